"""MNIST with captions: loading (tfds), statistics, and deterministic batches.

MNIST fits in host memory, so the pipeline is a numpy index computation: the
order of epoch e is a permutation drawn from (seed, e), global batch i of the
run is a slice of that order, and each process takes its contiguous share of
every global batch. The data position is therefore just the number of global
batches consumed, saved with each checkpoint, and a resumed run sees exactly
the batches an uninterrupted one would.
"""
import concurrent.futures
import dataclasses
import functools
import os
from typing import Dict, Optional, Tuple

from absl import logging
import numpy as np

from jaxsd import hub

MNIST_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
               "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")


def _tfds_data_dir(data_config) -> str:
  return (data_config.tfds_data_dir or os.environ.get("TFDS_DATA_DIR")
          or os.path.expanduser("~/tensorflow_datasets"))


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
  if data_config.dataset != "mnist":
    raise ValueError(f"data.dataset={data_config.dataset!r} is not supported; "
                     "jaxsd's pipeline reads 'mnist'.")
  return _load_split(data_config.dataset, split, _tfds_data_dir(data_config),
                     data_config.mnist_dir or "")


def dataset_statistics(images: np.ndarray, labels: np.ndarray,
                       num_classes: int = 10) -> Dict[str, float]:
  """Size, per-class counts and pixel mean/std (of [-1, 1]-scaled pixels)."""
  pixels = images.astype(np.float64) / 127.5 - 1.0
  stats = {"size": float(len(labels)),
           "pixel_mean": float(pixels.mean()),
           "pixel_std": float(pixels.std())}
  counts = np.bincount(labels, minlength=num_classes)
  for c in range(num_classes):
    stats[f"count_{c}"] = float(counts[c])
  return stats


def captions_for_labels(template: str, num_classes: int = 10):
  return [template.format(label=c) for c in range(num_classes)]


def preprocess_images(images: np.ndarray, image_size: int) -> np.ndarray:
  """uint8 [B, h, w, C] -> float32 [B, image_size, image_size, C] in [-1, 1].

  Pads with the background value -1 (MNIST's black) to reach image_size.
  """
  x = images.astype(np.float32) / 127.5 - 1.0
  h, w = x.shape[1:3]
  if image_size < max(h, w):
    raise ValueError(f"data.image_size={image_size} is smaller than the "
                     f"images ({h}x{w}); only padding is supported.")
  if image_size != h or image_size != w:
    ph, pw = image_size - h, image_size - w
    x = np.pad(x, ((0, 0), (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2),
                   (0, 0)), constant_values=-1.0)
  return x


@dataclasses.dataclass
class CaptionedImages:
  """Deterministic, resumable batches of a captioned image set.

  Attributes:
    images: uint8 [N, h, w, C].
    labels: int32 [N].
    caption_ids: int32 [num_classes, L] token ids of each class's caption.
    global_batch_size: images per step over all processes.
    process_index, process_count: this process's share of each global batch.
  """
  images: np.ndarray
  labels: np.ndarray
  caption_ids: np.ndarray
  global_batch_size: int
  image_size: int
  seed: int = 0
  shuffle: bool = True
  random_flip: bool = False
  process_index: int = 0
  process_count: int = 1

  def __post_init__(self):
    if self.global_batch_size % self.process_count:
      raise ValueError(
          f"training.batch_size={self.global_batch_size} does not divide by "
          f"the {self.process_count} processes; choose a multiple of "
          f"{self.process_count}.")
    if self.global_batch_size > len(self.labels):
      raise ValueError(f"training.batch_size={self.global_batch_size} exceeds "
                       f"the dataset's {len(self.labels)} examples.")
    self._order_cache: Dict[int, np.ndarray] = {}

  @property
  def batches_per_epoch(self) -> int:
    return len(self.labels) // self.global_batch_size  # drops the remainder

  @property
  def local_batch_size(self) -> int:
    return self.global_batch_size // self.process_count

  def _order(self, epoch: int) -> np.ndarray:
    if epoch not in self._order_cache:
      if self.shuffle:
        order = np.random.default_rng([self.seed, epoch]).permutation(
            len(self.labels))
      else:
        order = np.arange(len(self.labels))
      self._order_cache = {epoch: order}  # only the current epoch is needed
    return self._order_cache[epoch]

  def global_indices(self, position: int) -> np.ndarray:
    """Dataset indices of global batch number `position` (0-based)."""
    epoch, i = divmod(position, self.batches_per_epoch)
    b = self.global_batch_size
    return self._order(epoch)[i * b:(i + 1) * b]

  def batch(self, position: int) -> Dict[str, np.ndarray]:
    """This process's share of global batch `position`.

    Returns dict with image float32 [b, S, S, C] in [-1, 1], input_ids int32
    [b, L] and label int32 [b], where b = local batch size.
    """
    idx = self.global_indices(position)
    lo = self.process_index * self.local_batch_size
    idx = idx[lo:lo + self.local_batch_size]
    images = preprocess_images(self.images[idx], self.image_size)
    if self.random_flip:
      rng = np.random.default_rng([self.seed, position, 1])
      flip = rng.random(self.global_batch_size)[lo:lo + self.local_batch_size]
      images = np.where(flip[:, None, None, None] < 0.5, images[:, :, ::-1],
                        images)
    labels = self.labels[idx]
    return {"image": images, "input_ids": self.caption_ids[labels],
            "label": labels}

  def iterate(self, start_position: int, end_position: Optional[int] = None):
    """Yields (position, batch) from start_position on."""
    position = start_position
    while end_position is None or position < end_position:
      yield position, self.batch(position)
      position += 1


def training_data(config, tokenizer, images: np.ndarray, labels: np.ndarray,
                  process_index: int = 0, process_count: int = 1
                  ) -> CaptionedImages:
  """The config's training batches of (images, labels), each label's caption
  tokenised once."""
  from jaxsd import text as text_lib  # pylint: disable=g-import-not-at-top
  caption_ids = text_lib.tokenize(
      tokenizer, captions_for_labels(config.data.caption_template),
      config.text.max_length)
  return CaptionedImages(
      images=images, labels=labels, caption_ids=caption_ids,
      global_batch_size=config.training.batch_size,
      image_size=config.data.image_size, seed=config.training.seed,
      shuffle=config.data.shuffle, random_flip=config.data.random_flip,
      process_index=process_index, process_count=process_count)


def model_inputs(data: CaptionedImages, position: int, steps: int = 1
                 ) -> Dict[str, np.ndarray]:
  """This process's batch at `position` without labels; with steps > 1 the
  batches of `steps` consecutive positions stacked on a leading axis (one
  call of training.steps_per_call steps)."""
  if steps == 1:
    local = data.batch(position)
  else:
    parts = [data.batch(position + i) for i in range(steps)]
    local = {key: np.stack([p[key] for p in parts]) for key in parts[0]}
  local.pop("label")
  return local


class Prefetcher:
  """Builds the batch at `position + stride` in a thread while the caller
  trains on the one at `position` (host assembly and host-to-device copy
  overlap the device step).

  `make(position)` must be a pure function of position (CaptionedImages is),
  so a prefetched batch is exactly the one asked for; a jump in position
  (resume) just builds the asked-for batch directly.
  """

  def __init__(self, make, stride: int = 1):
    self._make = make
    self._stride = stride
    self._pool = concurrent.futures.ThreadPoolExecutor(
        max_workers=1, thread_name_prefix="jaxsd-prefetch")
    self._pending = None  # (position, future)

  def get(self, position: int):
    if self._pending is not None and self._pending[0] == position:
      batch = self._pending[1].result()
    else:
      batch = self._make(position)
    nxt = position + self._stride
    self._pending = (nxt, self._pool.submit(self._make, nxt))
    return batch

  def close(self):
    self._pool.shutdown(wait=True, cancel_futures=True)
    self._pending = None
