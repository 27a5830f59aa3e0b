"""The paper's protocol, the pieces a campaign is judged by: a dev split carved out of a
task's training data (the validation set stays untouched until the report), a learning rate
chosen per method on that dev split with a grid that must bracket the choice (and p, where a
method runs at several), and every comparison as a paired per-seed difference with a 95%
bootstrap interval.

A seed fixes the training subset, the head's initialisation and the data order, so two
methods' runs at the same seed differ only in the method: the per-seed differences are
paired, and their mean's interval is what a reading may cite. "Helps" or "hurts" is said only
where the interval excludes 0.
"""

from __future__ import annotations

import csv
import dataclasses
import math
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from train import text_datasets

PRIMARY_METRICS = ("eval_accuracy", "eval_pearson", "eval_matthews_correlation")  # the first found
BOOTSTRAP_SAMPLES = 10_000
LEVEL = 0.95


def carve_dev(train_csv: Path, out_dir: Path, dev_size: int, *, group_by: str | None = None,
              seed: int = 0) -> tuple[Path, Path]:
  """Splits ``train_csv`` into ``out_dir/pool.csv`` (what runs sample their training examples
  from) and ``out_dir/dev.csv`` (where learning rates are chosen), disjoint and together the
  whole file, in a fixed shuffled order. With ``group_by`` (a column, e.g. a claim), rows that
  share its value land on the same side, so the dev split holds whole groups (at least
  ``dev_size`` rows, at most one group more). Returns ``(pool, dev)``.

  Raises:
    ValueError: ``dev_size`` is not positive or leaves no rows for the pool, or
      ``group_by`` is not a column of the file.
  """
  if dev_size < 1:
    raise ValueError(f"the dev split needs at least one row; got dev_size={dev_size}.")
  with open(train_csv, newline="") as file:
    reader = csv.DictReader(file)
    header, rows = reader.fieldnames or [], list(reader)
  if group_by is not None and group_by not in header:
    raise ValueError(f"{train_csv} has no column {group_by!r} to group by (columns: {header}).")
  groups: dict[str, list[int]] = {}
  for index, row in enumerate(rows):
    groups.setdefault(row[group_by] if group_by else str(index), []).append(index)
  order = [list(groups.values())[i] for i in np.random.default_rng(seed).permutation(len(groups))]
  dev: list[int] = []
  for members in order:
    if len(dev) >= dev_size:
      break
    dev += members
  if len(dev) >= len(rows):
    raise ValueError(f"a dev split of {dev_size} rows leaves no training pool: {train_csv} has "
                     f"{len(rows)} rows" + (f" in {len(groups)} groups" if group_by else "") + ".")
  in_dev = set(dev)
  out_dir.mkdir(parents=True, exist_ok=True)
  paths = out_dir / "pool.csv", out_dir / "dev.csv"
  for path, keep in zip(paths, (lambda i: i not in in_dev, lambda i: i in in_dev)):
    with open(path, "w", newline="") as file:
      writer = csv.DictWriter(file, fieldnames=header)
      writer.writeheader()
      writer.writerows(row for index, row in enumerate(rows) if keep(index))
  return paths


def majority_share(path: Path) -> float:
  """The fraction of the data set's examples (a CSV/JSON file as run_glue reads it) whose
  label is its most frequent one: the accuracy of always predicting that class; nan for a
  regression task."""
  dataset = text_datasets.load_local(path)
  if dataset.is_regression:
    return math.nan
  return float(np.bincount(dataset.labels).max() / len(dataset.labels))


@dataclasses.dataclass(frozen=True)
class RateChoice:
  """The learning rate with the best mean dev score, and the rate to try next when the grid
  does not bracket it (the best at an end of the grid); ``next_rate`` is None once bracketed."""

  rate: float
  mean_dev_score: float
  next_rate: float | None

  @property
  def bracketed(self) -> bool:
    return self.next_rate is None


def choose_rate(dev_scores: Mapping[float, Sequence[float]], *, limits: tuple[float, float] = (1e-6, 1e-2)
                ) -> RateChoice:
  """The rate whose runs have the best mean dev score (ties: the smaller rate). When it is the
  grid's smallest or largest, the grid does not bracket it: ``next_rate`` is one grid step
  beyond (the ratio of its neighbour), unless that leaves ``limits``.

  Raises:
    ValueError: fewer than three rates, or a rate without scores.
  """
  rates = sorted(dev_scores)
  if len(rates) < 3:
    raise ValueError(f"a rate grid needs at least three rates to bracket the best; got {rates}.")
  if empty := [rate for rate in rates if not len(dev_scores[rate])]:
    raise ValueError(f"no dev scores for the rate(s) {empty}.")
  means = {rate: float(np.mean(dev_scores[rate])) for rate in rates}
  best = max(rates, key=lambda rate: (means[rate], -rate))
  next_rate = None
  if best == rates[0]:
    next_rate = rates[0] * rates[0] / rates[1]
  elif best == rates[-1]:
    next_rate = rates[-1] * rates[-1] / rates[-2]
  if next_rate is not None:
    next_rate = float(f"{next_rate:.3g}")  # as run directories name it (lr_9e-05), exactly
    if not limits[0] <= next_rate <= limits[1]:
      next_rate = None  # at the edge of what is worth trying: taken as it is
  return RateChoice(best, means[best], next_rate)


def choose_member(choices: Mapping[str, RateChoice]) -> str:
  """The member of a method's family (one cell per p, each at its own chosen rate) whose
  chosen rate has the best mean dev score; ties: the first in ``choices``' order.

  Raises:
    ValueError: no members.
  """
  if not choices:
    raise ValueError("no members to choose from.")
  best = max(choice.mean_dev_score for choice in choices.values())
  return next(cell for cell, choice in choices.items() if choice.mean_dev_score == best)


def bootstrap_interval(differences: Sequence[float], *, samples: int = BOOTSTRAP_SAMPLES,
                       level: float = LEVEL, seed: int = 0) -> tuple[float, float]:
  """The percentile bootstrap interval of the mean of ``differences`` (seeds resampled with
  replacement); ``(nan, nan)`` for fewer than two."""
  values = np.asarray(differences, float)
  if len(values) < 2:
    return math.nan, math.nan
  picks = np.random.default_rng(seed).integers(0, len(values), (samples, len(values)))
  means = values[picks].mean(axis=1)
  tail = (1 - level) / 2
  low, high = np.quantile(means, [tail, 1 - tail])
  return float(low), float(high)


def bonferroni_level(intervals: int, level: float = LEVEL) -> float:
  """The level at which each of ``intervals`` intervals is drawn so that all of them hold
  together with probability at least ``level`` (Bonferroni: 1 - (1 - level) / intervals)."""
  return 1 - (1 - level) / max(1, intervals)


@dataclasses.dataclass(frozen=True)
class Comparison:
  """A method against a baseline over the seeds both ran: the mean per-seed difference, its
  95% bootstrap interval, and the verdict the interval allows."""

  mean: float
  low: float
  high: float
  seeds: int
  wins: int

  @property
  def verdict(self) -> str:
    if not self.seeds:
      return "not run yet"
    if self.seeds < 2 or math.isnan(self.low):
      return "too few seeds"
    if self.low > 0:
      return "helps"
    if self.high < 0:
      return "hurts"
    return "no clear difference"

  def text(self, scale: float = 100.0) -> str:
    """``+1.23 [+0.40, +2.10]`` in points (``scale`` 100: accuracy as a percentage)."""
    if not self.seeds:
      return "–"
    return (f"{self.mean * scale:+.2f} [{self.low * scale:+.2f}, {self.high * scale:+.2f}]"
            if self.seeds >= 2 else f"{self.mean * scale:+.2f}")


def compare(scores: Mapping[int, float], baseline: Mapping[int, float], **bootstrap) -> Comparison:
  """``scores`` against ``baseline`` ({seed: score} each), paired by seed."""
  seeds = sorted(set(scores) & set(baseline))
  differences = [scores[seed] - baseline[seed] for seed in seeds]
  low, high = bootstrap_interval(differences, **bootstrap)
  return Comparison(float(np.mean(differences)) if seeds else math.nan, low, high, len(seeds),
                    sum(d > 0 for d in differences))
