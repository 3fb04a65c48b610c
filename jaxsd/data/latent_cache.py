"""A latent cache: a dataset's autoencoder posteriors, encoded once.

Written by `jaxsd-cache --config=... --out=DIR`; a run reads it
with `data.latent_cache=DIR` instead of decoding and encoding images every
step. Layout of DIR:

    cache.json            what it holds (written last: its presence means
                          the cache is complete), see `CacheInfo`
    NNNNN.mean.npy        float32 [n, h, w, c] posterior means of shard N
    NNNNN.logvar.npy      float32 [n, h, w, c] posterior log-variances
    NNNNN.captions.json   the n captions and keys (and, with text
                          embeddings, each example's row of the context file;
                          with buckets, each example's index in the data and
                          its crop offsets)
    NNNNN.context.npy     float32 or float16 [u, L, D] the frozen text
                          encoder's last hidden states of the shard's u
                          distinct captions (only with text embeddings)

Example i of the cache is example i of the data source it was made from
(same order, same count), so the loader's shuffled order over the cache is
the order it would have over the images, and a cached run trains on the
same examples, batch for batch, as one that encodes on the fly. With
data.buckets each shard holds one bucket's examples at its shape (the
shard's "bucket", [height, width] in pixels), and its captions.json lists
their indices in the data; the loader takes the cache's assignment, which
is the images' own, so the batches are again those of the images. It keeps
(mean, logvar), not one sample: the train step still draws from the
posterior.

With a frozen, pretrained text encoder (text.pretrained, text.trainable
False) the cache also holds the text embeddings of the captions: the step
then skips the text encoder for the batch and runs it on the empty prompt
alone (classifier-free dropout still trains on it).
"""
import bisect
import dataclasses
import json
import os
from typing import Any, Dict, List, Optional

import numpy as np

from jaxsd.data import sources

FORMAT = "jaxsd-latent-cache/1"
INFO_FILE = "cache.json"
# The data fields that decide which images, in which order and how they
# were transformed: a cache is only valid for a run with the same ones.
DATA_FIELDS = ("source", "name", "split", "path", "captions_file",
               "caption_key", "image_key", "coco_captions", "num_channels",
               "image_size", "crop", "caption_template")


@dataclasses.dataclass
class CacheInfo:
  examples: int
  shards: List[Dict[str, Any]]  # [{"name": "00000", "examples": n}]
  latent_shape: List[int]
  autoencoder: str  # the path it was encoded with
  autoencoder_fingerprint: str  # latent.FrozenAutoencoder.fingerprint()
  data: Dict[str, Any]  # the DATA_FIELDS of the config it was made from
  format: str = FORMAT
  # Text embeddings (empty text_fingerprint: none stored).
  text_fingerprint: str = ""  # latent.digest of the encoder and max_length
  text_encoder: str = ""  # text.pretrained it was encoded with
  context_shape: Optional[List[int]] = None  # [L, D]
  context_dtype: str = ""
  # Aspect-ratio buckets [[height, width], ...] in pixels (None: square).
  buckets: Optional[List[List[int]]] = None

  @property
  def has_text_embeddings(self) -> bool:
    return bool(self.text_fingerprint)

  def save(self, directory: str):
    path = os.path.join(directory, INFO_FILE)
    with open(path + ".tmp", "w") as f:
      json.dump(dataclasses.asdict(self), f, indent=1)
    os.replace(path + ".tmp", path)

  @classmethod
  def load(cls, directory: str) -> "CacheInfo":
    path = os.path.join(directory, INFO_FILE)
    if not os.path.isfile(path):
      raise FileNotFoundError(
          f"data.latent_cache={directory!r} is not a (complete) latent cache: "
          f"{INFO_FILE} is missing. Write one with `jaxsd-cache "
          f"--config=... --out={directory}`.")
    with open(path) as f:
      info = json.load(f)
    if info.get("format") != FORMAT:
      raise ValueError(f"{path} has format {info.get('format')!r}; this jaxsd "
                       f"reads {FORMAT!r}: write the cache again.")
    return cls(**info)


def data_fields(data_config) -> Dict[str, Any]:
  return {k: data_config.get(k) for k in DATA_FIELDS}


def write_shard(directory: str, name: str, mean: np.ndarray,
                logvar: np.ndarray, captions: List[str], keys: List[str],
                context: Optional[np.ndarray] = None,
                context_index: Optional[List[int]] = None,
                extra: Optional[Dict[str, List[int]]] = None):
  """One shard's files, each written to a temporary name and renamed.

  context [u, L, D] and context_index (example -> row) are the text
  embeddings of the shard's distinct captions, if the cache holds them.
  extra: more per-example lists for captions.json (a bucketed cache's
  "indices", "crop_top", "crop_left").
  """
  def put(suffix, write):
    path = os.path.join(directory, f"{name}.{suffix}")
    with open(path + ".tmp", "wb") as f:
      write(f)
    os.replace(path + ".tmp", path)
  put("mean.npy", lambda f: np.save(f, mean.astype(np.float32)))
  put("logvar.npy", lambda f: np.save(f, logvar.astype(np.float32)))
  table = {"captions": captions, "keys": keys, **(extra or {})}
  if context is not None:
    put("context.npy", lambda f: np.save(f, context))
    table["context_index"] = [int(i) for i in context_index]
  put("captions.json", lambda f: f.write(json.dumps(table).encode()))


class LatentCacheSource(sources.RandomAccessSource):
  """The examples of a latent cache: {"latent_mean", "latent_logvar",
  "caption", "key"}, memory-mapped (picklable: the arrays open lazily).

  Not a `data.source` of the registry: a run names its images' source as
  usual (evaluation, previews and prompts read the images) and the cache
  with data.latent_cache, which only the training loader reads.

  read_context: examples also hold "context" float32 [L, D], the stored
  text embedding of their caption (set by pipeline.make_latent_cache_source
  once the run's frozen text encoder is checked against the cache's).
  """

  name = "latent_cache"
  provides_latents = True  # the loader stacks them instead of decoding

  def __init__(self, directory: str):
    self.directory = directory
    self.info = CacheInfo.load(directory)
    self.read_context = False
    self._starts = np.cumsum([0] + [s["examples"] for s in self.info.shards])
    self._captions = None
    self._arrays: Dict[str, np.ndarray] = {}
    self._where = None  # bucketed: example -> (shard, offset)
    if self.info.buckets:
      table = self._caption_table()
      shard = np.zeros(self.info.examples, np.int32)
      offset = np.zeros(self.info.examples, np.int32)
      for s, entry in enumerate(self.info.shards):
        indices = np.asarray(table[entry["name"]]["indices"], np.int64)
        shard[indices], offset[indices] = s, np.arange(len(indices))
      self._where = (shard, offset)

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_arrays"], state["_captions"] = {}, None
    return state

  def bucket_assignment(self, shapes) -> np.ndarray:
    """int32 [N]: each example's index in `shapes` (its shard's bucket);
    a ValueError if the cache has a bucket `shapes` lacks or is square."""
    shapes = [tuple(s) for s in shapes]
    if not self.info.buckets:
      raise ValueError(
          f"The latent cache {self.directory} holds square examples but "
          "data.buckets is set; write it again with this run's buckets "
          "(jaxsd-cache) or set data.buckets='off'.")
    stored = [tuple(self.info.shards[s]["bucket"]) for s in
              range(len(self.info.shards))]
    missing = sorted(set(stored) - set(shapes))
    if missing:
      raise ValueError(
          f"The latent cache {self.directory} holds buckets "
          f"{[list(s) for s in missing]} that this run's data.buckets "
          f"({[list(s) for s in shapes]}) lacks; write it again with this "
          "run's buckets (jaxsd-cache).")
    per_shard = np.array([shapes.index(s) for s in stored], np.int32)
    return per_shard[self._where[0]]

  def __len__(self) -> int:
    return self.info.examples

  def _locate(self, index: int):
    index = self._check_index(index)
    if self._where is not None:
      s, offset = self._where[0][index], self._where[1][index]
      return self.info.shards[s]["name"], int(offset)
    s = bisect.bisect_right(self._starts, index) - 1
    return self.info.shards[s]["name"], index - int(self._starts[s])

  def _array(self, name: str, kind: str) -> np.ndarray:
    key = f"{name}.{kind}"
    if key not in self._arrays:
      self._arrays[key] = np.load(os.path.join(self.directory, key + ".npy"),
                                  mmap_mode="r")
    return self._arrays[key]

  def _caption_table(self):
    if self._captions is None:
      table = {}
      for shard in self.info.shards:
        with open(os.path.join(self.directory,
                               f"{shard['name']}.captions.json")) as f:
          table[shard["name"]] = json.load(f)
      self._captions = table
    return self._captions

  def caption(self, index: int) -> str:
    name, offset = self._locate(index)
    return self._caption_table()[name]["captions"][offset]

  def __getitem__(self, index: int) -> sources.Example:
    name, offset = self._locate(index)
    table = self._caption_table()[name]
    example = {"latent_mean": np.array(self._array(name, "mean")[offset]),
               "latent_logvar": np.array(self._array(name, "logvar")[offset]),
               "caption": table["captions"][offset],
               "key": table["keys"][offset]}
    if self._where is not None:
      example["crop_top"] = table["crop_top"][offset]
      example["crop_left"] = table["crop_left"][offset]
    if self.read_context:
      row = table["context_index"][offset]
      example["context"] = np.asarray(self._array(name, "context")[row],
                                      np.float32)
    return example


# Fields that name local files: the same folder spelt another way
# ("../shared/x" from another working directory, a symlink) is the same data.
_PATH_FIELDS = ("path", "captions_file")


def _same_value(key: str, cached, wanted) -> bool:
  if cached == wanted:
    return True
  if (key in _PATH_FIELDS and isinstance(cached, str)
      and isinstance(wanted, str) and cached and wanted
      and os.path.exists(wanted)):
    return os.path.realpath(cached) == os.path.realpath(wanted)
  return False


def check_matches(info: CacheInfo, data_config, fingerprint: str,
                  directory: str):
  """A run may read the cache only with the data and autoencoder it was
  written from; the error lists what differs."""
  want = data_fields(data_config)
  diff = {k: (info.data.get(k), want[k]) for k in DATA_FIELDS
          if not _same_value(k, info.data.get(k), want[k])}
  if diff:
    raise ValueError(
        f"The latent cache {directory} was written from other data: "
        + ", ".join(f"data.{k} was {a!r}, is {b!r}" for k, (a, b) in
                    diff.items())
        + ". Write a cache for this data (jaxsd-cache) or drop "
        "data.latent_cache.")
  if info.autoencoder_fingerprint != fingerprint:
    raise ValueError(
        f"The latent cache {directory} was encoded by the autoencoder "
        f"{info.autoencoder!r} (fingerprint {info.autoencoder_fingerprint}), "
        f"not by this run's model.autoencoder (fingerprint {fingerprint}); "
        "write the cache again with this autoencoder.")


def check_text_matches(info: CacheInfo, fingerprint: str, directory: str):
  """The stored text embeddings are valid only for the same frozen text
  encoder and max_length."""
  if info.text_fingerprint != fingerprint:
    raise ValueError(
        f"The latent cache {directory} holds text embeddings of the text "
        f"encoder {info.text_encoder!r} (fingerprint {info.text_fingerprint}), "
        f"not of this run's text.pretrained with its text.max_length "
        f"(fingerprint {fingerprint}); write the cache again, or write it "
        "with --text_embeddings=false to encode captions in the step.")
