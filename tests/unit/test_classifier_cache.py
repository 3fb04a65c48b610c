"""The MNIST classifier's parts, with random weights: its augmentation, its
input rule, and its cache (save, load, a hit never trains, tampering and
old formats refused). Training it to >= 99%: tests/e2e/test_eval_classifier.py.
"""
import json
import os

import jax
import numpy as np
import pytest

from jaxsd.evaluation import classifier as classifier_lib


def _random_classifier(seed=0):
  """An untrained classifier: real shapes, no training."""
  variables = classifier_lib.MnistClassifier().init(
      jax.random.key(seed), np.zeros((1, 28, 28, 1), np.float32))
  return classifier_lib.Classifier(variables, test_accuracy=0.5,
                                   train_seconds=1.25)



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


# --- Input rule ---------------------------------------------------------------


def test_input_rule_crops_32_and_refuses_other_shapes():
  """28x28 as is, 32x32 padded digits cropped back: same outputs; other
  sizes or colour are errors, not silently resized or cropped."""
  digits = np.random.RandomState(0).uniform(-1, 1, (6, 28, 28, 1)).astype(
      np.float32)
  padded = np.pad(digits, ((0, 0), (2, 2), (2, 2), (0, 0)),
                  constant_values=-1.0)
  np.testing.assert_array_equal(classifier_lib.as_model_input(padded), digits)
  clf = _random_classifier()
  for a, b in zip(clf.logits_and_features(digits),
                  clf.logits_and_features(padded)):
    np.testing.assert_array_equal(a, b)
  for bad in (np.zeros((2, 64, 64, 1), np.float32),
              np.zeros((2, 28, 28, 3), np.float32),
              np.zeros((2, 30, 30, 1), np.float32)):
    with pytest.raises(ValueError, match=r"28x28 or 32x32 grey") as info:
      clf.logits_and_features(bad)
    assert str(bad.shape) in str(info.value)
    assert "prompt_accuracy, fid_mnist, diversity" in str(info.value)


# --- Cache ------------------------------------------------------------------


def test_variables_round_trip(tmp_path):
  tree = {"params": {"dense": {"kernel": np.arange(6, dtype=np.float32)
                               .reshape(2, 3), "bias": np.ones(3, np.float32)}},
          "batch_stats": {"mean": np.array([0.5], np.float64)}}
  path = str(tmp_path / "v.msgpack")
  classifier_lib.save_variables(path, tree)
  loaded = classifier_lib.load_variables(path)
  assert jax.tree_util.tree_structure(loaded) == jax.tree_util.tree_structure(
      tree)
  for a, b in zip(jax.tree_util.tree_leaves(loaded),
                  jax.tree_util.tree_leaves(tree)):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(a, b)
  assert os.listdir(tmp_path) == ["v.msgpack"]  # no temporary file left


def test_classifier_round_trip_and_cache_hit(tmp_path):
  """A saved classifier loads with the same identity and outputs; a cache
  hit never trains; a tampered file is refused."""
  clf = _random_classifier()
  directory = classifier_lib.classifier_dir(str(tmp_path))
  classifier_lib.save_classifier(directory, clf)
  assert sorted(os.listdir(directory)) == ["metadata.json",
                                           "variables.msgpack"]
  with open(os.path.join(directory, "metadata.json")) as f:
    assert json.load(f)["identity"] == clf.identity

  def must_not_train():
    raise AssertionError("cached classifier was retrained")
  again = classifier_lib.load_or_train_classifier(str(tmp_path),
                                                  must_not_train)
  assert again.identity == clf.identity
  assert again.identity.startswith(classifier_lib.ARCHITECTURE_VERSION + "-")
  assert (again.test_accuracy, again.train_seconds) == (0.5, 1.25)
  images = np.random.RandomState(1).randint(0, 256, (5, 28, 28, 1), np.uint8)
  np.testing.assert_array_equal(again.logits_and_features(images)[1],
                                clf.logits_and_features(images)[1])

  other = _random_classifier(seed=1)
  classifier_lib.save_variables(os.path.join(directory, "variables.msgpack"),
                                other.variables)
  with pytest.raises(ValueError, match="hash"):
    classifier_lib.load_classifier(directory)


def test_folder_without_format_is_a_miss(tmp_path):
  """A folder an older jaxsd wrote (orbax, no format field) is retrained."""
  directory = classifier_lib.classifier_dir(str(tmp_path))
  os.makedirs(os.path.join(directory, "variables"))
  with open(os.path.join(directory, "metadata.json"), "w") as f:
    json.dump({"identity": "mnist-cnn-v1-000000000000"}, f)
  def train_arrays():
    raise RuntimeError("trains")
  with pytest.raises(RuntimeError, match="trains"):
    classifier_lib.load_or_train_classifier(str(tmp_path), train_arrays)
