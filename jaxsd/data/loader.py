"""Deterministic, resumable batches of any captioned image source.

`make_loader(source, ...)` returns a loader with `next_batch()`,
`get_state()` / `set_state()`, `statistics()` and `close()`. An example is
`{"image": encoded bytes or uint8 [H, W, C], "caption": str, "key": str}`.

Random-access sources (`__len__`, `__getitem__`, optionally
`example(i, epoch)`) go through Grain, with the order of today's MNIST
pipeline (input_pipeline.CaptionedImages): epoch e's order is
`default_rng([seed, e]).permutation(N)`, global batch p is the slice
`[(p % P) * B, (p % P + 1) * B)` of epoch `p // P`'s order (P = N // B
batches per epoch, the remainder dropped), and process k takes
`[k * b, (k + 1) * b)` of it. A batch is a pure function of
(seed, p, process_index, process_count), so the state is the position p.
An image that does not decode is replaced in its slot by the next decodable
one after the batch in the epoch's order, process k trying positions
`(i + 1) * B + k + t * process_count` (mod N) for t = 0, 1, ... (disjoint
candidates per process, no coordination); the replacement therefore also
appears in its own place in the epoch.

Stream sources (`shards`, `read_shard(shard)`) go through Grain too
(stream.py): epoch e's shard order is `default_rng([seed, e]).permutation(
len(shards))`, process k reads `order[k::process_count]`, `cycle_length`
shards at a time interleaved example by example (InterleaveIterDataset),
through a window shuffle of `shuffle_buffer` examples
(WindowShuffleIterDataset); with `workers` >= 1 each worker reads the slice
`[w::workers]` of those shards and batches are taken from the workers in
turn. Epochs follow each other without a break (a batch may span two). An
image that does not decode is skipped and the next example taken. The
state is Grain's iterator state (per process). Memory: the open shards' next
examples and a window of raw (undecoded) examples per reader; never a whole
shard.

With aspect-ratio buckets (`bucket_shapes`, data.buckets; random-access
sources only) the order is buckets.BucketPlan's: every global batch comes
from one bucket, a bucket's leftover carries into the next epoch, and a
batch is still a pure function of (seed, p, process_index, process_count)
and the images' sizes; process k takes `[k * b, (k + 1) * b)` of it. Its
examples are float32 [b, h, w, C] at the bucket's shape, with "crop_top"
and "crop_left" int32 [b] (the crop's offsets in the resized image). An
undecodable image is replaced as above from its bucket's sequence.
Streamed sources refuse buckets (their order is per process, so the
processes could not agree on a bucket without exchanging data).

Captions are tokenised in the main process, batch by batch (tokenizers are
not always picklable). Transform randomness (random crop, flip) is drawn
from (seed, epoch, example index) (transforms.example_rng).
"""
from typing import Any, Callable, Dict, List

from absl import flags
from absl import logging
import numpy as np

from jaxsd import errors
from jaxsd.data import transforms

PREFETCH_BATCHES = 2
MAX_SKIPPED_KEYS = 10  # distinct keys of skipped images kept for statistics()
_ENDLESS = 2 ** 62  # length of the position range given to Grain


def make_loader(source, *, global_batch_size: int, image_size: int,
                tokenize_fn: Callable[[List[str]], np.ndarray], seed: int,
                shuffle: bool = True, num_channels: int = 3,
                crop: str = "center", random_flip: bool = False,
                pad_small: bool = False, background=transforms.WHITE,
                workers: int = 0,
                shuffle_buffer: int = 1000, cycle_length: int = 4,
               process_index: int = 0,
                process_count: int = 1, bucket_shapes=None):
  """A loader of this process's batches of `source`.

  Its `next_batch()` returns {"image": float32 [b, S, S, C] in [-1, 1],
  "input_ids": int32 [b, L]} with b = global_batch_size / process_count,
  S = image_size, C = num_channels and input_ids = tokenize_fn(captions).

  Args:
    source: a random-access source (`__len__`, `__getitem__`, optionally
      `example(i, epoch)`) or a stream source (`shards`, `read_shard`).
    crop: "center" or "random" (after resizing the shorter side to S).
    pad_small: pad images that fit in S x S with the black background
      instead of upscaling them (MNIST 28x28 at S = 32).
    background: (r, g, b) that images with transparency are composited
      onto (data.background).
    workers: decoding processes (0: decode in this process, in a thread).
    shuffle_buffer: examples shuffled together (stream sources only).
    cycle_length: shards read at once, interleaved (stream sources only).
    bucket_shapes: None (square batches) or the (height, width) buckets
      (buckets.shapes_of); random-access sources only.
  """
  transform = transforms.ImageTransform(
      image_size=image_size, num_channels=num_channels, crop=crop,
      random_flip=random_flip, pad_small=pad_small, background=background)
  if global_batch_size < 1 or global_batch_size % process_count:
    raise ValueError(
        f"training.batch_size={global_batch_size} does not divide by the "
        f"{process_count} processes; choose a multiple of {process_count}.")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} is not in "
                     f"[0, {process_count}).")
  if workers < 0:
    raise ValueError(f"workers={workers} must be >= 0.")
  common = dict(global_batch_size=global_batch_size, tokenize_fn=tokenize_fn,
                transform=transform, seed=seed, shuffle=shuffle,
                workers=workers, process_index=process_index,
                process_count=process_count)
  if hasattr(source, "read_shard") and hasattr(source, "shards"):
    if bucket_shapes:
      raise ValueError(
          "data.buckets works with random-access sources only; a streamed "
          "source (webdataset) cannot agree on one bucket per global batch "
          "across processes: set data.buckets='off' or use another source.")
    return StreamLoader(source, shuffle_buffer=shuffle_buffer,
                        cycle_length=cycle_length, **common)
  if hasattr(source, "__len__") and hasattr(source, "__getitem__"):
    return RandomAccessLoader(source, bucket_shapes=bucket_shapes, **common)
  raise TypeError(f"{type(source).__name__} is neither a random-access source "
                  "(__len__, __getitem__) nor a stream source (shards, "
                  "read_shard).")


def _arrays(element) -> Dict[str, np.ndarray]:
  """A built batch's model inputs: "image", or a latent cache's
  "latent_mean" and "latent_logvar" (and "context", its text embeddings);
  bucketed batches' "crop_top" and "crop_left"."""
  return {k: v for k, v in element.items()
          if k in ("image", "latent_mean", "latent_logvar", "context",
                   "crop_top", "crop_left")}


# A saved loader state's fields: the setting each comes from.
STATE_FIELD_SETTINGS = {
    "global_batch_size": "training.batch_size",
    "seed": "training.seed",
    "shuffle": "data.shuffle",
    "examples": "the number of examples in the data",
    "shuffle_buffer": "data.shuffle_buffer",
    "cycle_length": "data.cycle_length",
    "workers": "data.workers",
    "process_index": "this process's index",
    "process_count": "the number of processes",
    "shards": "the number of data shards",
    "buckets": "data.buckets",
    "bucket_counts": "the images' sizes (examples per bucket)",
}


class _LoaderBase:
  """Tokenisation, skip counting and statistics shared by both loaders."""

  kind = ""

  def __init__(self, *, global_batch_size, tokenize_fn, transform, seed,
               shuffle, workers, process_index, process_count):
    self.global_batch_size = global_batch_size
    self.local_batch_size = global_batch_size // process_count
    self.process_index, self.process_count = process_index, process_count
    self.seed, self.shuffle, self.workers = seed, shuffle, workers
    self.transform = transform
    self._tokenize_fn = tokenize_fn
    self._batches = 0  # delivered by next_batch
    self._skipped = 0
    self._skipped_keys: List[str] = []

  def _deliver(self, element) -> Dict[str, np.ndarray]:
    self._batches += 1
    self._skipped += len(element["skipped"])
    for key in element["skipped"]:  # distinct: a later epoch reads it again
      if (len(self._skipped_keys) < MAX_SKIPPED_KEYS
          and key not in self._skipped_keys):
        self._skipped_keys.append(key)
    ids = np.asarray(self._tokenize_fn(list(element["caption"])))
    if ids.ndim != 2 or len(ids) != self.local_batch_size:
      raise ValueError(f"tokenize_fn returned shape {ids.shape} for "
                       f"{self.local_batch_size} captions; expected [b, L].")
    return {**_arrays(element), "input_ids": ids.astype(np.int32)}

  def _skip_state(self) -> Dict[str, Any]:
    return {"batches": self._batches, "skipped": self._skipped,
            "skipped_keys": list(self._skipped_keys)}

  def _check_state(self, state, fields):
    if state.get("kind") != self.kind:
      raise errors.ResumeMismatchError(
          f"The checkpoint's data position is of a {state.get('kind')!r} "
          f"source, this run's data is a {self.kind!r} one: resume with the "
          "run's data (or start a new --workdir).")
    for name, value in fields.items():
      if state.get(name) != value:
        setting = STATE_FIELD_SETTINGS.get(name, name)
        raise errors.ResumeMismatchError(
            f"The checkpoint's data position was saved with {name}="
            f"{state.get(name)!r}, this run has {value!r} ({setting}): resume "
            "with the run's value, or start a new --workdir (with "
            "--config.training.init_from=OLD_WORKDIR to keep its weights).")
    self._batches = int(state["batches"])
    self._skipped = int(state["skipped"])
    self._skipped_keys = list(state["skipped_keys"])

  def statistics(self) -> Dict[str, Any]:
    examples = self._batches * self.local_batch_size
    seen = examples + self._skipped
    return {"kind": self.kind, "batches": self._batches,
            "examples_delivered": examples, "skipped": self._skipped,
            "skipped_fraction": self._skipped / seen if seen else 0.0,
            "skipped_keys": list(self._skipped_keys)}

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


# ----------------------------------------------------------------------------
# Random-access sources, through Grain.
# ----------------------------------------------------------------------------


class BatchAt:
  """position -> this process's share of global batch `position`, decoded.

  Picklable (it runs in Grain's worker processes). Returns {"image": float32
  [b, S, S, C] (bucketed: [b, h, w, C] with "crop_top", "crop_left"),
  "caption": [b] str, "skipped": keys of the undecodable images replaced}.
  """

  def __init__(self, source, transform, seed, shuffle, global_batch_size,
               process_index, process_count, plan=None):
    self.source, self.transform = source, transform
    self.seed, self.shuffle = seed, shuffle
    self.num_examples = len(source)
    self.global_batch_size = global_batch_size
    self.local_batch_size = global_batch_size // process_count
    self.process_index, self.process_count = process_index, process_count
    self.plan = plan  # buckets.BucketPlan, or None: square batches
    self._orders: Dict[int, np.ndarray] = {}

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_orders"] = {}
    return state

  @property
  def batches_per_epoch(self) -> int:
    return self.num_examples // self.global_batch_size

  def epoch_of(self, position: int) -> int:
    if self.plan is not None:
      return self.plan.epoch_of(position)
    return position // self.batches_per_epoch

  def _locate(self, position: int):
    """(epoch, bucket shape or None, the epoch's sequence of the batch's
    examples, where the global batch starts in it)."""
    if self.plan is None:
      epoch, i = divmod(position, self.batches_per_epoch)
      return epoch, None, self.order(epoch), i * self.global_batch_size
    epoch, k, j = self.plan.locate(position)
    return (epoch, self.plan.shapes[k], self.plan.sequence(epoch, k),
            j * self.global_batch_size)

  def order(self, epoch: int) -> np.ndarray:
    if epoch not in self._orders:
      if self.shuffle:
        order = np.random.default_rng([self.seed, epoch]).permutation(
            self.num_examples)
      else:
        order = np.arange(self.num_examples)
      self._orders = {epoch: order}  # one epoch at a time
    return self._orders[epoch]

  def indices(self, position: int) -> np.ndarray:
    """Source indices of this process's slots of global batch `position`."""
    _, _, sequence, start = self._locate(position)
    start += self.process_index * self.local_batch_size
    return sequence[start:start + self.local_batch_size]

  def _prepare(self, index: int, epoch: int, shape=None):
    if hasattr(self.source, "example"):
      example = self.source.example(int(index), epoch)
    else:
      example = self.source[int(index)]
    key = str(example.get("key", index))
    rng = (transforms.example_rng(self.seed, epoch, int(index))
           if self.transform.needs_rng else None)
    if shape is None:
      return self.transform(example["image"], key, rng), example, key
    made = self.transform.to_bucket(example["image"], shape, key, rng)
    return made, example, key

  def _latents(self, position: int) -> Dict[str, Any]:
    """A latent cache's batch: stored posteriors, nothing to decode."""
    epoch = self.epoch_of(position)
    examples = [self.source.example(int(i), epoch)
                for i in self.indices(position)]
    batch = {"latent_mean": np.stack([e["latent_mean"] for e in examples]),
             "latent_logvar": np.stack([e["latent_logvar"] for e in examples]),
             "caption": [transforms.caption_of(e, e.get("key", ""))
                         for e in examples], "skipped": []}
    if "context" in examples[0]:
      batch["context"] = np.stack([e["context"] for e in examples])
    if self.plan is not None:
      for name in ("crop_top", "crop_left"):
        batch[name] = np.array([e[name] for e in examples], np.int32)
    return batch

  def __call__(self, position: int) -> Dict[str, Any]:
    position = int(position)
    if getattr(self.source, "provides_latents", False):
      return self._latents(position)
    epoch, shape, order, start = self._locate(position)
    first = start + self.process_index * self.local_batch_size
    images, captions, skipped, failed = [], [], [], []
    for slot, index in enumerate(order[first:first + self.local_batch_size]):
      image, example, key = self._prepare(index, epoch, shape)
      if image is None:
        skipped.append(key)
        failed.append(slot)
        image = caption = None
      else:
        caption = transforms.caption_of(example, key)
      images.append(image)
      captions.append(caption)
    base = start + self.global_batch_size + self.process_index
    t = 0
    for slot in failed:
      while True:
        if t >= len(order):
          raise RuntimeError(
              f"No decodable image found to replace the {len(failed)} "
              f"undecodable ones of batch {position} (first {skipped[0]!r}) "
              "after trying every example of the epoch.")
        index = order[(base + t * self.process_count) % len(order)]
        t += 1
        image, example, key = self._prepare(index, epoch, shape)
        if image is not None:
          images[slot], captions[slot] = image, transforms.caption_of(example, key)
          break
        skipped.append(key)
    if shape is None:
      return {"image": np.stack(images), "caption": captions,
              "skipped": skipped}
    return {"image": np.stack([image for image, _, _ in images]),
            "crop_top": np.array([top for _, top, _ in images], np.int32),
            "crop_left": np.array([left for _, _, left in images], np.int32),
            "caption": captions, "skipped": skipped}


class RandomAccessLoader(_LoaderBase):
  """Batches of a random-access source through a Grain pipeline.

  The pipeline is `MapDataset.range(position, ...).map(BatchAt(...))`: one
  Grain element is one local batch, so `workers` processes each build whole
  batches (Grain interleaves them back in order: the same batches for any
  worker count). State: {"position": global batches consumed} plus checks
  and skip counts; resuming rebuilds the pipeline at that position.
  """

  kind = "random_access"

  def __init__(self, source, bucket_shapes=None, **kwargs):
    super().__init__(**kwargs)
    self.plan = None
    if bucket_shapes:
      from jaxsd.data import buckets  # pylint: disable=g-import-not-at-top
      self.plan = buckets.BucketPlan(
          buckets.source_assignment(source, bucket_shapes), bucket_shapes,
          self.global_batch_size, self.seed, self.shuffle)
    self.batch_at = BatchAt(
        source, self.transform, self.seed, self.shuffle,
        self.global_batch_size, self.process_index, self.process_count,
        self.plan)
    if self.global_batch_size > self.batch_at.num_examples:
      raise ValueError(
          f"training.batch_size={self.global_batch_size} exceeds the "
          f"dataset's {self.batch_at.num_examples} examples.")
    self.position = 0
    self._iterator = None

  @property
  def batches_per_epoch(self) -> int:
    return self.batch_at.batches_per_epoch

  def _start(self):
    import grain  # pylint: disable=g-import-not-at-top  (2 s; only here)
    ds = grain.MapDataset.range(self.position, self.position + _ENDLESS)
    ds = ds.map(self.batch_at)
    if self.workers == 0:
      ds = ds.to_iter_dataset(grain.ReadOptions(
          num_threads=1, prefetch_buffer_size=PREFETCH_BATCHES))
    else:
      # Grain's workers read absl flags; outside an absl app (tests,
      # notebooks) nothing parsed them, so their defaults stand.
      if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
      ds = ds.to_iter_dataset(grain.ReadOptions(
          num_threads=1, prefetch_buffer_size=1))
      ds = ds.mp_prefetch(grain.MultiprocessingOptions(
          num_workers=self.workers, per_worker_buffer_size=PREFETCH_BATCHES))
    self._iterator = iter(ds)

  def batch(self, position: int) -> Dict[str, np.ndarray]:
    """The batch at `position`, built here without Grain (the same one
    next_batch gives there; does not move the loader)."""
    element = self.batch_at(position)
    ids = np.asarray(self._tokenize_fn(list(element["caption"])), np.int32)
    return {**_arrays(element), "input_ids": ids}

  def next_batch(self) -> Dict[str, np.ndarray]:
    if self._iterator is None:
      self._start()
    element = next(self._iterator)
    self.position += 1
    return self._deliver(element)

  def _fields(self):
    fields = {"seed": self.seed, "shuffle": self.shuffle,
              "global_batch_size": self.global_batch_size,
              "examples": self.batch_at.num_examples}
    if self.plan is not None:  # square runs' states stay as they were
      fields["buckets"] = [f"{h}x{w}" for h, w in self.plan.shapes]
      fields["bucket_counts"] = [int(n) for n in self.plan.counts]
    return fields

  def get_state(self) -> Dict[str, Any]:
    return {"kind": self.kind, "position": self.position, **self._fields(),
            **self._skip_state()}

  def set_state(self, state: Dict[str, Any]):
    self._check_state(state, self._fields())
    self.close()
    self.position = int(state["position"])

  def statistics(self) -> Dict[str, Any]:
    stats = {**super().statistics(), "examples": self.batch_at.num_examples,
             "batches_per_epoch": self.batches_per_epoch,
             "epoch": self.batch_at.epoch_of(self.position)}
    if self.plan is not None:
      stats["batches_per_epoch"] = self.plan.mean_batches_per_epoch()
      stats["buckets"] = len(self.plan.shapes)
      for (h, w), n in zip(self.plan.shapes, self.plan.counts):
        stats[f"bucket_{h}x{w}"] = int(n)
    return stats

  def close(self):
    if self._iterator is not None:
      close = getattr(self._iterator, "close", None)
      if close is not None:
        close()
      self._iterator = None


# ----------------------------------------------------------------------------
# Stream sources: Grain's interleave of shards, a window shuffle, workers.
# ----------------------------------------------------------------------------


class StreamLoader(_LoaderBase):
  """Batches of a stream source (webdataset shards) through Grain.

  Process k's epoch e is the shards `shard_order(e)[k::process_count]`,
  read `cycle_length` at a time and interleaved (Grain's
  InterleaveIterDataset), window-shuffled `shuffle_buffer` examples at a
  time (WindowShuffleIterDataset), decoded and batched; epochs follow each
  other without a break (a batch may span two). With `workers` >= 1, Grain's
  mp_prefetch runs that pipeline in each worker process over the slice
  `[w::workers]` of every epoch's shards and takes batches from the workers
  in turn, so the order depends on the worker count (0 and 1 give the same
  batches); with 0 a thread runs it. Unshuffled, shards are read one at a
  time in sorted order, examples in file order.

  State: Grain's iterator state (each worker's epoch, its open shards and
  their offsets, the window's start and place) after the last delivered
  batch, plus checks and skip counts. It is per process: each process saves
  and restores its own; a restore re-reads, undecoded, the window being
  shuffled and the open shards up to their offsets. Memory per reader: the
  open shards' next examples and one window of raw (undecoded) examples.
  """

  kind = "stream/grain"

  def __init__(self, source, *, shuffle_buffer, cycle_length, **kwargs):
    super().__init__(**kwargs)
    self.source = source
    self.num_shards = len(source.shards)
    if self.num_shards < self.process_count:
      raise ValueError(
          f"The source has {self.num_shards} shards for {self.process_count} "
          "processes; each process reads whole shards, so split the data "
          f"into at least {self.process_count} shards (more, smaller tar "
          "files), or run fewer processes.")
    if shuffle_buffer < 1:
      raise ValueError(f"shuffle_buffer={shuffle_buffer} must be >= 1.")
    if cycle_length < 1:
      raise ValueError(f"cycle_length={cycle_length} must be >= 1.")
    per_process = self.num_shards // self.process_count
    if self.workers > per_process:
      logging.warning(
          "data.workers=%d: the %d shards give each of the %d processes "
          "only %d; each worker reads whole shards, so %d workers are used.",
          self.workers, self.num_shards, self.process_count, per_process,
          per_process)
      self.workers = per_process
    self.shuffle_buffer, self.cycle_length = shuffle_buffer, cycle_length
    from jaxsd.data import stream  # pylint: disable=g-import-not-at-top
    self._stream_lib = stream  # imports grain (2 s): only streamed runs
    self.spec = stream.StreamSpec(
        source=source, transform=self.transform, seed=self.seed,
        shuffle=self.shuffle, cycle_length=cycle_length,
        window=shuffle_buffer, local_batch_size=self.local_batch_size,
        process_index=self.process_index, process_count=self.process_count)
    self._grain_state = None  # None: the start
    self._epoch = 0
    self._iterator = None

  def shards_of(self, epoch: int) -> List[str]:
    """This process's shards of `epoch`, in reading order."""
    return [self.source.shards[j] for j in self._stream_lib.shard_order(
        self.num_shards, seed=self.seed, shuffle=self.shuffle, epoch=epoch,
        process_index=self.process_index, process_count=self.process_count)]

  def _start(self):
    import grain  # pylint: disable=g-import-not-at-top
    ds = self._stream_lib.StreamBatches(self.spec)
    if self.workers == 0:
      ds = grain.experimental.ThreadPrefetchIterDataset(
          ds, prefetch_buffer_size=PREFETCH_BATCHES)
    else:
      if not flags.FLAGS.is_parsed():  # see RandomAccessLoader._start
        flags.FLAGS.mark_as_parsed()
      ds = ds.mp_prefetch(grain.MultiprocessingOptions(
          num_workers=self.workers, per_worker_buffer_size=PREFETCH_BATCHES))
    self._iterator = iter(ds)
    if self._grain_state is not None:
      self._iterator.set_state(self._grain_state)

  def next_batch(self) -> Dict[str, np.ndarray]:
    if self._iterator is None:
      self._start()
    element = next(self._iterator)
    self._grain_state = self._iterator.get_state()
    self._epoch = int(element["epoch"])
    return self._deliver(element)

  def _fields(self):
    return {"seed": self.seed, "shuffle": self.shuffle,
            "shuffle_buffer": self.shuffle_buffer,
            "cycle_length": self.cycle_length, "workers": self.workers,
            "global_batch_size": self.global_batch_size,
            "process_index": self.process_index,
            "process_count": self.process_count, "shards": self.num_shards}

  def get_state(self) -> Dict[str, Any]:
    return {"kind": self.kind, "grain": self._grain_state,
            "epoch": self._epoch, **self._fields(), **self._skip_state()}

  def set_state(self, state: Dict[str, Any]):
    self._check_state(state, self._fields())
    self.close()
    self._grain_state = state["grain"]
    self._epoch = int(state["epoch"])

  def statistics(self) -> Dict[str, Any]:
    return {**super().statistics(), "shards": self.num_shards,
            "epoch": self._epoch}

  def close(self):
    if self._iterator is not None:
      close = getattr(self._iterator, "close", None)
      if close is not None:
        close()
      self._iterator = None
