"""A training run logs eval/val_loss and jaxsd-evaluate reproduces it; a
latent run's val_loss against its closed form (a latent TrainSetup and its
evaluation: slow). The rest: tests/unit/test_val_loss.py."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsd.diffusion import generate
from jaxsd.diffusion import setup as build
from jaxsd.evaluation import evaluator as evaluator_lib
from jaxsd.evaluation.metrics import val_loss
from jaxsd.text import encoder as text_lib

import helpers

EXAMPLES = 12  # two chunks of 8: the second padded
BINS = 5


@pytest.mark.mnist
def test_training_logs_val_loss_and_jaxsd_evaluate_reproduces_it(
    tiny_config, tmp_path):
  """The trainer's Evaluate chore logs eval/val_loss (and its bins); the
  checkpoint's evaluation by jaxsd-evaluate's library gives the same
  numbers."""
  from mlflow.tracking import MlflowClient  # pylint: disable=g-import-not-at-top
  from jaxsd.diffusion import task as diffusion_task  # pylint: disable=g-import-not-at-top
  from jaxsd.evaluation import checkpoints as eval_checkpoints  # pylint: disable=g-import-not-at-top
  from jaxsd.tracking import mlflow_store  # pylint: disable=g-import-not-at-top
  config = helpers.val_loss_config(tiny_config(), bins=BINS)
  config.training.update(num_steps=2, eval_every=2, checkpoint_every=2)
  workdir = str(tmp_path)
  diffusion_task.train_and_evaluate(config, workdir)
  client = MlflowClient(tracking_uri=mlflow_store.tracking_uri(workdir))
  run, = client.search_runs(
      [client.get_experiment_by_name("jaxsd").experiment_id])
  logged = {k[len("eval/"):]: v for k, v in run.data.metrics.items()
            if k.startswith("eval/val_loss")}
  assert len(logged) == 1 + BINS
  result, = eval_checkpoints.evaluate_checkpoints(workdir, [2])
  assert result["step"] == 2
  for name, value in logged.items():
    assert result[name] == pytest.approx(value, rel=1e-6), name


@pytest.mark.mnist
def test_latent_val_loss_scores_the_encoded_held_out_examples(tiny_config,
                                                              tmp_path):
  """A latent run: the examples are encoded by the frozen autoencoder and
  the posterior drawn with the fixed key, in the scaled space."""
  config = helpers.val_loss_config(tiny_config(), EXAMPLES, BINS)
  config = helpers.latent_config(config, helpers.write_vae(
      str(tmp_path / "vae")))  # latents 14x14x4
  setup = build.TrainSetup(config)
  params = setup.create_train_state(jax.random.key(0)).ema_params
  generator = generate.Generator.from_config(setup.components, setup.mesh,
                                             config.sampling)
  evaluator = evaluator_lib.Evaluator(config).prepare()
  out = evaluator_lib.evaluate_params(evaluator, generator, params,
                                      jax.random.key(0))
  assert np.isfinite(out["val_loss"])
  # (Fixed posterior draws: the closed form below uses the fixed key.)

  comps = setup.components
  images, captions = evaluator_lib.Evaluator(config).context \
      .held_out_examples(EXAMPLES)
  mean, logvar = jax.jit(comps.autoencoder.encode)(comps.autoencoder_params,
                                                   images)
  key = jax.random.key(val_loss.VAL_LOSS_SEED)
  z = np.asarray(mean) + np.exp(0.5 * np.asarray(logvar)) * np.asarray(
      jax.random.normal(jax.random.fold_in(key, 1), mean.shape))
  ae = helpers.small_vae_config()
  x0 = (z - ae.shift_factor) * ae.scaling_factor
  assert x0.shape == (EXAMPLES, 14, 14, 4)
  noise = np.asarray(jax.random.normal(jax.random.fold_in(key, 0), x0.shape))
  ids = text_lib.tokenize(comps.tokenizer, captions, config.text.max_length)
  t = int(val_loss.bin_timesteps(config.diffusion.num_timesteps, BINS)[2])
  ab = float(comps.schedule.alphas_cumprod[t])
  pred = jax.jit(lambda p, x, ids: comps.unet.apply(
      p["unet"], x, jnp.full((x.shape[0],), t, jnp.int32),
      comps.encode(p, ids)))(params, np.sqrt(ab) * x0 + np.sqrt(1 - ab) * noise,
                             ids)
  v = np.sqrt(ab) * noise - np.sqrt(1 - ab) * x0
  want = np.mean((np.asarray(pred, np.float64) - v) ** 2)
  assert out[val_loss.bin_name(t, config.diffusion.num_timesteps)] == \
      pytest.approx(want, rel=1e-3)
