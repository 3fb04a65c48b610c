"""Reads the four original MNIST files (IDX format, gzipped) with numpy only.

The evaluation code needs MNIST in two places (training its classifier and the
reference statistics for FID); this reader keeps it free of tensorflow and of
the training input pipeline.
"""
import gzip
import os
from typing import Optional, Tuple

import numpy as np

# IDX type codes (third byte of the magic number) and their big-endian dtypes.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4",
               0x0D: ">f4", 0x0E: ">f8"}

_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def read_idx(path: str) -> np.ndarray:
  """Reads one IDX file (gzipped when the name ends in .gz) into an array."""
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rb") as f:
    data = f.read()
  if len(data) < 4 or data[0] != 0 or data[1] != 0:
    raise ValueError(f"{path}: not an IDX file (bad magic number)")
  type_code, ndim = data[2], data[3]
  if type_code not in _IDX_DTYPES:
    raise ValueError(f"{path}: unknown IDX type code {type_code:#x}")
  shape = tuple(int(d) for d in
                np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
  dtype = np.dtype(_IDX_DTYPES[type_code])
  offset = 4 + 4 * ndim
  expected = int(np.prod(shape)) * dtype.itemsize
  if len(data) - offset != expected:
    raise ValueError(f"{path}: {len(data) - offset} payload bytes, header "
                     f"{shape} needs {expected}")
  array = np.frombuffer(data, dtype=dtype, offset=offset).reshape(shape)
  return array.astype(dtype.newbyteorder("="))


def default_mnist_dir() -> str:
  """`$JAXSD_MNIST_DIR`, else the repository's `../shared/assets/mnist`."""
  env = os.environ.get("JAXSD_MNIST_DIR")
  if env:
    return env
  root = os.path.dirname(os.path.dirname(os.path.dirname(
      os.path.abspath(__file__))))
  return os.path.join(os.path.dirname(root), "shared", "assets", "mnist")


def _find(directory: str, stem: str) -> str:
  for name in (stem + ".gz", stem):
    path = os.path.join(directory, name)
    if os.path.exists(path):
      return path
  raise FileNotFoundError(
      f"MNIST file {stem}(.gz) not found in {directory!r}; point "
      "JAXSD_MNIST_DIR at the folder holding the four original files")


def load_mnist_split(split: str, directory: Optional[str] = None
                     ) -> Tuple[np.ndarray, np.ndarray]:
  """Loads one MNIST split.

  Args:
    split: "train" (60000 images) or "test" (10000 images).
    directory: folder with the original files; default `default_mnist_dir()`.

  Returns:
    images uint8 [N, 28, 28] in 0..255, labels int32 [N] in 0..9.
  """
  if split not in _FILES:
    raise ValueError(f"split must be one of {sorted(_FILES)}, got {split!r}")
  directory = directory or default_mnist_dir()
  images_stem, labels_stem = _FILES[split]
  images = read_idx(_find(directory, images_stem))
  labels = read_idx(_find(directory, labels_stem)).astype(np.int32)
  if images.ndim != 3 or images.shape[0] != labels.shape[0]:
    raise ValueError(f"inconsistent MNIST {split} files: images "
                     f"{images.shape}, labels {labels.shape}")
  return images, labels


def to_model_range(images: np.ndarray) -> np.ndarray:
  """uint8 [N, 28, 28(, 1)] -> float32 [N, 28, 28, 1] in [-1, 1]."""
  images = np.asarray(images)
  if images.ndim == 3:
    images = images[..., None]
  return images.astype(np.float32) / 127.5 - 1.0
