"""GLUE metrics against independent definitions."""

import numpy as np
import pytest

from train.metrics import compute_metrics, f1, matthews_correlation, pearson, spearmanr


def _random_binary(seed, n=200):
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 2, n)
  predictions = np.where(rng.random(n) < 0.7, labels, 1 - labels)
  return predictions, labels


@pytest.mark.parametrize("seed", range(3))
def test_matthews_equals_pearson_correlation_of_binary_vectors(seed):
  predictions, labels = _random_binary(seed)
  assert matthews_correlation(predictions, labels) == pytest.approx(
      np.corrcoef(predictions, labels)[0, 1], abs=1e-12)


def test_matthews_is_zero_when_one_class_is_never_predicted():
  assert matthews_correlation([1, 1, 1], [0, 1, 1]) == 0.0


@pytest.mark.parametrize("seed", range(3))
def test_f1_from_precision_and_recall(seed):
  predictions, labels = _random_binary(seed)
  tp = np.sum((predictions == 1) & (labels == 1))
  precision, recall = tp / np.sum(predictions == 1), tp / np.sum(labels == 1)
  assert f1(predictions, labels) == pytest.approx(2 * precision * recall / (precision + recall))


def test_pearson_and_spearman_with_ties():
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 6, 100).astype(float)  # many ties, like STS-B's scores
  predictions = labels + rng.normal(size=100)
  assert pearson(predictions, labels) == pytest.approx(np.corrcoef(predictions, labels)[0, 1])

  def brute_ranks(x):
    return np.array([np.sum(x < v) + (np.sum(x == v) + 1) / 2 for v in x])

  want = np.corrcoef(brute_ranks(predictions), brute_ranks(labels))[0, 1]
  assert spearmanr(predictions, labels) == pytest.approx(want)
  assert spearmanr(np.exp(labels), labels) == pytest.approx(1.0)


def test_task_metric_names_follow_run_glue():
  assert set(compute_metrics("cola", [1, 0], [1, 0])) == {"matthews_correlation"}
  assert set(compute_metrics("qqp", [1, 0], [1, 0])) == {"f1", "accuracy", "combined_score"}
  assert set(compute_metrics("stsb", [0.1, 0.5, 0.2], [1.0, 2.0, 0.0], is_regression=True)) == {
      "pearson", "spearmanr", "combined_score"}
  assert set(compute_metrics("sst2", [1, 0], [1, 1])) == {"accuracy"}
  assert set(compute_metrics(None, [0.1, 0.3], [1.0, 2.0], is_regression=True)) == {
      "pearson", "spearmanr", "combined_score"}


def test_mismatched_or_empty_inputs_refused():
  with pytest.raises(ValueError, match="one length"):
    compute_metrics("sst2", [1, 0, 1], [1, 0])
  with pytest.raises(ValueError, match="no predictions"):
    compute_metrics("sst2", [], [])
