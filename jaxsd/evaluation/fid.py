"""Fréchet distance between Gaussian fits of feature sets (FID), in numpy.

FID = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)).  Statistics are
float64: float32 covariances of 2048-d features lose the digits FID lives in.
"""
import os
import re
from typing import Callable, Optional, Tuple

import numpy as np

from jaxsd import shared_files

Statistics = Tuple[np.ndarray, np.ndarray]  # mean [D], covariance [D, D]


def feature_statistics(features) -> Statistics:
  """Mean [D] and unbiased covariance [D, D] (float64) of features [N, D]."""
  features = np.asarray(features, dtype=np.float64)
  if features.ndim != 2 or features.shape[0] < 2:
    raise ValueError(f"need features [N >= 2, D], got {features.shape}")
  return features.mean(axis=0), np.atleast_2d(np.cov(features, rowvar=False))


class RunningStatistics:
  """Accumulates mean and covariance of features over batches.

  Merges per-batch centred sums (Chan et al.'s parallel update), so a large
  common offset in the features does not cancel digits as sum(x x^T) would.
  """

  def __init__(self):
    self.count = 0
    self._mean = None  # [D] float64
    self._m2 = None  # [D, D] float64, sum of centred outer products

  def update(self, features) -> None:
    """Adds features [B, D] (any float dtype; B may be 0)."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2:
      raise ValueError(f"features must be [B, D], got {features.shape}")
    n_b = features.shape[0]
    if n_b == 0:
      return
    mean_b = features.mean(axis=0)
    centred = features - mean_b
    m2_b = centred.T @ centred
    if self._mean is None:
      self.count, self._mean, self._m2 = n_b, mean_b, m2_b
      return
    if mean_b.shape != self._mean.shape:
      raise ValueError(f"feature dim {mean_b.shape[0]} != "
                       f"{self._mean.shape[0]} seen before")
    n = self.count + n_b
    delta = mean_b - self._mean
    self._mean = self._mean + delta * (n_b / n)
    self._m2 = self._m2 + m2_b + np.outer(delta, delta) * (self.count * n_b / n)
    self.count = n

  def statistics(self) -> Statistics:
    """Mean [D] and unbiased covariance [D, D] of everything added."""
    if self.count < 2:
      raise ValueError(f"need at least 2 samples, have {self.count}")
    return self._mean.copy(), self._m2 / (self.count - 1)


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
  """Symmetric square root of a symmetric PSD matrix (eigenvalues >= 0)."""
  eigvals, eigvecs = np.linalg.eigh((matrix + matrix.T) / 2)
  return (eigvecs * np.sqrt(np.clip(eigvals, 0, None))) @ eigvecs.T


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
  """tr((S1 S2)^(1/2)) for symmetric PSD S1, S2.

  S1 S2 is similar to S1^(1/2) S2 S1^(1/2), which is symmetric PSD, so the
  trace is the sum of square roots of real eigenvalues: no complex parts and
  no sqrtm failures on the singular covariances of N < D samples.
  """
  root1 = _psd_sqrt(sigma1)
  inner = root1 @ sigma2 @ root1
  eigvals = np.linalg.eigvalsh((inner + inner.T) / 2)
  return float(np.sqrt(np.clip(eigvals, 0, None)).sum())


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
  """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2).

  Args:
    mu1, mu2: means [D].
    sigma1, sigma2: covariances [D, D].

  Returns:
    The squared Fréchet (2-Wasserstein) distance, a float >= 0 up to rounding.
  """
  mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(
      np.asarray(mu2, np.float64))
  sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
  sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
  if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
    raise ValueError(f"shape mismatch: {mu1.shape} {mu2.shape} "
                     f"{sigma1.shape} {sigma2.shape}")
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2)
               - 2 * trace_sqrt_product(sigma1, sigma2))


def fid_from_features(features1, features2) -> float:
  """FID between two feature sets [N1, D] and [N2, D]."""
  return frechet_distance(*feature_statistics(features1),
                          *feature_statistics(features2))


# --- Reference statistics cache -------------------------------------------


def statistics_cache_path(cache_dir: str, name: str) -> str:
  """`{cache_dir}/fid_stats_{name}.npz`, with `name` made filename-safe."""
  safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._")
  if not safe:
    raise ValueError(f"unusable statistics name {name!r}")
  return os.path.join(cache_dir, f"fid_stats_{safe}.npz")


def save_statistics(path: str, mu, sigma, name: str = "") -> None:
  """Writes mean and covariance to an .npz atomically (no torn files)."""
  shared_files.atomic_write(path, lambda f: np.savez(
      f, mu=np.asarray(mu, np.float64), sigma=np.asarray(sigma, np.float64),
      name=np.asarray(name)))


def load_statistics(path: str) -> Statistics:
  """Reads (mu [D], sigma [D, D]) from `save_statistics` or pytorch-fid."""
  with np.load(path) as data:
    return data["mu"].astype(np.float64), data["sigma"].astype(np.float64)


def cached_statistics(cache_dir: str, name: str,
                      compute_fn: Callable[[], Statistics],
                      overwrite: bool = False) -> Statistics:
  """Reference statistics, computed once per `name` and kept in `cache_dir`.

  Args:
    cache_dir: folder for the .npz files (created when missing).
    name: what the statistics describe, e.g. "<feature net identity>-test";
      a different feature network or split must use a different name.
    compute_fn: () -> (mu, sigma), called only on a cache miss.
    overwrite: recompute even when cached.

  Returns:
    (mu [D], sigma [D, D]) float64.
  """
  path = statistics_cache_path(cache_dir, name)
  if not overwrite and (cached := _read_named(path, name)) is not None:
    return cached
  # One process computes while others starting on the same cache wait for
  # the lock, then read its file (the atomic rename keeps the file whole).
  with shared_files.file_lock(path + ".lock"):
    if not overwrite and (cached := _read_named(path, name)) is not None:
      return cached
    mu, sigma = compute_fn()
    save_statistics(path, mu, sigma, name=name)
  return np.asarray(mu, np.float64), np.asarray(sigma, np.float64)


def _read_named(path: str, name: str) -> Optional[Statistics]:
  """The statistics at `path` when they were saved under `name`, else None."""
  if not os.path.exists(path):
    return None
  with np.load(path) as data:
    stored = str(data["name"]) if "name" in data else None
    # Sanitising can map two names to one file; never reuse the wrong one.
    if stored != name:
      return None
    return data["mu"].astype(np.float64), data["sigma"].astype(np.float64)


def reference_statistics_name(feature_identity: str, split: str,
                              extra: Optional[str] = None) -> str:
  """Cache key for reference statistics: feature network (its identity names
  its weights too, e.g. the Inception's sha256 prefix), data split, extras."""
  parts = [feature_identity, split] + ([extra] if extra else [])
  return "-".join(parts)
