"""Metric writers: the interface, the console, TensorBoard event files, and
several at once.

The interface is clu's MetricWriter (write_scalars, write_images,
write_texts, write_hparams, flush, close), written here rather than
imported: `import clu.metric_writers` imports TensorFlow for its TensorBoard
writer, which took 9.4 s of every jaxsd command's start on a 2-core AMD EPYC
(2026-12-06), while an event file is a few protobufs that the tensorboard
package defines without TensorFlow. The console lines keep clu's format
(`[step] key=value, ...`).
"""
import abc
import io
import itertools
import os
import socket
import time
from typing import Any, Dict, Mapping, Sequence

from absl import logging
import numpy as np


def flatten_dict(d: Mapping[str, Any], prefix: str = "") -> Dict[str, Any]:
  """{"a": {"b": 1}} -> {"a.b": 1}."""
  out = {}
  for k, v in d.items():
    key = f"{prefix}{k}"
    if isinstance(v, Mapping):
      out.update(flatten_dict(v, key + "."))
    else:
      out[key] = v
  return out


def image_uint8(image) -> np.ndarray:
  """An image for a log: [H, W, C] (or the first of [N, H, W, C]) as uint8,
  floats read as [0, 1]; one channel becomes [H, W]."""
  image = np.asarray(image)
  if image.ndim == 4:
    image = image[0]
  if image.dtype != np.uint8:
    image = np.clip(np.round(image * 255), 0, 255).astype(np.uint8)
  if image.shape[-1] == 1:
    image = image[..., 0]
  return image


class MetricWriter(abc.ABC):
  """What the trainer and its tasks write to (clu's MetricWriter methods)."""

  @abc.abstractmethod
  def write_scalars(self, step: int, scalars: Mapping[str, Any]):
    """Numbers at a step."""

  @abc.abstractmethod
  def write_images(self, step: int, images: Mapping[str, Any]):
    """[N, H, W, C] or [H, W, C] arrays, floats in [0, 1] or uint8."""

  @abc.abstractmethod
  def write_texts(self, step: int, texts: Mapping[str, str]):
    """Strings at a step."""

  @abc.abstractmethod
  def write_hparams(self, hparams: Mapping[str, Any]):
    """The run's settings (nested mappings allowed), once per start."""

  def flush(self):
    pass

  def close(self):
    self.flush()


class LoggingWriter(MetricWriter):
  """Writes every value to the INFO log, as clu's LoggingWriter does."""

  def write_scalars(self, step, scalars):
    values = [f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}"
              for k, v in sorted(scalars.items())]
    logging.info("[%d] %s", step, ", ".join(values))

  def write_images(self, step, images):
    logging.info("[%d] Got images: %s.", step,
                 {k: np.shape(v) for k, v in images.items()})

  def write_texts(self, step, texts):
    logging.info("[%d] Got texts: %s.", step, dict(texts))

  def write_hparams(self, hparams):
    logging.info("[Hyperparameters] %s", dict(hparams))

  def flush(self):
    logging.flush()


_FILE_IDS = itertools.count()


class TensorBoardWriter(MetricWriter):
  """One TensorBoard event file in logdir (events.out.tfevents.*.v2):
  scalars, PNG images, texts and the hparams plugin's session summary,
  which `tensorboard --logdir` reads as it reads TensorFlow's."""

  def __init__(self, logdir: str):
    # The tensorboard package's own protobufs and record framing (length,
    # masked CRC32C, data, masked CRC32C); none of them imports TensorFlow.
    from tensorboard.compat.proto import event_pb2  # pylint: disable=g-import-not-at-top
    from tensorboard.compat.proto import summary_pb2  # pylint: disable=g-import-not-at-top
    from tensorboard.summary.writer import record_writer  # pylint: disable=g-import-not-at-top
    self._event_pb2, self._summary_pb2 = event_pb2, summary_pb2
    os.makedirs(logdir, exist_ok=True)
    name = (f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}"
            f".{os.getpid()}.{next(_FILE_IDS)}.v2")
    self.path = os.path.join(logdir, name)
    self._file = open(self.path, "wb")  # pylint: disable=consider-using-with
    self._records = record_writer.RecordWriter(self._file)
    self._write(event_pb2.Event(wall_time=time.time(),
                                file_version="brain.Event:2"))

  def _write(self, event):
    # Flushed at once: a run logs every few seconds at most, and TensorBoard
    # then shows it live and a killed run loses nothing.
    self._records.write(event.SerializeToString())
    self._records.flush()

  def _summary(self, step: int, values: Sequence[Any]):
    if values:
      self._write(self._event_pb2.Event(
          wall_time=time.time(), step=int(step),
          summary=self._summary_pb2.Summary(value=list(values))))

  def write_scalars(self, step, scalars):
    value = self._summary_pb2.Summary.Value
    self._summary(step, [value(tag=k, simple_value=float(v))
                         for k, v in scalars.items()])

  def write_images(self, step, images):
    from PIL import Image  # pylint: disable=g-import-not-at-top
    summary = self._summary_pb2.Summary
    values = []
    for key, batch in images.items():
      batch = np.asarray(batch)
      batch = batch[None] if batch.ndim == 3 else batch
      for i in range(batch.shape[0]):
        image = image_uint8(batch[i])
        png = io.BytesIO()
        Image.fromarray(image).save(png, format="PNG")
        values.append(summary.Value(
            tag=key if batch.shape[0] == 1 else f"{key}/image/{i}",
            image=summary.Image(
                height=image.shape[0], width=image.shape[1],
                colorspace=1 if image.ndim == 2 else image.shape[-1],
                encoded_image_string=png.getvalue())))
    self._summary(step, values)

  def write_texts(self, step, texts):
    from tensorboard.compat.proto import tensor_pb2  # pylint: disable=g-import-not-at-top
    from tensorboard.compat.proto import types_pb2  # pylint: disable=g-import-not-at-top
    summary = self._summary_pb2
    metadata = summary.SummaryMetadata(
        plugin_data=summary.SummaryMetadata.PluginData(plugin_name="text"))
    self._summary(step, [summary.Summary.Value(
        tag=key, metadata=metadata,
        tensor=tensor_pb2.TensorProto(dtype=types_pb2.DT_STRING,
                                      string_val=[str(text).encode()]))
                         for key, text in texts.items()])

  def write_hparams(self, hparams):
    from tensorboard.plugins.hparams import summary_v2  # pylint: disable=g-import-not-at-top
    flat = {}
    for key, value in flatten_dict(hparams).items():
      if isinstance(value, (np.generic,)):
        value = value.item()
      flat[key] = (value if isinstance(value, (bool, int, float, str))
                   else "" if value is None else str(value))
    self._write(self._event_pb2.Event(wall_time=time.time(),
                                      summary=summary_v2.hparams_pb(flat)))

  def flush(self):
    if not self._file.closed:
      self._records.flush()

  def close(self):
    if not self._file.closed:
      self._records.close()


class MultiWriter(MetricWriter):
  """Writes to each of several writers."""

  def __init__(self, writers: Sequence[MetricWriter]):
    self.writers = list(writers)

  def write_scalars(self, step, scalars):
    for w in self.writers:
      w.write_scalars(step, scalars)

  def write_images(self, step, images):
    for w in self.writers:
      w.write_images(step, images)

  def write_texts(self, step, texts):
    for w in self.writers:
      w.write_texts(step, texts)

  def write_hparams(self, hparams):
    for w in self.writers:
      w.write_hparams(hparams)

  def flush(self):
    for w in self.writers:
      w.flush()

  def close(self):
    for w in self.writers:
      w.close()
