"""MNIST through tfds (the one MNIST reader, offline from the four files)
and caption tokens. The batches themselves: tests/test_data_loader.py."""
import os
import shutil
import time

import numpy as np
import pytest

from jaxsd.data import mnist as input_pipeline
from jaxsd.text import encoder as text


def test_captions_and_tokens(tokenizer):
  captions = [f"a photograph of the number {d}" for d in range(10)]
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


def test_offline_without_files_fails_fast(tiny_config, tmp_path, monkeypatch):
  from jaxsd import hub  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(hub, "network_available", lambda *a, **k: False)
  config = tiny_config()
  config.data.mnist_dir = ""
  config.data.tfds_data_dir = str(tmp_path)
  import tensorflow_datasets  # pylint: disable=g-import-not-at-top,unused-import
  start = time.time()  # what must be fast is the failure, not the import
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
def test_decoded_split_is_kept_beside_the_dataset(tiny_config, monkeypatch,
                                                  caplog):
  """The first load decodes the tfds split and keeps its arrays in the
  version folder; the next load (another process) reads them without
  decoding, and without tfds (nor TensorFlow); a damaged file is decoded
  again, with a warning."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  data = tiny_config().data
  data_dir = input_pipeline._tfds_data_dir(data)
  load = lambda: input_pipeline._load_split.__wrapped__(  # no lru cache
      "mnist", "test", data_dir, data.mnist_dir or "")
  images, labels = load()
  path = input_pipeline.arrays_path(tfds.builder("mnist", data_dir=data_dir),
                                    "test")
  assert path.endswith("jaxsd-test.npz") and images.shape == (10000, 28, 28, 1)
  assert input_pipeline._kept_arrays_path("mnist", "test", data_dir) == path
  saved = path + ".saved"
  shutil.copy(path, saved)  # the session's other tests keep using it
  try:
    def no_decoding(*args, **kwargs):
      raise AssertionError("decoded again")
    with monkeypatch.context() as m:
      m.setattr(tfds.core.DatasetBuilder, "as_dataset", no_decoding)
      m.setattr(tfds, "builder", no_decoding)
      again_images, again_labels = load()
    np.testing.assert_array_equal(again_images, images)
    np.testing.assert_array_equal(again_labels, labels)
    assert again_images.dtype == np.uint8 and again_labels.dtype == np.int32

    with open(path, "r+b") as f:
      f.truncate(1000)
    redone_images, _ = load()
    np.testing.assert_array_equal(redone_images, images)
    assert "decoding the split again" in caplog.text
    np.load(path)["image"]  # rewritten whole
  finally:
    shutil.copy(saved, path)
    os.remove(saved)
