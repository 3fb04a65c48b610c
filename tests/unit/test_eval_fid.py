"""Fréchet distance, running statistics and the reference-statistics cache."""
import numpy as np
import pytest
import scipy.linalg

from jaxsd.evaluation import fid


def _scipy_frechet(mu1, sigma1, mu2, sigma2, eps=1e-6):
  """pytorch-fid's formula: scipy sqrtm of S1 S2, eps offset when singular."""
  diff = mu1 - mu2
  covmean = scipy.linalg.sqrtm(sigma1.dot(sigma2))
  if not np.isfinite(covmean).all():
    offset = np.eye(sigma1.shape[0]) * eps
    covmean = scipy.linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
  covmean = covmean.real
  return diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(
      covmean)


def _correlated(rng, n, d, shift=0.0):
  mixing = rng.randn(d, d) / np.sqrt(d)
  return rng.randn(n, d) @ mixing + shift


def test_matches_scipy_sqrtm_formula():
  rng = np.random.RandomState(0)
  a, b = _correlated(rng, 500, 16), _correlated(rng, 400, 16, shift=0.3)
  stats_a, stats_b = fid.feature_statistics(a), fid.feature_statistics(b)
  got = fid.frechet_distance(*stats_a, *stats_b)
  expected = _scipy_frechet(*stats_a, *stats_b)
  assert got == pytest.approx(expected, rel=1e-6)
  assert got > 0.5


def test_singular_covariances_are_handled():
  """Fewer samples than dimensions: rank-deficient covariances, still real."""
  rng = np.random.RandomState(1)
  a, b = _correlated(rng, 20, 64), _correlated(rng, 30, 64, shift=0.1)
  got = fid.fid_from_features(a, b)
  expected = _scipy_frechet(*fid.feature_statistics(a),
                            *fid.feature_statistics(b))
  assert np.isfinite(got) and got > 0
  assert got == pytest.approx(expected, rel=1e-4)


def test_self_distance_is_zero_and_grows_with_shift():
  rng = np.random.RandomState(2)
  a = _correlated(rng, 2000, 32)
  assert abs(fid.fid_from_features(a, a)) < 1e-8
  distances = [fid.fid_from_features(a, a + shift)
               for shift in (0.1, 0.5, 1.0)]
  # A constant shift s in every one of D dims adds exactly D s^2.
  np.testing.assert_allclose(distances, [32 * 0.01, 32 * 0.25, 32 * 1.0],
                             rtol=1e-6)


def test_known_gaussians():
  """Diagonal case in closed form: sum (sqrt(s1) - sqrt(s2))^2 + |dmu|^2."""
  s1, s2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 9.0])
  mu1, mu2 = np.zeros(3), np.array([1.0, 0.0, 2.0])
  got = fid.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2))
  assert got == pytest.approx(5.0 + 1.0 + 1.0 + 0.0)


def test_running_statistics_match_one_pass():
  rng = np.random.RandomState(3)
  # A large common offset: naive sum(x x^T) would lose the covariance.
  features = (_correlated(rng, 1000, 8) + 1e4).astype(np.float32)
  running = fid.RunningStatistics()
  for chunk in np.array_split(features, [1, 7, 300, 301, 999]):
    running.update(chunk)
  running.update(np.zeros((0, 8)))
  mu, sigma = running.statistics()
  ref_mu, ref_sigma = fid.feature_statistics(features)
  assert running.count == 1000
  np.testing.assert_allclose(mu, ref_mu, rtol=1e-12)
  np.testing.assert_allclose(sigma, ref_sigma, rtol=1e-9, atol=1e-9)
  with pytest.raises(ValueError):
    running.update(np.zeros((3, 5)))
  with pytest.raises(ValueError):
    fid.RunningStatistics().statistics()


def test_reference_statistics_cache(tmp_path):
  rng = np.random.RandomState(4)
  features = _correlated(rng, 100, 4)
  calls = []

  def compute():
    calls.append(1)
    return fid.feature_statistics(features)

  name = fid.reference_statistics_name("mnist-cnn-v1-abc", "mnist-test")
  first = fid.cached_statistics(str(tmp_path), name, compute)
  second = fid.cached_statistics(str(tmp_path), name, compute)
  assert len(calls) == 1
  for x, y in zip(first, second):
    np.testing.assert_array_equal(x, y)
  assert fid.statistics_cache_path(str(tmp_path), name).endswith(
      "fid_stats_mnist-cnn-v1-abc-mnist-test.npz")
  # Another feature network or split is another entry, not a stale hit.
  fid.cached_statistics(str(tmp_path), name.replace("test", "train"), compute)
  assert len(calls) == 2
  fid.cached_statistics(str(tmp_path), name, compute, overwrite=True)
  assert len(calls) == 3
