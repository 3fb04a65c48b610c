"""Optimiser, EMA, weight-decay mask and the jitted train step.

The step is generic in its UNet and text encoder, so most checks use a toy
denoiser that compiles in a second; the end-to-end tests run the real UNet.
"""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jaxsd.text import encoder as text_lib
from jaxsd.training import state as ts
from jaxsd.diffusion import step as step_lib
from jaxsd.diffusion import schedules


class ToyUNet(nn.Module):
  @nn.compact
  def __call__(self, x, t, context):
    h = nn.Conv(8, (3, 3))(x)
    h = h + nn.Dense(8)(context.mean(1))[:, None, None, :]
    h = h + nn.Embed(100, 8)(t)[:, None, None, :]
    h = nn.GroupNorm(num_groups=4)(nn.silu(h))
    return nn.Conv(x.shape[-1], (3, 3))(h)


class ToyText(nn.Module):
  @nn.compact
  def __call__(self, ids):
    return nn.LayerNorm()(nn.Embed(50, 6)(ids))


def _config(**optim):
  config = ml_collections.ConfigDict({
      "diffusion": {"prediction_type": "epsilon", "min_snr_gamma": 0.0,
                    "cfg_dropout": 0.2, "timestep_sampling": "uniform",
                    "logit_mean": 0.0, "logit_std": 1.0},
      "text": {"trainable": True},
      "optim": {"learning_rate": 3e-2, "warmup_steps": 2,
                "end_learning_rate_factor": 0.0, "b1": 0.9, "b2": 0.999,
                "eps": 1e-8, "weight_decay": 1e-2, "grad_clip_norm": 1.0,
                "ema_decay": 0.9, "grad_accum_steps": 1}})
  config.optim.update(optim)
  return config


@functools.lru_cache(maxsize=None)
def _toy_params():
  """The toy models' initial parameters, initialised once (immutable)."""
  rng = jax.random.key(0)
  return {
      "unet": jax.jit(ToyUNet().init)(rng, jnp.zeros((1, 8, 8, 1)),
                                      jnp.zeros((1,), jnp.int32),
                                      jnp.zeros((1, 4, 6)))["params"],
      "text": jax.jit(ToyText().init)(rng, jnp.zeros((1, 4), jnp.int32)
                                      )["params"]}


def _setup(config, num_steps=50, steps_per_call=1):
  unet, txt = ToyUNet(), ToyText()
  params = _toy_params()
  tx = ts.make_optimizer(config.optim, num_steps, config.text.trainable)
  fn = step_lib.make_step_fn(
      unet_apply=lambda p, x, t, c: unet.apply({"params": p}, x, t, c),
      text_apply=lambda p, ids: txt.apply({"params": p}, ids),
      schedule=schedules.make_schedule("linear", 100),
      uncond_ids=np.zeros((1, 4), np.int32), config=config, tx=tx,
      steps_per_call=steps_per_call)
  return ts.create(params, tx), jax.jit(fn), tx


def _batch(n=8, seed=0):
  rng = np.random.default_rng(seed)
  return {"image": rng.uniform(-1, 1, (n, 8, 8, 1)).astype(np.float32),
          "input_ids": rng.integers(1, 50, (n, 4)).astype(np.int32)}


def _leaves_close(a, b, **kw):
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_allclose(x, y, **kw)


def test_weight_decay_mask_on_real_parameter_trees(tiny_config):
  encoder = text_lib.TextEncoder(tiny_config().text, 49408)
  params = {"text": jax.eval_shape(encoder.init, jax.random.key(0)),
            "unet": {"conv": {"kernel": jnp.ones((3, 3, 1, 4)),
                              "bias": jnp.ones(4)},
                     "norm": {"scale": jnp.ones(4), "bias": jnp.ones(4)}}}
  mask = ts.weight_decay_mask(params)
  flat = {jax.tree_util.keystr(p): v for p, v in
          jax.tree_util.tree_flatten_with_path(mask)[0]}
  embeddings = [k for k in flat if "embedding" in k]
  assert embeddings and not any(flat[k] for k in embeddings)
  assert not any(v for k, v in flat.items() if k.endswith("['bias']"))
  assert not any(v for k, v in flat.items() if k.endswith("['scale']"))
  kernels = [k for k in flat if k.endswith("['kernel']")]
  assert len(kernels) > 4 and all(flat[k] for k in kernels)


def test_parameter_init_is_a_program_of_the_model_alone(tiny_config):
  """TrainSetup.create_train_state draws the parameters in a program of
  their own (param_init), then makes the EMA and optimiser state from them:
  configs that differ only in the optimiser lower the same initialisation,
  so the compilation cache serves the second run its threefry draws (most
  of the init's compile: 10 of 11 s for the tiny config on 2 cores)."""
  from jaxsd.diffusion import setup as build  # pylint: disable=g-import-not-at-top
  texts = set()
  for overrides in ({}, {"optim.optimizer": "adafactor",
                        "optim.ema_decay": 0.9}):
    config = tiny_config()
    config.update_from_flattened_dict(overrides)
    setup = build.TrainSetup(config)
    lowered = setup.param_init().lower(jax.random.key(0))
    texts.add(lowered.as_text())
    assert (jax.tree_util.tree_structure(lowered.out_info)
            == jax.tree_util.tree_structure(setup.abstract_state.params))
  assert len(texts) == 1


def test_weight_decay_only_shrinks_kernels():
  config = _config(learning_rate=0.1, weight_decay=0.5, warmup_steps=0)
  tx = ts.make_optimizer(config.optim, 10)
  params = {"dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}}
  zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
  updates, _ = tx.update(zeros, tx.init(params), params)
  assert np.all(updates["dense"]["kernel"] < 0)  # decayed towards 0
  np.testing.assert_array_equal(updates["dense"]["bias"], 0.0)


def test_learning_rate_warmup_then_cosine():
  config = _config(learning_rate=1.0, warmup_steps=10)
  lr = ts.learning_rate_schedule(config.optim, 110)
  np.testing.assert_allclose([lr(0), lr(5), lr(10), lr(60), lr(110)],
                             [0.0, 0.5, 1.0, 0.5, 0.0], atol=1e-6)


def test_ema_update_formula():
  params = {"w": jnp.array([1.0, 2.0])}
  ema = {"w": jnp.array([0.0, 0.0])}
  out = ts.update_ema(ema, params, 0.75)
  np.testing.assert_allclose(out["w"], [0.25, 0.5])
  np.testing.assert_allclose(ts.ema_decay_at(0, 0.999), 0.1)
  np.testing.assert_allclose(ts.ema_decay_at(10**6, 0.999), 0.999)


def test_train_step_updates_ema_and_lowers_loss():
  config = _config()
  state, step, _ = _setup(config)
  batch = _batch()
  # A fixed evaluation of the loss: same noise every time.
  fixed = step_lib.add_noise_inputs(batch, jax.random.key(42),
                                    num_timesteps=100, cfg_dropout=0.0)
  @jax.jit
  def eval_loss(params):
    unet, txt = ToyUNet(), ToyText()
    ctx = txt.apply({"params": params["text"]}, fixed["input_ids"])
    x_t = schedules.make_schedule("linear", 100).add_noise(
        fixed["image"], fixed["noise"], fixed["t"])
    out = unet.apply({"params": params["unet"]}, x_t, fixed["t"], ctx)
    return jnp.mean((out - fixed["noise"])**2)
  before = eval_loss(state.params)
  prev_params = state.params
  state, metrics = step(state, batch, jax.random.key(1))
  assert int(state.step) == 1 and np.isfinite(metrics["loss"])
  # EMA: decay_at(0) = 0.1 of the old (= initial) params.
  expected = ts.update_ema(prev_params, state.params, ts.ema_decay_at(0, 0.9))
  _leaves_close(state.ema_params, expected, rtol=1e-5, atol=1e-7)
  for _ in range(30):
    state, metrics = step(state, batch, jax.random.key(1))
  assert float(eval_loss(state.params)) < 0.7 * float(before)


def test_gradient_accumulation_matches_full_batch():
  batch = _batch(8)
  s1, step1, _ = _setup(_config(grad_accum_steps=1))
  s2, step2, _ = _setup(_config(grad_accum_steps=4))
  for _ in range(3):
    s1, m1 = step1(s1, batch, jax.random.key(5))
    s2, m2 = step2(s2, batch, jax.random.key(5))
  np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-5)
  _leaves_close(s1.params, s2.params, rtol=1e-4, atol=1e-6)


def test_steps_per_call_matches_single_steps():
  batches = [_batch(8, seed=i) for i in range(3)]
  s1, step1, _ = _setup(_config())
  for b in batches:
    s1, _ = step1(s1, b, jax.random.key(5))
  s3, step3, _ = _setup(_config(), steps_per_call=3)
  stacked = {k: np.stack([b[k] for b in batches]) for k in batches[0]}
  s3, metrics = step3(s3, stacked, jax.random.key(5))
  assert metrics["loss"].shape == (3,) and int(s3.step) == 3
  _leaves_close(s1.params, s3.params, rtol=1e-5, atol=1e-6)


def test_frozen_text_encoder_stays_fixed():
  config = _config()
  config.text.trainable = False
  state, step, _ = _setup(config)
  text_before = state.params["text"]
  unet_before = state.params["unet"]
  for _ in range(2):  # the first step has learning rate 0 (warmup)
    state, _ = step(state, _batch(), jax.random.key(1))
  _leaves_close(state.params["text"], text_before, rtol=0, atol=0)
  changed = [not np.allclose(a, b) for a, b in zip(
      jax.tree_util.tree_leaves(state.params["unet"]),
      jax.tree_util.tree_leaves(unet_before))]
  assert any(changed)


def test_cfg_dropout_draws_the_configured_share():
  batch = _batch(4000)
  out = step_lib.add_noise_inputs(batch, jax.random.key(0), num_timesteps=100,
                                  cfg_dropout=0.25)
  assert out["noise"].shape == batch["image"].shape
  assert out["t"].min() >= 0 and out["t"].max() < 100
  assert abs(float(out["drop"].mean()) - 0.25) < 0.03


def test_cfg_dropout_swaps_in_the_empty_prompt_inside_the_loss():
  """Dropped examples are encoded from the empty prompt's tokens: the text
  encoder sees uncond_ids in their rows and the captions elsewhere."""
  seen = []

  def text_apply(params, ids):
    seen.append(ids)
    return params["embed"][ids]

  def unet_apply(params, x, t, context):
    del t
    return x * params["scale"] + context.mean((1, 2))[:, None, None, None]

  uncond = np.full((1, 4), 7, np.int32)
  params = {"unet": {"scale": jnp.ones(())},
            "text": {"embed": jnp.arange(50.0)[:, None] * jnp.ones((1, 3))}}
  batch = step_lib.add_noise_inputs(_batch(6), jax.random.key(0),
                                    num_timesteps=100, cfg_dropout=0.0)
  drop = np.array([True, False, True, False, False, True])
  loss = functools.partial(
      step_lib.loss_fn, unet_apply=unet_apply, text_apply=text_apply,
      schedule=schedules.make_schedule("linear", 100),
      uncond_ids=jnp.asarray(uncond), prediction_type="epsilon",
      min_snr_gamma=0.0, text_trainable=True)
  dropped = loss(params, {**batch, "drop": jnp.asarray(drop)})
  ids = np.asarray(seen[-1])
  np.testing.assert_array_equal(ids[drop], np.repeat(uncond, 3, 0))
  np.testing.assert_array_equal(ids[~drop], batch["input_ids"][~drop])
  # Same as handing the loss the empty prompt's tokens with no dropout.
  swapped = np.where(drop[:, None], uncond, batch["input_ids"])
  by_hand = loss(params, {**batch, "input_ids": jnp.asarray(swapped),
                          "drop": jnp.zeros(6, bool)})
  kept = loss(params, {**batch, "drop": jnp.zeros(6, bool)})
  np.testing.assert_allclose(dropped, by_hand, rtol=1e-6)
  assert abs(float(dropped) - float(kept)) > 1e-3


def test_logit_normal_timesteps_concentrate_in_the_middle():
  rng = jax.random.key(3)
  uniform = np.asarray(step_lib.sample_timesteps(rng, 20000, 1000))
  logit = np.asarray(step_lib.sample_timesteps(rng, 20000, 1000,
                                               "logit_normal"))
  shifted = np.asarray(step_lib.sample_timesteps(rng, 20000, 1000,
                                                 "logit_normal", 1.0, 1.0))
  for t in (uniform, logit, shifted):
    assert t.dtype == np.int32 and t.min() >= 0 and t.max() <= 999
  ends = lambda t: np.mean((t < 100) | (t >= 900))
  assert abs(ends(uniform) - 0.2) < 0.02
  # P(|N(0,1)| > logit(0.9) = 2.197) = 0.028.
  assert abs(ends(logit) - 0.028) < 0.01
  assert abs(np.median(logit) - 500) < 15
  # Median of sigmoid(N(1, 1)) is sigmoid(1) = 0.731.
  assert abs(np.median(shifted) - 731) < 15
  with pytest.raises(ValueError, match="logit_normal"):
    step_lib.sample_timesteps(rng, 4, 1000, "beta")
