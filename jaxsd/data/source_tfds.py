"""The `tfds` source: any tensorflow-datasets name (`data.name`) and split.

The caption is a text feature (`data.caption_key`), or `data.caption_template`
over a ClassLabel feature (`data.caption_key`, default "label") with
`{label}` (the class index) and `{label_name}` (its name), e.g.
"a photograph of a {label_name}" for cifar10. The image feature is
`data.image_key` (default "image"); Image features stay encoded (tfds keeps
PNG/JPEG bytes), so decoding happens in the loader's workers.

Datasets prepared as ArrayRecord are read by random access from disk
(`builder.as_data_source`); the source then pickles as its name, split and
folder, and each process opens the files itself. Datasets prepared as
TFRecord (tfds' default) are read once into memory: the encoded images and
captions. A dataset this source prepares itself (not yet in
`data.tfds_data_dir`, network available) is written as ArrayRecord, by one
process of the run while the others wait for it. Offline and not prepared
is a ValueError at once.
"""
from typing import Any, Optional, Sequence

from absl import logging
import numpy as np

from jaxsd import hub
from jaxsd.data import mnist as input_pipeline
from jaxsd.data import sources


def _import_tfds():
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  # pylint: disable-next=protected-access
  input_pipeline._hide_gpus_from_tensorflow(tf)
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  tfds.disable_progress_bar()
  return tfds


def _image_value(value: Any):
  """A record's image: encoded bytes (Image features) or uint8 [H, W, C]."""
  if isinstance(value, (bytes, np.bytes_)):
    return bytes(value)
  if isinstance(value, np.ndarray) and value.dtype == object:
    return bytes(value.item())
  return np.asarray(value, np.uint8)


def _builder(tfds, name: str, data_dir: str):
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.DatasetNotFoundError as e:
    first = str(e).splitlines()[0] if str(e) else ""
    raise ValueError(f"data.name={name!r} is not a tensorflow-datasets "
                     f"dataset ({first}); see tfds.list_builders().") from None
  if builder.is_prepared():
    return builder
  if hub.offline_mode() or not hub.network_available("storage.googleapis.com"):
    raise ValueError(
        f"The tfds dataset data.name={name!r} is not prepared in {data_dir} "
        "and there is no network to download it. Prepare it where there is "
        f"(tfds.builder({name!r}).download_and_prepare("
        "file_format='array_record')) and copy it here, or set "
        "data.tfds_data_dir to the folder that holds it.")

  def prepare(builder):
    logging.info("Preparing tfds %s in %s (ArrayRecord).", name, data_dir)
    builder.download_and_prepare(file_format="array_record")
  # One process of the run prepares, the others wait for it (a file lock).
  return input_pipeline.prepare_tfds(tfds, name, data_dir, prepare)


@sources.register_source("tfds")
class TfdsSource(sources.RandomAccessSource):
  """One tfds split; images `image_key`, captions from text or class labels."""

  def __init__(self, name: str, data_dir: str, split: str, image_key: str,
               caption_key: str, class_captions: Optional[Sequence[str]],
               skip_decoding: bool):
    self.dataset_name = name
    self.data_dir = data_dir
    self.split = split
    self.image_key = image_key
    self.caption_key = caption_key
    self.class_captions = (None if class_captions is None
                           else list(class_captions))
    self.skip_decoding = skip_decoding
    self._records = None  # ArrayRecord data source, opened per process
    self._images: Optional[np.ndarray] = None  # in-memory (TFRecord) copy
    self._captions: Optional[np.ndarray] = None
    self._length = 0

  @classmethod
  def from_config(cls, data_config, split: str) -> "TfdsSource":
    name = sources.config_field(data_config, "name")
    if not name:
      raise ValueError("data.source='tfds' needs data.name, a "
                       "tensorflow-datasets name such as 'cifar10'.")
    tfds = _import_tfds()
    # pylint: disable-next=protected-access
    data_dir = input_pipeline._tfds_data_dir(data_config)
    builder = _builder(tfds, name, data_dir)
    info = builder.info
    features = info.features
    feature_names = sorted(features.keys())
    image_key = sources.config_field(data_config, "image_key") or "image"
    if image_key not in features:
      raise ValueError(f"data.image_key={image_key!r} is not a feature of "
                       f"tfds {name!r} (features: {feature_names}).")
    caption_key = sources.config_field(data_config, "caption_key") or "label"
    if caption_key not in features:
      raise ValueError(
          f"tfds {name!r} has no feature {caption_key!r} for captions "
          f"(features: {feature_names}); set data.caption_key to a text or "
          "class-label feature.")
    feature = features[caption_key]
    class_captions = None
    if isinstance(feature, tfds.features.ClassLabel):
      template = sources.check_template(
          sources.config_field(data_config, "caption_template"),
          ("label", "label_name"), f"tfds {name!r}")
      class_captions = sources.label_captions(template, feature.names)
    elif not (isinstance(feature, tfds.features.Text)
              or getattr(feature, "dtype", None) == np.object_
              or str(getattr(feature, "dtype", "")) == "string"):
      raise ValueError(
          f"data.caption_key={caption_key!r} of tfds {name!r} is a "
          f"{type(feature).__name__}, neither text nor a class label; choose "
          f"another feature (features: {feature_names}).")
    try:
      info.splits[split]
    except (KeyError, ValueError) as e:
      raise ValueError(
          f"data.split={split!r} is not a split of tfds {name!r} (splits: "
          f"{sorted(info.splits.keys())}; {e}).") from None
    skip = isinstance(features[image_key], tfds.features.Image)
    source = cls(name, data_dir, split, image_key, caption_key,
                 class_captions, skip)
    source._open(tfds, builder)
    return source

  def _decoders(self, tfds):
    return ({self.image_key: tfds.decode.SkipDecoding()}
            if self.skip_decoding else None)

  def _open(self, tfds, builder):
    try:
      self._records = builder.as_data_source(self.split,
                                             decoders=self._decoders(tfds))
      self._length = len(self._records)
      return
    except NotImplementedError:  # prepared as TFRecord: no random access
      pass
    data = tfds.as_numpy(builder.as_dataset(
        split=self.split, batch_size=-1, decoders=self._decoders(tfds)))
    self._images = data[self.image_key]
    captions = data[self.caption_key]
    self._captions = (np.asarray(captions, np.int64) if self.class_captions
                      is not None else
                      np.array([sources.to_text(c) for c in captions], object))
    self._length = len(self._captions)
    logging.info("tfds %s[%s] is TFRecord: %d examples read into memory "
                 "(prepare it with file_format='array_record' to read from "
                 "disk).", self.dataset_name, self.split, self._length)

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_records"] = None  # reopened from disk in the new process
    return state

  def _record_source(self):
    if self._records is None:
      tfds = _import_tfds()
      builder = tfds.builder(self.dataset_name, data_dir=self.data_dir)
      self._records = builder.as_data_source(self.split,
                                             decoders=self._decoders(tfds))
    return self._records

  def __len__(self) -> int:
    return self._length

  def _caption_of(self, value) -> str:
    if self.class_captions is not None:
      return self.class_captions[int(value)]
    return sources.to_text(value)

  def __getitem__(self, index: int) -> sources.Example:
    index = self._check_index(index)
    if self._images is not None:
      image, caption = self._images[index], self._captions[index]
    else:
      record = self._record_source()[index]
      image, caption = record[self.image_key], record[self.caption_key]
    return {"image": _image_value(image), "caption": self._caption_of(caption),
            "key": f"{self.split}/{index}"}

  def caption(self, index: int) -> str:
    if self._captions is not None:
      return self._caption_of(self._captions[index])
    return self[index]["caption"]

  def statistics(self):
    return {**super().statistics(), "name": self.dataset_name,
            "split": self.split,
            "storage": "memory" if self._images is not None else "disk"}

