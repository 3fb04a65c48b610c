"""Captioned image sources, chosen by name (`data.source`) from a registry.

`make_source(data_config, split)` builds the source registered under
`data_config.source` (as `diffusion/samplers.py` registers samplers). Every
source yields examples

    {"image": X, "caption": str, "key": str}

where X is either encoded image bytes (the file's jpg/png/webp contents,
decoded later, in the loader's worker processes, by `decode_image`) or a
uint8 array [H, W, C]. `key` names the example in logs (a file name, a tar
key, or "split/index").

Two kinds of source:

- `RandomAccessSource`: `len(source)`, `source[i]` (deterministic) and
  `source.example(i, epoch)`. The loader calls `example(i, epoch)`; it equals
  `source[i]` except where a source draws per epoch (coco with
  `data.coco_captions="random"` picks one of an image's captions from
  (epoch, i)). Random-access sources are picklable and small when pickled
  (paths, captions and index lists; files are opened when an example is read),
  so Grain's worker processes can each hold one.
- `StreamSource`: `source.shards`, the shard paths sorted (the documented
  order the loader permutes per epoch), and `source.read_shard(shard)`, an
  iterator over one shard's examples in file order that holds one sample's
  files at a time (webdataset).

Every source also has `statistics()`: cheap facts for the start-of-run log
(examples or shards; caption length in words over the first
`CAPTION_SAMPLE` examples of a random-access source).

Configuration errors (unknown source, missing path, empty folder, no
captions, a caption template naming a field the source lacks, ...) are a
ValueError at `make_source` time, within seconds, naming the config field and
the fix. The sources themselves live one per module (`source_*.py`), each
registering itself when this module is imported.
"""
import operator
import os
import string
from typing import Any, Dict, Iterator, List, Optional, Sequence

from absl import logging
import numpy as np

from jaxsd import registry
from jaxsd.errors import ConfigError
from jaxsd.data import transforms

Example = Dict[str, Any]  # {"image": bytes | uint8 [H, W, C], "caption", "key"}

CAPTION_SAMPLE = 1000  # examples whose captions statistics() measures
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")

_SOURCES = registry.Registry("data source", "data.source")


def register_source(name: str):
  """Class decorator adding a source class to the registry as `name`.

  The class must define `from_config(cls, data_config, split) -> source`.
  """
  def wrap(cls):
    if not callable(getattr(cls, "from_config", None)):
      raise TypeError(f"{cls.__name__} needs a from_config(data_config, "
                      "split) classmethod to be registered as a data source.")
    return _SOURCES.register(name)(cls)
  return wrap


source_names = _SOURCES.names
source_class = _SOURCES.get  # ValueError naming data.source and the choices


def make_source(data_config, split: Optional[str] = None):
  """The source `data_config.source` of `split` (default `data_config.split`).

  Raises:
    ValueError: a config field is wrong; the message names it and the fix.
  """
  cls = source_class(config_field(data_config, "source") or "mnist")
  split = split or config_field(data_config, "split") or "train"
  return cls.from_config(data_config, split)


def decode_image(image, key: str = "") -> Optional[np.ndarray]:
  """An example's image (encoded bytes or uint8 array) -> uint8 [H, W, C].

  C is 1 for grey files and 3 for colour ones (an array keeps its own). None
  for a corrupt or truncated file, after one warning naming `key`, so that a
  bad file skips one example instead of ending a run. The loader's decoder
  (`transforms.decode`) is this same function.
  """
  return transforms.decode(image, key)


# ---------------------------------------------------------------------------
# The two kinds of source.


class RandomAccessSource:
  """`len(source)` examples, `source[i]` for 0 <= i < len (deterministic)."""

  name = ""  # set by register_source

  def __len__(self) -> int:
    raise NotImplementedError

  def __getitem__(self, index: int) -> Example:
    raise NotImplementedError

  def example(self, index: int, epoch: int) -> Example:
    """Example `index` as epoch `epoch` sees it; the loader calls this.

    Equal to `self[index]` unless the source draws something per epoch.
    """
    del epoch
    return self[index]

  def caption(self, index: int) -> str:
    """The caption of `self[index]` (sources override it to skip the image)."""
    return self[index]["caption"]

  def _check_index(self, index) -> int:
    index = operator.index(index)  # numpy integers too
    if not 0 <= index < len(self):
      raise IndexError(f"index {index} out of range for a {self.name} source "
                       f"of {len(self)} examples")
    return index

  def statistics(self) -> Dict[str, Any]:
    """{"source", "examples", "caption_words_min/median/max", ...}."""
    n = min(len(self), CAPTION_SAMPLE)
    return {"source": self.name, "examples": len(self),
            **caption_statistics([self.caption(i) for i in range(n)])}


class StreamSource:
  """Examples read shard by shard; `shards` sorted, `read_shard` streams."""

  name = ""  # set by register_source
  shards: List[str]  # sorted shard paths

  def read_shard(self, shard: str) -> Iterator[Example]:
    raise NotImplementedError

  def __iter__(self) -> Iterator[Example]:
    """Every shard's examples in `shards` order (one pass, no shuffling)."""
    for shard in self.shards:
      yield from self.read_shard(shard)

  def statistics(self) -> Dict[str, Any]:
    return {"source": self.name, "shards": len(self.shards),
            "shard_bytes": sum(os.path.getsize(s) for s in self.shards)}


# ---------------------------------------------------------------------------
# Helpers the sources share.


def config_field(data_config, name: str, default: Any = "") -> Any:
  """`data_config.<name>`, or `default` when the config predates the field."""
  value = data_config.get(name, default)
  return default if value is None else value


def require_path(data_config, field: str, what: str, directory: bool = True
                 ) -> str:
  """The existing folder (or file) `data.<field>`, else a ConfigError (a ValueError)."""
  path = config_field(data_config, field)
  source = config_field(data_config, "source")
  if not path:
    raise ConfigError(f"data.source={source!r} needs data.{field}: {what}; set "
                     f"--config.data.{field}=...")
  path = os.path.expanduser(path)
  if not os.path.exists(path):
    raise ConfigError(f"data.{field}={path!r} does not exist; it should be "
                     f"{what}.")
  if directory and not os.path.isdir(path):
    raise ConfigError(f"data.{field}={path!r} is not a folder; it should be "
                     f"{what}.")
  if not directory and not os.path.isfile(path):
    raise ConfigError(f"data.{field}={path!r} is not a file; it should be "
                     f"{what}.")
  return path


def template_fields(template: str) -> List[str]:
  """The fields a str.format template names ("{label_name}" -> label_name)."""
  try:
    parsed = list(string.Formatter().parse(template))
  except ValueError as e:
    raise ConfigError(f"data.caption_template={template!r} is not a valid "
                     f"format string ({e}).") from None
  names = []
  for _, field, _, _ in parsed:
    if field is None:
      continue
    root = field.split(".")[0].split("[")[0]
    if not root or root.isdigit():
      raise ConfigError(f"data.caption_template={template!r} has a positional "
                       "field {}; name the field, e.g. {label_name}.")
    names.append(root)
  return names


def check_template(template: str, available: Sequence[str], source: str
                   ) -> str:
  """`template` if it names only fields in `available`, else a ConfigError (a ValueError)."""
  unknown = sorted(set(template_fields(template)) - set(available))
  if unknown:
    offers = ("{" + "}, {".join(available) + "}") if available else "none"
    raise ConfigError(
        f"data.caption_template={template!r} names {unknown}, which the "
        f"{source} source does not have (its template fields: {offers}); "
        "change the template or caption the data another way.")
  return template


def label_captions(template: str, names: Sequence[str]) -> List[str]:
  """Caption of each class: `template` with label=<index>, label_name=<name>."""
  return [template.format(label=i, label_name=n) for i, n in enumerate(names)]


def caption_statistics(captions: Sequence[str]) -> Dict[str, Any]:
  """Words per caption over `captions`: min, median, max and the sample size."""
  if not captions:
    return {"caption_sample": 0}
  words = np.array([len(c.split()) for c in captions])
  return {"caption_sample": len(captions),
          "caption_words_min": int(words.min()),
          "caption_words_median": float(np.median(words)),
          "caption_words_max": int(words.max())}


def read_bytes(path: str, key: str) -> bytes:
  """The contents of an image file; b"" (after a warning) if unreadable.

  An unreadable file then fails to decode in the loader and is skipped like a
  corrupt one, instead of ending the run.
  """
  try:
    with open(path, "rb") as f:
      return f.read()
  except OSError as e:
    logging.warning("Cannot read image %r (%s); it will be skipped.", key, e)
    return b""


def to_text(value: Any) -> str:
  """A caption value as str (tfds and Arrow give bytes for text)."""
  if isinstance(value, (bytes, np.bytes_)):
    return bytes(value).decode("utf-8", errors="replace")
  return str(value)


# Each module registers its source(s) with register_source when imported.
# pylint: disable=g-import-not-at-top,g-bad-import-order,wrong-import-position
from jaxsd.data import source_mnist  # noqa: E402,F401
from jaxsd.data import source_tfds  # noqa: E402,F401
from jaxsd.data import source_imagefolder  # noqa: E402,F401
from jaxsd.data import source_coco  # noqa: E402,F401
from jaxsd.data import source_webdataset  # noqa: E402,F401
from jaxsd.data import source_huggingface  # noqa: E402,F401
