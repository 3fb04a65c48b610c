"""The MNIST judge: trains to >= 99%, is cached, scores real digits well,
and two processes on an empty cache train it once.

One session-scoped fixture trains the classifier (about a minute on 2 cores)
into the test run's cache; every other test (and training's evaluation) reuses
it. The cache's save and load and the input rule, with random weights:
tests/unit/test_classifier_cache.py.
"""
import json
import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from jaxsd import environment
from jaxsd.data import mnist as input_pipeline
from jaxsd.evaluation import classifier as classifier_lib
from jaxsd.evaluation import fid
from jaxsd.evaluation import prompt_metrics

import helpers

pytestmark = pytest.mark.mnist


@pytest.fixture(scope="session")
def mnist(tiny_config):
  """(train_images, train_labels, test_images, test_labels), uint8
  [N, 28, 28, 1] / int32, from the data pipeline."""
  data = environment.resolve(tiny_config()).data
  return (*input_pipeline.load_mnist(data, "train"),
          *input_pipeline.load_mnist(data, "test"))


@pytest.fixture(scope="session")
def cache_dir():
  """The evaluator's own classifier cache under $JAXSD_CACHE (fresh per CI
  run), so one test run trains the classifier once, here or in training."""
  return os.path.join(environment.cache_dir(), "classifier")


@pytest.fixture(scope="session")
def classifier(mnist_classifier, cache_dir):
  """conftest's mnist_classifier: trained into cache_dir, or read from it."""
  assert os.path.isdir(classifier_lib.classifier_dir(cache_dir))
  return mnist_classifier


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
  as_float = images.astype(np.float32) / 127.5 - 1
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
      classifier, cache_dir, "test", lambda: test_images)
  path = fid.statistics_cache_path(cache_dir, fid.reference_statistics_name(
      classifier.identity, "mnist-test"))
  assert os.path.exists(path)
  # A cache hit reads no MNIST.
  def must_not_read():
    raise AssertionError("cached statistics were recomputed")
  cached = prompt_metrics.mnist_reference_statistics(
      classifier, cache_dir, "test", must_not_read)
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


_WORKER = textwrap.dedent("""
    import json, os, sys, time
    import numpy as np
    from jaxsd.evaluation import classifier as classifier_lib
    cache, arrays, me, other = sys.argv[1:5]
    with np.load(arrays) as data:
      arrays = tuple(data[k] for k in ("xtr", "ytr", "xte", "yte"))
    calls = []
    def train_arrays():
      calls.append(1)
      return arrays
    # Start together: both find the cache empty.
    open(me, "w").close()
    while not os.path.exists(other):
      time.sleep(0.05)
    clf = classifier_lib.load_or_train_classifier(
        cache, train_arrays, classifier_lib.TrainConfig(epochs=1),
        min_accuracy=0.5)
    print(json.dumps(dict(identity=clf.identity, trained=len(calls),
                          test_accuracy=clf.test_accuracy,
                          train_seconds=clf.train_seconds)))
""")


def test_processes_share_an_empty_cache(mnist, tmp_path):
  """Two processes on one empty cache: one trains, the other waits and loads
  the same weights; neither deadlocks (no collective barriers)."""
  train_images, train_labels, test_images, test_labels = mnist
  arrays = str(tmp_path / "arrays.npz")
  np.savez(arrays, xtr=train_images[:6000], ytr=train_labels[:6000],
           xte=test_images[:1000], yte=test_labels[:1000])
  cache = str(tmp_path / "cache")
  env = dict(os.environ, PYTHONPATH=helpers.ROOT, JAX_PLATFORMS="cpu")
  procs = [subprocess.Popen(
      [sys.executable, "-c", _WORKER, cache, arrays,
       str(tmp_path / f"ready{i}"), str(tmp_path / f"ready{1 - i}")],
      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  results = []
  for p in procs:
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]
    results.append(json.loads(out.strip().splitlines()[-1]))
  assert sorted(r["trained"] for r in results) == [0, 1]
  assert results[0]["identity"] == results[1]["identity"]
  assert results[0]["train_seconds"] == results[1]["train_seconds"]
  print(f"1-epoch classifier on 6000 images: test accuracy "
        f"{results[0]['test_accuracy']:.3f}")
  (folder,) = [n for n in os.listdir(cache) if not n.endswith(".lock")]
  assert sorted(os.listdir(os.path.join(cache, folder))) == [
      "metadata.json", "variables.msgpack"]
