"""Latent diffusion: a frozen autoencoder (a diffusers-layout vae/ folder the
test writes) under the UNet. The step draws from the posterior in the
autoencoder's scaled space (closed form); stored text embeddings train the
loss of their token ids; bad autoencoders are clear errors. Caches and runs:
tests/e2e/test_latent_runs.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsd.diffusion import setup as build
from jaxsd.diffusion import step as step_lib
from jaxsd.models import autoencoder as ae_lib

import helpers

AE = helpers.small_vae_config()


@pytest.fixture(scope="module")
def vae(tmp_path_factory):
  return helpers.write_vae(str(tmp_path_factory.mktemp("vae")))


def _latent_config(tiny_config, vae):
  return helpers.latent_config(tiny_config(), vae)

def test_components_denoise_latents_and_decode_to_pixels(tiny_config, vae):
  comps = build.build_components(_latent_config(tiny_config, vae))
  assert comps.image_shape == (14, 14, 4)
  assert comps.pixel_shape == (28, 28, 1)
  x = jax.random.normal(jax.random.key(0), (2, 14, 14, 4))
  images = comps.decode(comps.autoencoder_params, x)
  assert images.shape == (2, 28, 28, 1)
  assert float(jnp.max(jnp.abs(images))) <= 1.0
  # decode works in the scaled space: z = x / scale + shift.
  module = comps.autoencoder.module
  raw = module.apply({"params": comps.autoencoder_params},
                     x / AE.scaling_factor + AE.shift_factor,
                     method=module.decode)
  np.testing.assert_allclose(images, jnp.clip(raw, -1, 1), atol=1e-6)


def test_step_draws_from_the_posterior_in_the_scaled_space():
  mean = jnp.full((2, 3, 3, 4), 0.5)
  logvar = jnp.full((2, 3, 3, 4), -2.0)
  rng = jax.random.key(3)
  out = step_lib.add_noise_inputs(
      {"latent_mean": mean, "latent_logvar": logvar,
       "input_ids": jnp.zeros((2, 4), jnp.int32)}, rng, num_timesteps=10,
      cfg_dropout=0.0, latent_scale=0.7, latent_shift=0.1)
  rng_rest, rng_posterior = jax.random.split(rng)
  eps = jax.random.normal(rng_posterior, mean.shape)
  np.testing.assert_allclose(
      out["image"], (0.5 + np.exp(-1.0) * eps - 0.1) * 0.7, rtol=1e-6)
  assert "latent_mean" not in out
  # The rest of the randomness comes from the remaining key, as in pixel runs.
  pixel = step_lib.add_noise_inputs(
      {"image": out["image"], "input_ids": out["input_ids"]}, rng_rest,
      num_timesteps=10, cfg_dropout=0.0)
  np.testing.assert_array_equal(out["noise"], pixel["noise"])
  np.testing.assert_array_equal(out["t"], pixel["t"])


def test_bad_autoencoders_are_clear_errors(tiny_config, vae, tmp_path):
  config = _latent_config(tiny_config, vae)
  config.model.in_channels = config.model.out_channels = 1
  with pytest.raises(ValueError, match=r"latent_channels=4.*in_channels=1"):
    build.build_components(config)
  config = _latent_config(tiny_config, str(tmp_path / "nowhere"))
  with pytest.raises(FileNotFoundError, match="nowhere.*does not exist"):
    build.build_components(config)
  (tmp_path / "empty").mkdir()
  config = _latent_config(tiny_config, str(tmp_path / "empty"))
  with pytest.raises(ValueError, match="neither a diffusers AutoencoderKL"):
    build.build_components(config)
  config = _latent_config(tiny_config, vae)
  config.data.image_size = 27
  with pytest.raises(ValueError, match="image_size=27 does not divide"):
    build.build_components(config)
  config = _latent_config(tiny_config, vae)
  config.data.num_channels = 3
  with pytest.raises(ValueError, match="encodes 1-channel images"):
    build.build_components(config)
  bad = helpers.write_vae(str(tmp_path / "unscaled"), ae_lib.AutoencoderConfig(
      **{**AE.__dict__, "scaling_factor": -1.0}))
  with pytest.raises(ValueError, match="scaling_factor=-1.0"):
    build.build_components(_latent_config(tiny_config, bad))


def test_stored_text_embeddings_train_the_same_loss_as_token_ids(
    tiny_config, tokenizer):
  """loss_fn on a batch's context (the frozen encoder's output, as a cache
  stores it) equals loss_fn on its token ids, dropped examples included."""
  from jaxsd.text import encoder as text_lib  # pylint: disable=g-import-not-at-top
  config = tiny_config()
  config.text.trainable = False
  comps = build.build_components(config)
  params = comps.init_params(jax.random.key(0))
  ids = text_lib.tokenize(tokenizer, [f"picture {i}" for i in range(4)],
                          config.text.max_length)
  batch = {"image": jax.random.normal(jax.random.key(1), (4,)
                                      + comps.image_shape),
           "input_ids": jnp.asarray(ids)}
  batch = step_lib.add_noise_inputs(batch, jax.random.key(2),
                                    num_timesteps=comps.schedule.num_timesteps,
                                    cfg_dropout=0.5)
  batch["drop"] = jnp.array([True, False, True, False])
  # Jitted: the UNet op by op (its blocked attention a Python loop) costs
  # more than the two compiles (a batch with and without "context").
  loss = jax.jit(lambda b: step_lib.loss_fn(
      params, b, unet_apply=comps.unet.apply, text_apply=comps.text_encoder,
      schedule=comps.schedule, uncond_ids=jnp.asarray(comps.uncond_ids),
      prediction_type="epsilon", min_snr_gamma=0.0, text_trainable=False))
  context = jax.jit(comps.text_encoder)(params["text"], batch["input_ids"])
  stored = {**batch, "context": context}
  np.testing.assert_allclose(loss(stored), loss(batch), rtol=1e-6)
  # The stored context is what trains: other embeddings, another loss.
  other = {**batch, "context": context + 1.0}
  assert abs(float(loss(other)) - float(loss(batch))) > 1e-4
  # Dropped examples train on the empty prompt, not on the stored context.
  all_dropped = {**batch, "drop": jnp.ones(4, bool)}
  np.testing.assert_allclose(loss({**all_dropped, "context": context + 1.0}),
                             loss(all_dropped), rtol=1e-6)


def test_mnist_latent_config_validates_and_traces_its_step(tmp_path):
  """configs/mnist_latent.py: the autoencoder run's config is accepted by
  the autoencoder trainer, and the diffusion config, over an autoencoder of
  that architecture, traces its latent train step (no compile)."""
  from configs import mnist_latent  # pylint: disable=g-import-not-at-top
  from jaxsd.autoencoder import training as autoencoder_training
  from jaxsd import config_checks
  from jaxsd import environment  # pylint: disable=g-import-not-at-top
  ae_run = environment.resolve(mnist_latent.get_config("autoencoder"))
  config_checks.validate_autoencoder(ae_run)
  arch = autoencoder_training.autoencoder_config(ae_run, scaling_factor=0.8)
  config = environment.resolve(mnist_latent.get_config())
  config.model.autoencoder = helpers.write_vae(str(tmp_path / "vae"), arch)
  config_checks.validate(config)
  setup = build.TrainSetup(config)
  b = config.training.batch_size
  latents = jax.ShapeDtypeStruct((b, 8, 8, 4), np.float32)
  batch = {"latent_mean": latents, "latent_logvar": latents,
           "input_ids": jax.ShapeDtypeStruct(
               (b,) + setup.components.uncond_ids.shape[1:], np.int32)}
  state, metrics = jax.eval_shape(setup.step_fn(), setup.abstract_state,
                                  batch, jax.random.key(0))
  assert metrics["loss"].shape == () and state.step.shape == ()
  with pytest.raises(ValueError, match="choose"):
    mnist_latent.get_config("pixels")
