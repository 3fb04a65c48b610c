"""MNIST through tensorflow-datasets: jaxsd's one MNIST reader.

Offline it builds tfds's `mnist` from the four original files (data.mnist_dir);
without them and without a network it fails in seconds, saying what to
provide. The `mnist` data source (jaxsd/data/source_mnist.py) and the
evaluation's classifier read MNIST through `load_mnist`.
"""
import functools
import os
from typing import Tuple

from absl import logging
import numpy as np

from jaxsd import hub

MNIST_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
               "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")


def _tfds_data_dir(data_config) -> str:
  # Filled from $TFDS_DATA_DIR by jaxsd.environment.resolve.
  return data_config.tfds_data_dir or os.path.expanduser("~/tensorflow_datasets")


def _hide_gpus_from_tensorflow(tf):
  # TF (used by tfds and clu) must never grab GPU memory or NCCL from JAX.
  try:
    tf.config.set_visible_devices([], "GPU")
  except RuntimeError:  # already initialised; nothing left to hide
    pass


@functools.lru_cache(maxsize=4)
def _load_split(dataset: str, split: str, data_dir: str,
                mnist_dir: str) -> Tuple[np.ndarray, np.ndarray]:
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  _hide_gpus_from_tensorflow(tf)
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  tfds.disable_progress_bar()
  builder = tfds.builder(dataset, data_dir=data_dir)
  if not builder.is_prepared():
    if mnist_dir:
      missing = [f for f in MNIST_FILES
                 if not os.path.exists(os.path.join(mnist_dir, f))]
      if missing:
        raise FileNotFoundError(
            f"data.mnist_dir={mnist_dir!r} lacks {missing}; it must hold the "
            f"four original MNIST files {list(MNIST_FILES)}.")
      logging.info("Building %s in %s from %s (no download).", dataset,
                   data_dir, mnist_dir)
      download_config = tfds.download.DownloadConfig(manual_dir=mnist_dir)
    elif not hub.network_available("storage.googleapis.com"):
      raise RuntimeError(
          f"The {dataset!r} dataset is not prepared in {data_dir} and there is "
          "no network to download it. Provide a folder with the four original "
          f"MNIST files ({', '.join(MNIST_FILES)}) via --config.data.mnist_dir="
          "DIR or the JAXSD_MNIST_DIR environment variable.")
    else:
      download_config = tfds.download.DownloadConfig()
    builder.download_and_prepare(download_config=download_config)
  data = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1))
  images = np.asarray(data["image"], np.uint8)
  labels = np.asarray(data["label"], np.int32)
  return images, labels


def load_mnist(data_config, split: str = "train"
               ) -> Tuple[np.ndarray, np.ndarray]:
  """Returns (images uint8 [N, 28, 28, 1], labels int32 [N]) of a tfds split."""
  return _load_split("mnist", split, _tfds_data_dir(data_config),
                     data_config.mnist_dir or "")
