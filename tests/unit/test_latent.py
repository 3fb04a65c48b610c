"""Latent diffusion: a frozen autoencoder (a diffusers-layout vae/ folder the
test writes) under the UNet. The step draws from the posterior in the
autoencoder's scaled space (closed form); a latent cache holds example i's
exact posterior and trains the same loss as encoding on the fly; bad
autoencoders are clear errors; and (slow) a tiny latent run trains,
checkpoints, resumes to equal parameters, samples a pixel grid and
evaluates."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from jaxsd.diffusion import setup as build
from jaxsd.autoencoder import frozen as latent
from jaxsd.diffusion import step as step_lib
from jaxsd.data import latent_cache
from jaxsd.data import pipeline
from jaxsd.models import autoencoder as ae_lib

AE = ae_lib.AutoencoderConfig(
    in_channels=1, out_channels=1, block_out_channels=(8, 16),
    latent_channels=4, norm_num_groups=4, scaling_factor=0.7,
    shift_factor=0.1)


def write_vae(folder, config=AE, seed=0):
  """A random AutoencoderKL saved as diffusers does (config.json and
  diffusion_pytorch_model.safetensors)."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  module = ae_lib.AutoencoderKL(config)
  params = ae_lib.init_params(module, jax.random.key(seed), 16)
  # Away from the initialisation (unit scales, zero biases) so every
  # parameter matters.
  leaves, tree = jax.tree_util.tree_flatten(params)
  rng = np.random.default_rng(seed)
  leaves = [np.asarray(x) + 0.05 * rng.standard_normal(x.shape).astype(
      np.float32) for x in leaves]
  params = jax.tree_util.tree_unflatten(tree, leaves)
  os.makedirs(folder, exist_ok=True)
  save_file(ae_lib.to_diffusers_weights(params),
            os.path.join(folder, "diffusion_pytorch_model.safetensors"))
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(config.to_diffusers(), f)
  return folder


def _latent_config(tiny_config, vae):
  config = tiny_config()
  config.model.autoencoder = vae
  config.model.in_channels = config.model.out_channels = AE.latent_channels
  config.data.image_size = 28  # latents 14x14x4
  config.data.num_channels = 1
  return config


def _imagefolder(path, count=32):
  os.makedirs(path)
  with open(os.path.join(path, "metadata.jsonl"), "w") as f:
    for i in range(count):
      pixels = np.random.default_rng(i).integers(0, 255, (20, 20),
                                                 dtype=np.uint8)
      Image.fromarray(pixels).save(os.path.join(path, f"{i:03d}.png"))
      f.write(json.dumps({"file_name": f"{i:03d}.png",
                          "text": f"picture {i % 4}"}) + "\n")
  return path


@pytest.fixture(scope="module")
def vae(tmp_path_factory):
  return write_vae(str(tmp_path_factory.mktemp("vae")))


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
  bad = write_vae(str(tmp_path / "unscaled"), ae_lib.AutoencoderConfig(
      **{**AE.__dict__, "scaling_factor": -1.0}))
  with pytest.raises(ValueError, match="scaling_factor=-1.0"):
    build.build_components(_latent_config(tiny_config, bad))


def _folder_config(tiny_config, vae, folder):
  config = _latent_config(tiny_config, vae)
  config.data.source = "imagefolder"
  config.data.path = folder
  config.data.image_size = 16  # latents 8x8x4
  config.eval.metrics = ()
  config.sampling.prompts = ()
  return config


@pytest.mark.slow
def test_cache_trains_the_same_loss_as_encoding_on_the_fly(
    tiny_config, vae, tmp_path):
  from jaxsd.commands import cache  # pylint: disable=g-import-not-at-top
  folder = _imagefolder(str(tmp_path / "images"))
  config = _folder_config(tiny_config, vae, folder)
  out = str(tmp_path / "cache")
  info = cache.write_cache(config, out, batch_size=5, shard_size=12)
  assert info.examples == 32 and [s["examples"] for s in info.shards] == [
      15, 15, 2]  # shards close at whole encoder batches
  config.data.latent_cache = out

  setup = build.TrainSetup(config)
  frozen = setup.components.autoencoder
  source = pipeline.make_source(config)
  cached = pipeline.make_latent_cache_source(config, source, frozen)
  # Example i of the cache is example i of the data, encoded.
  image_loader = pipeline.make_loader(config, setup.components.tokenizer,
                                      source)
  cache_loader = pipeline.make_loader(config, setup.components.tokenizer,
                                      cached)
  step = jax.jit(setup.step_fn())
  for _ in range(2):  # batches 0-1 of the same shuffled order
    pixels = setup.global_batch(image_loader.next_batch())
    stored = setup.global_batch(cache_loader.next_batch())
    assert set(stored) == {"latent_mean", "latent_logvar", "input_ids"}
    np.testing.assert_array_equal(pixels["input_ids"], stored["input_ids"])
    np.testing.assert_allclose(pixels["latent_mean"], stored["latent_mean"],
                               atol=1e-5)
    state = setup.create_train_state(jax.random.key(0))
    _, m_fly = step(state, pixels, jax.random.key(1))
    state = setup.create_train_state(jax.random.key(0))
    _, m_cache = step(state, stored, jax.random.key(1))
    np.testing.assert_allclose(m_fly["loss"], m_cache["loss"], rtol=1e-5)
  image_loader.close(), cache_loader.close()

  # Another image size, or another autoencoder: refused, naming what differs.
  other = _folder_config(tiny_config, vae, folder)
  other.data.image_size, other.data.latent_cache = 8, out
  with pytest.raises(ValueError, match=r"data.image_size was 16, is 8"):
    pipeline.make_latent_cache_source(other, source, frozen)
  other_vae = latent.load(write_vae(str(tmp_path / "vae2"), seed=1))
  with pytest.raises(ValueError, match="not by this run's model.autoencoder"):
    pipeline.make_latent_cache_source(config, source, other_vae)
  with pytest.raises(FileNotFoundError, match="jaxsd-cache"):
    latent_cache.LatentCacheSource(str(tmp_path))
  flipped = _folder_config(tiny_config, vae, folder)
  flipped.data.random_flip = True
  with pytest.raises(ValueError, match="random flips"):
    cache.write_cache(flipped, str(tmp_path / "cache2"))


def _frozen_text_encoder(config, folder, seed=0):
  """A random FlaxCLIPTextModel of config.text's size, saved as a
  pretrained one; config.text then names it, frozen."""
  import transformers  # pylint: disable=g-import-not-at-top
  from jaxsd.text import encoder as text_lib  # pylint: disable=g-import-not-at-top
  tokenizer = text_lib.load_tokenizer(config.text.tokenizer)
  model = transformers.FlaxCLIPTextModel(text_lib.text_encoder_config(
      config.text, text_lib.vocab_size(tokenizer)), seed=seed)
  model.save_pretrained(folder)
  config.text.pretrained, config.text.trainable = folder, False
  return config


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
  loss = lambda b: step_lib.loss_fn(
      params, b, unet_apply=comps.unet.apply, text_apply=comps.text_encoder,
      schedule=comps.schedule, uncond_ids=jnp.asarray(comps.uncond_ids),
      prediction_type="epsilon", min_snr_gamma=0.0, text_trainable=False)
  context = comps.text_encoder(params["text"], batch["input_ids"])
  stored = {**batch, "context": context}
  np.testing.assert_allclose(loss(stored), loss(batch), rtol=1e-6)
  # The stored context is what trains: other embeddings, another loss.
  other = {**batch, "context": context + 1.0}
  assert abs(float(loss(other)) - float(loss(batch))) > 1e-4
  # Dropped examples train on the empty prompt, not on the stored context.
  all_dropped = {**batch, "drop": jnp.ones(4, bool)}
  np.testing.assert_allclose(loss({**all_dropped, "context": context + 1.0}),
                             loss(all_dropped), rtol=1e-6)


@pytest.mark.slow
def test_cache_with_text_embeddings_trains_the_same_loss(
    tiny_config, vae, tmp_path):
  from jaxsd.commands import cache  # pylint: disable=g-import-not-at-top
  from jaxsd.training import trainer as train  # pylint: disable=g-import-not-at-top
  folder = _imagefolder(str(tmp_path / "images"))
  config = _frozen_text_encoder(_folder_config(tiny_config, vae, folder),
                                str(tmp_path / "text"))
  out = str(tmp_path / "cache")
  info = cache.write_cache(config, out, batch_size=8, shard_size=16)
  assert info.has_text_embeddings
  assert info.context_shape == [config.text.max_length,
                                config.text.hidden_size]
  # One embedding per distinct caption of a shard ("picture 0".."picture 3").
  assert np.load(os.path.join(out, "00000.context.npy")).shape[0] == 4
  config.data.latent_cache = out
  setup = build.TrainSetup(config)
  source, cache_loader = train.load_training_data(config, setup.components)
  image_loader = pipeline.make_loader(config, setup.components.tokenizer,
                                      source)
  step = jax.jit(setup.step_fn())
  for _ in range(2):
    pixels = setup.global_batch(image_loader.next_batch())
    stored = setup.global_batch(cache_loader.next_batch())
    assert set(stored) == {"latent_mean", "latent_logvar", "input_ids",
                           "context"}
    state = setup.create_train_state(jax.random.key(0))
    _, m_fly = step(state, pixels, jax.random.key(1))
    state = setup.create_train_state(jax.random.key(0))
    _, m_cache = step(state, stored, jax.random.key(1))
    np.testing.assert_allclose(m_fly["loss"], m_cache["loss"], rtol=1e-5)
  image_loader.close(), cache_loader.close()

  # Another text encoder: refused. A trainable one: the cache's embeddings
  # are left unread and the step encodes the captions.
  other = _frozen_text_encoder(_folder_config(tiny_config, vae, folder),
                               str(tmp_path / "text2"), seed=1)
  other.data.latent_cache = out
  comps = build.build_components(other)
  with pytest.raises(ValueError, match="text embeddings of the text encoder"):
    train.load_training_data(other, comps)
  other.text.trainable = True
  comps = build.build_components(other)
  _, loader = train.load_training_data(other, comps)
  assert "context" not in loader.next_batch()
  loader.close()
  # --text_embeddings=true without a frozen pretrained encoder: refused.
  other.data.latent_cache = ""
  with pytest.raises(ValueError, match="needs a frozen pretrained text"):
    cache.write_cache(other, str(tmp_path / "cache3"), text_embeddings="true")


@pytest.mark.slow
@pytest.mark.mnist
def test_tiny_latent_run_trains_samples_and_evaluates(tiny_config, vae,
                                                     tmp_path):
  from mlflow.tracking import MlflowClient  # pylint: disable=g-import-not-at-top
  from jaxsd.tracking import mlflow_store
  from jaxsd.commands import sample
  from jaxsd.training import trainer as train  # pylint: disable=g-import-not-at-top
  whole = train.train_and_evaluate(_latent_config(tiny_config, vae),
                                   str(tmp_path / "whole"))
  assert int(whole.step) == 4
  grid = Image.open(tmp_path / "whole" / "samples" / "step_00000004.png")
  assert grid.size[0] >= 3 * 28  # pixel images, one per prompt
  client = MlflowClient(
      tracking_uri=mlflow_store.tracking_uri(tmp_path / "whole"))
  (run,) = client.search_runs(
      [client.get_experiment_by_name("jaxsd").experiment_id])
  assert "eval/prompt_accuracy" in run.data.metrics  # MNIST's metrics judge
  assert "eval/fid_mnist" in run.data.metrics        # the decoded digits

  # A resume restores latent runs as pixel ones (the frozen autoencoder is
  # no part of the state): tests/test_train_e2e.py's preempted run.
  images, step = sample.generate_for_prompts(
      str(tmp_path / "whole"), ["a photograph of the number 3"],
      num_samples=2, steps=3)
  assert step == 4 and images.shape == (2, 28, 28, 1)


@pytest.mark.slow
@pytest.mark.mnist
def test_a_jaxsd_autoencoder_run_is_an_autoencoder(tiny_config, tmp_path):
  """model.autoencoder=WORKDIR of jaxsd-train-autoencoder: its
  architecture and measured scaling factor; a diffusion workdir is not."""
  from jaxsd.autoencoder import training as autoencoder_training
  from jaxsd.commands import train_autoencoder  # pylint: disable=g-import-not-at-top
  config = tiny_config()
  a = config.autoencoder
  a.block_out_channels, a.norm_num_groups, a.latent_channels = (8, 16), 4, 4
  a.eval_images = 8
  config.training.num_steps = config.training.checkpoint_every = 2
  config.eval.metrics = ()
  workdir = str(tmp_path / "ae")
  train_autoencoder.train_autoencoder(config, workdir)
  frozen = latent.load(workdir)
  want, params, _ = autoencoder_training.load_run(workdir)
  assert frozen.config == want and frozen.config.scaling_factor > 0
  assert frozen.config.block_out_channels == (8, 16)
  comps = build.build_components(_latent_config(tiny_config, workdir))
  assert comps.image_shape == (14, 14, 4)
  x = np.random.default_rng(0).uniform(-1, 1, (2, 28, 28, 1)).astype(
      np.float32)
  mean, _ = frozen.encode(frozen.params, x)
  direct = frozen.module.apply({"params": params}, x,
                               method=frozen.module.encode)[0]
  np.testing.assert_allclose(mean, direct, atol=1e-6)
  with pytest.raises(ValueError, match="neither a diffusers"):
    latent.load(str(tmp_path))  # a folder holding a run, not a run


def test_mnist_latent_config_validates_and_traces_its_step(tmp_path):
  """configs/mnist_latent.py: the autoencoder run's config is accepted by
  the autoencoder trainer, and the diffusion config, over an autoencoder of
  that architecture, traces its latent train step (no compile)."""
  from configs import mnist_latent  # pylint: disable=g-import-not-at-top
  from jaxsd.autoencoder import training as autoencoder_training
  from jaxsd import config_checks
  from jaxsd import environment  # pylint: disable=g-import-not-at-top
  ae_run = environment.resolve(mnist_latent.get_config("autoencoder"))
  autoencoder_training.check_config(ae_run)
  arch = autoencoder_training.autoencoder_config(ae_run, scaling_factor=0.8)
  config = environment.resolve(mnist_latent.get_config())
  config.model.autoencoder = write_vae(str(tmp_path / "vae"), arch)
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
