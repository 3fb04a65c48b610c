"""Aspect-ratio buckets: which (height, width) each image trains at, and
the order of a bucketed epoch's batches.

`data.buckets` is "off" (every image resized and cropped to one square, the
default), "auto" (`auto_shapes`: about data.image_size**2 pixels each, sides
multiples of what the model needs, aspect ratios up to
data.bucket_max_aspect) or an explicit list "HxW,HxW,..." (`parse`).

Each image goes to the bucket nearest its aspect ratio in log space
(`assign`; ties to the earlier bucket of the sorted list), is resized to
cover the bucket and cropped (transforms.ImageTransform.to_bucket).

`BucketPlan` orders the batches. With N examples of which n_k sit in bucket
k and a global batch B:
- bucket k's sequence in epoch e is the last r_k(e) = (e * n_k) mod B
  examples of its earlier epochs' orders (the leftover, not yet trained
  on; from epoch e - 1 unless the bucket holds fewer than a batch) followed
  by its epoch e order (a permutation of its
  members drawn from default_rng([seed, e, k + 1]); sorted unshuffled);
- that sequence gives c_k(e) = floor((e + 1) n_k / B) - floor(e n_k / B)
  full batches, the rest carries into epoch e + 1: no image goes unseen and
  bucket k's share of batches is n_k / N over the epochs;
- the epoch's batches (k, j) for j < c_k(e) are permuted by
  default_rng([seed, e]) (unshuffled: bucket by bucket);
- global batch p is the (p - C(e))-th of epoch e, C(e) = sum_k floor(e n_k /
  B) the batches before it; process i of P takes [i * B/P, (i + 1) * B/P)
  of it.
So a batch is a pure function of (seed, p, the assignment): every process
computes the same plan, and the loader's state stays its position p.
"""
import io
import math
from typing import Dict, List, Optional, Sequence, Tuple

from absl import logging
import numpy as np
from PIL import Image

Shape = Tuple[int, int]  # (height, width) in pixels

OFF = "off"
AUTO = "auto"
# "auto" buckets step their sides by about image_size / AUTO_STEPS_PER_SIDE
# (rounded up to the model's multiple): a handful of buckets, each its own
# compiled step, rather than one per multiple.
AUTO_STEPS_PER_SIDE = 8
_EXIF_ORIENTATION = 0x0112
_TRANSPOSED = (5, 6, 7, 8)  # EXIF orientations that swap width and height


def enabled(data_config) -> bool:
  return str(data_config.get("buckets", OFF)).strip().lower() != OFF


def parse(value) -> Optional[List[Shape]]:
  """data.buckets -> None (off), "auto", or the sorted distinct shapes.

  Accepts "off", "auto", "HxW,HxW,..." or a sequence of (h, w) pairs.
  Raises ValueError naming the accepted forms.
  """
  if isinstance(value, str):
    text = value.strip().lower()
    if text == OFF:
      return None
    if text == AUTO:
      return AUTO
    pairs = []
    for part in text.replace(" ", "").split(","):
      h, sep, w = part.partition("x")
      if not sep or not h.isdigit() or not w.isdigit():
        raise ValueError(
            f"data.buckets={value!r}: use 'off', 'auto' or a list of "
            "heightxwidth shapes such as '48x88,64x64,88x48'.")
      pairs.append((int(h), int(w)))
  else:
    try:
      pairs = [(int(h), int(w)) for h, w in value]
    except (TypeError, ValueError):
      raise ValueError(
          f"data.buckets={value!r}: use 'off', 'auto' or a list of "
          "heightxwidth shapes such as '48x88,64x64,88x48'.") from None
  if not pairs or any(h < 1 or w < 1 for h, w in pairs):
    raise ValueError(f"data.buckets={value!r}: every side must be >= 1.")
  return sorted(set(pairs))


def auto_shapes(image_size: int, multiple: int, max_aspect: float
                ) -> List[Shape]:
  """About image_size**2 pixels each, sides multiples of `multiple`
  (stepped by max(multiple, ~image_size / 8)), long side / short side <=
  max_aspect; symmetric, the square included when image_size allows."""
  step = multiple * max(1, math.ceil(image_size / AUTO_STEPS_PER_SIDE
                                     / multiple))
  area = image_size * image_size
  shapes = set()
  short = step
  while short * short <= area:
    long = max(short, round(area / short / step) * step)
    if long / short <= max_aspect:
      shapes.update({(short, long), (long, short)})
    short += step
  if not shapes:  # image_size below one step: the nearest square
    side = max(step, round(image_size / step) * step)
    shapes.add((side, side))
  return sorted(shapes)


def model_multiple(config, autoencoder_factor: int = 1) -> int:
  """What a bucket side must divide by: the UNet's 2**(levels - 1) times
  the autoencoder's downsampling (1 in pixel space)."""
  return autoencoder_factor * 2 ** (len(config.model.block_out_channels) - 1)


def shapes_of(config, autoencoder_factor: int = 1) -> Optional[List[Shape]]:
  """The run's bucket shapes in pixels, or None with data.buckets off."""
  data = config.data
  parsed = parse(data.get("buckets", OFF))
  if parsed == AUTO:
    return auto_shapes(data.image_size,
                       model_multiple(config, autoencoder_factor),
                       float(data.get("bucket_max_aspect", 2.0)))
  return parsed


def assign(sizes: Sequence[Optional[Shape]], shapes: Sequence[Shape]
           ) -> np.ndarray:
  """int32 [N]: the index in `shapes` of the bucket nearest each (h, w) in
  |log(h / w) - log(H / W)| (ties: the earlier bucket); an image whose size
  is unknown (None: it does not open) goes to the most square bucket, where
  the loader replaces it like any undecodable image."""
  log_ratios = np.array([math.log(h / w) for h, w in shapes])
  square = int(np.argmin(np.abs(log_ratios)))
  out = np.empty(len(sizes), np.int32)
  for i, size in enumerate(sizes):
    if size is None:
      out[i] = square
    else:
      out[i] = int(np.argmin(np.abs(log_ratios - math.log(size[0] / size[1]))))
  return out


def image_size(data) -> Optional[Shape]:
  """(height, width) of encoded bytes or an open file (PIL reads the header
  only, and the EXIF orientation) or of a uint8 array [H, W, C]; None if
  it does not open."""
  if isinstance(data, np.ndarray):
    return int(data.shape[0]), int(data.shape[1])
  try:
    with Image.open(io.BytesIO(data) if isinstance(data, bytes)
                    else data) as image:
      w, h = image.size
      try:
        orientation = image.getexif().get(_EXIF_ORIENTATION)
      except Exception:  # pylint: disable=broad-except  (bad EXIF: ignore)
        orientation = None
  except Exception:  # pylint: disable=broad-except  (decode says why later)
    return None
  return (w, h) if orientation in _TRANSPOSED else (h, w)


def source_image_sizes(source) -> List[Optional[Shape]]:
  """Each example's (height, width), read once per source object and kept
  on it (`source.image_size(i)` when the source can read a header without
  the whole file; else from the example's image)."""
  cached = getattr(source, "_bucket_image_sizes", None)
  if cached is not None:
    return cached
  n = len(source)
  own = getattr(source, "image_size", None)
  sizes = []
  for i in range(n):
    sizes.append(own(i) if callable(own) else image_size(source[i]["image"]))
  logging.info("Read the sizes of %d images for data.buckets.", n)
  try:
    source._bucket_image_sizes = sizes  # pylint: disable=protected-access
  except AttributeError:
    pass
  return sizes


def source_assignment(source, shapes: Sequence[Shape]) -> np.ndarray:
  """int32 [N]: each example's bucket. A latent cache gives its stored
  assignment (`bucket_assignment(shapes)`), other sources their images'."""
  stored = getattr(source, "bucket_assignment", None)
  if callable(stored):
    return np.asarray(stored(shapes), np.int32)
  return assign(source_image_sizes(source), shapes)


def name(shape: Shape) -> str:
  return f"{shape[0]}x{shape[1]}"


class BucketPlan:
  """The batches of a bucketed epoch (see the module docstring).

  Picklable and small: the assignment and the per-epoch orders it derives
  (the last two epochs' kept).
  """

  def __init__(self, assignment: np.ndarray, shapes: Sequence[Shape],
               global_batch_size: int, seed: int, shuffle: bool):
    self.assignment = np.asarray(assignment, np.int32)
    self.shapes = [tuple(int(v) for v in s) for s in shapes]
    self.global_batch_size = global_batch_size
    self.seed, self.shuffle = seed, shuffle
    self.members = [np.flatnonzero(self.assignment == k)
                    for k in range(len(self.shapes))]
    self.counts = np.array([len(m) for m in self.members], np.int64)
    if self.counts.sum() < global_batch_size:
      raise ValueError(
          f"training.batch_size={global_batch_size} exceeds the dataset's "
          f"{int(self.counts.sum())} examples.")
    self._orders: Dict[Tuple[int, int], np.ndarray] = {}
    self._epoch_batches: Dict[int, np.ndarray] = {}

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_orders"], state["_epoch_batches"] = {}, {}
    return state

  def batches_before(self, epoch: int) -> int:
    """C(e): global batches in epochs 0 .. e - 1."""
    return int(np.sum((epoch * self.counts) // self.global_batch_size))

  def mean_batches_per_epoch(self) -> float:
    return float(self.counts.sum() / self.global_batch_size)

  def epoch_of(self, position: int) -> int:
    """The epoch global batch `position` belongs to."""
    n, b = int(self.counts.sum()), self.global_batch_size
    epoch = max(0, position * b // n - 1)
    while self.batches_before(epoch) > position:
      epoch -= 1
    while self.batches_before(epoch + 1) <= position:
      epoch += 1
    return epoch

  def _order(self, epoch: int, k: int) -> np.ndarray:
    """Bucket k's members in epoch e's order."""
    if (epoch, k) not in self._orders:
      members = self.members[k]
      if self.shuffle:
        members = members[np.random.default_rng(
            [self.seed, epoch, k + 1]).permutation(len(members))]
      if len(self._orders) > 8 * len(self.shapes):  # bounded memory
        self._orders = {}
      self._orders[(epoch, k)] = members
    return self._orders[(epoch, k)]

  def sequence(self, epoch: int, k: int) -> np.ndarray:
    """Bucket k's examples in epoch e: the leftover of e - 1, then e's."""
    carried = (epoch * int(self.counts[k])) % self.global_batch_size
    parts = [self._order(epoch, k)]
    back = epoch
    while carried > 0:  # a bucket smaller than a batch carries several epochs
      back -= 1
      earlier = self._order(back, k)
      parts.insert(0, earlier[max(0, len(earlier) - carried):])
      carried -= len(parts[0])
    return np.concatenate(parts) if len(parts) > 1 else parts[0]

  def epoch_batches(self, epoch: int) -> np.ndarray:
    """int [P_e, 2]: (bucket, batch within the bucket) in epoch e's order."""
    if epoch not in self._epoch_batches:
      b = self.global_batch_size
      per = ((epoch + 1) * self.counts) // b - (epoch * self.counts) // b
      batches = np.array([(k, j) for k in range(len(self.shapes))
                          for j in range(int(per[k]))],
                         np.int64).reshape(-1, 2)
      if self.shuffle:
        batches = batches[np.random.default_rng([self.seed, epoch])
                          .permutation(len(batches))]
      self._epoch_batches = {epoch: batches}  # one epoch at a time
    return self._epoch_batches[epoch]

  def locate(self, position: int) -> Tuple[int, int, int]:
    """(epoch, bucket, batch within the bucket's epoch sequence)."""
    epoch = self.epoch_of(position)
    k, j = self.epoch_batches(epoch)[position - self.batches_before(epoch)]
    return epoch, int(k), int(j)

  def global_indices(self, position: int) -> Tuple[int, int, np.ndarray]:
    """(epoch, bucket, the B source indices of global batch `position`)."""
    epoch, k, j = self.locate(position)
    b = self.global_batch_size
    return epoch, k, self.sequence(epoch, k)[j * b:(j + 1) * b]
