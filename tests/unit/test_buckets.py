"""Aspect-ratio buckets (data.buckets), on folders of PIL images of several
aspect ratios the tests make: the buckets "auto" makes; each image's bucket
and crop; every batch from one bucket; two processes agree on the bucket
and split its batch; exact resume mid-epoch; leftovers carry into the next
epoch; one compile per bucket shape; the refusals; a bucketed latent cache
trains on the batches encoding on the fly would; and (slow) a tiny run on
mixed shapes trains, checkpoints and resumes exactly."""
import io
import json

import numpy as np
import pytest
from PIL import Image

from jaxsd import config_checks
from jaxsd.data import buckets
from jaxsd.data import loader as loader_lib
from jaxsd.data import sources
from jaxsd.data import transforms
from jaxsd.errors import ConfigError

import helpers

SHAPES_16 = helpers.BUCKET_SHAPES_16


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
  return helpers.write_mixed_folder(
      str(tmp_path_factory.mktemp("mixed") / "images"))


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


def _config(tiny_config, folder, buckets_value="auto"):
  return helpers.bucket_config(tiny_config(), folder, buckets_value)


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
