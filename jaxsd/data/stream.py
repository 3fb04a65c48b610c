"""The Grain pipeline of a stream source (webdataset shards).

Used by loader.StreamLoader (which documents the order); kept apart because
it imports grain at module level, which the classes Grain's worker
processes unpickle must (they subclass grain's IterDataset and
DatasetIterator).

StreamBatches (sliced by Grain's mp_prefetch per worker)
  -> _BatchIterator: decode, skip what does not decode, batch exactly b
  -> _EpochStream: epoch after epoch, each a Grain pipeline of
     MapDataset.source(this process's shards of the epoch, this worker's
     slice) -> ShardDataset per shard -> InterleaveIterDataset(cycle_length)
     -> WindowShuffleIterDataset(window)
"""
import functools
from typing import Any, Dict, Iterator, List, Optional

import grain
import numpy as np

from jaxsd.data import transforms

SHARD_STRIDE = 2 ** 32  # a stream example's place: shard * stride + offset
MAX_EMPTY_EPOCHS = 10  # a reader's epochs in a row without examples


def shard_order(num_shards: int, *, seed: int, shuffle: bool, epoch: int,
                process_index: int = 0, process_count: int = 1) -> List[int]:
  """Indices (into the sorted `source.shards`) of the shards process k
  reads in `epoch`, in reading order."""
  if shuffle:
    order = np.random.default_rng([seed, epoch]).permutation(num_shards)
  else:
    order = np.arange(num_shards)
  return [int(j) for j in order[process_index::process_count]]


class StreamSpec:
  """What the pipeline needs; picklable (it goes to the worker processes)."""

  def __init__(self, *, source, transform, seed, shuffle, cycle_length,
               window, local_batch_size, process_index, process_count):
    self.source, self.transform = source, transform
    self.seed, self.shuffle = seed, shuffle
    self.cycle_length, self.window = cycle_length, window
    self.local_batch_size = local_batch_size
    self.process_index, self.process_count = process_index, process_count


# --- One shard ----------------------------------------------------------------


class _ShardIterator(grain.DatasetIterator):
  """One shard's raw examples in file order; the state is the offset.

  Restoring reopens the shard and skips `offset` examples without decoding
  them. Each example is tagged with its epoch and its place (shard j,
  offset o: j * SHARD_STRIDE + o), from which its transform randomness is
  drawn, whichever process or worker reads it.
  """

  def __init__(self, source, j: int, epoch: int):
    super().__init__()
    self._source, self._j, self._epoch = source, j, epoch
    self._offset = 0
    self._reader: Optional[Iterator] = None

  def _open(self):
    shard = self._source.shards[self._j]
    self._reader = iter(self._source.read_shard(shard))
    for o in range(self._offset):
      try:
        next(self._reader)
      except StopIteration:
        raise RuntimeError(
            f"Shard {shard!r} has {o} examples, fewer than the saved data "
            f"position's {self._offset}; the data changed since the "
            "checkpoint (restore it, or start a new workdir).") from None

  def __next__(self):
    if self._reader is None:
      self._open()
    try:
      example = next(self._reader)
    except StopIteration:
      self._close_reader()
      raise
    self._offset += 1
    return {**example, "_epoch": self._epoch,
            "_place": self._j * SHARD_STRIDE + self._offset - 1}

  def get_state(self) -> Dict[str, Any]:
    return {"offset": self._offset}

  def set_state(self, state):
    self._close_reader()
    self._offset = int(state["offset"])

  def _close_reader(self):
    if self._reader is not None and hasattr(self._reader, "close"):
      self._reader.close()
    self._reader = None

  def close(self):
    self._close_reader()


class ShardDataset(grain.IterDataset):
  """Shard j of `source.shards`, read in epoch `epoch`."""

  def __init__(self, source, j: int, epoch: int):
    super().__init__()
    self._source, self._j, self._epoch = source, j, epoch

  def __iter__(self):
    return _ShardIterator(self._source, self._j, self._epoch)


# --- Epochs -------------------------------------------------------------------


class _EpochStream:
  """One reader's raw examples, epoch after epoch.

  Epoch e reads `shard_order(e)[worker_slice]`: `cycle_length` shards at a
  time, interleaved example by example (a new shard takes the place of one
  that ends), through a window shuffle of `window` examples seeded by (seed,
  epoch, process). The state is the epoch and that Grain pipeline's state.
  """

  def __init__(self, spec: StreamSpec, worker_slice: slice):
    self.spec, self.worker_slice = spec, worker_slice
    self.epoch = 0
    self._inner = None
    self._shards: List[int] = []
    self._empty_epochs = 0

  def _start_epoch(self):
    spec = self.spec
    self._shards = shard_order(
        len(spec.source.shards), seed=spec.seed, shuffle=spec.shuffle,
        epoch=self.epoch, process_index=spec.process_index,
        process_count=spec.process_count)[self.worker_slice]
    ds = grain.MapDataset.source(self._shards).map(
        functools.partial(ShardDataset, spec.source, epoch=self.epoch))
    ds = grain.experimental.InterleaveIterDataset(
        ds, cycle_length=spec.cycle_length if spec.shuffle else 1)
    if spec.shuffle and spec.window > 1:
      seed = np.random.default_rng(
          [spec.seed, self.epoch, spec.process_index]).integers(2 ** 31)
      ds = grain.experimental.WindowShuffleIterDataset(
          ds, window_size=spec.window, seed=int(seed))
    self._inner = ds.__iter__()

  def __next__(self):
    while True:
      if self._inner is None:
        self._start_epoch()
      try:
        example = next(self._inner)
        self._empty_epochs = 0
        return example
      except StopIteration:
        self._empty_epochs += 1
        if self._empty_epochs >= MAX_EMPTY_EPOCHS:
          names = [self.spec.source.shards[j] for j in self._shards]
          raise RuntimeError(
              f"Process {self.spec.process_index} read no examples in "
              f"{MAX_EMPTY_EPOCHS} epochs in a row (its shards of epoch "
              f"{self.epoch}, worker slice {self.worker_slice}: {names}); "
              "check the shards (data.path), or use fewer data.workers."
          ) from None
        self.close()
        self.epoch += 1

  def get_state(self) -> Dict[str, Any]:
    if self._inner is None:
      self._start_epoch()
    return {"epoch": self.epoch, "epoch_state": self._inner.get_state()}

  def set_state(self, state):
    self.close()
    self.epoch = int(state["epoch"])
    self._start_epoch()
    self._inner.set_state(state["epoch_state"])

  def close(self):
    if self._inner is not None:
      self._inner.close()
      self._inner = None


# --- Batches ------------------------------------------------------------------


class _BatchIterator(grain.DatasetIterator):
  """Raw examples -> decoded batches of exactly b images. An image that does
  not decode is skipped (its key reported in "skipped") and the next one
  taken. It holds nothing between batches, so its state is the stream's."""

  def __init__(self, spec: StreamSpec, worker_slice: slice):
    super().__init__()
    self._spec = spec
    self._stream = _EpochStream(spec, worker_slice)

  def __next__(self) -> Dict[str, Any]:
    spec = self._spec
    images, captions, skipped = [], [], []
    while len(images) < spec.local_batch_size:
      example = next(self._stream)
      key = str(example.get("key", example["_place"]))
      rng = (transforms.example_rng(spec.seed, example["_epoch"],
                                    example["_place"])
             if spec.transform.needs_rng else None)
      image = spec.transform(example["image"], key, rng)
      if image is None:
        skipped.append(key)
        continue
      images.append(image)
      captions.append(transforms.caption_of(example, key))
    return {"image": np.stack(images), "caption": captions,
            "skipped": skipped, "epoch": self._stream.epoch}

  def get_state(self) -> Dict[str, Any]:
    return self._stream.get_state()

  def set_state(self, state):
    self._stream.set_state(state)

  def close(self):
    self._stream.close()


class StreamBatches(grain.IterDataset):
  """This process's batches; Grain's mp_prefetch gives worker w the slice
  [w::workers] of every epoch's shards (set_slice)."""

  def __init__(self, spec: StreamSpec):
    super().__init__()
    self._spec = spec
    self._slice = slice(None)

  def set_slice(self, sl: slice, sequential_slice: bool = False):
    del sequential_slice  # shards are dealt round robin either way
    self._slice = sl

  def __iter__(self):
    return _BatchIterator(self._spec, self._slice)
