"""MNIST through tensorflow-datasets: jaxsd's one MNIST reader.

Offline it builds tfds's `mnist` from the four original files (data.mnist_dir);
without them and without a network it fails in seconds, saying what to
provide. The `mnist` data source (jaxsd/data/source_mnist.py) and the
evaluation's classifier read MNIST through `load_mnist`. The processes of a
run that share a data folder prepare a dataset once (`prepare_tfds`, under a
file lock; the `tfds` source uses it too). A split's decoded arrays are kept
beside the prepared dataset (`arrays_path`), so later runs skip decoding.
"""
import functools
import os
from typing import Tuple
import zipfile

from absl import logging
import numpy as np

from jaxsd import hub
from jaxsd import shared_files

MNIST_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
               "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")


def _tfds_data_dir(data_config) -> str:
  # Filled from $TFDS_DATA_DIR by jaxsd.environment.resolve.
  return data_config.tfds_data_dir or os.path.expanduser("~/tensorflow_datasets")


def _hide_gpus_from_tensorflow(tf):
  # TF (tfds uses it) must never grab GPU memory or NCCL from JAX.
  try:
    tf.config.set_visible_devices([], "GPU")
  except RuntimeError:  # already initialised; nothing left to hide
    pass


def prepare_lock_path(builder) -> str:
  """The file lock that serialises preparing a tfds dataset: beside its
  version folder (`DATA_DIR/mnist/3.0.1.lock`), where tfds also keeps its
  `incomplete.*` folders."""
  return os.fspath(builder.data_dir).rstrip("/") + ".lock"


def prepare_tfds(tfds, name: str, data_dir: str, prepare_fn):
  """A prepared tfds builder of `name` in `data_dir`, calling
  prepare_fn(builder) to prepare it when it is not.

  Every process of a run calls this on one shared data_dir: one prepares
  under a file lock while the others wait, then open what it wrote (tfds
  would otherwise have each build its own copy and all but one fail to
  rename it into place).
  """
  builder = tfds.builder(name, data_dir=data_dir)
  if builder.is_prepared():
    return builder
  shared_files.prepare_once(
      prepare_lock_path(builder),
      lambda: tfds.builder(name, data_dir=data_dir).is_prepared(),
      lambda: prepare_fn(builder))
  # A fresh builder reads the dataset's info from the folder just written.
  return tfds.builder(name, data_dir=data_dir)


def _download_config(tfds, dataset: str, data_dir: str, mnist_dir: str):
  if mnist_dir:
    missing = [f for f in MNIST_FILES
               if not os.path.exists(os.path.join(mnist_dir, f))]
    if missing:
      raise FileNotFoundError(
          f"data.mnist_dir={mnist_dir!r} lacks {missing}; it must hold the "
          f"four original MNIST files {list(MNIST_FILES)}.")
    logging.info("Building %s in %s from %s (no download).", dataset,
                 data_dir, mnist_dir)
    return tfds.download.DownloadConfig(manual_dir=mnist_dir)
  if not hub.network_available("storage.googleapis.com"):
    raise RuntimeError(
        f"The {dataset!r} dataset is not prepared in {data_dir} and there is "
        "no network to download it. Provide a folder with the four original "
        f"MNIST files ({', '.join(MNIST_FILES)}) via --config.data.mnist_dir="
        "DIR or the JAXSD_MNIST_DIR environment variable.")
  return tfds.download.DownloadConfig()


def arrays_path(builder, split: str) -> str:
  """Where the decoded arrays of a prepared split are kept: in the dataset's
  version folder (`DATA_DIR/mnist/3.0.1/jaxsd-train.npz`), so that they go
  with the files they were decoded from."""
  return os.path.join(os.fspath(builder.data_dir), f"jaxsd-{split}.npz")


def _read_arrays(path: str):
  try:
    with np.load(path) as f:
      return f["image"], f["label"]
  except (OSError, KeyError, ValueError, EOFError,
          zipfile.BadZipFile) as e:  # damaged: decode again
    logging.warning("Ignoring %s (%s); decoding the split again.", path, e)
    return None


def _write_arrays(path: str, images, labels) -> None:
  try:
    shared_files.atomic_write(
        path, lambda f: np.savez(f, image=images, label=labels))
  except OSError as e:  # a read-only data folder: decode each time
    logging.info("Not keeping the decoded arrays at %s (%s).", path, e)


def _kept_arrays_path(dataset: str, split: str, data_dir: str) -> str:
  """The kept arrays of the newest prepared version of `dataset` in
  data_dir, or "" (tfds writes a version folder under a temporary name and
  renames it when the dataset is complete)."""
  root = os.path.join(data_dir, dataset)
  # Version folders only ("3.0.1"): not "incomplete.*" nor "3.0.1.lock".
  folders = sorted((f for f in (os.listdir(root) if os.path.isdir(root) else [])
                    if all(p.isdigit() for p in f.split("."))),
                   key=lambda f: tuple(int(p) for p in f.split(".")),
                   reverse=True)
  for folder in folders:
    if os.path.exists(os.path.join(root, folder, "dataset_info.json")):
      path = os.path.join(root, folder, f"jaxsd-{split}.npz")
      return path if os.path.exists(path) else ""
  return ""


@functools.lru_cache(maxsize=4)
def _load_split(dataset: str, split: str, data_dir: str,
                mnist_dir: str) -> Tuple[np.ndarray, np.ndarray]:
  # Kept arrays are read without TensorFlow and tfds, whose imports took 5 s
  # of every process that loads MNIST (2-core AMD EPYC, 2026-12-06).
  kept = _kept_arrays_path(dataset, split, data_dir)
  arrays = _read_arrays(kept) if kept else None
  if arrays is not None:
    return arrays
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  _hide_gpus_from_tensorflow(tf)
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  tfds.disable_progress_bar()
  builder = prepare_tfds(
      tfds, dataset, data_dir,
      lambda b: b.download_and_prepare(download_config=_download_config(
          tfds, dataset, data_dir, mnist_dir)))
  # Decoding the 60000 training PNGs takes 5 s and more per process (2-core
  # AMD EPYC, 2026-12-06); the arrays read back in 0.01 s.
  path = arrays_path(builder, split)
  arrays = (_read_arrays(path) if os.path.exists(path) and path != kept
            else None)
  if arrays is not None:
    return arrays
  data = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1))
  images = np.asarray(data["image"], np.uint8)
  labels = np.asarray(data["label"], np.int32)
  _write_arrays(path, images, labels)
  return images, labels


def load_mnist(data_config, split: str = "train"
               ) -> Tuple[np.ndarray, np.ndarray]:
  """Returns (images uint8 [N, 28, 28, 1], labels int32 [N]) of a tfds split."""
  return _load_split("mnist", split, _tfds_data_dir(data_config),
                     data_config.mnist_dir or "")
