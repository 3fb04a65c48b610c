"""Data: captions, tokens, preprocessing, determinism, process shares, resume."""
import time

import numpy as np
import pytest

from jaxsd import input_pipeline
from jaxsd import text


def _data(n=100, batch=10, seed=0, process_index=0, process_count=1,
          **kwargs):
  rng = np.random.default_rng(123)
  images = rng.integers(0, 256, (n, 28, 28, 1), dtype=np.uint8)
  labels = (np.arange(n) % 10).astype(np.int32)
  caption_ids = np.arange(10 * 4, dtype=np.int32).reshape(10, 4)
  return input_pipeline.CaptionedImages(
      images=images, labels=labels, caption_ids=caption_ids,
      global_batch_size=batch, image_size=28, seed=seed,
      process_index=process_index, process_count=process_count, **kwargs)


def test_captions_and_tokens(tokenizer):
  captions = input_pipeline.captions_for_labels(
      "a photograph of the number {label}")
  assert captions[7] == "a photograph of the number 7"
  ids = text.tokenize(tokenizer, captions, 12)
  assert ids.shape == (10, 12) and ids.dtype == np.int32
  # <start> a photograph of the number 7 <end> <pad>...
  np.testing.assert_array_equal(
      ids[7], [49406, 320, 8853, 539, 518, 2842, 278] + [49407] * 5)
  assert len({tuple(r) for r in ids}) == 10  # each digit distinct
  empty = text.empty_prompt_ids(tokenizer, 12)
  np.testing.assert_array_equal(empty[0], [49406] + [49407] * 11)


def test_long_prompt_truncated_with_warning(tokenizer, caplog):
  ids = text.tokenize(tokenizer, ["word " * 30], 8, warn_truncation=True)
  assert ids.shape == (1, 8) and ids[0, -1] == 49407
  assert "truncated" in caplog.text


def test_preprocess_scales_and_pads():
  images = np.zeros((2, 28, 28, 1), np.uint8)
  images[:, 0, 0] = 255
  x = input_pipeline.preprocess_images(images, 32)
  assert x.shape == (2, 32, 32, 1) and x.dtype == np.float32
  assert x.min() == -1.0 and x.max() == 1.0
  assert x[0, 2, 2, 0] == 1.0  # 2 pixels of padding on each side
  assert np.all(x[:, :2] == -1.0) and np.all(x[:, -2:] == -1.0)
  with pytest.raises(ValueError, match="image_size"):
    input_pipeline.preprocess_images(images, 16)


def test_batches_are_deterministic_and_cover_each_epoch():
  a, b = _data(seed=3), _data(seed=3)
  for pos in (0, 5, 13):
    np.testing.assert_array_equal(a.global_indices(pos), b.global_indices(pos))
  epoch0 = np.concatenate([a.global_indices(p) for p in range(10)])
  epoch1 = np.concatenate([a.global_indices(p) for p in range(10, 20)])
  np.testing.assert_array_equal(np.sort(epoch0), np.arange(100))
  np.testing.assert_array_equal(np.sort(epoch1), np.arange(100))
  assert not np.array_equal(epoch0, epoch1)  # reshuffled per epoch
  assert not np.array_equal(a.global_indices(0),
                            _data(seed=4).global_indices(0))


def test_batch_contents_match_labels():
  d = _data()
  batch = d.batch(2)
  idx = d.global_indices(2)
  np.testing.assert_array_equal(batch["label"], d.labels[idx])
  np.testing.assert_array_equal(batch["input_ids"],
                                d.caption_ids[d.labels[idx]])
  np.testing.assert_allclose(batch["image"],
                             d.images[idx].astype(np.float32) / 127.5 - 1)


def test_processes_split_each_global_batch():
  whole = _data(batch=12)
  shares = [_data(batch=12, process_index=i, process_count=3)
            for i in range(3)]
  for pos in (0, 7):
    parts = [s.batch(pos) for s in shares]
    assert all(len(p["label"]) == 4 for p in parts)
    np.testing.assert_array_equal(
        np.concatenate([p["image"] for p in parts]), whole.batch(pos)["image"])
  with pytest.raises(ValueError, match="divide by the 3 processes"):
    _data(batch=10, process_count=3)


def test_resume_position_gives_same_batches():
  d = _data()
  straight = [b["label"] for _, b in d.iterate(0, 25)]
  resumed = [b["label"] for _, b in _data().iterate(17, 25)]
  for x, y in zip(straight[17:], resumed):
    np.testing.assert_array_equal(x, y)


def test_model_inputs_drop_labels_and_stack_steps():
  d = _data()
  one = input_pipeline.model_inputs(d, 3)
  assert sorted(one) == ["image", "input_ids"]
  np.testing.assert_array_equal(one["image"], d.batch(3)["image"])
  three = input_pipeline.model_inputs(d, 3, steps=3)
  assert three["image"].shape == (3,) + one["image"].shape
  for i in range(3):
    np.testing.assert_array_equal(three["input_ids"][i],
                                  d.batch(3 + i)["input_ids"])


def test_training_data_follows_the_config(tiny_config, tokenizer):
  config = tiny_config()
  images = np.zeros((40, 28, 28, 1), np.uint8)
  labels = (np.arange(40) % 10).astype(np.int32)
  data = input_pipeline.training_data(config, tokenizer, images, labels,
                                      process_index=1, process_count=2)
  assert data.global_batch_size == config.training.batch_size
  assert (data.process_index, data.process_count) == (1, 2)
  assert data.caption_ids.shape == (10, config.text.max_length)
  np.testing.assert_array_equal(
      data.caption_ids, text.tokenize(
          tokenizer, input_pipeline.captions_for_labels(
              config.data.caption_template), config.text.max_length))


def test_prefetcher_gives_the_asked_for_batches():
  d = _data()
  calls = []
  def make(position):
    calls.append(position)
    return d.batch(position)
  prefetch = input_pipeline.Prefetcher(make, stride=2)
  try:
    for pos in (0, 2, 4, 9, 11):  # 9: a jump, as after a resume
      np.testing.assert_array_equal(prefetch.get(pos)["image"],
                                    d.batch(pos)["image"])
  finally:
    prefetch.close()
  # 4 was prefetched after 2 and used; 6 was prefetched but never asked for;
  # 9 was built directly.
  assert calls.count(4) == 1 and 6 in calls and calls.count(9) == 1


def test_random_flip_is_deterministic():
  d = _data(random_flip=True)
  np.testing.assert_array_equal(d.batch(1)["image"], d.batch(1)["image"])
  plain = _data().batch(1)["image"]
  flipped = d.batch(1)["image"]
  same = [np.array_equal(p, f) for p, f in zip(plain, flipped)]
  mirrored = [np.array_equal(p[:, ::-1], f) for p, f in zip(plain, flipped)]
  assert all(s or m for s, m in zip(same, mirrored)) and any(mirrored)


def test_dataset_statistics():
  images = np.array([[[[0]]], [[[255]]], [[[255]]]], np.uint8)
  stats = input_pipeline.dataset_statistics(images, np.array([0, 1, 1]), 3)
  assert stats["size"] == 3 and stats["count_1"] == 2 and stats["count_2"] == 0
  np.testing.assert_allclose(stats["pixel_mean"], 1 / 3)


def test_offline_without_files_fails_fast(tiny_config, tmp_path, monkeypatch):
  from jaxsd import hub  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(hub, "network_available", lambda *a, **k: False)
  config = tiny_config()
  config.data.mnist_dir = ""
  config.data.tfds_data_dir = str(tmp_path)
  start = time.time()
  with pytest.raises(RuntimeError, match="JAXSD_MNIST_DIR"):
    input_pipeline.load_mnist(config.data, "test")
  assert time.time() - start < 10


def test_mnist_dir_missing_files(tiny_config, tmp_path):
  config = tiny_config()
  config.data.mnist_dir = str(tmp_path)
  config.data.tfds_data_dir = str(tmp_path / "tfds")
  with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte.gz"):
    input_pipeline.load_mnist(config.data, "test")


@pytest.mark.mnist
@pytest.mark.slow  # builds tfds's mnist from the four files
def test_load_mnist_offline_from_files(tiny_config):
  images, labels = input_pipeline.load_mnist(tiny_config().data, "test")
  assert images.shape == (10000, 28, 28, 1) and images.dtype == np.uint8
  np.testing.assert_array_equal(np.bincount(labels)[:3], [980, 1135, 1032])
