"""Data loader and transforms: hand-computed transforms, determinism, epochs,
process shares, exact resume, workers, corrupt images, MNIST equality with
the MNIST batches jaxsd trained on before, and the stream reader's bounded
memory."""
import io
import json
import logging
import time

import numpy as np
from PIL import Image
import pytest

from jaxsd.text import encoder as text
from jaxsd.data import loader as loader_lib
from jaxsd.data import transforms

CORRUPT = b"\x89PNG\r\n\x1a\n not really a png"


def _encode(array, fmt="PNG"):
  buf = io.BytesIO()
  Image.fromarray(array.squeeze(-1) if array.shape[-1] == 1 else array).save(
      buf, format=fmt)
  return buf.getvalue()


def _ids(captions):
  """Fake tokenizer: "caption {i} [{epoch}]" -> [i, epoch or -1]."""
  out = []
  for c in captions:
    words = c.split()
    out.append([int(words[1]), int(words[2]) if len(words) > 2 else -1])
  return np.array(out, np.int32)


class ArraySource:
  """A random-access source of n random uint8 [h, w, 3] images; the indices
  in `corrupt` hold undecodable bytes."""

  def __init__(self, n=100, h=8, w=8, corrupt=()):
    self.images = np.random.default_rng(0).integers(0, 256, (n, h, w, 3),
                                                    dtype=np.uint8)
    self.corrupt = set(corrupt)

  def __len__(self):
    return len(self.images)

  def __getitem__(self, i):
    image = CORRUPT if i in self.corrupt else self.images[i]
    return {"image": image, "caption": f"caption {i}", "key": f"img{i}"}


class EpochCaptionSource(ArraySource):
  """COCO-like: the caption drawn depends on the epoch."""

  def example(self, i, epoch):
    return {**self[i], "caption": f"caption {i} {epoch}"}


class ShardSource:
  """A stream source: shard j holds `sizes[j]` PNG-encoded examples, read
  lazily; `pulled` counts examples handed out, `opened` the shards opened."""

  def __init__(self, sizes=(7, 9, 11, 8, 10), corrupt=(), hw=(8, 8)):
    self.sizes = list(sizes)
    self.shards = [f"shard-{j:03d}.tar" for j in range(len(sizes))]
    self.starts = np.concatenate([[0], np.cumsum(self.sizes)])
    self.corrupt = set(corrupt)
    self.hw = hw
    self.pulled = 0
    self.opened = []

  def read_shard(self, shard):
    j = self.shards.index(shard)
    self.opened.append(shard)
    for o in range(self.sizes[j]):
      i = int(self.starts[j] + o)
      rng = np.random.default_rng(i)
      image = rng.integers(0, 256, (*self.hw, 3), dtype=np.uint8)
      self.pulled += 1
      yield {"image": CORRUPT if i in self.corrupt else _encode(image),
             "caption": f"caption {i}", "key": f"{shard}/{o}"}


def _loader(source, batch=8, **kwargs):
  kwargs.setdefault("image_size", 8)
  kwargs.setdefault("seed", 3)
  return loader_lib.make_loader(source, global_batch_size=batch,
                                tokenize_fn=_ids, **kwargs)


def _take(loader, n):
  return [loader.next_batch() for _ in range(n)]


def _assert_same(batches_a, batches_b):
  assert len(batches_a) == len(batches_b)
  for a, b in zip(batches_a, batches_b):
    np.testing.assert_array_equal(a["input_ids"], b["input_ids"])
    np.testing.assert_array_equal(a["image"], b["image"])


# ----------------------------------------------------------------------------
# Transforms
# ----------------------------------------------------------------------------


def test_decode_bytes_arrays_and_corrupt(caplog):
  rgb = np.random.default_rng(1).integers(0, 256, (5, 7, 3), dtype=np.uint8)
  np.testing.assert_array_equal(transforms.decode(_encode(rgb)), rgb)
  np.testing.assert_array_equal(transforms.decode(_encode(rgb, "WEBP")),
                                np.asarray(Image.open(io.BytesIO(
                                    _encode(rgb, "WEBP"))).convert("RGB")))
  grey = rgb[:, :, :1]
  assert transforms.decode(_encode(grey)).shape == (5, 7, 1)
  assert transforms.decode(rgb[:, :, 0]).shape == (5, 7, 1)  # 2-D array
  assert transforms.decode(rgb) is rgb
  jpeg = _encode(rgb, "JPEG")
  with caplog.at_level(logging.WARNING):
    assert transforms.decode(jpeg[:len(jpeg) // 2], key="half.jpg") is None
    assert transforms.decode(CORRUPT, key="bad.png") is None
  assert "half.jpg" in caplog.text and "bad.png" in caplog.text
  with pytest.raises(ValueError, match="uint8"):
    transforms.decode(rgb.astype(np.float32))


def test_channels():
  rgb = np.random.default_rng(2).integers(0, 256, (4, 6, 3), dtype=np.uint8)
  grey = transforms.to_channels(rgb, 1)
  np.testing.assert_array_equal(
      grey[:, :, 0], np.asarray(Image.fromarray(rgb).convert("L")))
  np.testing.assert_array_equal(transforms.to_channels(grey, 3),
                                np.repeat(grey, 3, axis=-1))
  opaque = np.concatenate([rgb, np.full_like(rgb[..., :1], 255)], -1)
  np.testing.assert_array_equal(transforms.to_channels(opaque, 3), rgb)
  clear = np.concatenate([rgb, np.zeros_like(rgb[..., :1])], -1)
  np.testing.assert_array_equal(transforms.to_channels(clear, 3),
                                np.full_like(rgb, 255))  # onto white


def test_resize_crop_pad_flip_scale():
  image = np.random.default_rng(3).integers(0, 256, (20, 30, 3),
                                            dtype=np.uint8)
  resized = transforms.resize_shorter_side(image, 10)
  expected = np.asarray(Image.fromarray(image).resize(
      (15, 10), Image.Resampling.BICUBIC))
  np.testing.assert_array_equal(resized, expected)
  assert transforms.resize_shorter_side(image, 20) is image
  np.testing.assert_array_equal(transforms.crop(resized, 10), resized[:, 2:12])
  draws = np.random.default_rng(5)
  top, left = int(draws.integers(0, 1)), int(draws.integers(0, 6))
  np.testing.assert_array_equal(
      transforms.crop(resized, 10, "random", np.random.default_rng(5)),
      resized[top:top + 10, left:left + 10])
  # Padding with the background, 2 on each side (28 -> 32).
  digit = np.random.default_rng(4).integers(0, 256, (28, 28, 1),
                                            dtype=np.uint8)
  t = transforms.ImageTransform(image_size=32, num_channels=1, pad_small=True)
  padded = np.full((32, 32, 1), -1.0, np.float32)
  padded[2:30, 2:30] = digit / 127.5 - 1.0
  np.testing.assert_allclose(t(digit), padded, rtol=0, atol=1e-6)
  # Without pad_small the small image is upscaled instead.
  up = transforms.ImageTransform(image_size=32, num_channels=1)(digit)
  np.testing.assert_array_equal(up, transforms.to_float(
      transforms.resize_shorter_side(digit, 32)))
  # Scale: 0 -> -1, 255 -> 1, exactly.
  np.testing.assert_array_equal(
      transforms.to_float(np.array([0, 255], np.uint8)), [-1.0, 1.0])
  # Flip: drawn after the crop offsets.
  t = transforms.ImageTransform(image_size=10, crop="random", random_flip=True)
  for seed in range(4):
    rng = np.random.default_rng(seed)
    top, lft = int(rng.integers(0, 1)), int(rng.integers(0, 6))
    window = resized[top:top + 10, lft:lft + 10]
    want = window[:, ::-1] if rng.random() < 0.5 else window
    np.testing.assert_array_equal(
        t(image, rng=np.random.default_rng(seed)), transforms.to_float(want))


# ----------------------------------------------------------------------------
# Random-access sources
# ----------------------------------------------------------------------------


def test_random_access_deterministic_epochs_cover_everything():
  a, b = _loader(ArraySource()), _loader(ArraySource())
  batches = _take(a, 24)  # 100 // 8 = 12 batches per epoch, two epochs
  _assert_same(batches, _take(b, 24))
  ids = np.concatenate([x["input_ids"][:, 0] for x in batches])
  epoch0, epoch1 = ids[:96], ids[96:]
  assert len(set(epoch0)) == 96 and len(set(epoch1)) == 96
  assert not np.array_equal(epoch0, epoch1)
  np.testing.assert_array_equal(
      epoch1, np.random.default_rng([3, 1]).permutation(100)[:96])
  assert batches[0]["image"].shape == (8, 8, 8, 3)
  assert batches[0]["image"].dtype == np.float32
  assert batches[0]["input_ids"].dtype == np.int32
  source = ArraySource()
  np.testing.assert_array_equal(
      batches[0]["image"][0], transforms.to_float(source.images[ids[0]]))
  unshuffled = _take(_loader(ArraySource(), shuffle=False), 2)
  np.testing.assert_array_equal(unshuffled[1]["input_ids"][:, 0],
                                np.arange(8, 16))
  assert a.statistics()["epoch"] == 2 and a.statistics()["skipped"] == 0
  a.close(), b.close()


def test_random_access_process_shares_and_epoch_captions():
  whole = _loader(EpochCaptionSource())
  parts = [_loader(EpochCaptionSource(), process_index=k, process_count=2)
           for k in range(2)]
  for _ in range(14):
    batch = whole.next_batch()
    shares = [p.next_batch() for p in parts]
    assert shares[0]["image"].shape[0] == 4
    np.testing.assert_array_equal(
        np.concatenate([s["input_ids"] for s in shares]), batch["input_ids"])
    np.testing.assert_array_equal(
        np.concatenate([s["image"] for s in shares]), batch["image"])
  assert batch["input_ids"][0, 1] == 1  # batch 13 is in epoch 1


def test_random_access_resume_is_exact():
  kwargs = dict(image_size=6, crop="random", random_flip=True)
  uninterrupted = _loader(ArraySource(h=8, w=10), **kwargs)
  _take(uninterrupted, 10)
  state = json.loads(json.dumps(uninterrupted.get_state()))
  assert state["position"] == 10
  resumed = _loader(ArraySource(h=8, w=10), **kwargs)
  resumed.set_state(state)
  _assert_same(_take(resumed, 5), _take(uninterrupted, 5))
  with pytest.raises(ValueError, match="seed"):
    _loader(ArraySource(h=8, w=10), **{**kwargs, "seed": 4}).set_state(state)


def test_random_access_workers_give_the_same_batches():
  kwargs = dict(image_size=6, crop="random", random_flip=True)
  in_process = _take(_loader(ArraySource(h=8, w=10), **kwargs), 5)
  with _loader(ArraySource(h=8, w=10), workers=2, **kwargs) as pooled:
    _assert_same(_take(pooled, 5), in_process)


def test_random_access_corrupt_images_are_replaced():
  order = np.random.default_rng([3, 0]).permutation(100)
  bad = [int(order[1]), int(order[5])]  # slot 1 of process 0, slot 1 of 1
  loader = _loader(ArraySource(corrupt=bad), batch=8, process_count=2,
                   process_index=1)
  batch = loader.next_batch()
  assert batch["image"].shape == (4, 8, 8, 3)
  # Process 1's candidates: order[8 + 1], order[8 + 3], ...
  np.testing.assert_array_equal(
      batch["input_ids"][:, 0], [order[4], order[9], order[6], order[7]])
  stats = loader.statistics()
  assert stats["skipped"] == 1 and stats["skipped_keys"] == [f"img{bad[1]}"]
  zero = _loader(ArraySource(corrupt=bad), batch=8, process_count=2)
  np.testing.assert_array_equal(zero.next_batch()["input_ids"][:, 0],
                                [order[0], order[8], order[2], order[3]])
  everything_bad = _loader(ArraySource(n=10, corrupt=range(10)), batch=2)
  with pytest.raises(RuntimeError, match="No decodable image"):
    everything_bad.next_batch()


class MnistLikeSource:
  """uint8 [N, 28, 28, 1] images with label captions, as jaxsd's MNIST."""

  def __init__(self, images, labels, template):
    self.images, self.labels, self.template = images, labels, template

  def __len__(self):
    return len(self.labels)

  def __getitem__(self, i):
    return {"image": self.images[i], "key": str(i),
            "caption": self.template.format(label=int(self.labels[i]))}


def _mnist_batch_before_grain(images, labels, caption_ids, global_batch,
                              image_size, seed, position, process_index,
                              process_count):
  """MNIST's batches as jaxsd trained on them before the Grain loader (its
  CaptionedImages): epoch e's order default_rng([seed, e]).permutation(N),
  global batch p the p-th slice of it, process k its k-th contiguous share,
  images padded with -1 to image_size."""
  per_epoch = len(labels) // global_batch
  epoch, i = divmod(position, per_epoch)
  order = np.random.default_rng([seed, epoch]).permutation(len(labels))
  idx = order[i * global_batch:(i + 1) * global_batch]
  local = global_batch // process_count
  idx = idx[process_index * local:(process_index + 1) * local]
  x = images[idx].astype(np.float32) / 127.5 - 1.0
  p = image_size - 28
  x = np.pad(x, ((0, 0), (p // 2, p - p // 2), (p // 2, p - p // 2), (0, 0)),
             constant_values=-1.0)
  return {"image": x, "input_ids": caption_ids[labels[idx]]}


@pytest.mark.parametrize("image_size,process_count", [(28, 1), (32, 2)])
def test_mnist_batches_equal_the_pre_grain_pipeline(tokenizer, image_size,
                                              process_count):
  rng = np.random.default_rng(7)
  images = rng.integers(0, 256, (100, 28, 28, 1), dtype=np.uint8)
  labels = rng.integers(0, 10, 100).astype(np.int32)
  template = "a photograph of the number {label}"
  tokenize = lambda captions: text.tokenize(tokenizer, captions, 12)  # pylint: disable=unnecessary-lambda-assignment
  caption_ids = tokenize([template.format(label=d) for d in range(10)])
  for k in range(process_count):
    loader = loader_lib.make_loader(
        MnistLikeSource(images, labels, template), global_batch_size=16,
        image_size=image_size, tokenize_fn=tokenize, seed=5, num_channels=1,
        pad_small=True, process_index=k, process_count=process_count)
    for position in range(14):  # 6 batches per epoch: into epoch 2
      want = _mnist_batch_before_grain(images, labels, caption_ids, 16,
                                       image_size, 5, position, k,
                                       process_count)
      got = loader.next_batch()
      np.testing.assert_array_equal(got["image"], want["image"])
      np.testing.assert_array_equal(got["input_ids"], want["input_ids"])
    loader.close()


# ----------------------------------------------------------------------------
# Stream sources
# ----------------------------------------------------------------------------


def _stream(source, batch=5, **kwargs):
  kwargs.setdefault("shuffle_buffer", 8)
  return _loader(source, batch=batch, **kwargs)


def _stream_ids(batches):
  return np.concatenate([b["input_ids"][:, 0] for b in batches])


def test_stream_deterministic_epochs_cover_everything():
  source = ShardSource()  # 45 examples
  batches = _take(_stream(source), 18)
  _assert_same(batches, _take(_stream(ShardSource()), 18))
  ids = _stream_ids(batches)
  epoch0, epoch1 = ids[:45], ids[45:]
  assert sorted(epoch0) == list(range(45)) == sorted(epoch1)
  assert not np.array_equal(epoch0, epoch1)
  assert sorted(source.opened[:5]) == sorted(source.shards)
  unshuffled = _stream_ids(_take(_stream(ShardSource(), shuffle=False), 9))
  np.testing.assert_array_equal(unshuffled, np.arange(45))


def test_stream_reads_shards_in_the_documented_order():
  """No window shuffle and one shard at a time: epoch e is the shards of
  `shard_order(e)` in file order; two at a time, they alternate."""
  source = ShardSource()
  ids = _stream_ids(_take(_stream(source, shuffle_buffer=1, cycle_length=1),
                          18))
  expected = [i for e in (0, 1)
              for j in np.random.default_rng([3, e]).permutation(5)
              for i in range(source.starts[j], source.starts[j + 1])]
  np.testing.assert_array_equal(ids, expected)
  ids = _stream_ids(_take(_stream(ShardSource(), shuffle_buffer=1,
                                  cycle_length=2), 9))
  a, b = np.random.default_rng([3, 0]).permutation(5)[:2]
  first = ids[:2 * min(source.sizes[a], source.sizes[b])]
  np.testing.assert_array_equal(first[0::2], np.arange(len(first) // 2)
                                + source.starts[a])
  np.testing.assert_array_equal(first[1::2], np.arange(len(first) // 2)
                                + source.starts[b])


def test_stream_process_shares_are_disjoint_and_cover_the_epoch():
  seen = []
  for k in range(2):
    loader = _stream(ShardSource(), batch=4, process_index=k, process_count=2)
    source = loader.source
    count = sum(source.sizes[source.shards.index(s)]
                for s in loader.shards_of(0))
    ids = _stream_ids(_take(loader, count // 2 + 1))[:count]
    loader.close()
    assert len(set(ids)) == count
    seen.append(set(ids))
  assert not seen[0] & seen[1]
  assert seen[0] | seen[1] == set(range(45))
  with pytest.raises(ValueError, match="at least 3 shards"):
    _stream(ShardSource(sizes=(5, 5)), batch=3, process_count=3)


SIXTY = (3,) * 20  # 20 shards of 3: 12 batches of 5 per epoch


@pytest.mark.parametrize("k", [3, 12, 14])  # mid-epoch, at its end, epoch 1
def test_stream_resume_is_exact(k, monkeypatch):
  kwargs = dict(image_size=6, crop="random", random_flip=True)
  uninterrupted = _stream(ShardSource(SIXTY), **kwargs)
  _take(uninterrupted, k)
  state = json.loads(json.dumps(uninterrupted.get_state()))
  source = ShardSource(SIXTY)
  # No read-ahead thread while counting: it would open the next batches'
  # shards at its own pace (a count that grew under load, 11 > 10).
  monkeypatch.setattr(loader_lib, "PREFETCH_BATCHES", 0)
  resumed = _stream(source, **kwargs)
  resumed.set_state(state)
  first = resumed.next_batch()
  # The restore reread the window's and the open shards, not the epoch.
  assert len(source.opened) <= 2 * 4 + 2
  _assert_same([first] + _take(resumed, 6), _take(uninterrupted, 7))
  assert resumed.statistics() == uninterrupted.statistics()
  uninterrupted.close(), resumed.close()


def test_stream_workers_resume_and_corrupt_images():
  kwargs = dict(image_size=6, crop="random", random_flip=True)
  bad = {3, 17, 30}
  reference = _stream(ShardSource(corrupt=bad), **kwargs)
  in_process = _take(reference, 9)
  assert reference.statistics()["skipped"] >= 3
  assert all(b["image"].shape == (5, 6, 6, 3) for b in in_process)
  ids = _stream_ids(in_process)
  assert sorted(ids[:42]) == sorted(set(range(45)) - bad)  # one epoch
  with _stream(ShardSource(corrupt=bad), workers=1, **kwargs) as one:
    _assert_same(_take(one, 9), in_process)  # 0 and 1 workers: one reader
    assert one.statistics() == reference.statistics()
  # Two workers read alternate shards of each epoch: another order, the same
  # examples, and an exact resume.
  with _stream(ShardSource(corrupt=bad), workers=2, **kwargs) as pooled:
    batches = _take(pooled, 4)
    state = json.loads(json.dumps(pooled.get_state()))
    batches += _take(pooled, 5)
  assert not np.array_equal(_stream_ids(batches), ids)
  assert len(set(_stream_ids(batches))) == 42  # every decodable example
  with _stream(ShardSource(corrupt=bad), workers=2, **kwargs) as resumed:
    resumed.set_state(state)
    _assert_same(_take(resumed, 5), batches[4:])
  with _stream(ShardSource(), **kwargs) as other:
    with pytest.raises(ValueError, match="workers=2, this run has 0"):
      other.set_state(state)


def test_stream_reads_shards_lazily():
  source = ShardSource(sizes=(200, 200))
  loader = _stream(source, batch=4)
  loader.next_batch()
  time.sleep(0.5)  # let the prefetch thread read all it can
  # A window (8), the open shards' next examples and the batches in flight:
  # never the whole shard.
  assert source.pulled <= 8 + 2 * 2 + (loader_lib.PREFETCH_BATCHES + 2) * 4
  loader.close()


class _Counts:
  """A loader stand-in with given skip statistics."""

  def __init__(self, skipped, read):
    self.stats = {"skipped": skipped, "skipped_fraction": skipped / read,
                  "skipped_keys": [f"bad_{i}.jpg" for i in range(skipped)]}

  def statistics(self):
    return self.stats


def test_too_many_skipped_images_stop_the_run_naming_them():
  from jaxsd.data import pipeline  # pylint: disable=g-import-not-at-top
  pipeline.check_skipped(_Counts(0, 100), 0.01)
  pipeline.check_skipped(_Counts(1, 100), 0.01)  # at the limit: goes on
  with pytest.raises(pipeline.TooManySkippedImagesError,
                     match=r"2 images .*bad_0\.jpg.*max_skipped_fraction"):
    pipeline.check_skipped(_Counts(2, 100), 0.01)
