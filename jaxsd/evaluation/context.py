"""What the metrics of one evaluator share, loaded on first use and kept.

Three metrics (prompt_accuracy, fid_mnist, diversity) judge samples with the
same MNIST classifier; the context loads (or trains) it once, reads the MNIST
splits once, and runs the classifier once per sample set, however many of
them ask. Metric-specific networks (Inception, CLIP) stay in their metrics.
"""
import os
import time
from typing import Dict, Sequence, Tuple

from absl import logging
import numpy as np

from jaxsd import environment
from jaxsd import input_pipeline
from jaxsd.evaluation import classifier as classifier_lib
from jaxsd.evaluation import prompt_metrics


def cache_dir(eval_config) -> str:
  """eval.cache_dir, else jaxsd's cache ($JAXSD_CACHE or ~/.cache/jaxsd)."""
  return eval_config.cache_dir or environment.cache_dir()


class EvalContext:
  """Shared, lazily loaded resources of the metrics.

  Attributes:
    config: the run's config (the metrics read `eval` and `data`).
    eval_config: config.eval.
    cache_dir: where networks and reference statistics are cached.
    shared_seconds: time spent in shared work (the classifier's pass over the
      samples) during the current evaluation, by name; the evaluator reports
      it as `seconds/<name>` instead of charging the first metric that asked.
  """

  def __init__(self, config):
    self.config = config
    self.eval_config = config.eval
    self.cache_dir = cache_dir(config.eval)
    self.shared_seconds: Dict[str, float] = {}
    self._classifier = None
    self._real_diversity = None
    self._outputs_of = None  # the images `_outputs` belong to
    self._outputs = None
    self._digits_of = None
    self._digits = None

  # --- Kept for the evaluator's lifetime -------------------------------------
  def mnist(self, split: str) -> Tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, 28, 28, 1], labels int32 [N]) of an MNIST split, via
    the data pipeline (which keeps loaded splits in memory)."""
    return input_pipeline.load_mnist(self.config.data, split)

  def classifier(self) -> classifier_lib.Classifier:
    """The MNIST classifier, trained into the cache on first use."""
    if self._classifier is None:
      def arrays():
        return (*self.mnist("train"), *self.mnist("test"))
      self._classifier = classifier_lib.load_or_train_classifier(
          os.path.join(self.cache_dir, "classifier"), arrays)
      logging.info("MNIST classifier %s: test accuracy %.4f",
                   self._classifier.identity, self._classifier.test_accuracy)
    return self._classifier

  def real_diversity(self) -> np.ndarray:
    """Per-digit diversity float64 [10] of the MNIST test split: the yardstick
    of diversity_ratio."""
    if self._real_diversity is None:
      images, labels = self.mnist("test")
      features = self.classifier().features(images)
      self._real_diversity = np.asarray(
          prompt_metrics.diversity(features, labels)["per_digit"])
    return self._real_diversity

  # --- Kept for one sample set -----------------------------------------------
  def classifier_outputs(self, images: np.ndarray
                         ) -> Tuple[np.ndarray, np.ndarray]:
    """Classifier (logits [N, 10], features [N, 128]) of samples [N, H, W, 1]
    (28x28, or 32x32 padded; see `classifier.as_model_input`), computed once
    per sample set."""
    if self._outputs_of is not images:
      start = time.perf_counter()
      self._outputs = self.classifier().logits_and_features(images)
      self._outputs_of = images
      self.shared_seconds["mnist_classifier"] = (
          self.shared_seconds.get("mnist_classifier", 0.0)
          + time.perf_counter() - start)
    return self._outputs

  def prompt_digits(self, prompts: Sequence[str]) -> np.ndarray:
    """int [N] digits the captions ask for."""
    if self._digits_of is not prompts:
      self._digits = prompt_metrics.prompt_digits_of(prompts)
      self._digits_of = prompts
    return self._digits

  def forget_samples(self) -> None:
    """Drops what was computed for the last sample set (and its timing)."""
    self._outputs_of = self._outputs = None
    self._digits_of = self._digits = None
    self.shared_seconds = {}
