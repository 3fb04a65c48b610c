"""eval/val_loss: the training loss on held-out examples at fixed timesteps
and noise, through the evaluator, with no pretrained weights.

The tiny config's real UNet on MNIST's test split; one TrainSetup and
fresh initial weights, shared by the module (tests only read them).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsd import config_checks
from jaxsd.diffusion import generate
from jaxsd.diffusion import setup as build
from jaxsd.errors import ConfigError
from jaxsd.evaluation import evaluator as evaluator_lib
from jaxsd.evaluation.metrics import val_loss
from jaxsd.text import encoder as text_lib

import helpers

EXAMPLES = 12  # two chunks of 8: the second padded
BINS = 5


def _val_config(tiny_config):
  return helpers.val_loss_config(tiny_config(), EXAMPLES, BINS)


@pytest.fixture(scope="module")
def model(tiny_config):
  """(config, setup, generator, initial params)."""
  config = _val_config(tiny_config)
  setup = build.TrainSetup(config)
  state = setup.create_train_state(jax.random.key(0))
  generator = generate.Generator.from_config(setup.components, setup.mesh,
                                             config.sampling)
  return config, setup, generator, state


def _evaluate(config, generator, params, rng_seed=0):
  evaluator = evaluator_lib.Evaluator(config).prepare()
  return evaluator_lib.evaluate_params(evaluator, generator, params,
                                       jax.random.key(rng_seed))


def test_bins_are_the_centres_of_equal_parts_of_the_schedule():
  np.testing.assert_array_equal(val_loss.bin_timesteps(1000, 5),
                                [100, 300, 500, 700, 900])
  np.testing.assert_array_equal(val_loss.bin_timesteps(100, 1), [50])
  assert val_loss.bin_name(100, 1000) == "val_loss/t_100"
  assert val_loss.bin_name(5, 1000) == "val_loss/t_005"


def test_val_loss_needs_no_samples():
  metric = val_loss.ValidationLoss()
  assert not metric.needs_samples


@pytest.mark.mnist
def test_val_loss_runs_through_the_evaluator_without_sampling(model):
  config, _, generator, state = model
  out = _evaluate(config, generator, state.ema_params)
  names = [val_loss.bin_name(int(t), config.diffusion.num_timesteps)
           for t in val_loss.bin_timesteps(config.diffusion.num_timesteps,
                                           BINS)]
  assert set(out) == {"val_loss", *names, "seconds/val_loss", "seconds"}
  assert "sampling_seconds" not in out  # no metric needed samples
  assert np.isfinite(out["val_loss"]) and out["val_loss"] > 0
  # the bins weigh equally: their mean is the headline
  assert np.mean([out[n] for n in names]) == pytest.approx(out["val_loss"],
                                                           rel=1e-12)


@pytest.mark.mnist
def test_same_params_same_number_in_another_evaluator(model):
  """Identical at every evaluation and in another run's evaluator (the
  noise is fixed, not the run's; the sampling key does not enter)."""
  config, _, generator, state = model
  evaluator = evaluator_lib.Evaluator(config).prepare()
  first = evaluator_lib.evaluate_params(evaluator, generator,
                                        state.ema_params, jax.random.key(0))
  again = evaluator_lib.evaluate_params(evaluator, generator,
                                        state.ema_params, jax.random.key(7))
  other_run = _evaluate(config, generator, state.ema_params, rng_seed=3)
  for out in (again, other_run):
    assert {k: v for k, v in out.items() if "seconds" not in k} == {
        k: v for k, v in first.items() if "seconds" not in k}


@pytest.mark.mnist
def test_val_loss_is_the_velocity_mse_on_the_held_out_examples(model):
  """An independent computation of one bin: the UNet's prediction on
  x_t = sqrt(ab) x0 + sqrt(1 - ab) noise for the first EXAMPLES test digits
  with their captions and the fixed noise, against the velocity
  v = sqrt(ab) noise - sqrt(1 - ab) x0 (MNIST's prediction type), numpy's
  mean squared error."""
  config, setup, generator, state = model
  assert config.diffusion.prediction_type == "v_prediction"
  out = _evaluate(config, generator, state.ema_params)
  comps = setup.components
  evaluator = evaluator_lib.Evaluator(config)
  images, captions = evaluator.context.held_out_examples(EXAMPLES)
  assert images.shape[0] == EXAMPLES
  noise = np.asarray(jax.random.normal(
      jax.random.fold_in(jax.random.key(val_loss.VAL_LOSS_SEED), 0),
      images.shape))
  ids = text_lib.tokenize(comps.tokenizer, captions, config.text.max_length)
  t = int(val_loss.bin_timesteps(config.diffusion.num_timesteps, BINS)[1])
  ab = float(comps.schedule.alphas_cumprod[t])
  x_t = np.sqrt(ab) * images + np.sqrt(1 - ab) * noise
  params = state.ema_params
  pred = jax.jit(lambda p, x, ids: comps.unet.apply(
      p["unet"], x, jnp.full((x.shape[0],), t, jnp.int32),
      comps.encode(p, ids)))(params, x_t, ids)
  v = np.sqrt(ab) * noise - np.sqrt(1 - ab) * images
  want = np.mean((np.asarray(pred, np.float64) - v) ** 2)
  got = out[val_loss.bin_name(t, config.diffusion.num_timesteps)]
  assert got == pytest.approx(want, rel=1e-4)


@pytest.mark.mnist
def test_other_params_give_another_val_loss(model):
  """The number follows the params it is given (a trained run's val_loss:
  tests/e2e/test_val_loss_run.py)."""
  config, _, generator, state = model
  before = _evaluate(config, generator, state.params)["val_loss"]
  leaves, tree = jax.tree_util.tree_flatten(state.params)
  rng = np.random.default_rng(0)
  moved = jax.tree_util.tree_unflatten(tree, [
      x + 0.01 * rng.standard_normal(x.shape).astype(np.float32)
      for x in leaves])
  after = _evaluate(config, generator, moved)["val_loss"]
  assert np.isfinite(after) and after != before


def test_evaluate_on_samples_leaves_val_loss_out(tiny_config):
  """Evaluator.evaluate scores samples; val_loss scores the model only
  (evaluate_model), so a config of only val_loss samples nothing."""
  config = tiny_config()
  config.eval.metrics = ("val_loss",)
  evaluator = evaluator_lib.Evaluator(config)
  assert not evaluator.needs_samples and evaluator.scores_model
  assert evaluator.evaluate(np.zeros((2, 28, 28, 1), np.float32),
                            ["a", "b"]) == {}


@pytest.mark.parametrize("key,value,fragment", [
    ("val_loss_examples", 0, ">= 1 (an integer)"),
    ("val_loss_timesteps", 101, "in [1, 100] (an integer)"),
])
def test_bad_val_loss_settings_are_refused(tiny_config, key, value,
                                           fragment):
  config = tiny_config()
  config.eval[key] = value
  with pytest.raises(ConfigError) as e:
    config_checks.validate(config)
  assert f"eval.{key}={value!r} must be {fragment}" in str(e.value)


def test_a_config_saved_before_val_loss_validates(tiny_config):
  config = tiny_config()
  with config.unlocked():
    del config.eval["val_loss_examples"]
    del config.eval["val_loss_timesteps"]
  config_checks.validate(config)
