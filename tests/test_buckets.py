"""Aspect-ratio buckets (data.buckets), on folders of PIL images of several
aspect ratios the tests make: the buckets "auto" makes; each image's bucket
and crop; every batch from one bucket; two processes agree on the bucket
and split its batch; exact resume mid-epoch; leftovers carry into the next
epoch; one compile per bucket shape; the refusals; a bucketed latent cache
trains on the batches encoding on the fly would; and (slow) a tiny run on
mixed shapes trains, checkpoints and resumes exactly."""
import io
import json
import os
import signal

import jax
import numpy as np
import pytest
from PIL import Image

from jaxsd import config_checks
from jaxsd.data import buckets
from jaxsd.data import loader as loader_lib
from jaxsd.data import pipeline
from jaxsd.data import sources
from jaxsd.data import transforms
from jaxsd.errors import ConfigError

# 60% 4:3 landscapes, 30% 3:4 portraits, 10% squares (width, height).
SIZES = [(40, 30)] * 6 + [(30, 40)] * 3 + [(32, 32)]
SHAPES_16 = [(12, 22), (14, 18), (16, 16), (18, 14), (22, 12)]  # auto, 16 px


def _folder(path, count=30):
  """count PNGs cycling through SIZES, each with its own noise and
  caption; returns the folder."""
  os.makedirs(path)
  with open(os.path.join(path, "metadata.jsonl"), "w") as f:
    for i in range(count):
      w, h = SIZES[i % len(SIZES)]
      pixels = np.random.default_rng(i).integers(0, 255, (h, w, 3), np.uint8)
      Image.fromarray(pixels).save(os.path.join(path, f"{i:03d}.png"))
      f.write(json.dumps({"file_name": f"{i:03d}.png",
                          "text": f"picture {i}"}) + "\n")
  return path


def _source(path):
  return sources.make_source(_data_config(path))


def _data_config(path):
  from configs import default  # pylint: disable=g-import-not-at-top
  data = default.get_config().data
  data.path = path
  return data


def _tokenize(captions):
  """Caption "picture i" -> [[i]]: batches say which examples they hold."""
  return np.array([[int(c.split()[1])] for c in captions], np.int32)


def _loader(source, batch=4, shapes=SHAPES_16, **kwargs):
  return loader_lib.make_loader(
      source, global_batch_size=batch, image_size=16, tokenize_fn=_tokenize,
      seed=3, bucket_shapes=shapes, **kwargs)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  return _folder(str(tmp_path_factory.mktemp("mixed") / "images"))


# --- The buckets and each image's place in them ---------------------------------


def test_auto_buckets_fit_the_model_and_the_aspect_bound():
  assert buckets.auto_shapes(64, 8, 2.0) == [
      (48, 88), (56, 72), (64, 64), (72, 56), (88, 48)]
  assert buckets.auto_shapes(16, 2, 2.0) == SHAPES_16
  for size, multiple, aspect in ((64, 32, 2.0), (512, 64, 2.0),
                                 (96, 4, 1.5), (1024, 128, 4.0)):
    shapes = buckets.auto_shapes(size, multiple, aspect)
    assert (size, size) in shapes
    for h, w in shapes:
      assert h % multiple == 0 and w % multiple == 0
      assert max(h, w) / min(h, w) <= aspect
      assert abs(h * w / size ** 2 - 1) < 0.2  # about size**2 pixels
  assert buckets.parse("off") is None and buckets.parse("auto") == "auto"
  assert buckets.parse("64x64, 48x88,64x64") == [(48, 88), (64, 64)]
  with pytest.raises(ValueError, match="heightxwidth"):
    buckets.parse("64*64")


def test_each_image_goes_to_the_nearest_aspect_ratio_and_covers_it():
  sizes = [(30, 40), (40, 30), (32, 32), (10, 40), (33, 32), None]
  np.testing.assert_array_equal(buckets.assign(sizes, SHAPES_16),
                                [1, 3, 2, 0, 2, 2])
  # The header gives (height, width), EXIF rotations included.
  data = io.BytesIO()
  Image.new("RGB", (40, 30)).save(data, "PNG")
  assert buckets.image_size(data.getvalue()) == (30, 40)
  exif = Image.Exif()
  exif[0x0112] = 6  # rotated 90 degrees: stored 40 wide, shown 40 high
  rotated = io.BytesIO()
  Image.new("RGB", (40, 30)).save(rotated, "JPEG", exif=exif)
  assert buckets.image_size(rotated.getvalue()) == (40, 30)
  assert buckets.image_size(b"not an image") is None

  # Resized to cover 14x18 (40x30 -> 24x18... 30x40 -> 14x19 covers 14x18
  # only at 18 wide: scale max(14/30, 18/40) = 0.467 -> 14x19), then cropped.
  pixels = np.arange(30 * 40 * 3, dtype=np.uint8).reshape(30, 40, 3)
  transform = transforms.ImageTransform(image_size=16, crop="center")
  image, top, left = transform.to_bucket(pixels, (14, 18))
  assert image.shape == (14, 18, 3) and image.dtype == np.float32
  assert (top, left) == (0, 0)
  resized = transforms.resize_to_cover(pixels, 14, 18)
  assert resized.shape == (14, 19, 3)
  image, top, left = transform.to_bucket(pixels, (22, 12))  # a portrait crop
  assert image.shape == (22, 12, 3) and top == 0 and left == (29 - 12) // 2
  np.testing.assert_array_equal(
      image, transforms.to_float(transforms.resize_to_cover(
          pixels, 22, 12)[:, left:left + 12]))
  randomly = transforms.ImageTransform(image_size=16, crop="random")
  draws = {randomly.to_bucket(pixels, (22, 12), rng=transforms.example_rng(
      0, 0, i))[2] for i in range(20)}
  assert len(draws) > 3 and all(0 <= d <= 29 - 12 for d in draws)


# --- Batches ---------------------------------------------------------------------


def test_every_batch_comes_from_one_bucket(folder):
  source = _source(folder)
  assignment = buckets.source_assignment(source, SHAPES_16)
  # 60% landscapes -> 14x18, 30% portraits -> 18x14, 10% squares -> 16x16.
  assert np.bincount(assignment, minlength=5).tolist() == [0, 18, 3, 9, 0]
  with _loader(source) as loader:
    shapes = []
    for _ in range(12):
      batch = loader.next_batch()
      examples = batch["input_ids"][:, 0]
      (k,) = set(assignment[examples])
      assert batch["image"].shape == (4, *SHAPES_16[k], 3)
      assert batch["crop_top"].shape == batch["crop_left"].shape == (4,)
      shapes.append(SHAPES_16[k])
    assert len(set(shapes)) >= 2  # the buckets take turns
    stats = loader.statistics()
  assert stats["buckets"] == 5 and stats["bucket_14x18"] == 18
  assert stats["bucket_12x22"] == 0 and stats["batches_per_epoch"] == 7.5


def test_two_processes_agree_on_the_bucket_and_split_its_batch(folder):
  source = _source(folder)
  with _loader(source) as whole, \
      _loader(source, process_index=0, process_count=2) as first, \
      _loader(source, process_index=1, process_count=2) as second:
    for _ in range(10):
      full, a, b = whole.next_batch(), first.next_batch(), second.next_batch()
      assert a["image"].shape == b["image"].shape == (2, *full["image"].shape[1:])
      for key in full:
        np.testing.assert_array_equal(np.concatenate([a[key], b[key]]),
                                      full[key])


def test_a_resumed_loader_gives_the_batches_an_uninterrupted_one_would(
    folder):
  source = _source(folder)
  with _loader(source, crop="random", random_flip=True) as loader:
    for _ in range(5):  # mid-epoch (7.5 batches per epoch)
      loader.next_batch()
    state = json.loads(json.dumps(loader.get_state()))  # as checkpointed
    expected = [loader.next_batch() for _ in range(8)]  # into epoch 1
  assert state["buckets"] == ["12x22", "14x18", "16x16", "18x14", "22x12"]
  with _loader(source, crop="random", random_flip=True) as resumed:
    resumed.set_state(state)
    for want in expected:
      got = resumed.next_batch()
      for key in want:
        np.testing.assert_array_equal(got[key], want[key])
  with _loader(source, shapes=SHAPES_16[1:]) as other:  # other buckets
    with pytest.raises(Exception, match="data.buckets"):
      other.set_state(state)


def test_leftovers_carry_into_the_next_epoch_and_no_image_goes_unseen():
  # Buckets of 7, 3 and 25 examples, batches of 8.
  assignment = np.array([0] * 7 + [1] * 3 + [2] * 25)
  plan = buckets.BucketPlan(assignment, [(8, 8), (8, 16), (16, 8)], 8,
                            seed=0, shuffle=True)
  seen = np.zeros(len(assignment), int)
  position = 0
  for epoch in range(8):
    batches = plan.batches_before(epoch + 1) - plan.batches_before(epoch)
    for _ in range(batches):
      e, k, indices = plan.global_indices(position)
      assert e == epoch and set(assignment[indices]) == {k}
      np.add.at(seen, indices, 1)
      position += 1
    # After epoch e each bucket k has trained floor((e + 1) n_k / 8) full
    # batches: every example but the < 8 carried ones once per epoch.
    for k, n in enumerate((7, 3, 25)):
      members = seen[assignment == k]
      assert members.sum() == (epoch + 1) * n // 8 * 8
      assert members.max() - members.min() <= 1
  # The bucket of 25 leaves 1 after epoch 0; epoch 1's first batch of that
  # bucket starts with it, ahead of epoch 1's own order.
  last = plan.sequence(0, 2)[-1]
  assert plan.sequence(1, 2)[0] == last
  assert last not in np.concatenate([
      plan.global_indices(p)[2] for p in range(plan.batches_before(1))])
  # Each bucket's share of batches follows its share of images.
  counts = np.bincount([plan.locate(p)[1] for p in range(position)])
  np.testing.assert_allclose(counts / counts.sum(), [7 / 35, 3 / 35, 25 / 35],
                             atol=0.02)


# --- The config -----------------------------------------------------------------


def _config(tiny_config, folder, buckets_value="auto"):
  config = tiny_config()
  config.data.source = "imagefolder"
  config.data.path = folder
  config.data.image_size = 16
  config.data.num_channels = 3
  config.data.buckets = buckets_value
  config.model.in_channels = config.model.out_channels = 3
  config.text.max_length = 8
  config.eval.metrics = ()
  config.sampling.prompts = ()
  return config


def test_what_cannot_work_is_refused_in_one_line(tiny_config, folder):
  config_checks.validate(_config(tiny_config, folder))
  config_checks.validate(_config(tiny_config, folder, "14x18,18x14"))
  refusals = [
      ("13x18", {}, r"data.buckets='13x18': the bucket 13x18 has a side that "
       r"is not a multiple of 2 .* e.g. 12x18"),
      ("4x4,6x6,8x8", {"data.max_buckets": 2},
       "lists 3 buckets, more than data.max_buckets=2"),
      ("auto", {"data.max_buckets": 4}, "makes 5 buckets, more than "
       "data.max_buckets=4"),
      ("auto", {"training.steps_per_call": 2},
       "training.steps_per_call=2 stacks batches of one shape"),
      ("auto", {"data.source": "webdataset"}, "needs a random-access source"),
      ("auto", {"data.bucket_max_aspect": 0.5}, "data.bucket_max_aspect=0.5 "
       "must be >= 1"),
      ("16*16", {}, "data.buckets='16\\*16': use 'off', 'auto'"),
  ]
  for value, changes, message in refusals:
    config = _config(tiny_config, folder, value)
    for key, v in changes.items():
      section, field = key.split(".")
      config[section][field] = v
    with pytest.raises(ConfigError, match=message) as raised:
      config_checks.validate(config)
    assert "\n" not in str(raised.value)
  with pytest.raises(ConfigError, match="the autoencoder trains on square"):
    config_checks.validate_autoencoder(_config(tiny_config, folder))
  # Gradient accumulation splits a bucket's batch like a square one.
  config = _config(tiny_config, folder)
  config.optim.grad_accum_steps = 2
  config_checks.validate(config)


# --- Compiles ---------------------------------------------------------------------


@pytest.mark.slow  # two compiles of the tiny step: minutes on a shared CPU
def test_each_bucket_shape_compiles_the_step_once(tiny_config, folder):
  from jaxsd.diffusion import setup as build  # pylint: disable=g-import-not-at-top
  config = _config(tiny_config, folder, "8x12,12x8")
  config.training.batch_size = 2
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


# --- The latent cache -----------------------------------------------------------


def _write_vae(folder):
  """A random 2x-downsampling AutoencoderKL of grey images, saved as
  diffusers does."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  from jaxsd.models import autoencoder as ae_lib  # pylint: disable=g-import-not-at-top
  config = ae_lib.AutoencoderConfig(
      in_channels=1, out_channels=1, block_out_channels=(8, 16),
      latent_channels=4, norm_num_groups=4, scaling_factor=0.7)
  params = ae_lib.init_params(ae_lib.AutoencoderKL(config), jax.random.key(0),
                              16)
  os.makedirs(folder)
  save_file(ae_lib.to_diffusers_weights(params),
            os.path.join(folder, "diffusion_pytorch_model.safetensors"))
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(config.to_diffusers(), f)
  return folder


@pytest.mark.slow  # the autoencoder compiles once per bucket shape
def test_a_bucketed_latent_cache_gives_the_batches_encoding_would(
    tiny_config, folder, tmp_path):
  from jaxsd.autoencoder import latent_cache as writer  # pylint: disable=g-import-not-at-top
  from jaxsd.diffusion import setup as build  # pylint: disable=g-import-not-at-top
  config = _config(tiny_config, folder)
  config.model.autoencoder = _write_vae(str(tmp_path / "vae"))
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


# --- A run --------------------------------------------------------------------


def _leaves(state):
  return [np.asarray(x) for x in jax.tree_util.tree_leaves(
      (state.params, state.ema_params))]


@pytest.mark.slow
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

  def stop_at_2(step):  # a preemption after step 2's checkpoint is due
    if step == 2:
      os.kill(os.getpid(), signal.SIGTERM)
  stopped = diffusion_task.train_and_evaluate(
      _config(tiny_config, folder), str(tmp_path / "resumed"),
      hooks=[stop_at_2])
  assert int(stopped.step) == 2
  resumed = diffusion_task.train_and_evaluate(_config(tiny_config, folder),
                                              str(tmp_path / "resumed"))
  assert int(resumed.step) == 4
  for a, b in zip(_leaves(resumed), _leaves(whole)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
