"""Aspect-ratio buckets end to end: one compile per bucket shape, a bucketed
latent cache equal to encoding on the fly, a tiny run on mixed shapes that
trains, checkpoints and resumes exactly. The rest: tests/unit/test_buckets.py."""
import os

import jax
import numpy as np
import pytest

from jaxsd.data import pipeline

import helpers


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  return helpers.write_mixed_folder(
      str(tmp_path_factory.mktemp("mixed") / "images"))


def _config(tiny_config, folder, buckets_value="auto"):
  return helpers.bucket_config(tiny_config(), folder, buckets_value)


def test_each_bucket_shape_compiles_the_step_once(tiny_config, folder):
  from jaxsd.diffusion import setup as build  # pylint: disable=g-import-not-at-top
  # The buckets and batch of the run below: the same step programs, so
  # that run reads them back from the compilation cache.
  config = _config(tiny_config, folder)
  setup = build.TrainSetup(config)
  source = pipeline.make_source(config)
  loader = pipeline.make_loader(config, setup.components.tokenizer, source,
                                bucket_shapes=pipeline.bucket_shapes(config))
  step = setup.make_train_step()  # donates the state, as training does
  state = setup.create_train_state(jax.random.key(0))
  seen = []
  for _ in range(6):
    batch = setup.global_batch(loader.next_batch())
    seen.append(batch["image"].shape[1:3])
    state, metrics = step(state, batch, jax.random.key(1))
    assert np.isfinite(float(metrics["loss"]))
  loader.close()
  assert len(set(seen)) == 2 and len(seen) > 2  # the shapes alternate
  assert step.jitted._cache_size() == 2  # pylint: disable=protected-access


def test_a_bucketed_latent_cache_gives_the_batches_encoding_would(
    tiny_config, folder, tmp_path):
  from jaxsd.autoencoder import latent_cache as writer  # pylint: disable=g-import-not-at-top
  from jaxsd.diffusion import setup as build  # pylint: disable=g-import-not-at-top
  config = _config(tiny_config, folder)
  config.model.autoencoder = helpers.write_vae(str(tmp_path / "vae"))
  config.model.in_channels = config.model.out_channels = 4
  config.data.num_channels = 1
  out = str(tmp_path / "cache")
  info = writer.write_cache(config, out, batch_size=4, shard_size=8)
  # "auto" for 2x latents under a 2-level UNet: sides multiples of 4.
  assert info.buckets == [[12, 20], [16, 16], [20, 12]]
  assert info.examples == 30
  assert {tuple(s["bucket"]) for s in info.shards} == {
      (12, 20), (16, 16), (20, 12)}
  config.data.latent_cache = out

  setup = build.TrainSetup(config)
  frozen = setup.components.autoencoder
  shapes = pipeline.bucket_shapes(config, frozen)
  source = pipeline.make_source(config)
  cached = pipeline.make_latent_cache_source(config, source, frozen)
  tokenizer = setup.components.tokenizer
  with pipeline.make_loader(config, tokenizer, source,
                            bucket_shapes=shapes) as images, \
      pipeline.make_loader(config, tokenizer, cached,
                           bucket_shapes=shapes) as latents:
    seen = set()
    for _ in range(12):  # past the first epoch (3.75 batches of 8)
      pixels = setup.global_batch(images.next_batch())
      stored = setup.global_batch(latents.next_batch())
      assert set(stored) == set(pixels)
      for key in ("input_ids", "crop_top", "crop_left"):
        np.testing.assert_array_equal(pixels[key], stored[key])
      np.testing.assert_allclose(pixels["latent_mean"], stored["latent_mean"],
                                 atol=1e-5)
      seen.add(stored["latent_mean"].shape[1:3])
  assert seen == {(6, 10), (8, 8), (10, 6)}

  square = _config(tiny_config, folder, "off")
  square.model.autoencoder = config.model.autoencoder
  square.model.in_channels = square.model.out_channels = 4
  square.data.num_channels, square.data.latent_cache = 1, out
  with pytest.raises(ValueError, match="written with buckets 12x20,16x16,"
                     "20x12, this run's data.buckets gives off"):
    pipeline.make_latent_cache_source(square, source, frozen)


def test_a_tiny_run_on_mixed_shapes_trains_checkpoints_and_resumes_exactly(
    tiny_config, folder, tmp_path):
  from jaxsd.diffusion import task as diffusion_task  # pylint: disable=g-import-not-at-top
  from jaxsd.tracking import mlflow_store  # pylint: disable=g-import-not-at-top
  whole = diffusion_task.train_and_evaluate(_config(tiny_config, folder),
                                            str(tmp_path / "whole"))
  assert int(whole.step) == 4
  assert sorted(os.listdir(tmp_path / "whole" / "checkpoints")) == ["2", "4"]
  # Sampling a non-square grid is sampling's part (sampling.height/width).

  from mlflow.tracking import MlflowClient  # pylint: disable=g-import-not-at-top
  client = MlflowClient(tracking_uri=mlflow_store.tracking_uri(
      str(tmp_path / "whole")))
  (run,) = client.search_runs(
      [client.get_experiment_by_name("jaxsd").experiment_id])
  assert run.data.metrics["data/buckets"] == 5
  assert run.data.metrics["data/bucket_14x18"] == 18
  assert [a.path for a in client.list_artifacts(run.info.run_id, "data")] == [
      "data/examples_14x18", "data/examples_16x16", "data/examples_18x14"]

  # Resumed from the step-2 checkpoint: the loader's bucket state with it.
  workdir = helpers.copy_run_until(str(tmp_path / "whole"),
                                   str(tmp_path / "resumed"), 2)
  resumed = diffusion_task.train_and_evaluate(_config(tiny_config, folder),
                                              workdir)
  assert int(resumed.step) == 4
  helpers.assert_leaves_close(helpers.model_leaves(resumed),
                              helpers.model_leaves(whole))
