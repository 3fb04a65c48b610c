"""Latent diffusion end to end: a latent cache (jaxsd-cache) holds example
i's exact posterior (and, with a frozen text encoder, its caption's
embeddings) and trains the same loss as encoding on the fly; a tiny latent
run trains, samples a pixel grid and evaluates; a jaxsd autoencoder run
serves as a latent run's autoencoder."""
import os

import jax
import numpy as np
import pytest
from PIL import Image

from jaxsd.autoencoder import frozen as latent
from jaxsd.data import latent_cache
from jaxsd.data import pipeline
from jaxsd.diffusion import setup as build

import helpers

@pytest.fixture(scope="module")
def vae(tmp_path_factory):
  return helpers.write_vae(str(tmp_path_factory.mktemp("vae")))


def _latent_config(tiny_config, vae):
  return helpers.latent_config(tiny_config(), vae)


def _folder_config(tiny_config, vae, folder):
  return helpers.latent_folder_config(tiny_config(), vae, folder)


def _imagefolder(path):
  return helpers.write_imagefolder(path, 32, helpers.grey_noise,
                                   lambda i: f"picture {i % 4}")


def test_cache_trains_the_same_loss_as_encoding_on_the_fly(
    tiny_config, vae, tmp_path):
  from jaxsd.autoencoder import latent_cache as cache  # pylint: disable=g-import-not-at-top
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
  other_vae = latent.load(helpers.write_vae(str(tmp_path / "vae2"), seed=1))
  with pytest.raises(ValueError, match="not by this run's model.autoencoder"):
    pipeline.make_latent_cache_source(config, source, other_vae)
  with pytest.raises(FileNotFoundError, match="jaxsd-cache"):
    latent_cache.LatentCacheSource(str(tmp_path))
  flipped = _folder_config(tiny_config, vae, folder)
  flipped.data.random_flip = True
  with pytest.raises(ValueError, match="random flips"):
    cache.write_cache(flipped, str(tmp_path / "cache2"))



def test_cache_with_text_embeddings_trains_the_same_loss(
    tiny_config, vae, tmp_path):
  from jaxsd.autoencoder import latent_cache as cache  # pylint: disable=g-import-not-at-top
  from jaxsd.diffusion import task as diffusion_task  # pylint: disable=g-import-not-at-top
  folder = _imagefolder(str(tmp_path / "images"))
  config = helpers.frozen_text_encoder(_folder_config(tiny_config, vae, folder),
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
  source, cache_loader = diffusion_task.load_training_data(config, setup.components)
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
  other = helpers.frozen_text_encoder(_folder_config(tiny_config, vae, folder),
                               str(tmp_path / "text2"), seed=1)
  other.data.latent_cache = out
  comps = build.build_components(other)
  with pytest.raises(ValueError, match="text embeddings of the text encoder"):
    diffusion_task.load_training_data(other, comps)
  other.text.trainable = True
  comps = build.build_components(other)
  _, loader = diffusion_task.load_training_data(other, comps)
  assert "context" not in loader.next_batch()
  loader.close()
  # --text_embeddings=true without a frozen pretrained encoder: refused.
  other.data.latent_cache = ""
  with pytest.raises(ValueError, match="needs a frozen pretrained text"):
    cache.write_cache(other, str(tmp_path / "cache3"), text_embeddings="true")



@pytest.mark.mnist
def test_tiny_latent_run_trains_samples_and_evaluates(tiny_config, vae,
                                                     tmp_path):
  from mlflow.tracking import MlflowClient  # pylint: disable=g-import-not-at-top
  from jaxsd.tracking import mlflow_store
  from jaxsd.diffusion import sample_run as sample
  from jaxsd.diffusion import task as diffusion_task  # pylint: disable=g-import-not-at-top
  whole = diffusion_task.train_and_evaluate(_latent_config(tiny_config, vae),
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



@pytest.mark.mnist
def test_a_jaxsd_autoencoder_run_is_an_autoencoder(autoencoder_run,
                                                   tiny_config):
  """model.autoencoder=WORKDIR of jaxsd-train-autoencoder: its
  architecture and measured scaling factor; a diffusion workdir is not."""
  from jaxsd.autoencoder import training as autoencoder_training  # pylint: disable=g-import-not-at-top
  workdir, _ = autoencoder_run
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
    latent.load(os.path.dirname(workdir))  # holds a run, is not one


