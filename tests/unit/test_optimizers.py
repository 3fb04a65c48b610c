"""The optimisers `optim.optimizer` / `optim.moment_dtype` select
(jaxsd/training/state.py), against optax's own as oracles."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from jaxsd.errors import ConfigError
from jaxsd.training import checks
from jaxsd.training import state as ts


def _optim(**overrides):
  optim = ml_collections.ConfigDict(dict(
      optimizer="adamw", moment_dtype="float32", learning_rate=1e-2,
      warmup_steps=0, end_learning_rate_factor=1.0, b1=0.9, b2=0.999,
      eps=1e-8, weight_decay=0.0, grad_clip_norm=0.0, ema_decay=0.0,
      grad_accum_steps=1))
  optim.update(overrides)
  return optim


def _problem(n_in=64, n_out=32):
  """A least-squares fit: {"dense": {"kernel" [n_in, n_out], "bias"
  [n_out]}}."""
  keys = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(keys[0], (256, n_in))
  target = x @ jax.random.normal(keys[1], (n_in, n_out)) + 1.0
  params = {"dense": {"kernel": 0.1 * jax.random.normal(keys[2],
                                                        (n_in, n_out)),
                      "bias": jnp.zeros((n_out,))}}
  loss = lambda p: jnp.mean(jnp.square(x @ p["dense"]["kernel"]
                                       + p["dense"]["bias"] - target))
  return params, loss


def _train(tx, steps):
  params, loss = _problem()

  @jax.jit
  def run(params):
    def step(carry, _):
      p, s = carry
      value, grads = jax.value_and_grad(loss)(p)
      updates, s = tx.update(grads, s, p)
      return (optax.apply_updates(p, updates), s), value
    (p, s), losses = jax.lax.scan(step, (params, tx.init(params)), None,
                                  length=steps)
    return p, s, losses
  return run(params)


def test_bfloat16_adamw_follows_float32_adamw():
  """Half the state, the same descent: after 300 steps the losses agree to
  a few percent and the second moment kept moving (stochastic rounding;
  round-to-nearest would freeze it at its first values)."""
  steps = 300
  _, ref_state, ref_losses = _train(
      optax.adamw(1e-2, weight_decay=0.0), steps)
  tx = ts.make_optimizer(_optim(moment_dtype="bfloat16"), steps)
  _, state, losses = _train(tx, steps)
  assert float(losses[-1]) < 0.05 * float(losses[0])  # it trains
  np.testing.assert_allclose(losses[::30], ref_losses[::30], rtol=0.05)
  nu = [x for x in jax.tree_util.tree_leaves(state)
        if x.dtype == jnp.bfloat16]
  assert nu, "moments are bfloat16"
  ref_nu = ref_state[0].nu["dense"]["kernel"]
  adam, = [x for x in jax.tree_util.tree_leaves(
      state, is_leaf=lambda x: isinstance(x, ts.ScaleByAdamBf16State))
             if isinstance(x, ts.ScaleByAdamBf16State)]
  got_nu = adam.nu["dense"]["kernel"].astype(jnp.float32)
  np.testing.assert_allclose(got_nu.mean(), ref_nu.mean(), rtol=0.05)


def test_stochastic_rounding_to_bfloat16_is_unbiased():
  """The second moment's rounding: each value goes to one of its two
  bfloat16 neighbours with probability by distance (mean = the value, to
  the binomial standard error), the same stream the same way, another
  stream another way."""
  x = jnp.full((256, 1024), 1.0 + 2.0**-10, jnp.float32)  # 1/8 of a step
  lo, hi = 1.0, 1.0 + 2.0**-7  # its bfloat16 neighbours
  rounded = ts._round_to_bfloat16(x, jnp.uint32(7)).astype(jnp.float32)
  assert set(np.unique(np.asarray(rounded))) == {lo, hi}
  up = float((rounded == hi).mean())
  assert abs(up - 0.125) < 4 * np.sqrt(0.125 * 0.875 / x.size), up
  np.testing.assert_array_equal(
      rounded, ts._round_to_bfloat16(x, jnp.uint32(7)).astype(jnp.float32))
  other = ts._round_to_bfloat16(x, jnp.uint32(8)).astype(jnp.float32)
  assert 0.15 < float((other != rounded).mean()) < 0.30  # ~2 * p * (1 - p)
  # Neighbouring rows are not copies of each other (the index is hashed).
  assert float((rounded[0] != rounded[1]).mean()) > 0.15


def test_adafactor_is_optax_adafactor_without_parameter_scaling():
  """With weight decay 0, jaxsd's Adafactor is optax.adafactor with
  multiply_by_parameter_scale=False (AdamW's meaning of learning_rate)."""
  tx = ts.make_optimizer(_optim(optimizer="adafactor"), 50)
  ref = optax.adafactor(1e-2, multiply_by_parameter_scale=False)
  got, _, _ = _train(tx, 50)
  expected, _, _ = _train(ref, 50)
  for g, e in zip(jax.tree_util.tree_leaves(got),
                  jax.tree_util.tree_leaves(expected)):
    np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-6)


def test_adafactor_decays_weights_by_learning_rate_times_decay():
  """Decoupled decay as AdamW's: a zero gradient moves a kernel by
  -lr * weight_decay * kernel."""
  tx = ts.make_optimizer(_optim(optimizer="adafactor", weight_decay=0.1),
                         10)
  params = {"kernel": jnp.full((4, 4), 2.0)}
  updates, _ = tx.update({"kernel": jnp.zeros((4, 4))}, tx.init(params),
                         params)
  np.testing.assert_allclose(updates["kernel"], -1e-2 * 0.1 * 2.0,
                             rtol=1e-6)


@pytest.mark.parametrize("optimizer,moments,low,high", [
    ("adamw", "float32", 8.0, 8.01),
    ("adamw", "bfloat16", 4.0, 4.01),
    ("adafactor", "float32", 0.0, 0.2),
])
def test_state_bytes_per_parameter(optimizer, moments, low, high):
  params = {"kernel": jnp.zeros((512, 256)), "bias": jnp.zeros((256,))}
  tx = ts.make_optimizer(_optim(optimizer=optimizer, moment_dtype=moments),
                         10)
  per_param = ts.state_bytes_per_param(tx.init(params), params)
  assert low <= per_param <= high


@pytest.mark.parametrize("overrides,match", [
    (dict(optimizer="sgd"), "optim.optimizer='sgd'"),
    (dict(moment_dtype="float16"), "optim.moment_dtype='float16'"),
    (dict(optimizer="adafactor", moment_dtype="bfloat16"),
     "applies to AdamW"),
])
def test_config_checks_name_the_field(overrides, match):
  config = ml_collections.ConfigDict(dict(
      optim=_optim(**overrides),
      training=dict(batch_size=4)))
  with pytest.raises(ConfigError, match=match):
    checks.check_optim(config)


@pytest.mark.parametrize("optimizer,moments", [("adamw", "bfloat16"),
                                               ("adafactor", "float32")])
def test_state_checkpoints_and_resumes_exactly(optimizer, moments, tmp_path):
  """The state saved at step 3 restores with its dtypes and structure (into
  the shapes a fresh `tx.init` gives, as a resumed run's TrainSetup does),
  and steps 4-6 from it equal the uninterrupted run's bit for bit.
  tests/e2e/test_optimizer_runs.py runs the same through the trainer."""
  from jaxsd.checkpointing import checkpoints as checkpoint  # pylint: disable=g-import-not-at-top
  # [128, 160]: Adafactor factors kernels of 128+ rows and columns.
  params, loss = _problem(128, 160)
  tx = ts.make_optimizer(_optim(optimizer=optimizer, moment_dtype=moments,
                                weight_decay=0.01), 6)

  @jax.jit
  def step(state):
    grads = jax.grad(loss)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    return state.replace(step=state.step + 1, opt_state=opt_state,
                         params=optax.apply_updates(state.params, updates))

  def run(state, steps):
    for _ in range(steps):
      state = step(state)
    return state

  at_3 = run(ts.create(params, tx), 3)
  uninterrupted = run(at_3, 3)
  mngr = checkpoint.manager(str(tmp_path), keep=1)
  checkpoint.save(mngr, 3, at_3, {"step": 3})
  mngr.wait_until_finished()
  abstract = jax.eval_shape(lambda: ts.create(params, tx))
  restored, _, _ = checkpoint.restore(mngr, abstract)
  mngr.close()
  same_tree = jax.tree_util.tree_structure
  assert same_tree(restored.opt_state) == same_tree(at_3.opt_state)
  for a, b in zip(jax.tree_util.tree_leaves(restored),
                  jax.tree_util.tree_leaves(at_3)):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(a, b)
  if moments == "bfloat16":
    assert {x.dtype for x in jax.tree_util.tree_leaves(restored.opt_state)
            if x.ndim} == {jnp.dtype(jnp.bfloat16)}
  else:  # factored: a row and a column vector for the kernel, not [128, 160]
    assert all(x.size < 128 * 160 for x in
               jax.tree_util.tree_leaves(restored.opt_state))
  resumed = run(restored, 3)
  assert not np.array_equal(resumed.params["dense"]["kernel"],
                            at_3.params["dense"]["kernel"])  # it trained
  for a, b in zip(jax.tree_util.tree_leaves(resumed),
                  jax.tree_util.tree_leaves(uninterrupted)):
    np.testing.assert_array_equal(a, b)
