"""The MNIST judge: trains to >= 99%, is cached, and scores real digits well.

One session-scoped fixture trains the classifier (about a minute on 2 cores)
into the test run's cache; every other test (and training's evaluation) reuses it.
"""
import os
import time

import numpy as np
import pytest

from jaxsd.evaluation import classifier as classifier_lib
from jaxsd.evaluation import fid
from jaxsd.evaluation import mnist_idx
from jaxsd.evaluation import prompt_metrics


@pytest.fixture(scope="session")
def mnist():
  """(train_images, train_labels, test_images, test_labels), uint8 / int32."""
  return classifier_lib.mnist_arrays()


@pytest.fixture(scope="session")
def cache_dir():
  """The evaluator's own classifier cache under $JAXSD_CACHE (fresh per CI
  run), so one test run trains the classifier once, here or in training."""
  return os.path.join(os.environ["JAXSD_CACHE"], "classifier")


@pytest.fixture(scope="session")
def classifier(mnist, cache_dir):
  return classifier_lib.load_or_train_classifier(cache_dir, lambda: mnist)


def test_mnist_idx_reader(mnist):
  train_images, train_labels, test_images, test_labels = mnist
  assert train_images.shape == (60000, 28, 28)
  assert test_images.shape == (10000, 28, 28)
  assert train_images.dtype == np.uint8 and train_images.max() == 255
  # The canonical files' first labels and class counts.
  np.testing.assert_array_equal(train_labels[:8], [5, 0, 4, 1, 9, 2, 1, 3])
  np.testing.assert_array_equal(test_labels[:8], [7, 2, 1, 0, 4, 1, 4, 9])
  assert np.bincount(test_labels).tolist() == [
      980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def test_classifier_reaches_99_percent(classifier, mnist):
  _, _, test_images, test_labels = mnist
  assert classifier.test_accuracy >= 0.99
  # The stored figure is the real one: recompute it from the images.
  assert classifier.accuracy(test_images, test_labels) == pytest.approx(
      classifier.test_accuracy, abs=1e-9)
  assert classifier.identity.startswith(classifier_lib.ARCHITECTURE_VERSION)
  print(f"classifier: test accuracy {classifier.test_accuracy:.4f}, trained "
        f"in {classifier.train_seconds:.1f} s")


def test_cached_classifier_is_reused_not_retrained(classifier, cache_dir,
                                                   mnist):
  def must_not_train():
    raise AssertionError("cached classifier was retrained")

  start = time.time()
  again = classifier_lib.load_or_train_classifier(cache_dir, must_not_train)
  assert time.time() - start < 15
  assert again.identity == classifier.identity
  assert again.test_accuracy == classifier.test_accuracy
  images = mnist[2][:300]
  logits, features = classifier.logits_and_features(images)
  logits2, features2 = again.logits_and_features(images)
  np.testing.assert_allclose(logits2, logits, atol=1e-5)
  np.testing.assert_allclose(features2, features, atol=1e-5)
  assert features.shape == (300, classifier_lib.FEATURE_DIM)
  assert os.path.exists(os.path.join(
      classifier_lib.classifier_dir(cache_dir), "metadata.json"))


def test_input_forms_agree(classifier, mnist):
  """uint8, [-1, 1] floats, [N, 28, 28] and 32x32-padded images: same logits."""
  images = mnist[2][:64]
  reference = classifier.logits_and_features(images, batch_size=50)[0]
  as_float = mnist_idx.to_model_range(images)
  padded = np.pad(as_float, ((0, 0), (2, 2), (2, 2), (0, 0)),
                  constant_values=-1.0)
  for variant in (as_float, as_float[..., 0], padded):
    np.testing.assert_allclose(
        classifier.logits_and_features(variant, batch_size=50)[0], reference,
        atol=1e-4)


def test_prompt_accuracy_of_real_digits(classifier, mnist):
  """Real test digits, 'prompted' with their labels, are judged right."""
  _, _, test_images, test_labels = mnist
  predicted = classifier.predict(test_images)
  result = prompt_metrics.prompt_accuracy(predicted, test_labels)
  assert result["mean"] >= 0.99
  assert result["per_digit"].shape == (10,)
  assert result["per_digit"].min() >= 0.97
  # Wrong prompts are caught: shifting every label by one gives ~0.
  wrong = prompt_metrics.prompt_accuracy(predicted, (test_labels + 1) % 10)
  assert wrong["mean"] < 0.02


def test_mnist_fid_small_for_real_data_large_for_noise(classifier, mnist):
  train_images, train_labels, test_images, test_labels = mnist
  noise = np.random.RandomState(0).randint(0, 256, (10000, 28, 28),
                                           dtype=np.uint8)
  real = prompt_metrics.mnist_fid(classifier, test_images, train_images[:10000])
  to_noise = prompt_metrics.mnist_fid(classifier, test_images, noise)
  # Only digits 0-4 against all digits: a class-coverage failure in between.
  low_digits = prompt_metrics.mnist_fid(
      classifier, test_images, train_images[:10000][train_labels[:10000] < 5])
  print(f"MNIST-FID test/train {real:.3f}, test/0-4 {low_digits:.3f}, "
        f"test/noise {to_noise:.3f}")
  assert real < 0.02 * to_noise
  assert real < low_digits < to_noise


def test_sample_metrics_with_cached_reference(classifier, mnist, cache_dir):
  _, _, test_images, test_labels = mnist
  reference = prompt_metrics.mnist_reference_statistics(
      classifier, cache_dir, "test", images=test_images)
  path = fid.statistics_cache_path(cache_dir, fid.reference_statistics_name(
      classifier.identity, "mnist-test"))
  assert os.path.exists(path)
  # A cache hit reads no MNIST files (this folder does not exist).
  cached = prompt_metrics.mnist_reference_statistics(
      classifier, cache_dir, "test", mnist_dir="/nonexistent/mnist")
  np.testing.assert_array_equal(cached[1], reference[1])

  samples, digits = test_images[:1000], test_labels[:1000]
  metrics = prompt_metrics.sample_metrics(classifier, samples, digits,
                                          reference_statistics=reference)
  assert metrics["prompt_accuracy"] >= 0.98
  assert set(f"prompt_accuracy/{d}" for d in range(10)) <= set(metrics)
  assert metrics["diversity"] > 0
  assert metrics["mnist_fid"] < 0.05 * prompt_metrics.mnist_fid(
      classifier, test_images, np.zeros_like(test_images[:1000]) + 128)

  # Mode collapse: each prompt answered by one repeated image.
  collapsed = np.concatenate([np.repeat(samples[digits == d][:1], 20, axis=0)
                              for d in range(10)])
  collapsed_metrics = prompt_metrics.sample_metrics(
      classifier, collapsed, np.repeat(np.arange(10), 20),
      reference_statistics=reference)
  assert collapsed_metrics["diversity"] == pytest.approx(0, abs=1e-3)
  assert collapsed_metrics["mnist_fid"] > 5 * metrics["mnist_fid"]


def test_random_shift_translates_within_bounds():
  import jax  # pylint: disable=g-import-not-at-top
  images = -np.ones((64, 28, 28, 1), np.float32)
  images[:, 10:18, 10:18] = 1.0  # an 8x8 square, 2+ pixels from every edge
  shifted = np.asarray(classifier_lib.random_shift(
      jax.random.key(0), images, max_shift=2))
  assert shifted.shape == images.shape
  offsets = set()
  for image in shifted[..., 0]:
    rows, cols = np.nonzero(image > 0)
    assert len(rows) == 64  # the whole square survives, only moved
    offsets.add((rows.min() - 10, cols.min() - 10))
  assert offsets <= {(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)}
  assert len(offsets) > 10  # offsets vary per image
  np.testing.assert_array_equal(
      classifier_lib.random_shift(jax.random.key(0), images, 0), images)
