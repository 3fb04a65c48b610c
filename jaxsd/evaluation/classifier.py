"""A small MNIST CNN used as the judge of generated digits.

Its logits give prompt accuracy; its 128-d penultimate layer is the feature
space for diversity and MNIST-FID. Trained once and kept in a cache folder
(msgpack variables, then metadata.json with its test accuracy and an identity
string that names reference statistics computed with it).

The cache is written without collective operations (an orbax checkpointer's
barriers deadlock when only one process of a `jax.distributed` run
evaluates): files appear by atomic rename, and a file lock lets the first of
several processes that start on an empty cache train while the others wait
and then load its result.
"""
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
from typing import Callable, Tuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxsd import shared_files

# Bump when the architecture or training recipe changes: the cache folder and
# the identity (hence cached reference statistics) change with it.
ARCHITECTURE_VERSION = "mnist-cnn-v1"
FEATURE_DIM = 128
NUM_CLASSES = 10

ArraysFn = Callable[[], Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]


class MnistClassifier(nn.Module):
  """CNN: [B, 28, 28, 1] in [-1, 1] -> logits [B, 10].

  Strided convolutions instead of pooling, and no layer at full 28x28
  resolution: on XLA:CPU the backward pass through full-resolution feature
  maps and max pools dominated training time.
  """
  feature_dim: int = FEATURE_DIM
  num_classes: int = NUM_CLASSES

  def setup(self):
    self.conv1 = nn.Conv(32, (5, 5), strides=2)  # -> 14x14
    self.norm1 = nn.BatchNorm(momentum=0.9)
    self.conv2 = nn.Conv(64, (3, 3), strides=2)  # -> 7x7
    self.norm2 = nn.BatchNorm(momentum=0.9)
    self.conv3 = nn.Conv(64, (3, 3))
    self.norm3 = nn.BatchNorm(momentum=0.9)
    self.hidden = nn.Dense(self.feature_dim)
    self.head = nn.Dense(self.num_classes)

  def logits_and_features(self, x, train: bool = False):
    """x [B, 28, 28, 1] -> (logits [B, 10], features [B, feature_dim] >= 0)."""
    norm = dict(use_running_average=not train)
    x = nn.relu(self.norm1(self.conv1(x), **norm))
    x = nn.relu(self.norm2(self.conv2(x), **norm))
    x = nn.relu(self.norm3(self.conv3(x), **norm))
    features = nn.relu(self.hidden(x.reshape(x.shape[0], -1)))
    return self.head(features), features

  def __call__(self, x, train: bool = False):
    return self.logits_and_features(x, train)[0]


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  epochs: int = 4
  batch_size: int = 128
  learning_rate: float = 3e-3  # peak of a one-cycle (warmup + cosine) schedule
  warmup_fraction: float = 0.2
  # Random translation of training images, in pixels: +0.1% test accuracy.
  max_shift: int = 2
  seed: int = 0


CLASSIFIER_METRICS = ("prompt_accuracy", "fid_mnist", "diversity")


def as_model_input(images) -> np.ndarray:
  """Images to float32 [N, 28, 28, 1] in [-1, 1], the classifier's input.

  Accepts uint8 (0..255) or float in [-1, 1], [N, H, W] or [N, H, W, 1].
  28x28 images are used as they are; 32x32 ones (MNIST padded with
  background by the data pipeline) are centre-cropped back to 28x28. Any
  other size or channel count is an error: the classifier has only seen
  28x28 grey digits, and resizing or cropping other images would judge
  something else than what was generated.

  Raises:
    ValueError: images are not [N, 28 or 32, 28 or 32(, 1)] squares.
  """
  images = np.asarray(images)
  if images.ndim == 3:
    images = images[..., None]
  if (images.ndim != 4 or images.shape[-1] != 1
      or images.shape[1:3] not in ((28, 28), (32, 32))):
    raise ValueError(
        f"images of shape {images.shape}: the MNIST-classifier metrics "
        f"({', '.join(CLASSIFIER_METRICS)}) judge 28x28 or 32x32 grey "
        "digits only ([N, 28, 28(, 1)] or [N, 32, 32(, 1)]).")
  if images.dtype == np.uint8:
    images = images.astype(np.float32) / 127.5 - 1.0
  images = images.astype(np.float32)
  if images.shape[1] == 32:
    images = images[:, 2:30, 2:30]
  return images


# --- Training ---------------------------------------------------------------


def random_shift(rng, images, max_shift: int):
  """Translates each image [B, H, W, C] by up to max_shift pixels (pads -1)."""
  if max_shift == 0:
    return images
  b, h, w, c = images.shape
  padded = jnp.pad(images, ((0, 0), (max_shift,) * 2, (max_shift,) * 2,
                            (0, 0)), constant_values=-1.0)
  offsets = jax.random.randint(rng, (b, 2), 0, 2 * max_shift + 1)
  crop = lambda image, o: jax.lax.dynamic_slice(image, (o[0], o[1], 0),
                                                (h, w, c))
  return jax.vmap(crop)(padded, offsets)


def _make_train_step(model: MnistClassifier, tx: optax.GradientTransformation,
                     max_shift: int):
  def train_step(params, batch_stats, opt_state, images, labels, rng):
    images = random_shift(rng, images, max_shift)

    def loss_fn(params):
      logits, updates = model.apply(
          {"params": params, "batch_stats": batch_stats}, images, train=True,
          mutable=["batch_stats"])
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
      return loss.mean(), updates["batch_stats"]
    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), batch_stats, opt_state, loss
  return jax.jit(train_step, donate_argnums=(0, 1, 2))


def train_classifier(train_images, train_labels, test_images=None,
                     test_labels=None, config: TrainConfig = TrainConfig(),
                     log_every: int = 100) -> "Classifier":
  """Trains `MnistClassifier` with Adam on numpy arrays.

  A Python loop over one jitted step: on XLA:CPU the same step inside
  `lax.scan` ran several times slower (convolutions in loops lose their fast
  path), and per-step dispatch is cheap beside a step.

  Args:
    train_images: uint8 [N, 28, 28] or [N, 28, 28, 1] (or float in [-1, 1]).
    train_labels: int [N] in 0..9.
    test_images, test_labels: optional held-out set for `test_accuracy`.
    config: optimisation settings.
    log_every: steps between loss log lines (0: none).

  Returns:
    A `Classifier` (test_accuracy is NaN without a test set).
  """
  start = time.time()
  images = as_model_input(train_images)
  labels = np.asarray(train_labels, np.int32)
  if labels.shape != (images.shape[0],):
    raise ValueError(f"labels {labels.shape} do not match images "
                     f"{images.shape}")
  steps_per_epoch = images.shape[0] // config.batch_size
  num_steps = steps_per_epoch * config.epochs
  if num_steps == 0:
    raise ValueError("fewer training images than one batch")

  model = MnistClassifier()
  variables = jax.jit(model.init)(jax.random.key(config.seed), images[:1])
  params, batch_stats = variables["params"], variables["batch_stats"]
  tx = optax.adam(optax.cosine_onecycle_schedule(
      num_steps, config.learning_rate, pct_start=config.warmup_fraction))
  opt_state = tx.init(params)
  train_step = _make_train_step(model, tx, config.max_shift)
  shift_rng = jax.random.key(config.seed + 1)

  rng = np.random.RandomState(config.seed)
  step = 0
  for epoch in range(config.epochs):
    order = rng.permutation(images.shape[0])
    for i in range(steps_per_epoch):
      idx = order[i * config.batch_size:(i + 1) * config.batch_size]
      params, batch_stats, opt_state, loss = train_step(
          params, batch_stats, opt_state, images[idx], labels[idx],
          jax.random.fold_in(shift_rng, step))
      step += 1
      if log_every and step % log_every == 0:
        logging.info("classifier epoch %d step %d/%d loss %.4f", epoch, step,
                     num_steps, float(loss))

  classifier = Classifier(
      {"params": params, "batch_stats": batch_stats}, config=config)
  if test_images is not None:
    classifier.test_accuracy = classifier.accuracy(test_images, test_labels)
  classifier.train_seconds = time.time() - start
  logging.info("classifier trained in %.1f s, test accuracy %.4f",
               classifier.train_seconds, classifier.test_accuracy)
  return classifier


# --- Inference ----------------------------------------------------------------


def _variables_digest(variables) -> str:
  """sha256 over every array (path, dtype, shape, bytes), in path order."""
  digest = hashlib.sha256()
  leaves = jax.tree_util.tree_flatten_with_path(variables)[0]
  for path, leaf in sorted(leaves, key=lambda kv: jax.tree_util.keystr(kv[0])):
    leaf = np.asarray(leaf)
    digest.update(jax.tree_util.keystr(path).encode())
    digest.update(f"{leaf.dtype}{leaf.shape}".encode())
    digest.update(np.ascontiguousarray(leaf).tobytes())
  return digest.hexdigest()


class Classifier:
  """A trained `MnistClassifier` with batched, jitted host-side inference.

  Attributes:
    variables: {"params", "batch_stats"}.
    identity: "mnist-cnn-v1-<12 hex of the weights' sha256>": names anything
      computed with these exact weights (e.g. cached reference statistics).
    test_accuracy: fraction of the MNIST test set classified right.
  """

  def __init__(self, variables, config: TrainConfig = TrainConfig(),
               test_accuracy: float = float("nan"),
               train_seconds: float = float("nan")):
    self.model = MnistClassifier()
    self.variables = jax.tree_util.tree_map(jnp.asarray, variables)
    self.config = config
    self.test_accuracy = test_accuracy
    self.train_seconds = train_seconds
    self.identity = (f"{ARCHITECTURE_VERSION}-"
                     f"{_variables_digest(self.variables)[:12]}")
    self._apply = jax.jit(lambda v, x: self.model.apply(
        v, x, method=MnistClassifier.logits_and_features))

  def logits_and_features(self, images, batch_size: int = 500
                          ) -> Tuple[np.ndarray, np.ndarray]:
    """Images [N, ...] (see `as_model_input`) -> logits [N, 10], features
    [N, 128].

    Batches are padded to `batch_size` so one compiled shape serves any N.
    """
    images = as_model_input(images)
    n = images.shape[0]
    logits, features = [], []
    for i in range(0, n, batch_size):
      batch = images[i:i + batch_size]
      pad = batch_size - batch.shape[0]
      if pad:
        batch = np.concatenate([batch, np.zeros((pad,) + batch.shape[1:],
                                                batch.dtype)])
      out_logits, out_features = self._apply(self.variables, batch)
      logits.append(np.asarray(out_logits)[:batch_size - pad])
      features.append(np.asarray(out_features)[:batch_size - pad])
    if not logits:
      return (np.zeros((0, NUM_CLASSES), np.float32),
              np.zeros((0, FEATURE_DIM), np.float32))
    return np.concatenate(logits), np.concatenate(features)

  def predict(self, images, batch_size: int = 500) -> np.ndarray:
    """Predicted digits int [N]."""
    return self.logits_and_features(images, batch_size)[0].argmax(-1)

  def features(self, images, batch_size: int = 500) -> np.ndarray:
    """Penultimate-layer features float32 [N, 128]."""
    return self.logits_and_features(images, batch_size)[1]

  def accuracy(self, images, labels, batch_size: int = 500) -> float:
    return float(np.mean(self.predict(images, batch_size)
                         == np.asarray(labels)))


# --- Cache --------------------------------------------------------------------

_METADATA = "metadata.json"
_VARIABLES = "variables.msgpack"
# Recorded in metadata.json; a folder without it (an older, orbax-written
# cache) counts as a miss and is rewritten.
_FORMAT = "flax-msgpack-v1"


def classifier_dir(cache_dir: str, config: TrainConfig = TrainConfig()) -> str:
  """Folder of the classifier trained with `config` inside `cache_dir`."""
  key = hashlib.sha256(json.dumps(
      [ARCHITECTURE_VERSION, dataclasses.asdict(config)],
      sort_keys=True).encode()).hexdigest()[:10]
  return os.path.join(os.path.abspath(cache_dir), f"classifier_{key}")


def save_variables(path: str, variables) -> None:
  """Writes a tree of arrays to `path` (msgpack) atomically."""
  state = jax.tree_util.tree_map(np.asarray, flax.core.unfreeze(variables))
  data = flax.serialization.msgpack_serialize(state)
  shared_files.atomic_write(path, lambda f: f.write(data))


def load_variables(path: str):
  """The tree of numpy arrays `save_variables` wrote (nested dicts)."""
  with open(path, "rb") as f:
    return flax.serialization.msgpack_restore(f.read())


def save_classifier(directory: str, classifier: Classifier) -> None:
  """Writes the classifier to `directory`, holding its exclusive lock."""
  with _lock(directory):
    _write_classifier(directory, classifier)


def _write_classifier(directory: str, classifier: Classifier) -> None:
  # Variables first, then metadata.json, whose presence marks the folder
  # complete; each file appears whole by rename.
  save_variables(os.path.join(directory, _VARIABLES), classifier.variables)
  metadata = dict(identity=classifier.identity,
                  architecture=ARCHITECTURE_VERSION,
                  format=_FORMAT,
                  test_accuracy=classifier.test_accuracy,
                  train_seconds=classifier.train_seconds,
                  config=dataclasses.asdict(classifier.config))
  text = json.dumps(metadata, indent=2).encode()
  shared_files.atomic_write(os.path.join(directory, _METADATA),
                           lambda f: f.write(text))
  # An older cache's orbax folder, now superseded.
  shutil.rmtree(os.path.join(directory, "variables"), ignore_errors=True)


def _is_complete(directory: str) -> bool:
  try:
    with open(os.path.join(directory, _METADATA)) as f:
      metadata = json.load(f)
  except (OSError, ValueError):
    return False
  return (metadata.get("format") == _FORMAT
          and os.path.exists(os.path.join(directory, _VARIABLES)))


def load_classifier(directory: str) -> Classifier:
  """Restores a classifier written by `save_classifier`.

  Raises:
    ValueError: the stored tree does not fit `MnistClassifier`, or the
      weights do not hash to the identity in metadata.json (corruption).
  """
  directory = os.path.abspath(directory)
  with open(os.path.join(directory, _METADATA)) as f:
    metadata = json.load(f)
  variables = load_variables(os.path.join(directory, _VARIABLES))
  abstract = jax.eval_shape(MnistClassifier().init, jax.random.key(0),
                            jnp.zeros((1, 28, 28, 1), jnp.float32))
  leaves = jax.tree_util.tree_leaves
  if (jax.tree_util.tree_structure(abstract)
      != jax.tree_util.tree_structure(variables)
      or any((a.shape, a.dtype) != (v.shape, v.dtype)
             for a, v in zip(leaves(abstract), leaves(variables)))):
    raise ValueError(f"{directory}: stored variables do not fit "
                     f"{ARCHITECTURE_VERSION}")
  classifier = Classifier(variables, TrainConfig(**metadata["config"]),
                          test_accuracy=metadata["test_accuracy"],
                          train_seconds=metadata["train_seconds"])
  if classifier.identity != metadata["identity"]:
    raise ValueError(f"{directory}: restored weights hash to "
                     f"{classifier.identity}, metadata says "
                     f"{metadata['identity']}")
  return classifier


def _lock(directory: str, shared: bool = False):
  # Beside the folder, not in it: the folder's contents may be replaced.
  return shared_files.file_lock(directory + ".lock", shared=shared)


def load_or_train_classifier(cache_dir: str, train_arrays_fn: ArraysFn,
                             config: TrainConfig = TrainConfig(),
                             min_accuracy: float = 0.99,
                             retrain: bool = False) -> Classifier:
  """The cached classifier for `config`, trained and saved on a cache miss.

  Safe when several processes call it at once on one cache: the first to
  miss trains under an exclusive file lock; the others wait for the lock and
  load what it saved (readers hold the lock shared, so none reads a folder
  being rewritten).

  Args:
    cache_dir: folder holding classifiers (created when missing).
    train_arrays_fn: () -> (train_images, train_labels, test_images,
      test_labels), numpy (see `train_classifier`), e.g. from
      `input_pipeline.load_mnist`; called only to train.
    config: training settings; part of the cache key.
    min_accuracy: a fresh classifier below this test accuracy raises instead
      of being cached (a weak judge would make every metric misleading).
    retrain: ignore a cached classifier.

  Returns:
    The `Classifier`.
  """
  directory = classifier_dir(cache_dir, config)
  if not retrain:
    with _lock(directory, shared=True):
      if _is_complete(directory):
        return _load_logged(directory)
  with _lock(directory):
    if not retrain and _is_complete(directory):  # trained while we waited
      return _load_logged(directory)
    train_images, train_labels, test_images, test_labels = train_arrays_fn()
    classifier = train_classifier(train_images, train_labels, test_images,
                                  test_labels, config)
    if not classifier.test_accuracy >= min_accuracy:
      raise RuntimeError(f"classifier reached test accuracy "
                         f"{classifier.test_accuracy:.4f} < {min_accuracy}")
    _write_classifier(directory, classifier)
  logging.info("saved classifier %s to %s", classifier.identity, directory)
  return classifier


def _load_logged(directory: str) -> Classifier:
  classifier = load_classifier(directory)
  logging.info("loaded classifier %s (test accuracy %.4f) from %s",
               classifier.identity, classifier.test_accuracy, directory)
  return classifier
