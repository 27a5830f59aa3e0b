"""The protocol's pieces: the dev split carved out of the training data, the learning rate
chosen on it, and paired comparisons with bootstrap intervals."""

import csv
import math

import numpy as np
import pytest

from train.experiments import protocol


def _write(path, rows, header=("sentence1", "sentence2", "label")):
  with open(path, "w", newline="") as file:
    writer = csv.writer(file)
    writer.writerow(header)
    writer.writerows(rows)
  return path


def _read(path):
  with open(path, newline="") as file:
    return [tuple(row.values()) for row in csv.DictReader(file)]


def test_dev_split_is_disjoint_whole_and_deterministic(tmp_path):
  rows = [(f"premise {i}", f"hypothesis {i}", ["yes", "no"][i % 2]) for i in range(200)]
  train = _write(tmp_path / "train.csv", rows)
  pool, dev = protocol.carve_dev(train, tmp_path / "a", 50)
  pool_rows, dev_rows = _read(pool), _read(dev)
  assert len(dev_rows) == 50 and len(pool_rows) == 150
  assert sorted(pool_rows + dev_rows) == sorted(rows)  # disjoint, and together the whole file
  assert dev_rows != rows[:50] and pool_rows != rows[50:]  # shuffled, not the file's head
  assert _read(protocol.carve_dev(train, tmp_path / "b", 50)[1]) == dev_rows  # same seed
  assert _read(protocol.carve_dev(train, tmp_path / "c", 50, seed=1)[1]) != dev_rows
  with open(dev, newline="") as file:
    assert next(csv.reader(file)) == ["sentence1", "sentence2", "label"]


def test_dev_split_keeps_groups_whole(tmp_path):
  # 60 claims with 1 to 5 evidence pairs each: no claim may be on both sides.
  rng = np.random.default_rng(0)
  rows = [(f"evidence {c}.{k}", f"claim {c}", "SUPPORTS") for c in range(60)
          for k in range(rng.integers(1, 6))]
  train = _write(tmp_path / "train.csv", rows)
  pool, dev = protocol.carve_dev(train, tmp_path / "split", 40, group_by="sentence2")
  pool_claims = {row[1] for row in _read(pool)}
  dev_claims = {row[1] for row in _read(dev)}
  assert not pool_claims & dev_claims and len(pool_claims | dev_claims) == 60
  assert 40 <= len(_read(dev)) < 45  # whole groups: at most one group past the size
  # Without grouping the same file would split claims (the check above can fail).
  pool, dev = protocol.carve_dev(train, tmp_path / "rows", 40)
  assert {row[1] for row in _read(pool)} & {row[1] for row in _read(dev)}


def test_dev_split_refuses_impossible_requests(tmp_path):
  train = _write(tmp_path / "train.csv", [("a", "b", "yes")] * 10)
  with pytest.raises(ValueError, match="no training pool"):
    protocol.carve_dev(train, tmp_path / "x", 10)
  with pytest.raises(ValueError, match="at least one row"):
    protocol.carve_dev(train, tmp_path / "x", 0)
  with pytest.raises(ValueError, match="no column 'claim'"):
    protocol.carve_dev(train, tmp_path / "x", 3, group_by="claim")


def test_majority_share_is_the_accuracy_of_always_predicting_the_commonest_class(tmp_path):
  rows = [("a", "b", "yes")] * 5 + [("c", "d", "no")] * 3 + [("e", "f", "maybe")] * 2
  assert protocol.majority_share(_write(tmp_path / "three.csv", rows)) == 0.5
  assert protocol.majority_share(_write(tmp_path / "two.csv", rows[3:])) == pytest.approx(3 / 7)
  scores = _write(tmp_path / "scores.csv", [("a", "b", "3.5"), ("c", "d", "3.5"), ("e", "f", "1.0")])
  assert math.isnan(protocol.majority_share(scores))  # a regression task has no majority class


def test_rate_choice_brackets_the_best():
  inside = protocol.choose_rate({1e-5: [0.70, 0.72], 3e-5: [0.80, 0.78], 1e-4: [0.75, 0.76]})
  assert inside.rate == 3e-5 and inside.bracketed and inside.mean_dev_score == pytest.approx(0.79)
  # Best at the top of the grid: one step further up (×3 here); at the bottom, one down.
  top = protocol.choose_rate({1e-5: [0.6], 3e-5: [0.7], 1e-4: [0.8]})
  assert top.rate == 1e-4 and not top.bracketed and top.next_rate == pytest.approx(1e-4 * 1e-4 / 3e-5, rel=2e-3)
  bottom = protocol.choose_rate({1e-5: [0.9], 3e-5: [0.7], 1e-4: [0.8], 3e-4: [0.5]})
  assert bottom.rate == 1e-5 and bottom.next_rate == pytest.approx(1e-5 / 3, rel=2e-3)
  assert protocol.choose_rate({3e-4: [0.9], 1e-3: [0.7], 3e-3: [0.8]}).next_rate == 9e-05  # not 8.99..e-05
  # The mean over seeds decides, not one lucky seed; ties go to the smaller rate.
  assert protocol.choose_rate({1e-5: [0.9, 0.5], 3e-5: [0.72, 0.72], 1e-4: [0.6]}).rate == 3e-5
  assert protocol.choose_rate({1e-5: [0.5], 3e-5: [0.8], 1e-4: [0.8]}).rate == 3e-5
  # Past the limits nothing more is tried.
  assert protocol.choose_rate({1e-3: [0.1], 3e-3: [0.2], 1e-2: [0.3]}).bracketed
  with pytest.raises(ValueError, match="at least three"):
    protocol.choose_rate({1e-5: [0.5], 3e-5: [0.6]})
  with pytest.raises(ValueError, match="no dev scores"):
    protocol.choose_rate({1e-5: [0.5], 3e-5: [], 1e-4: [0.6]})


def test_p_choice_takes_the_best_chosen_rate_and_the_first_listed_on_a_tie():
  choice = protocol.RateChoice
  assert protocol.choose_member({"ct_f_0.3": choice(3e-4, 0.80, None),
                                 "ct_f_0.2": choice(1e-3, 0.82, None),
                                 "ct_f_0.4": choice(1e-4, 0.81, None)}) == "ct_f_0.2"
  # A tie keeps the first listed (the grid's order), whatever the rate.
  assert protocol.choose_member({"ct_d_0.3": choice(3e-4, 0.80, None),
                                 "ct_d_0.1": choice(1e-4, 0.80, None)}) == "ct_d_0.3"
  assert protocol.choose_member({"ct_d_0.1": choice(1e-4, 0.80, None),
                                 "ct_d_0.3": choice(3e-4, 0.80, None)}) == "ct_d_0.1"
  with pytest.raises(ValueError, match="no members"):
    protocol.choose_member({})


def test_bootstrap_interval_of_the_mean():
  assert protocol.bootstrap_interval([0.02] * 5) == pytest.approx((0.02, 0.02))
  assert all(math.isnan(x) for x in protocol.bootstrap_interval([0.3]))
  # Against the normal approximation on many draws: the percentile interval of the mean of
  # 400 values is close to mean ± 1.96 · sd / sqrt(n).
  values = np.random.default_rng(3).normal(0.01, 0.02, 400)
  low, high = protocol.bootstrap_interval(values)
  half = 1.96 * values.std() / np.sqrt(len(values))
  assert low == pytest.approx(values.mean() - half, abs=2e-4)
  assert high == pytest.approx(values.mean() + half, abs=2e-4)
  assert protocol.bootstrap_interval(values) == (low, high)  # seeded
  # At a Bonferroni level (the report's, for 15 intervals: 1 - 0.05/15): wider, as z = 2.935.
  assert protocol.bonferroni_level(15) == pytest.approx(1 - 0.05 / 15)
  assert protocol.bonferroni_level(1) == protocol.bonferroni_level(0) == protocol.LEVEL
  low, high = protocol.bootstrap_interval(values, level=protocol.bonferroni_level(15))
  half = 2.935 * values.std() / np.sqrt(len(values))
  assert low == pytest.approx(values.mean() - half, abs=3e-4)
  assert high == pytest.approx(values.mean() + half, abs=3e-4)


def test_comparison_is_paired_by_seed_and_says_only_what_the_interval_allows():
  baseline = {0: 0.70, 1: 0.80, 2: 0.60, 3: 0.75, 4: 0.65}
  # Unpaired means are equal-ish to the spread, but every seed gains 1 to 2 points.
  gains = {seed: score + 0.01 + 0.002 * seed for seed, score in baseline.items()}
  better = protocol.compare(gains, baseline)
  assert better.verdict == "helps" and better.seeds == 5 and better.wins == 5
  assert better.mean == pytest.approx(0.014) and 0.01 <= better.low < better.high <= 0.018
  assert better.text() == f"+1.40 [{better.low * 100:+.2f}, {better.high * 100:+.2f}]"
  worse = protocol.compare(baseline, gains)
  assert worse.verdict == "hurts" and worse.wins == 0
  mixed = protocol.compare({s: v + (0.02 if s % 2 else -0.02) for s, v in baseline.items()}, baseline)
  assert mixed.verdict == "no clear difference" and mixed.low < 0 < mixed.high
  # Seeds only one side ran are left out of the pairing.
  partial = protocol.compare({0: 0.9, 1: 0.9, 7: 0.1}, baseline)
  assert partial.seeds == 2 and partial.mean == pytest.approx(0.15)
  assert protocol.compare({0: 0.9}, baseline).verdict == "too few seeds"
