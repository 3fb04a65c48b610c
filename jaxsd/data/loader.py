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

Stream sources (`shards`, `read_shard(shard)`) are read shard by shard: epoch
e's shard order is `default_rng([seed, e]).permutation(len(shards))`, process
k reads `order[k::process_count]` in that order, through a shuffle buffer of
`shuffle_buffer` examples: output n of the epoch is the buffer slot
`default_rng([seed, e, k, n]).integers(len(buffer))`, swapped with the last
and replaced by the next example read. Epochs follow each other without a
break (a batch may span two). An image that does not decode is skipped and
the next output taken. Memory: the open shard's iterator, the buffer of raw
(undecoded) examples and a few prefetched batches; never a whole shard.

Captions are tokenised in the main process, batch by batch (tokenizers are
not always picklable). Transform randomness (random crop, flip) is drawn
from (seed, epoch, example index) (transforms.example_rng).
"""
import concurrent.futures
import multiprocessing
import queue
import threading
from typing import Any, Callable, Dict, Iterator, List, Optional

from absl import flags
import numpy as np

from jaxsd.data import transforms

PREFETCH_BATCHES = 2
MAX_SKIPPED_KEYS = 10  # keys of skipped images kept for statistics()
_ENDLESS = 2 ** 62  # length of the position range given to Grain


def make_loader(source, *, global_batch_size: int, image_size: int,
                tokenize_fn: Callable[[List[str]], np.ndarray], seed: int,
                shuffle: bool = True, num_channels: int = 3,
                crop: str = "center", random_flip: bool = False,
                pad_small: bool = False, workers: int = 0,
                shuffle_buffer: int = 1000, process_index: int = 0,
                process_count: int = 1):
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
    workers: decoding processes (0: decode in this process, in a thread).
    shuffle_buffer: examples shuffled together (stream sources only).
  """
  transform = transforms.ImageTransform(
      image_size=image_size, num_channels=num_channels, crop=crop,
      random_flip=random_flip, pad_small=pad_small)
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
    return StreamLoader(source, shuffle_buffer=shuffle_buffer, **common)
  if hasattr(source, "__len__") and hasattr(source, "__getitem__"):
    return RandomAccessLoader(source, **common)
  raise TypeError(f"{type(source).__name__} is neither a random-access source "
                  "(__len__, __getitem__) nor a stream source (shards, "
                  "read_shard).")


def _caption(example, key) -> str:
  caption = example.get("caption")
  if not isinstance(caption, str):
    raise TypeError(f"Example {key!r} has caption {caption!r}; every example "
                    "needs a str caption.")
  return caption


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
    room = MAX_SKIPPED_KEYS - len(self._skipped_keys)
    self._skipped_keys += list(element["skipped"][:max(room, 0)])
    ids = np.asarray(self._tokenize_fn(list(element["caption"])))
    if ids.ndim != 2 or len(ids) != self.local_batch_size:
      raise ValueError(f"tokenize_fn returned shape {ids.shape} for "
                       f"{self.local_batch_size} captions; expected [b, L].")
    return {"image": element["image"], "input_ids": ids.astype(np.int32)}

  def _skip_state(self) -> Dict[str, Any]:
    return {"batches": self._batches, "skipped": self._skipped,
            "skipped_keys": list(self._skipped_keys)}

  def _check_state(self, state, fields):
    if state.get("kind") != self.kind:
      raise ValueError(f"A {state.get('kind')!r} loader state cannot resume "
                       f"a {self.kind!r} loader.")
    for name, value in fields.items():
      if state.get(name) != value:
        raise ValueError(
            f"The saved data position has {name}={state.get(name)!r} but this "
            f"run has {value!r}; resume with the same {name} (or start a new "
            "workdir).")
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
  [b, S, S, C], "caption": [b] str, "skipped": keys of the undecodable
  images replaced}.
  """

  def __init__(self, source, transform, seed, shuffle, global_batch_size,
               process_index, process_count):
    self.source, self.transform = source, transform
    self.seed, self.shuffle = seed, shuffle
    self.num_examples = len(source)
    self.global_batch_size = global_batch_size
    self.local_batch_size = global_batch_size // process_count
    self.process_index, self.process_count = process_index, process_count
    self._orders: Dict[int, np.ndarray] = {}

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_orders"] = {}
    return state

  @property
  def batches_per_epoch(self) -> int:
    return self.num_examples // self.global_batch_size

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
    epoch, i = divmod(position, self.batches_per_epoch)
    start = i * self.global_batch_size + self.process_index * (
        self.local_batch_size)
    return self.order(epoch)[start:start + self.local_batch_size]

  def _prepare(self, index: int, epoch: int):
    if hasattr(self.source, "example"):
      example = self.source.example(int(index), epoch)
    else:
      example = self.source[int(index)]
    key = str(example.get("key", index))
    rng = (transforms.example_rng(self.seed, epoch, int(index))
           if self.transform.needs_rng else None)
    return self.transform(example["image"], key, rng), example, key

  def __call__(self, position: int) -> Dict[str, Any]:
    position = int(position)
    epoch, i = divmod(position, self.batches_per_epoch)
    images, captions, skipped, failed = [], [], [], []
    for slot, index in enumerate(self.indices(position)):
      image, example, key = self._prepare(index, epoch)
      if image is None:
        skipped.append(key)
        failed.append(slot)
        image = caption = None
      else:
        caption = _caption(example, key)
      images.append(image)
      captions.append(caption)
    base = (i + 1) * self.global_batch_size + self.process_index
    t = 0
    order = self.order(epoch)
    for slot in failed:
      while True:
        if t >= self.num_examples:
          raise RuntimeError(
              f"No decodable image found to replace the {len(failed)} "
              f"undecodable ones of batch {position} (first {skipped[0]!r}) "
              "after trying every example of the epoch.")
        index = order[(base + t * self.process_count) % self.num_examples]
        t += 1
        image, example, key = self._prepare(index, epoch)
        if image is not None:
          images[slot], captions[slot] = image, _caption(example, key)
          break
        skipped.append(key)
    return {"image": np.stack(images), "caption": captions,
            "skipped": skipped}


class RandomAccessLoader(_LoaderBase):
  """Batches of a random-access source through a Grain pipeline.

  The pipeline is `MapDataset.range(position, ...).map(BatchAt(...))`: one
  Grain element is one local batch, so `workers` processes each build whole
  batches (Grain interleaves them back in order: the same batches for any
  worker count). State: {"position": global batches consumed} plus checks
  and skip counts; resuming rebuilds the pipeline at that position.
  """

  kind = "random_access"

  def __init__(self, source, **kwargs):
    super().__init__(**kwargs)
    self.batch_at = BatchAt(
        source, self.transform, self.seed, self.shuffle,
        self.global_batch_size, self.process_index, self.process_count)
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
    return {"image": element["image"], "input_ids": ids}

  def next_batch(self) -> Dict[str, np.ndarray]:
    if self._iterator is None:
      self._start()
    element = next(self._iterator)
    self.position += 1
    return self._deliver(element)

  def _fields(self):
    return {"seed": self.seed, "shuffle": self.shuffle,
            "global_batch_size": self.global_batch_size,
            "examples": self.batch_at.num_examples}

  def get_state(self) -> Dict[str, Any]:
    return {"kind": self.kind, "position": self.position, **self._fields(),
            **self._skip_state()}

  def set_state(self, state: Dict[str, Any]):
    self._check_state(state, self._fields())
    self.close()
    self.position = int(state["position"])

  def statistics(self) -> Dict[str, Any]:
    return {**super().statistics(), "examples": self.batch_at.num_examples,
            "batches_per_epoch": self.batches_per_epoch,
            "epoch": self.position // self.batches_per_epoch}

  def close(self):
    if self._iterator is not None:
      close = getattr(self._iterator, "close", None)
      if close is not None:
        close()
      self._iterator = None


# ----------------------------------------------------------------------------
# Stream sources: shards, a shuffle buffer, a background thread.
# ----------------------------------------------------------------------------


class ShuffledStream:
  """This process's raw examples of a stream source, epoch after epoch.

  `next()` returns (example, epoch, n), n counting the epoch's outputs.
  `state()` is exact and small: the epoch, n, the shard being read (its
  place in this process's shard list of the epoch) and how many of its
  examples were read, and where each buffered example came from (shard
  place, offset). Restoring re-reads, without decoding, only the shards the
  buffer holds examples of, up to the last one needed; typically the
  current shard and the one before it, never the whole epoch.
  """

  def __init__(self, source, *, seed, shuffle, buffer_size, process_index,
               process_count, state=None):
    self.source, self.seed, self.shuffle = source, seed, shuffle
    self.buffer_size = buffer_size if shuffle else 1
    self.process_index, self.process_count = process_index, process_count
    self.num_shards = len(source.shards)
    state = state or {"epoch": 0, "emitted": 0, "cursor": 0, "offset": 0,
                      "buffer": []}
    self._epoch = int(state["epoch"])
    self._emitted = int(state["emitted"])
    self._cursor, self._offset = int(state["cursor"]), int(state["offset"])
    self._shards = self.shards_of(self._epoch)
    self._reader: Optional[Iterator] = None
    self._buffer: List = []  # [((cursor, offset), example)]
    self._restore([tuple(m) for m in state["buffer"]])

  def shards_of(self, epoch: int) -> List[str]:
    """This process's shards of `epoch`, in reading order."""
    if self.shuffle:
      order = np.random.default_rng([self.seed, epoch]).permutation(
          self.num_shards)
    else:
      order = np.arange(self.num_shards)
    shards = self.source.shards
    return [shards[j] for j in order[self.process_index::self.process_count]]

  def _restore(self, metas):
    need: Dict[int, set] = {}
    for c, o in metas:
      need.setdefault(c, set()).add(o)
    found = {}

    def read(c, count, keep_open):
      reader = iter(self.source.read_shard(self._shards[c]))
      for o in range(count):
        try:
          example = next(reader)
        except StopIteration:
          raise RuntimeError(
              f"Shard {self._shards[c]!r} has {o} examples, fewer than the "
              "saved data position says; the data changed since the "
              "checkpoint (restore it, or start a new workdir).") from None
        if o in need.get(c, ()):
          found[(c, o)] = example
      if keep_open:
        self._reader = reader
      elif hasattr(reader, "close"):
        reader.close()

    for c in sorted(need):
      if c != self._cursor:
        read(c, max(need[c]) + 1, keep_open=False)
    if self._offset:
      read(self._cursor, self._offset, keep_open=True)
    self._buffer = [((c, o), found[(c, o)]) for c, o in metas]

  def _fill(self):
    while len(self._buffer) < self.buffer_size and self._cursor < len(
        self._shards):
      if self._reader is None:
        self._reader = iter(self.source.read_shard(self._shards[self._cursor]))
        self._offset = 0
      try:
        example = next(self._reader)
      except StopIteration:
        self._reader = None
        self._cursor, self._offset = self._cursor + 1, 0
        continue
      self._buffer.append(((self._cursor, self._offset), example))
      self._offset += 1

  def next(self):
    self._fill()
    if not self._buffer:  # the epoch is over
      if self._emitted == 0:
        raise RuntimeError(
            f"Process {self.process_index}'s shards of epoch {self._epoch} "
            f"({self._shards}) hold no examples.")
      self._epoch += 1
      self._emitted, self._cursor, self._offset = 0, 0, 0
      self._shards = self.shards_of(self._epoch)
      self._fill()
    if len(self._buffer) == 1:
      j = 0
    else:
      j = int(np.random.default_rng(
          [self.seed, self._epoch, self.process_index, self._emitted]
      ).integers(len(self._buffer)))
    _, example = self._buffer[j]
    self._buffer[j] = self._buffer[-1]
    self._buffer.pop()
    self._emitted += 1
    return example, self._epoch, self._emitted - 1

  def state(self) -> Dict[str, Any]:
    return {"epoch": self._epoch, "emitted": self._emitted,
            "cursor": self._cursor, "offset": self._offset,
            "buffer": [list(meta) for meta, _ in self._buffer]}


class _Failure:

  def __init__(self, error):
    self.error = error


class _Background:
  """Runs an iterator in a daemon thread, `depth` items ahead."""

  def __init__(self, items: Iterator, depth: int):
    self._queue: queue.Queue = queue.Queue(depth)
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, args=(items,),
                                    daemon=True, name="jaxsd-stream")
    self._thread.start()

  def _put(self, item) -> bool:
    while not self._stop.is_set():
      try:
        self._queue.put(item, timeout=0.1)
        return True
      except queue.Full:
        pass
    return False

  def _run(self, items):
    try:
      for item in items:
        if not self._put(item):
          return
    except BaseException as e:  # pylint: disable=broad-except
      self._put(_Failure(e))  # raised in the consumer

  def get(self):
    item = self._queue.get()
    if isinstance(item, _Failure):
      raise item.error
    return item

  def close(self):
    self._stop.set()
    self._thread.join(timeout=30)


class StreamLoader(_LoaderBase):
  """Batches of a stream source (webdataset shards): a ShuffledStream read,
  decoded (in `workers` spawned processes, or in the thread) and batched in a
  background thread, PREFETCH_BATCHES ahead.

  State: this process's ShuffledStream state after the last delivered batch
  (epoch, outputs n of the epoch, shard place and offset, the buffer's
  example places) plus checks and skip counts. It is per process: each
  process saves and restores its own.
  """

  kind = "stream"

  def __init__(self, source, *, shuffle_buffer, **kwargs):
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
    self.shuffle_buffer = shuffle_buffer
    self._stream_state: Optional[Dict[str, Any]] = None  # None: the start
    self._background: Optional[_Background] = None
    self._pool = None

  def _decode(self, items):
    """[(example, epoch, n)] -> [float32 image or None], in order."""
    keys = [str(ex.get("key", f"{epoch}:{n}")) for ex, epoch, n in items]
    rngs = [transforms.example_rng(
        self.seed, epoch, n * self.process_count + self.process_index)
            if self.transform.needs_rng else None for _, epoch, n in items]
    images = [ex["image"] for ex, _, _ in items]
    if self._pool is None:
      return list(map(self.transform, images, keys, rngs)), keys
    return list(self._pool.map(self.transform, images, keys, rngs)), keys

  def _produce(self, stream: ShuffledStream):
    """Yields (element, stream state after it), endlessly."""
    b = self.local_batch_size
    while True:
      images, captions, skipped = [], [], []
      while len(images) < b:
        items = [stream.next() for _ in range(b - len(images))]
        decoded, keys = self._decode(items)
        for (example, _, _), image, key in zip(items, decoded, keys):
          if image is None:
            skipped.append(key)
          else:
            images.append(image)
            captions.append(_caption(example, key))
      yield ({"image": np.stack(images), "caption": captions,
              "skipped": skipped}, stream.state())

  def _start(self):
    if self.workers and self._pool is None:
      self._pool = concurrent.futures.ProcessPoolExecutor(
          self.workers, mp_context=multiprocessing.get_context("spawn"))
    stream = ShuffledStream(
        self.source, seed=self.seed, shuffle=self.shuffle,
        buffer_size=self.shuffle_buffer, process_index=self.process_index,
        process_count=self.process_count, state=self._stream_state)
    self._background = _Background(self._produce(stream), PREFETCH_BATCHES)

  def next_batch(self) -> Dict[str, np.ndarray]:
    if self._background is None:
      self._start()
    element, self._stream_state = self._background.get()
    return self._deliver(element)

  def _fields(self):
    return {"seed": self.seed, "shuffle": self.shuffle,
            "shuffle_buffer": self.shuffle_buffer,
            "global_batch_size": self.global_batch_size,
            "process_index": self.process_index,
            "process_count": self.process_count, "shards": self.num_shards}

  def get_state(self) -> Dict[str, Any]:
    stream = self._stream_state or {"epoch": 0, "emitted": 0, "cursor": 0,
                                    "offset": 0, "buffer": []}
    return {"kind": self.kind, **stream, **self._fields(),
            **self._skip_state()}

  def set_state(self, state: Dict[str, Any]):
    self._check_state(state, self._fields())
    self._stop_background()
    self._stream_state = {k: state[k] for k in
                          ("epoch", "emitted", "cursor", "offset", "buffer")}

  def statistics(self) -> Dict[str, Any]:
    epoch = (self._stream_state or {}).get("epoch", 0)
    return {**super().statistics(), "shards": self.num_shards,
            "epoch": epoch}

  def _stop_background(self):
    if self._background is not None:
      self._background.close()
      self._background = None

  def close(self):
    self._stop_background()
    if self._pool is not None:
      self._pool.shutdown(wait=True, cancel_futures=True)
      self._pool = None
