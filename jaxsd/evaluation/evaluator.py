"""Runs the metrics a config names on samples of a model.

Metrics are registered by name (config `eval.metrics`):
  prompt_accuracy  share of samples the MNIST classifier labels as the
                   prompted digit (mean and per digit)
  fid_mnist        Fréchet distance in the classifier's penultimate features
                   to the MNIST test split
  diversity        mean pairwise classifier-feature distance within a prompt
  fid_inception    standard FID (pytorch-fid Inception weights) to MNIST test
  clip_score       mean image-prompt cosine similarity under a CLIP model
A metric whose network is unavailable (weights missing offline) is skipped
with one log line and logs nothing.
"""
import os
import time
from typing import Callable, Dict, List, Sequence

from absl import logging
import numpy as np

from jaxsd import input_pipeline
from jaxsd.evaluation import classifier as classifier_lib
from jaxsd.evaluation import fid
from jaxsd.evaluation import prompt_metrics
from jaxsd.evaluation.weights import WeightsUnavailableError

CLASSIFIER_METRICS = ("prompt_accuracy", "fid_mnist", "diversity")
METRICS = CLASSIFIER_METRICS + ("fid_inception", "clip_score")


def cache_dir(eval_config) -> str:
  return (eval_config.cache_dir or os.environ.get("JAXSD_CACHE")
          or os.path.expanduser("~/.cache/jaxsd"))


def eval_prompts(template: str, num_samples: int) -> List[str]:
  """num_samples captions cycling over the ten digits (equal counts when
  num_samples is a multiple of 10)."""
  return [template.format(label=i % 10) for i in range(num_samples)]


class Evaluator:
  """Loads the judging networks once; evaluates sample sets on demand."""

  def __init__(self, config):
    self.config = config
    self.eval_config = config.eval
    unknown = set(self.eval_config.metrics) - set(METRICS)
    if unknown:
      raise ValueError(f"eval.metrics has unknown {sorted(unknown)}; known: "
                       f"{list(METRICS)}.")
    self.cache_dir = cache_dir(self.eval_config)
    self._classifier = None
    self._inception = None
    self._clip = None
    self._real_diversity = None
    self._skipped: Dict[str, str] = {}

  @property
  def metrics(self) -> Sequence[str]:
    return tuple(m for m in self.eval_config.metrics if m not in self._skipped)

  def _mnist(self, split):
    return input_pipeline.load_mnist(self.config.data, split)

  # --- Networks, loaded lazily and once -------------------------------------
  def classifier(self) -> classifier_lib.Classifier:
    if self._classifier is None:
      def arrays():
        return (*self._mnist("train"), *self._mnist("test"))
      self._classifier = classifier_lib.load_or_train_classifier(
          os.path.join(self.cache_dir, "classifier"), arrays)
      logging.info("MNIST classifier %s: test accuracy %.4f",
                   self._classifier.identity, self._classifier.test_accuracy)
    return self._classifier

  def _skip(self, metric: str, reason: str):
    if metric not in self._skipped:
      logging.warning("Skipping eval/%s: %s", metric, reason)
      self._skipped[metric] = reason

  def _inception_net(self):
    if self._inception is None and "fid_inception" not in self._skipped:
      from jaxsd.evaluation import inception  # pylint: disable=g-import-not-at-top
      try:
        self._inception = inception.load_fid_inception(
            self.eval_config.inception_weights or None,
            cache_dir=self.cache_dir)
      except WeightsUnavailableError as e:
        self._skip("fid_inception", f"no FID Inception weights ({e}); set "
                   "eval.inception_weights to pt_inception-2015-12-05-"
                   "6726825d.pth")
    return self._inception

  def _clip_scorer(self):
    if self._clip is None and "clip_score" not in self._skipped:
      from jaxsd.evaluation import clip_score  # pylint: disable=g-import-not-at-top
      try:
        self._clip = clip_score.load_clip_scorer(self.eval_config.clip_model)
      except WeightsUnavailableError as e:
        self._skip("clip_score", f"CLIP model {self.eval_config.clip_model!r} "
                   f"unavailable ({e}); set eval.clip_model to a local folder")
    return self._clip

  def prepare(self):
    """Loads every network and reference statistic the metrics need, so the
    first evaluation's time is the evaluation's own."""
    names = self.eval_config.metrics
    if any(m in names for m in CLASSIFIER_METRICS):
      self.classifier()
      if "fid_mnist" in names:
        self._mnist_reference()
      if "diversity" in names:
        self.real_diversity()
    if "fid_inception" in names and self._inception_net() is not None:
      self._inception_reference()
    if "clip_score" in names:
      self._clip_scorer()
    return self

  def _mnist_reference(self):
    clf = self.classifier()
    return prompt_metrics.mnist_reference_statistics(
        clf, os.path.join(self.cache_dir, "fid_stats"), split="test",
        images=self._mnist("test")[0])

  def real_diversity(self) -> np.ndarray:
    """Per-digit diversity [10] of the MNIST test split: the yardstick of
    diversity_ratio."""
    if self._real_diversity is None:
      images, labels = self._mnist("test")
      feats = self.classifier().features(images)
      self._real_diversity = np.asarray(
          prompt_metrics.diversity(feats, labels)["per_digit"])
    return self._real_diversity

  def _inception_reference(self):
    net = self._inception_net()
    n = self.eval_config.inception_reference_samples
    def compute():
      images = self._mnist("test")[0][:n]
      return fid.feature_statistics(net(images.astype(np.float32) / 127.5 - 1))
    return fid.cached_statistics(
        os.path.join(self.cache_dir, "fid_stats"),
        fid.reference_statistics_name(net.identity, "mnist-test", f"n{n}"),
        compute)

  # --- Evaluation ------------------------------------------------------------
  def evaluate(self, images: np.ndarray, prompts: Sequence[str]
               ) -> Dict[str, float]:
    """Metrics of samples [N, H, W, C] in [-1, 1] drawn for `prompts`.

    Returns flat names: prompt_accuracy, prompt_accuracy/<d>, fid_mnist,
    diversity, diversity/<d>, fid_inception, clip_score, clip_score_x100,
    and seconds/<metric>.
    """
    names = self.eval_config.metrics
    images = np.asarray(images, np.float32)
    if images.shape[1:3] != (28, 28):  # padded to 32: crop back to MNIST
      h, w = images.shape[1:3]
      images = images[:, (h - 28) // 2:(h - 28) // 2 + 28,
                      (w - 28) // 2:(w - 28) // 2 + 28]
    out: Dict[str, float] = {}
    if any(m in names for m in CLASSIFIER_METRICS):
      start = time.perf_counter()
      digits = prompt_metrics.prompt_digits_of(prompts)
      ref = self._mnist_reference() if "fid_mnist" in names else None
      metrics = prompt_metrics.sample_metrics(self.classifier(), images,
                                              digits, ref)
      for key, value in metrics.items():
        name = "fid_mnist" if key == "mnist_fid" else key
        if name.split("/")[0] in names:
          out[name] = float(value)
      out.update(_worst_and_ratios(out, self.real_diversity()
                                   if "diversity" in names else None))
      out["seconds/classifier_metrics"] = time.perf_counter() - start
    if "fid_inception" in names and self._inception_net() is not None:
      start = time.perf_counter()
      mu, sigma = self._inception_reference()
      feats = self._inception_net()(images)
      out["fid_inception"] = fid.frechet_distance(
          *fid.feature_statistics(feats), mu, sigma)
      out["seconds/fid_inception"] = time.perf_counter() - start
    if "clip_score" in names and self._clip_scorer() is not None:
      start = time.perf_counter()
      n = min(self.eval_config.num_clip_samples, len(images))
      score = self._clip_scorer().score(images[:n], list(prompts[:n]))
      out["clip_score"] = score["clip_similarity"]
      out["clip_score_x100"] = score["clip_score"]
      out["seconds/clip_score"] = time.perf_counter() - start
    return out


def _worst_and_ratios(metrics: Dict[str, float], real_diversity):
  """prompt_accuracy_min (worst digit) and, given the real test split's
  per-digit diversity, diversity_ratio/<d> = generated / real with its mean
  and minimum (1 = as varied as real digits; near 0 = mode collapse)."""
  out = {}
  accs = [v for k, v in metrics.items() if k.startswith("prompt_accuracy/")]
  if accs:
    out["prompt_accuracy_min"] = min(accs)
  if real_diversity is not None:
    ratios = {}
    for d, real in enumerate(real_diversity):
      if f"diversity/{d}" in metrics:
        ratios[f"diversity_ratio/{d}"] = metrics[f"diversity/{d}"] / real
    if ratios:
      out.update(ratios)
      out["diversity_ratio"] = float(np.mean(list(ratios.values())))
      out["diversity_ratio_min"] = min(ratios.values())
  return out


def evaluate_params(evaluator: Evaluator, generate_fn: Callable, params, rng
                    ) -> Dict[str, float]:
  """Samples eval.num_samples images (prompts cycling over the digits) with
  generate_fn(params, prompts, rng) and evaluates them; adds
  seconds (total) and sampling_seconds."""
  start = time.perf_counter()
  prompts = eval_prompts(evaluator.config.data.caption_template,
                         evaluator.eval_config.num_samples)
  images = generate_fn(params, prompts, rng)
  sampling = time.perf_counter() - start
  metrics = evaluator.evaluate(images, prompts)
  metrics["sampling_seconds"] = sampling
  metrics["seconds"] = time.perf_counter() - start
  return metrics
