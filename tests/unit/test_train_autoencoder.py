"""The autoencoder trainer: its step (loss falls, the discriminator waits for
disc_start, one compiled function for both phases), PSNR, the run format
(is_autoencoder_run / load_run) and, end to end on MNIST, a run that
checkpoints, resumes exactly after SIGTERM, logs eval/psnr and its grid to
MLflow, and stops on a non-finite loss keeping the last good checkpoint."""
import math
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsd.autoencoder import training as at
from jaxsd.tracking import mlflow_store
from jaxsd.training import trainer as train
from jaxsd.commands import train_autoencoder
from jaxsd.data import pipeline as data_pipeline


def _config(tiny_config, image_size=32):
  config = tiny_config()
  a = config.autoencoder
  a.block_out_channels = (8, 16)
  a.norm_num_groups = 4
  a.latent_channels = 4
  a.layers_per_block = 1
  a.disc_channels = 8
  a.disc_layers = 2
  a.eval_images = 8
  a.scaling_factor = 0.0  # measured
  config.data.image_size = image_size  # MNIST's 28x28 padded
  config.training.batch_size = 8
  config.eval.metrics = ()
  return config


def _images(n=8, size=16, seed=0):
  """Smooth random pictures in [-1, 1], [n, size, size, 1]."""
  rng = np.random.default_rng(seed)
  coarse = rng.uniform(-1, 1, (n, size // 4, size // 4, 1))
  return np.repeat(np.repeat(coarse, 4, axis=1), 4, axis=2).astype(np.float32)


@pytest.fixture(scope="module")
def stepper(tiny_config):
  """(setup, jitted undonated step, initial state) of a one-level
  autoencoder with the discriminator from step 4, compiled without most
  XLA optimisations (same numbers up to rounding, a compile several times
  faster)."""
  config = _config(tiny_config, image_size=16)
  a = config.autoencoder
  a.block_out_channels = (8,)
  a.mid_block_add_attention = False
  a.disc_layers = 1
  a.disc_start = 4
  config.training.num_steps = 100  # the learning rate is > 0 at step 4
  previous = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  setup = at.AutoencoderSetup(config)
  yield (setup, setup.make_train_step(donate=False),
         setup.create_train_state(jax.random.key(0)))
  jax.config.update("jax_disable_most_optimizations", previous)


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


def _same(a, b) -> bool:
  return all(np.array_equal(x, y) for x, y in zip(_leaves(a), _leaves(b)))


def test_step_lowers_loss_and_discriminator_waits_for_disc_start(stepper):
  setup, step, state = stepper
  batch = setup.global_batch({"image": _images()})
  rng = jax.random.key(1)
  initial_disc = state.params["discriminator"]
  losses, d_losses, disc_params = [], [], []
  for _ in range(6):
    state, metrics = step(state, batch, rng)
    losses.append(float(metrics["loss"]))
    d_losses.append(float(metrics["d_loss"]))
    disc_params.append(state.params["discriminator"])
  assert all(np.isfinite(losses))
  # Steps 0-3 (before disc_start) train only the autoencoder.
  assert losses[3] < losses[0]
  assert d_losses[:4] == [0.0] * 4 and d_losses[4] > 0
  assert _same(disc_params[3], initial_disc)
  assert not _same(disc_params[4], initial_disc)
  assert not _same(disc_params[5], disc_params[4])
  # Both phases ran through one compiled function.
  assert step._cache_size() == 1  # pylint: disable=protected-access


def test_generator_loss_counts_only_from_disc_start(stepper):
  setup, step, state = stepper
  batch = setup.global_batch({"image": _images(seed=3)})
  _, before = step(state, batch, jax.random.key(1))
  at_start = jax.device_put(jnp.int32(4), setup.replicated)
  _, after = step(state.replace(step=at_start), batch, jax.random.key(1))
  assert step._cache_size() == 1  # pylint: disable=protected-access
  assert float(before["g_loss"]) == 0.0
  assert float(after["g_loss"]) != 0.0
  # The total is its parts with their weights.
  assert math.isclose(
      float(after["loss"]) - float(after["rec_loss"]),
      setup.config.autoencoder.kl_weight * float(after["kl"])
      + setup.config.autoencoder.disc_weight * float(after["g_loss"]),
      rel_tol=1e-4, abs_tol=1e-6)


def test_psnr_closed_form():
  images = np.zeros((2, 4, 4, 1), np.float32)
  recon = np.stack([np.full((4, 4, 1), 0.1), np.full((4, 4, 1), 0.2)])
  # MSE 0.01 and 0.04 at peak-to-peak 2: 10 log10(4 / mse), averaged.
  expected = (10 * math.log10(400) + 10 * math.log10(100)) / 2
  assert math.isclose(at.psnr(images, recon), expected, rel_tol=1e-9)
  # Out-of-range reconstructions count as the saved (clipped) image.
  assert math.isclose(at.psnr(images + 1.0, np.full_like(images, 1.5)),
                      at.psnr(images + 1.0, images + 1.0))


def test_scaling_factor_is_inverse_std():
  means = np.random.default_rng(0).normal(0.0, 4.0, (64, 4, 4, 4))
  assert math.isclose(at.measure_scaling_factor(means), 1 / np.std(means))


def test_discriminator_is_a_patch_gan():
  disc = at.PatchDiscriminator(channels=8, num_layers=3)
  x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
  params = jax.eval_shape(disc.init, jax.random.key(0), x)["params"]
  logits = jax.eval_shape(lambda p, x: disc.apply({"params": p}, x), params,
                          x)
  # 32 -> 16 -> 8 -> 4 (stride 2), then two 4x4 stride-1 convs: 3, 2.
  assert logits.shape == (2, 2, 2, 1)
  assert params["conv_3"]["kernel"].shape[-1] == 8 * 8  # 8x cap


def test_not_an_autoencoder_run(tiny_config, tmp_path):
  empty = tmp_path / "empty"
  empty.mkdir()
  diffusion = tmp_path / "diffusion"
  diffusion.mkdir()
  train.save_config(tiny_config(), str(diffusion))
  for workdir in (empty, diffusion, tmp_path / "missing"):
    assert not at.is_autoencoder_run(str(workdir))
    with pytest.raises((ValueError, FileNotFoundError),
                       match=r"python -m jaxsd\.train_autoencoder") as e:
      at.load_run(str(workdir))
    assert str(workdir) in str(e.value)
  with pytest.raises(ValueError, match="diffusion"):
    at.load_run(str(diffusion))


def test_bad_reconstruction_loss_is_refused(tiny_config):
  config = _config(tiny_config)
  config.autoencoder.reconstruction_loss = "l3"
  with pytest.raises(ValueError, match="reconstruction_loss"):
    at.check_config(config)


# --- End to end on MNIST ------------------------------------------------------


def _run(config, workdir, monkeypatch=None, sigterm_at=None):
  if sigterm_at is not None:
    reached = train._Preemption.reached  # pylint: disable=protected-access

    def patched(self, step):
      if step == sigterm_at:
        os.kill(os.getpid(), signal.SIGTERM)
      return reached(self, step)
    monkeypatch.setattr(train._Preemption, "reached", patched)  # pylint: disable=protected-access
  return train_autoencoder.train_autoencoder(config, str(workdir))


def _mlflow_run(workdir):
  from mlflow.tracking import MlflowClient  # pylint: disable=g-import-not-at-top
  client = MlflowClient(tracking_uri=mlflow_store.tracking_uri(workdir))
  (run,) = client.search_runs(
      [client.get_experiment_by_name("jaxsd").experiment_id])
  return client, run


def _e2e_config(tiny_config):
  config = _config(tiny_config)
  # The resume at step 2 crosses the discriminator's switch-on.
  config.autoencoder.disc_start = 2
  return config


@pytest.mark.slow
@pytest.mark.mnist
def test_trains_checkpoints_resumes_and_loads(tiny_config, tmp_path,
                                              monkeypatch):
  monkeypatch.setenv("JAXSD_OFFLINE", "1")  # no download try for rFID
  whole = _run(_e2e_config(tiny_config), tmp_path / "whole")
  workdir = tmp_path / "whole"
  assert int(whole.step) == 4
  assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4"]
  assert (workdir / "samples" / "recon_step_00000004.png").exists()
  client, run = _mlflow_run(workdir)
  assert run.info.status == "FINISHED"
  psnr = run.data.metrics["eval/psnr"]
  assert np.isfinite(psnr) and psnr > 0
  assert "eval/rfid" not in run.data.metrics  # no Inception weights offline
  assert "train/d_loss" in run.data.metrics
  assert [a.path for a in client.list_artifacts(run.info.run_id)
          if a.path == "reconstructions"] == ["reconstructions"]

  # load_run: the measured scaling factor and params reproducing eval/psnr.
  assert at.is_autoencoder_run(str(workdir))
  ae_config, params, step = at.load_run(str(workdir))
  assert step == 4
  assert ae_config.scaling_factor == pytest.approx(
      run.data.metrics["autoencoder/scaling_factor"], rel=1e-6)
  assert ae_config.scaling_factor > 0 and ae_config.in_channels == 1
  config = _e2e_config(tiny_config)
  heldout = data_pipeline.preview(
      config, data_pipeline.make_source(config, config.eval.reference_split),
      config.autoencoder.eval_images)[0]
  reconstruct = at.make_reconstruct_fn(at.ae_lib.AutoencoderKL(ae_config))
  recon, _ = reconstruct(params, heldout)
  assert at.psnr(heldout, recon) == pytest.approx(psnr, abs=1e-4)
  _, params_2, _ = at.load_run(str(workdir), step=2)
  assert not _same(params_2, params)

  # SIGTERM at step 2 checkpoints and stops; the restart ends as `whole`.
  stopped = _run(_e2e_config(tiny_config), tmp_path / "resumed", monkeypatch,
                 sigterm_at=2)
  assert int(stopped.step) == 2
  assert _mlflow_run(tmp_path / "resumed")[1].info.status == "KILLED"
  monkeypatch.undo()
  monkeypatch.setenv("JAXSD_OFFLINE", "1")
  resumed = _run(_e2e_config(tiny_config), tmp_path / "resumed")
  assert int(resumed.step) == 4
  for a, b in zip(_leaves(resumed.params), _leaves(whole.params)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.slow
@pytest.mark.mnist
def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(
    tiny_config, tmp_path, monkeypatch):
  monkeypatch.setenv("JAXSD_OFFLINE", "1")
  real = at.AutoencoderSetup.global_batch
  calls = []

  def poisoned(self, local_batch):
    calls.append(1)
    if len(calls) == 3:  # the batch of step 3
      local_batch = {"image": np.full_like(local_batch["image"], np.nan)}
    return real(self, local_batch)
  monkeypatch.setattr(at.AutoencoderSetup, "global_batch", poisoned)
  workdir = tmp_path / "nan"
  with pytest.raises(train.NonFiniteLossError, match="step 3"):
    _run(_e2e_config(tiny_config), workdir)
  assert sorted(os.listdir(workdir / "checkpoints")) == ["2"]
  assert _mlflow_run(workdir)[1].info.status == "FAILED"
  assert at.load_run(str(workdir))[2] == 2
