"""Metrics of generated digits judged by the MNIST classifier.

- prompt accuracy: share of the samples drawn for prompt digit d that the
  classifier labels d (per digit, and the mean over digits);
- diversity: mean pairwise L2 distance between classifier features of the
  samples of one prompt (per digit, and the mean): near 0 means collapse;
- MNIST-FID: Fréchet distance of classifier features to a reference set.
"""
import re
from typing import Callable, Dict, Optional, Sequence

import numpy as np

from jaxsd.evaluation import fid
from jaxsd.evaluation.classifier import Classifier

NUM_DIGITS = 10


def prompt_digit(prompt: str) -> int:
  """The digit a caption asks for: its last number ("... number 7" -> 7)."""
  numbers = re.findall(r"\d+", prompt)
  if not numbers or not 0 <= int(numbers[-1]) < NUM_DIGITS:
    raise ValueError(f"no digit 0..9 in prompt {prompt!r}")
  return int(numbers[-1])


def _per_digit(values_by_digit) -> Dict[str, object]:
  per_digit = np.asarray(values_by_digit, np.float64)
  present = ~np.isnan(per_digit)
  mean = float(per_digit[present].mean()) if present.any() else float("nan")
  return {"mean": mean, "per_digit": per_digit}


def prompt_accuracy(predicted, prompt_digits,
                    num_classes: int = NUM_DIGITS) -> Dict[str, object]:
  """Agreement of predicted labels with prompted digits.

  Args:
    predicted: int [N] classifier labels.
    prompt_digits: int [N] digits the samples were prompted with.
    num_classes: number of digits.

  Returns:
    {"mean": mean over prompted digits of their accuracy (each digit weighs
    the same however many samples it has), "per_digit": float64 [num_classes]
    (NaN for digits without samples)}.
  """
  predicted, prompt_digits = np.asarray(predicted), np.asarray(prompt_digits)
  if predicted.shape != prompt_digits.shape or predicted.ndim != 1:
    raise ValueError(f"shapes {predicted.shape} and {prompt_digits.shape}")
  per_digit = []
  for d in range(num_classes):
    mask = prompt_digits == d
    per_digit.append(np.mean(predicted[mask] == d) if mask.any() else np.nan)
  return _per_digit(per_digit)


def mean_pairwise_distance(features) -> float:
  """Mean L2 distance over the N (N - 1) / 2 row pairs of features [N, D]."""
  x = np.asarray(features, np.float64)
  n = x.shape[0]
  if n < 2:
    return float("nan")
  sq = (x * x).sum(axis=1)
  # |a - b|^2 = |a|^2 + |b|^2 - 2 a.b, clipped: rounding can go below 0.
  dist = np.sqrt(np.clip(sq[:, None] + sq[None, :] - 2 * x @ x.T, 0, None))
  return float(dist[np.triu_indices(n, k=1)].mean())


def diversity(features, prompt_digits,
              num_classes: int = NUM_DIGITS) -> Dict[str, object]:
  """Within-prompt spread of samples in feature space.

  Args:
    features: float [N, D] classifier features.
    prompt_digits: int [N].
    num_classes: number of digits.

  Returns:
    {"mean": mean over digits with >= 2 samples, "per_digit": float64
    [num_classes] mean pairwise distance (NaN below 2 samples)}.
  """
  features, prompt_digits = np.asarray(features), np.asarray(prompt_digits)
  if features.shape[0] != prompt_digits.shape[0]:
    raise ValueError(f"{features.shape[0]} features, "
                     f"{prompt_digits.shape[0]} digits")
  return _per_digit([mean_pairwise_distance(features[prompt_digits == d])
                     for d in range(num_classes)])


def mnist_fid(classifier: Classifier, images_a, images_b,
              batch_size: int = 500) -> float:
  """FID in classifier-feature space between image sets [N, 28, 28(, 1)]."""
  return fid.fid_from_features(classifier.features(images_a, batch_size),
                               classifier.features(images_b, batch_size))


def mnist_reference_statistics(classifier: Classifier, cache_dir: str,
                               split: str,
                               images_fn: Callable[[], np.ndarray]
                               ) -> fid.Statistics:
  """Classifier-feature statistics of an MNIST split, cached per classifier.

  Args:
    classifier: the feature network; its identity is part of the cache key.
    cache_dir: folder for the .npz.
    split: "train" or "test": names the cache entry.
    images_fn: () -> the split's images (e.g. `input_pipeline.load_mnist`'s),
      called only on a cache miss.
  """
  def compute():
    return fid.feature_statistics(classifier.features(images_fn()))
  name = fid.reference_statistics_name(classifier.identity, f"mnist-{split}")
  return fid.cached_statistics(cache_dir, name, compute)


def flat_per_digit(name: str, result: Dict[str, object]) -> Dict[str, float]:
  """{"mean", "per_digit"} -> {name: mean, "name/<d>": value} for logging;
  digits without a value (NaN: not prompted) are left out."""
  out = {name: float(result["mean"])}
  for d, value in enumerate(result["per_digit"]):
    if not np.isnan(value):
      out[f"{name}/{d}"] = float(value)
  return out


def sample_metrics(classifier: Classifier, images, prompt_digits,
                   reference_statistics: Optional[fid.Statistics] = None,
                   batch_size: int = 500) -> Dict[str, float]:
  """All classifier metrics of generated samples, as a flat dict for logging.

  Args:
    classifier: the judge.
    images: samples [N, H, W(, 1)] in [-1, 1] (or uint8); see `as_model_input`.
    prompt_digits: int [N] prompted digits (`prompt_digit` parses captions).
    reference_statistics: (mu, sigma) of real data; adds "mnist_fid".
    batch_size: classifier batch size.

  Returns:
    {"prompt_accuracy", "prompt_accuracy/<d>", "diversity", "diversity/<d>",
    ["mnist_fid"]}; per-digit entries only for digits that were prompted.
  """
  logits, features = classifier.logits_and_features(images, batch_size)
  metrics = {
      **flat_per_digit("prompt_accuracy",
                       prompt_accuracy(logits.argmax(-1), prompt_digits)),
      **flat_per_digit("diversity", diversity(features, prompt_digits))}
  if reference_statistics is not None:
    metrics["mnist_fid"] = fid.frechet_distance(
        *fid.feature_statistics(features), *reference_statistics)
  return metrics


def prompt_digits_of(prompts: Sequence[str]) -> np.ndarray:
  """int [N] digits of N captions."""
  return np.asarray([prompt_digit(p) for p in prompts], np.int32)
