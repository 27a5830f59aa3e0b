"""GLUE metrics (paper Table 6), with Hugging Face run_glue's names.

CoLA: Matthews correlation; MRPC and QQP: F1 and accuracy; STS-B: Pearson and
Spearman correlation; the other tasks: accuracy. Tasks with two metrics also
report their mean as ``combined_score``, as ``evaluate``'s GLUE metric does.
"""

from __future__ import annotations

import numpy as np

_TASK_METRICS = {
    "cola": ("matthews_correlation",),
    "mrpc": ("f1", "accuracy"),
    "qqp": ("f1", "accuracy"),
    "stsb": ("pearson", "spearmanr"),
}


def accuracy(predictions, labels) -> float:
  """The fraction of predictions equal to the labels.

  Examples:
    >>> from train.metrics import accuracy
    >>> accuracy([1, 0, 1, 1], [1, 0, 0, 1])
    0.75
  """
  predictions, labels = _pair(predictions, labels)
  return float(np.mean(predictions == labels))


def f1(predictions, labels) -> float:
  """Binary F1 of the positive class (label 1).

  Examples:
    >>> from train.metrics import f1
    >>> f1([1, 0, 1, 1], [1, 0, 0, 1])  # precision 2/3, recall 1
    0.8
  """
  predictions, labels = _pair(predictions, labels)
  true_positive = np.sum((predictions == 1) & (labels == 1))
  predicted, actual = np.sum(predictions == 1), np.sum(labels == 1)
  return float(2 * true_positive / (predicted + actual)) if predicted + actual else 0.0


def matthews_correlation(predictions, labels) -> float:
  """Matthews correlation of binary predictions; 0 when a class is never predicted or present.

  Examples:
    >>> from train.metrics import matthews_correlation
    >>> matthews_correlation([1, 0, 1, 0], [1, 0, 1, 0]), matthews_correlation([1, 1, 1], [1, 0, 1])
    (1.0, 0.0)
  """
  predictions, labels = _pair(predictions, labels)
  tp = float(np.sum((predictions == 1) & (labels == 1)))
  tn = float(np.sum((predictions != 1) & (labels != 1)))
  fp = float(np.sum((predictions == 1) & (labels != 1)))
  fn = float(np.sum((predictions != 1) & (labels == 1)))
  denominator = np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
  return float((tp * tn - fp * fn) / denominator) if denominator else 0.0


def pearson(predictions, labels) -> float:
  """Pearson correlation; 0 when either side is constant.

  Examples:
    >>> from train.metrics import pearson
    >>> pearson([1.0, 2.0, 3.0], [2.0, 4.0, 6.5])
    0.9979...
  """
  predictions, labels = _pair(predictions, labels, dtype=np.float64)
  x, y = predictions - predictions.mean(), labels - labels.mean()
  denominator = np.sqrt(np.sum(x * x) * np.sum(y * y))
  return float(np.sum(x * y) / denominator) if denominator else 0.0


def spearmanr(predictions, labels) -> float:
  """Pearson correlation of the ranks, ties given their average rank.

  Examples:
    >>> from train.metrics import spearmanr
    >>> spearmanr([1.0, 2.0, 3.0], [1.0, 4.0, 9.0])  # monotone: 1 whatever the spacing
    1.0
  """
  predictions, labels = _pair(predictions, labels, dtype=np.float64)
  return pearson(_average_ranks(predictions), _average_ranks(labels))


_FUNCTIONS = {"accuracy": accuracy, "f1": f1, "matthews_correlation": matthews_correlation,
              "pearson": pearson, "spearmanr": spearmanr}


def metric_names(task_name: str | None, is_regression: bool) -> tuple[str, ...]:
  """The metrics reported for a GLUE task, or for a local data set without a task name.

  Examples:
    >>> from train.metrics import metric_names
    >>> metric_names("cola", False), metric_names(None, True)
    (('matthews_correlation',), ('pearson', 'spearmanr'))
  """
  if task_name in _TASK_METRICS:
    return _TASK_METRICS[task_name]
  return ("pearson", "spearmanr") if is_regression else ("accuracy",)


def compute_metrics(task_name: str | None, predictions, labels, *, is_regression: bool = False):
  """``{"accuracy": ..., "f1": ..., "combined_score": ...}`` for the task.

  ``predictions`` are class ids (classification) or scores (regression).

  Examples:
    >>> from train.metrics import compute_metrics
    >>> compute_metrics("mrpc", [1, 0, 1, 1], [1, 0, 0, 1])
    {'f1': 0.8, 'accuracy': 0.75, 'combined_score': 0.775}
  """
  names = metric_names(task_name, is_regression)
  results = {name: _FUNCTIONS[name](predictions, labels) for name in names}
  if len(names) > 1:
    results["combined_score"] = float(np.mean(list(results.values())))
  return results


def _pair(predictions, labels, dtype=None):
  predictions, labels = np.asarray(predictions, dtype), np.asarray(labels, dtype)
  if predictions.shape != labels.shape or predictions.ndim != 1:
    raise ValueError(f"predictions {predictions.shape} and labels {labels.shape} must be 1-D "
                     "arrays of one length.")
  if predictions.size == 0:
    raise ValueError("no predictions to score.")
  return predictions, labels


def _average_ranks(values: np.ndarray) -> np.ndarray:
  order = np.argsort(values, kind="stable")
  ranks = np.empty(len(values))
  ranks[order] = np.arange(1, len(values) + 1)
  _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
  sums = np.bincount(inverse, weights=ranks)
  return sums[inverse] / counts[inverse]
