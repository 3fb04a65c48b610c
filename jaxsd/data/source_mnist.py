"""The `mnist` source: tfds MNIST (offline from the four files), label captions.

MNIST fits in memory (47 MB), so the arrays of `input_pipeline.load_mnist`
are kept in the source and travel with it to loader workers.
"""
from typing import Sequence

import numpy as np

from jaxsd.data import mnist as input_pipeline
from jaxsd.data import sources


@sources.register_source("mnist")
class MnistSource(sources.RandomAccessSource):
  """Images uint8 [28, 28, 1]; caption = data.caption_template(label=digit)."""

  def __init__(self, images: np.ndarray, labels: np.ndarray,
               class_captions: Sequence[str], split: str):
    self.images = images
    self.labels = labels
    self.class_captions = list(class_captions)
    self.split = split

  @classmethod
  def from_config(cls, data_config, split: str) -> "MnistSource":
    template = sources.check_template(
        sources.config_field(data_config, "caption_template"), ("label",),
        "mnist")
    images, labels = input_pipeline.load_mnist(data_config, split)
    return cls(images, labels, [template.format(label=d) for d in range(10)],
               split)

  def __len__(self) -> int:
    return len(self.labels)

  def __getitem__(self, index: int) -> sources.Example:
    index = self._check_index(index)
    return {"image": self.images[index], "caption": self.caption(index),
            "key": f"{self.split}/{index}"}

  def caption(self, index: int) -> str:
    return self.class_captions[int(self.labels[index])]
