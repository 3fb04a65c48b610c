"""Prompt accuracy and diversity on hand-made inputs (no classifier needed)."""
import numpy as np
import pytest
import scipy.spatial.distance

from jaxsd.evaluation import prompt_metrics


def test_prompt_accuracy_per_digit_and_mean():
  digits = np.array([0, 0, 0, 0, 1, 1, 7])
  predicted = np.array([0, 0, 0, 5, 1, 2, 7])
  result = prompt_metrics.prompt_accuracy(predicted, digits)
  expected = np.full(10, np.nan)
  expected[[0, 1, 7]] = [0.75, 0.5, 1.0]
  np.testing.assert_array_equal(result["per_digit"], expected)
  # Each prompted digit weighs the same, however many samples it has.
  assert result["mean"] == pytest.approx((0.75 + 0.5 + 1.0) / 3)
  with pytest.raises(ValueError):
    prompt_metrics.prompt_accuracy(predicted[:3], digits)


def test_diversity_is_mean_pairwise_distance_within_prompt():
  rng = np.random.RandomState(0)
  features = rng.randn(30, 8).astype(np.float32)
  digits = np.repeat([2, 5, 9], 10)
  digits[-1] = 4  # a lone sample: no pairs, NaN, left out of the mean
  result = prompt_metrics.diversity(features, digits)
  for d in (2, 5, 9):
    expected = scipy.spatial.distance.pdist(
        features[digits == d].astype(np.float64)).mean()
    assert result["per_digit"][d] == pytest.approx(expected, rel=1e-6)
  assert np.isnan(result["per_digit"][4]) and np.isnan(result["per_digit"][0])
  assert result["mean"] == pytest.approx(
      np.mean([result["per_digit"][d] for d in (2, 5, 9)]))
  # Identical samples have no diversity; scaled features scale it.
  assert prompt_metrics.mean_pairwise_distance(np.ones((5, 8))) == 0.0
  assert prompt_metrics.diversity(3 * features, digits)["mean"] == (
      pytest.approx(3 * result["mean"], rel=1e-6))


def test_prompt_digit_parsing():
  assert prompt_metrics.prompt_digit("a photograph of the number 7") == 7
  np.testing.assert_array_equal(
      prompt_metrics.prompt_digits_of(
          [f"a photograph of the number {d}" for d in (0, 9, 3)]), [0, 9, 3])
  with pytest.raises(ValueError):
    prompt_metrics.prompt_digit("a photograph of a cat")
