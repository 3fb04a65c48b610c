"""The `huggingface` source: a dataset of the `datasets` library.

Where the data comes from:
- `data.path`, a local folder: written by `save_to_disk` (a Dataset, or a
  DatasetDict whose `data.split` is taken), else a folder of parquet files
  (split by file name as the Hub does, `train-*.parquet`, `test-*.parquet`;
  all files are "train" when none is named for a split);
- else `data.name`, a Hub id such as "Matthijs/snacks", from the Hub or its
  local cache. Offline and not cached is a ValueError at once.

Columns: the image is `data.image_key` (default "image"); the caption is
`data.caption_key` (default "text", else "caption"). A class-label column
(`data.caption_key`, or "label" / the first ClassLabel column when no text
column exists) is captioned by `data.caption_template` with `{label}` and
`{label_name}` (the ClassLabel's name). Image columns are read with
`datasets.Image(decode=False)`: examples carry the stored bytes (or the
file's), decoded later in the loader's workers.

`datasets` is imported only when this source is built. The source pickles
with its Dataset, which pickles as the paths of its memory-mapped Arrow files
(save_to_disk folders and the Hub/parquet cache are memory-mapped).
"""
import contextlib
import glob
import os
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np

from jaxsd import hub
from jaxsd.data import sources

TEXT_COLUMNS = ("text", "caption")


def _import_datasets():
  try:
    import datasets  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("data.source='huggingface' needs the datasets package "
                      f"(pip install datasets): {e}") from None
  return datasets


@contextlib.contextmanager
def _hub_offline(datasets):
  """datasets and huggingface_hub offline: the cache only, no sockets."""
  from huggingface_hub import constants  # pylint: disable=g-import-not-at-top
  saved = datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE
  datasets.config.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE = True
  try:
    yield
  finally:
    datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE = saved


def _load_folder(datasets, path: str, split: str):
  if (os.path.isfile(os.path.join(path, "state.json"))
      or os.path.isfile(os.path.join(path, "dataset_dict.json"))):
    loaded = datasets.load_from_disk(path)
    if isinstance(loaded, datasets.DatasetDict):
      if split not in loaded:
        raise ValueError(f"data.split={split!r} is not a split of the "
                         f"DatasetDict in data.path={path!r} (splits: "
                         f"{sorted(loaded)}).")
      return loaded[split]
    if loaded.split is not None and str(loaded.split) != split:
      raise ValueError(f"data.path={path!r} holds split {str(loaded.split)!r}, "
                       f"not data.split={split!r}.")
    return loaded
  if not glob.glob(os.path.join(path, "**", "*.parquet"), recursive=True):
    raise ValueError(
        f"data.path={path!r} is neither a save_to_disk folder (state.json / "
        "dataset_dict.json) nor a folder of .parquet files; point data.path "
        "at one, or set data.name to a Hub dataset id.")
  try:
    return datasets.load_dataset("parquet", data_dir=path, split=split)
  except ValueError as e:
    raise ValueError(f"Cannot read data.split={split!r} of the parquet files "
                     f"in data.path={path!r}: {e}") from None


def _load_hub(datasets, name: str, split: str):
  offline = (hub.offline_mode(hugging_face=True)
             or not hub.network_available("huggingface.co"))
  if offline:
    try:
      with _hub_offline(datasets):
        return datasets.load_dataset(name, split=split)
    except Exception as e:  # pylint: disable=broad-except
      # Offline, datasets raises one of several errors for "not cached".
      raise ValueError(
          f"data.name={name!r} split {split!r} is not in the Hugging Face "
          f"cache ({datasets.config.HF_DATASETS_CACHE}) and huggingface.co "
          "is not reachable (offline). Load it once with a network, or "
          "save_to_disk it elsewhere, copy the folder and set data.path. "
          f"({type(e).__name__}: {str(e)[:200]})") from None
  try:
    return datasets.load_dataset(name, split=split)
  except datasets.exceptions.DatasetNotFoundError as e:
    raise ValueError(f"data.name={name!r} is not a Hugging Face dataset "
                     f"({e}).") from None
  except ValueError as e:
    raise ValueError(f"Cannot load data.name={name!r} with data.split="
                     f"{split!r}: {e}") from None


def _caption_column(datasets, features, caption_key: str) -> str:
  columns = list(features)
  if caption_key:
    if caption_key not in features:
      raise ValueError(f"data.caption_key={caption_key!r} is not a column "
                       f"(columns: {columns}).")
    return caption_key
  for name in TEXT_COLUMNS:
    if name in features:
      return name
  labels = [c for c in columns
            if isinstance(features[c], datasets.ClassLabel)]
  if "label" in labels:
    return "label"
  if labels:
    return labels[0]
  raise ValueError(f"No caption column: none of {list(TEXT_COLUMNS)} nor a "
                   f"ClassLabel column (columns: {columns}); set "
                   "data.caption_key to the caption column.")


@sources.register_source("huggingface")
class HuggingFaceSource(sources.RandomAccessSource):
  """Rows of a `datasets.Dataset` with an image and a caption column."""

  def __init__(self, dataset, image_column: str, caption_column: str,
               split: str, class_captions: Optional[Sequence[str]] = None,
               label_template: str = ""):
    """Captions: class_captions[label] for a ClassLabel column,
    label_template.format(label=value) for an integer one, else the text."""
    self.dataset = dataset
    self.image_column = image_column
    self.caption_column = caption_column
    self.split = split
    self.class_captions = (None if class_captions is None
                           else list(class_captions))
    self.label_template = label_template

  @classmethod
  def from_config(cls, data_config, split: str) -> "HuggingFaceSource":
    path = sources.config_field(data_config, "path")
    name = sources.config_field(data_config, "name")
    if not path and not name:
      raise ValueError(
          "data.source='huggingface' needs data.name (a Hub dataset id such "
          "as 'Matthijs/snacks') or data.path (a save_to_disk or parquet "
          "folder).")
    datasets = _import_datasets()
    if path:
      path = sources.require_path(
          data_config, "path", "a save_to_disk folder or a folder of parquet "
          "files")
      dataset = _load_folder(datasets, path, split)
    else:
      dataset = _load_hub(datasets, name, split)
    features = dataset.features
    image_column = sources.config_field(data_config, "image_key") or "image"
    if image_column not in features:
      raise ValueError(f"data.image_key={image_column!r} is not a column "
                       f"(columns: {list(features)}); set data.image_key to "
                       "the image column.")
    caption_column = _caption_column(
        datasets, features, sources.config_field(data_config, "caption_key"))
    if caption_column == image_column:
      raise ValueError(f"data.caption_key={caption_column!r} is the image "
                       "column; set it to the caption column.")
    class_captions, label_template = cls._label_captions(
        datasets, features[caption_column], caption_column, data_config)
    dataset = dataset.select_columns([image_column, caption_column])
    if isinstance(features[image_column], datasets.Image):
      dataset = dataset.cast_column(image_column,
                                    datasets.Image(decode=False))
    if not len(dataset):
      raise ValueError(f"The {split!r} split of data.path={path!r} / "
                       f"data.name={name!r} has no rows.")
    return cls(dataset, image_column, caption_column, split, class_captions,
               label_template)

  @staticmethod
  def _label_captions(datasets, feature, column: str, data_config
                      ) -> Tuple[Optional[List[str]], str]:
    """(class_captions, label_template) of the caption column's feature."""
    template = sources.config_field(data_config, "caption_template")
    if isinstance(feature, datasets.ClassLabel):
      sources.check_template(template, ("label", "label_name"),
                             f"huggingface (column {column!r})")
      return sources.label_captions(template, feature.names), ""
    dtype = getattr(feature, "dtype", "")
    if isinstance(feature, datasets.Value) and "int" in dtype:
      sources.check_template(template, ("label",),
                             f"huggingface (integer column {column!r})")
      return None, template
    if not (isinstance(feature, datasets.Value) and "string" in dtype):
      raise ValueError(f"data.caption_key={column!r} is a {feature}, neither "
                       "text nor a class label; set data.caption_key to the "
                       "caption column.")
    return None, ""

  def __len__(self) -> int:
    return len(self.dataset)

  def _image(self, value: Any, key: str):
    if isinstance(value, dict):  # Image(decode=False): {"bytes", "path"}
      if value.get("bytes") is not None:
        return value["bytes"]
      return sources.read_bytes(value.get("path") or "", key)
    return np.asarray(value, np.uint8)

  def _caption_of(self, value: Any) -> str:
    if self.class_captions is not None:
      return self.class_captions[int(value)]
    if self.label_template:
      return self.label_template.format(label=int(value))
    return sources.to_text(value).strip()

  def __getitem__(self, index: int) -> sources.Example:
    index = self._check_index(index)
    row = self.dataset[index]
    key = f"{self.split}/{index}"
    return {"image": self._image(row[self.image_column], key),
            "caption": self._caption_of(row[self.caption_column]),
            "key": key}

  def caption(self, index: int) -> str:
    return self._caption_of(self.dataset[index][self.caption_column])

  def statistics(self):
    n = min(len(self), sources.CAPTION_SAMPLE)
    values = self.dataset.select_columns([self.caption_column])[:n]
    captions = [self._caption_of(v) for v in values[self.caption_column]]
    return {"source": self.name, "examples": len(self), "split": self.split,
            **sources.caption_statistics(captions)}
