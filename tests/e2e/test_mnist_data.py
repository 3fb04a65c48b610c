"""MNIST from its four original files, offline: tfds builds it (about 20 s
the first time, then cached)."""
import numpy as np
import pytest

from jaxsd.data import mnist as input_pipeline


@pytest.mark.mnist
def test_load_mnist_offline_from_files(tiny_config):
  images, labels = input_pipeline.load_mnist(tiny_config().data, "test")
  assert images.shape == (10000, 28, 28, 1) and images.dtype == np.uint8
  np.testing.assert_array_equal(np.bincount(labels)[:3], [980, 1135, 1032])
