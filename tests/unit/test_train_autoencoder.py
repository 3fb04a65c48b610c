"""The autoencoder trainer's parts: its step (loss falls, the discriminator
waits for disc_start, one compiled function for both phases), PSNR, the
discriminator, the run format's refusals. Whole runs:
tests/e2e/test_train_autoencoder_runs.py."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsd import config_checks
from jaxsd.autoencoder import training as at
from jaxsd.checkpointing import run_config

import helpers


def _images(n=8, size=16, seed=0):
  """Smooth random pictures in [-1, 1], [n, size, size, 1]."""
  rng = np.random.default_rng(seed)
  coarse = rng.uniform(-1, 1, (n, size // 4, size // 4, 1))
  return np.repeat(np.repeat(coarse, 4, axis=1), 4, axis=2).astype(np.float32)


@pytest.fixture(scope="module")
def stepper(tiny_config):
  """(setup, jitted undonated step, initial state) of a one-level
  autoencoder with the discriminator from step 4."""
  config = helpers.small_autoencoder(tiny_config(), image_size=16)
  a = config.autoencoder
  a.block_out_channels = (8,)
  a.mid_block_add_attention = False
  a.disc_layers = 1
  a.disc_start = 4
  config.training.num_steps = 100  # the learning rate is > 0 at step 4
  setup = at.AutoencoderSetup(config)
  return (setup, setup.make_train_step(donate=False),
          setup.create_train_state(jax.random.key(0)))


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
  assert helpers.same_leaves(disc_params[3], initial_disc)
  assert not helpers.same_leaves(disc_params[4], initial_disc)
  assert not helpers.same_leaves(disc_params[5], disc_params[4])
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
  run_config.save_config(tiny_config(), str(diffusion))
  for workdir in (empty, diffusion, tmp_path / "missing"):
    assert not at.is_autoencoder_run(str(workdir))
    with pytest.raises((ValueError, FileNotFoundError),
                       match="jaxsd-train-autoencoder") as e:
      at.load_run(str(workdir))
    assert str(workdir) in str(e.value)
  with pytest.raises(ValueError, match="diffusion"):
    at.load_run(str(diffusion))


def test_bad_reconstruction_loss_is_refused(tiny_config):
  config = helpers.small_autoencoder(tiny_config())
  config.autoencoder.reconstruction_loss = "l3"
  with pytest.raises(ValueError, match="reconstruction_loss"):
    config_checks.validate_autoencoder(config)
