"""The experiments' report: each paper table and figure from the runs' outputs (Markdown and
CSV tables, PNG figures in ``results_dir``), and RESULTS.md around them.

By name: :func:`protocol_table` (with :func:`protocol_figure` and the compute table
:func:`protocol_compute`; the paper's protocol), :func:`table3_methods` (with its figure
:func:`table3_methods_figure`; the paper's Tables 3 and 4), :func:`table5_ablations`,
:func:`table2_domain`, :func:`figure2_probe`, :func:`figure3_overlap`, and
:func:`child_network_layers` (no counterpart in the paper).
Nothing here runs a trainer: the launcher runs, the probe (``probe.py``) evaluates.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from childtuning_jax import mask_jaccard
from train import arguments
from train.experiments import cells, protocol
from train.experiments.cells import Setting

logger = logging.getLogger("experiments")


def results_of(setting: Setting, cell: str) -> dict[int, dict]:
  """``{seed: all_results}`` of the finished runs of a cell (whatever seeds exist)."""
  found = {}
  for path in sorted((setting.root / "runs" / cell).glob("seed_*/all_results.json")):
    found[int(path.parent.name.removeprefix("seed_"))] = json.loads(path.read_text())
  return dict(sorted(found.items()))


def scores_of(setting: Setting, cell: str, key: str = "eval_accuracy") -> dict[int, float]:
  """``{seed: 100 * value}`` (the paper's scale) of one result key."""
  return {seed: 100 * r[key] for seed, r in results_of(setting, cell).items() if key in r}


def wall_seconds(setting: Setting, cell_names: Sequence[str]) -> float:
  total = 0.0
  for cell in dict.fromkeys(cell_names):
    for path in (setting.root / "runs" / cell).glob("seed_*/wall_seconds.json"):
      total += json.loads(path.read_text())["wall_seconds"]
  return total


def machines(setting: Setting) -> str:
  """The machines the runs recorded (the launcher writes them into wall_seconds.json)."""
  seen = {}
  for pattern in ("runs/*/*/wall_seconds.json", "overlap/*/wall_seconds.json",
                  "protocol/*/*/*/*/*/*/wall_seconds.json"):
    for path in sorted(setting.root.glob(pattern)):
      machine = json.loads(path.read_text()).get("machine")
      if machine:
        seen[f"{machine['cpu']} ({machine['cores']} cores)"] = True
  return "; ".join(seen) if seen else "machine not recorded by these runs"


def mean_max(values: Sequence[float]) -> str:
  """The paper's Table 3 format: mean (max) over seeds."""
  return f"{np.mean(values):.2f} ({np.max(values):.2f})" if len(values) else "–"


def paired_delta(scores: dict[int, float], baseline: dict[int, float]) -> tuple[float, int, int]:
  """Mean of the per-seed differences over the seeds both have, how many of them are
  positive, and how many seeds are shared (a seed fixes the data subset, head and order)."""
  seeds = sorted(set(scores) & set(baseline))
  differences = [scores[s] - baseline[s] for s in seeds]
  return (float(np.mean(differences)) if seeds else math.nan,
          sum(d > 0 for d in differences), len(seeds))


@dataclasses.dataclass
class Table:
  """A results table: formatted cells for Markdown, raw numbers for CSV."""

  name: str
  title: str
  columns: list[str]
  rows: list[list[str]] = dataclasses.field(default_factory=list)
  raw: list[dict[str, Any]] = dataclasses.field(default_factory=list)
  notes: list[str] = dataclasses.field(default_factory=list)

  def markdown(self) -> str:
    lines = [f"**{self.title}**", "", "| " + " | ".join(self.columns) + " |",
             "|" + "|".join("---" for _ in self.columns) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in self.rows]
    lines += [""] + [f"{note}" for note in self.notes]
    return "\n".join(lines).rstrip() + "\n"

  def write(self, directory: Path) -> str:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{self.name}.md").write_text(self.markdown())
    with open(directory / f"{self.name}.csv", "w", newline="") as file:
      fields = list(dict.fromkeys(k for record in self.raw for k in record))
      writer = csv.DictWriter(file, fieldnames=fields)
      writer.writeheader()
      writer.writerows(self.raw)
    return self.markdown()


def _pyplot():
  import matplotlib

  matplotlib.use("Agg")  # files only, no display
  import matplotlib.pyplot as plt

  return plt


def _delta_text(delta: float, wins: int, shared: int) -> str:
  return "–" if not shared else f"{delta:+.2f} ({wins}/{shared})"


# ----------------------------------------------------------------------------- tables and figures


def table3_methods(setting: Setting) -> Table:
  """Table 3/4: accuracy on the Rotten Tomatoes validation set, mean (max) over seeds."""
  table = Table("methods", "Rotten Tomatoes, 1k training examples: validation accuracy",
                ["Method", "Seeds", "Accuracy: mean (max)", "Std", "Δ vs vanilla (seeds better)",
                 "Training loss"])
  baseline = scores_of(setting, "vanilla")
  for name in cells.EXPERIMENT_CELLS["methods"]:
    scores = scores_of(setting, name)
    delta, wins, shared = paired_delta(scores, baseline)
    values = list(scores.values())
    losses = [r["train_loss"] for r in results_of(setting, name).values() if "train_loss" in r]
    table.rows.append([cells.CELLS[name].label, str(len(values)), mean_max(values),
                       f"{np.std(values, ddof=1):.2f}" if len(values) > 1 else "–",
                       "" if name == "vanilla" else _delta_text(delta, wins, shared),
                       f"{np.mean(losses):.3f}" if losses else "–"])
    table.raw.append({"method": cells.CELLS[name].label, "cell": name, "seeds": len(values),
                      "mean": np.mean(values) if values else None,
                      "max": np.max(values) if values else None,
                      "std": np.std(values, ddof=1) if len(values) > 1 else None,
                      "delta_vs_vanilla": None if name == "vanilla" else delta,
                      "seeds_better": None if name == "vanilla" else wins,
                      "train_loss": np.mean(losses) if losses else None,
                      **{f"seed_{seed}": value for seed, value in scores.items()}})
  table.notes.append("Δ vs vanilla: the mean of per-seed differences (a seed fixes the "
                     "1k-example subset, the head's initialisation and the data order); in "
                     "parentheses, on how many of the shared seeds the method beat vanilla. "
                     "Training loss: the mean over all training steps (dropout on), averaged "
                     "over seeds.")
  return table


def table3_methods_figure(setting: Setting, path: Path) -> Path:
  plt = _pyplot()
  names = cells.EXPERIMENT_CELLS["methods"]
  figure, axis = plt.subplots(figsize=(9, 4.5))
  baseline = scores_of(setting, "vanilla")
  if baseline:
    axis.axhline(np.mean(list(baseline.values())), color="grey",
                 linestyle="--", linewidth=1, label="vanilla mean")
  for index, name in enumerate(names):
    values = list(scores_of(setting, name).values())
    if not values:
      continue
    axis.scatter(np.full(len(values), index), values, s=14, color="tab:blue", alpha=0.6)
    axis.hlines(np.mean(values), index - 0.3, index + 0.3, color="black")
  axis.set_xticks(range(len(names)), [cells.CELLS[n].label for n in names], rotation=40, ha="right",
                  fontsize=8)
  axis.set_ylabel("validation accuracy (%)")
  axis.set_title("Rotten Tomatoes (1k examples), MiniLM-L6: each dot a seed, bar the mean")
  axis.legend(loc="lower right", fontsize=8)
  figure.tight_layout()
  figure.savefig(path, dpi=120)
  plt.close(figure)
  return path


def protocol_rates(setting: Setting, model: str, task: str, size: int, cell: str) -> list[float]:
  """The learning rates a protocol cell's selection ran (read from its run directories)."""
  select = setting.protocol_cell_dir(model, task, size, cell) / "select"
  return sorted(float(path.name.removeprefix("lr_")) for path in select.glob("lr_*"))


def protocol_scores(setting: Setting, model: str, task: str, size: int, cell: str, stage: str,
                    rate: float, seeds: Sequence[int]) -> dict[int, float]:
  """``{seed: primary metric}`` (a fraction) of a protocol cell's finished runs at ``rate``."""
  scores = {}
  for seed in seeds:
    path = setting.protocol_dir(model, task, size, cell, stage, rate, seed) / "all_results.json"
    if path.exists():
      results = json.loads(path.read_text())
      found = [results[k] for k in protocol.PRIMARY_METRICS if k in results]
      if found:
        scores[seed] = found[0]
  return scores


def protocol_dev_scores(setting: Setting, model: str, task: str, size: int, cell: str,
                        rates: Sequence[float] | None = None,
                        grid: cells.Protocol | None = None) -> dict[float, list[float]]:
  """``{rate: dev scores of the finished selection seeds}`` (all rates on disk by default)."""
  rates = protocol_rates(setting, model, task, size, cell) if rates is None else rates
  seeds = (grid or cells.PROTOCOL).selection_seeds
  return {rate: list(protocol_scores(setting, model, task, size, cell, "select", rate,
                                     seeds).values())
          for rate in rates}


def protocol_choice(setting: Setting, model: str, task: str, size: int, cell: str,
                    grid: cells.Protocol | None = None) -> protocol.RateChoice | None:
  """The rate the dev split chose, once every rate run has its selection seeds."""
  grid = grid or cells.PROTOCOL
  scores = protocol_dev_scores(setting, model, task, size, cell, grid=grid)
  complete = {rate: v for rate, v in scores.items() if len(v) == len(grid.selection_seeds)}
  if len(complete) < 3 or len(complete) < len(scores):
    return None
  return protocol.choose_rate(complete)


def protocol_selection(setting: Setting, grid: cells.Protocol | None = None
                       ) -> dict[tuple[str, str, int, str], tuple[protocol.RateChoice | None,
                                                                   str | None]]:
  """``{(model, task, size, cell): (the rate the dev split chose, the member of the cell's
  family it chose)}``, each selection read once. The member (:func:`protocol.choose_member`
  among :meth:`cells.Protocol.family`: the method at each p) is None until every member has
  its rate; it is the cell itself where the method has no other p."""
  grid = grid or cells.PROTOCOL
  choices = {key: protocol_choice(setting, *key, grid) for key in grid.keys()}
  selection = {}
  for key, choice in choices.items():
    family = {member: choices.get((*key[:3], member)) for member in grid.family(*key)}
    whole = all(member_choice is not None for member_choice in family.values())
    selection[key] = (choice, protocol.choose_member(family) if whole else None)
  return selection


def protocol_member(setting: Setting, model: str, task: str, size: int, cell: str,
                    grid: cells.Protocol | None = None) -> str | None:
  """The member of ``cell``'s family the dev split chose (:func:`protocol_selection`)."""
  return protocol_selection(setting, grid)[(model, task, size, cell)][1]


def protocol_not_learned(setting: Setting, model: str, task: str, size: int,
                         grid: cells.Protocol | None = None) -> float | None:
  """The dev split's majority-class share where the baseline's chosen rate scores no better
  than always predicting that class (the model did not learn the task at this size, so no
  method is compared there); None where it does better, its selection is not finished, or
  the grid compares methods regardless (``compare_unlearned``)."""
  grid = grid or cells.PROTOCOL
  choice = protocol_choice(setting, model, task, size, grid.baseline, grid)
  if choice is None or grid.compare_unlearned:
    return None
  majority = protocol.majority_share(setting.split_dir(task) / "dev.csv")
  return majority if choice.mean_dev_score <= majority else None


def protocol_majorities(setting: Setting, grid: cells.Protocol) -> dict[tuple[str, str, int],
                                                                        float | None]:
  """:func:`protocol_not_learned` for each model, task and size of the grid."""
  return {group: protocol_not_learned(setting, *group, grid)
          for group in dict.fromkeys(key[:3] for key in grid.keys())}


def protocol_finals(setting: Setting, grid: cells.Protocol | None = None):
  """``{(model, task, size, cell): (RateChoice or None, chosen member or None, {seed:
  validation score})}`` (:func:`protocol_selection`); no scores for a cell whose p the dev
  split did not choose."""
  grid = grid or cells.PROTOCOL
  finals = {}
  for key, (choice, member) in protocol_selection(setting, grid).items():
    finals[key] = (choice, member, protocol_scores(
        setting, *key, "final", choice.rate, grid.seeds_of_final(*key)) if member == key[3] else {})
  return finals


def protocol_comparisons(finals, not_learned, grid: cells.Protocol):
  """``({key: (Comparison at 95%, Comparison at the Bonferroni level or None)}, that level)``
  for every cell but the baseline, from :func:`protocol_finals`. The family is every interval
  the protocol shows: two paired seeds or more, in a task the baseline learned
  (``not_learned``: :func:`protocol_majorities`). Each is drawn at
  1 - 0.05/m: were each exact, all m would hold together with at least 95% probability."""
  compared = {}
  for key, (_, _, scores) in finals.items():
    if key[3] != grid.baseline:
      baseline = finals.get((*key[:3], grid.baseline), (None, None, {}))[2]
      compared[key] = scores, baseline, protocol.compare(scores, baseline)
  family = {key for key, (_, _, comparison) in compared.items()
            if comparison.seeds >= 2 and not_learned[key[:3]] is None}
  level = protocol.bonferroni_level(len(family))
  return {key: (comparison, protocol.compare(scores, baseline, level=level)
                if key in family else None)
          for key, (scores, baseline, comparison) in compared.items()}, level


def protocol_table(setting: Setting, grid: cells.Protocol | None = None) -> Table:
  """Each method at its own learning rate, chosen on the dev split; scored on validation."""
  grid = grid or cells.PROTOCOL
  table = Table("protocol", "Each method at the learning rate its dev split chose: validation "
                "accuracy, and the paired difference to vanilla with its 95% bootstrap interval",
                ["Model", "Task", "Train size", "Method", "Dev accuracy by rate", "Rate", "Seeds",
                 "Accuracy: mean (std)", "Δ vs vanilla [95% CI]", "Reading",
                 "Reading, Bonferroni"])
  finals = protocol_finals(setting, grid)
  not_learned = protocol_majorities(setting, grid)
  comparisons, level = protocol_comparisons(finals, not_learned, grid)
  for (model, task, size, cell), (choice, member, scores) in finals.items():
    dev = protocol_dev_scores(setting, model, task, size, cell, grid=grid)
    dev_text = ", ".join(f"{rate:g}: {100 * np.mean(v):.1f}"
                         + ("*" if choice and rate == choice.rate else "")
                         for rate, v in dev.items() if v) or "–"
    values = [100 * v for v in scores.values()]
    comparison, adjusted = comparisons.get((model, task, size, cell), (None, None))
    rate_text = "–" if choice is None else f"{choice.rate:g}" + (
        "" if choice.bracketed else " (grid end)")
    majority = not_learned[(model, task, size)]
    reading = "" if comparison is None else comparison.verdict
    if member not in (None, cell):  # another p of this method was chosen: no finals here
      comparison = None
      reading = f"p not chosen: the dev split chose {cells.CELLS[member].label}"
    elif choice is not None and member is None:  # another p's selection is not finished
      comparison = None
      reading = "p not chosen yet: another p's selection is not finished"
    if majority is not None:  # nothing to compare: the task was not learned
      comparison = None
      reading = (f"not learned: dev at the majority class's {100 * majority:.1f}; no finals"
                 if cell == grid.baseline else "not run: the baseline did not learn the task")
    table.rows.append([
        model, cells.TASKS[task].label, str(size), cells.CELLS[cell].label, dev_text, rate_text,
        str(len(values)),
        f"{np.mean(values):.2f} ({np.std(values, ddof=1):.2f})" if len(values) > 1 else
        (f"{values[0]:.2f}" if values else "–"),
        "" if comparison is None else comparison.text(), reading,
        "" if adjusted is None else adjusted.verdict])
    table.raw.append({
        "model": model, "task": task, "train_size": size, "cell": cell,
        "rate": None if choice is None else choice.rate,
        "bracketed": None if choice is None else choice.bracketed,
        **{f"dev_lr_{rate:g}": float(np.mean(v)) for rate, v in dev.items() if v},
        "seeds": len(values), "mean": float(np.mean(values)) if values else None,
        "majority_not_beaten": majority,
        "std": float(np.std(values, ddof=1)) if len(values) > 1 else None,
        **({} if comparison is None else {
            "delta": comparison.mean, "delta_low": comparison.low, "delta_high": comparison.high,
            "seeds_paired": comparison.seeds, "seeds_better": comparison.wins}),
        "reading": reading or None,
        **{f"seed_{seed}": value for seed, value in scores.items()},
        **({} if adjusted is None else {
            "bonferroni_low": adjusted.low, "bonferroni_high": adjusted.high,
            "bonferroni_reading": adjusted.verdict})})
  table.notes.append(
      f"Dev accuracy by rate: the mean over selection seeds {list(grid.selection_seeds)} of "
      f"each learning rate's runs, scored on {grid.dev_size} examples carved out of the "
      "training data (never trained on); * marks the rate taken, \"grid end\" one the grid "
      "did not bracket. The final seeds run at that rate and are scored on the validation set, "
      "which no choice looked at. Δ vs vanilla: the mean per-seed difference in points (a seed "
      "fixes the training subset, the head's initialisation and the data order) and its 95% "
      "percentile bootstrap interval; the reading says helps or hurts only where the interval "
      "excludes 0. Where vanilla's chosen rate scores no better on the dev split than always "
      "predicting its most frequent class, the model did not learn the task at that size: "
      "nothing is compared there, and the other methods do not run. Where a method runs at "
      "several p, p is chosen like the rate: the p whose chosen rate has the best mean dev "
      "score runs the final seeds, the others none.")
  family = sum(adjusted is not None for _, adjusted in comparisons.values())
  if family:
    table.notes.append(
        f"Reading, Bonferroni: the verdict of the same bootstrap at level {100 * level:.2f}% "
        f"(1 - 0.05/{family}, for the {family} intervals of this table): together they cover "
        f"all {family} true differences with about 95% probability, where {family} separate 95% "
        "intervals can be expected to miss about one in twenty. With ten seeds, a percentile "
        "bootstrap's far tails are themselves approximate.")
  return table


def protocol_figure(setting: Setting, path: Path, grid: cells.Protocol | None = None) -> Path:
  """Each method's paired difference to vanilla with its interval, per model, task and size."""
  grid = grid or cells.PROTOCOL
  plt = _pyplot()
  finals = protocol_finals(setting, grid)
  others = list(dict.fromkeys(key[3] for key in finals if key[3] != grid.baseline))
  not_learned = protocol_majorities(setting, grid)
  pairs, level = protocol_comparisons(finals, not_learned, grid)
  comparisons = {}  # {group: {cell: (Comparison, Bonferroni's)}}, the groups with something to show
  for key, (comparison, adjusted) in pairs.items():
    if adjusted is not None:
      comparisons.setdefault(key[:3], {})[key[3]] = comparison, adjusted
  groups = list(comparisons)
  figure, axis = plt.subplots(figsize=(max(6, 1.6 * len(groups)), 4.5))
  axis.axhline(0, color="grey", linewidth=1)
  labelled = set()
  methods = list(dict.fromkeys(cells.CELLS[cell].method for cell in others))
  for index, group in enumerate(groups):
    present = sorted((cell for cell in others if cell in comparisons[group]),  # CT-F's p, then CT-D's
                     key=lambda cell: methods.index(cells.CELLS[cell].method))
    width = 0.8 / max(1, len(present))
    for number, cell in enumerate(present):  # centred on the group's tick
      comparison, adjusted = comparisons[group][cell]
      x = index - 0.4 + width * (number + 0.5)
      for interval, style in ((adjusted, {"linewidth": 0.8, "alpha": 0.45, "capsize": 6}),
                              (comparison, {"capsize": 3})):  # Bonferroni's thin, behind
        axis.errorbar(x, 100 * interval.mean, yerr=[[100 * (interval.mean - interval.low)],
                                                    [100 * (interval.high - interval.mean)]],
                      fmt="o", color=f"C{others.index(cell)}", **style,
                      label=(None if cell in labelled or interval is adjusted
                             else cells.CELLS[cell].label))
      labelled.add(cell)
  axis.set_xticks(range(len(groups)), [f"{model}\n{cells.TASKS[task].label.split(' (')[0]}\n"
                                       f"{size} examples" for model, task, size in groups],
                  fontsize=7)
  axis.set_ylabel("Δ validation accuracy vs vanilla (points)")
  axis.set_title("Paired difference to vanilla (each method at its own rate):\n95% bootstrap "
                 f"interval (thick) and Bonferroni's {100 * level:.2f}% (thin)",
                 fontsize=9)
  if axis.get_legend_handles_labels()[0]:
    axis.legend(fontsize=7)
  figure.tight_layout()
  figure.savefig(path, dpi=120)
  plt.close(figure)
  return path


def table5_ablations(setting: Setting) -> Table:
  """Table 5: the child network matters (prune / random / lowest Fisher vs CT-D)."""
  table = Table("ablations", "Ablations of CT-D (p=0.3): validation accuracy",
                ["Method", "Seeds", "Accuracy: mean (max)", "Δ vs vanilla (seeds better)"])
  baseline = scores_of(setting, "vanilla")
  rows = [("Vanilla", scores_of(setting, "vanilla")),
          ("Prune (CT-D's weights outside the child network set to 0 at evaluation)",
           scores_of(setting, "ct_d_0.3", "eval_pruned_accuracy")),
          (cells.CELLS["ct_d_random"].label, scores_of(setting, "ct_d_random")),
          (cells.CELLS["ct_d_lowest"].label, scores_of(setting, "ct_d_lowest")),
          (cells.CELLS["ct_d_0.3"].label, scores_of(setting, "ct_d_0.3"))]
  for label, scores in rows:
    delta, wins, shared = paired_delta(scores, baseline)
    table.rows.append([label, str(len(scores)), mean_max(list(scores.values())),
                       "" if label == "Vanilla" else _delta_text(delta, wins, shared)])
    table.raw.append({"method": label, "seeds": len(scores),
                      "mean": np.mean(list(scores.values())) if scores else None,
                      "max": max(scores.values()) if scores else None,
                      "delta_vs_vanilla": None if label == "Vanilla" else delta,
                      **{f"seed_{seed}": value for seed, value in scores.items()}})
  return table


def table2_domain(setting: Setting) -> Table:
  """Table 2: trained on Rotten Tomatoes, evaluated in and out of domain."""
  sets = [("eval_accuracy", "Rotten Tomatoes (in-domain)")] + [
      (f"eval_{name}_accuracy", label) for name, label in cells.OUT_OF_DOMAIN.items()]
  table = Table("domain", "Domain generalisation: trained on Rotten Tomatoes (1k), accuracy "
                "mean (max) on each set", ["Method", "Seeds", *(label for _, label in sets),
                                           "Out-of-domain average", "Δ average vs vanilla"])
  baseline = _ood_average(setting, "vanilla")
  for name in cells.EXPERIMENT_CELLS["domain"]:
    columns = [scores_of(setting, name, key) for key, _ in sets]
    average = _ood_average(setting, name)
    delta, wins, shared = paired_delta(average, baseline)
    table.rows.append([cells.CELLS[name].label, str(len(average)),
                       *(mean_max(list(c.values())) for c in columns),
                       mean_max(list(average.values())),
                       "" if name == "vanilla" else _delta_text(delta, wins, shared)])
    table.raw.append({"method": cells.CELLS[name].label, "seeds": len(average),
                      **{label: np.mean(list(c.values())) if c else None
                         for (_, label), c in zip(sets, columns)},
                      "ood_average": np.mean(list(average.values())) if average else None,
                      "delta_ood_average": None if name == "vanilla" else delta})
  table.notes.append("Out-of-domain sets: the VADER ground-truth snippets (Amazon product "
                     "reviews, New York Times editorials, tweets), binary by the sign of the mean "
                     "human rating. The VADER movie snippets are left out: most of them are also "
                     "in the Rotten Tomatoes data.")
  return table


def _ood_average(setting: Setting, cell: str) -> dict[int, float]:
  columns = [scores_of(setting, cell, f"eval_{name}_accuracy") for name in cells.OUT_OF_DOMAIN]
  seeds = set.intersection(*(set(c) for c in columns)) if columns else set()
  return {seed: float(np.mean([c[seed] for c in columns])) for seed in sorted(seeds)}


_BUDGETS = {
    arguments.PUBLISHED_ALWAYS_TRAINABLE: "embeddings, pooler and head trained in full, p the "
    "fraction of the encoder blocks' entries (the published code's budget)",
    "^classifier/": "the head trained in full, every other parameter competing for p of the "
    "entries",
}


def _budget(run_args: Sequence[Path]) -> str:
  """What CT-D's p was a fraction of, read from the CT-D runs' recorded flags."""
  patterns = sorted({json.loads(f.read_text()).get("always_trainable", "") for f in run_args
                     if json.loads(f.read_text()).get("mode") == "ChildTuning-D"}, key=str)
  return "; ".join(_BUDGETS.get(p, f"trained in full: `--always_trainable {p}`")
                   for p in patterns) or "no CT-D run"


def child_network_layers(setting: Setting, path: Path) -> Table:
  """Per-layer keep fraction of the CT-D child networks (mean over seeds)."""
  fractions, patterns = {}, set()
  for name in cells.EXPERIMENT_CELLS["layers"]:
    files = sorted((setting.root / "runs" / name).glob("seed_*/mask_keep_fractions.json"))
    per_seed = [json.loads(f.read_text())["per_layer"] for f in files]
    for f in files:
      run_args = f.parent / "run_args.json"
      if run_args.is_file():
        patterns.add(json.loads(run_args.read_text()).get("always_trainable"))
    if per_seed:
      fractions[name] = {group: float(np.mean([p[group] for p in per_seed])) for group in per_seed[0]}
  groups = list(next(iter(fractions.values()), {}))
  table = Table("layers", "Where CT-D's child network lies: the fraction of each part's "
                "entries in the child network (mean over seeds)",
                ["Part", *(cells.CELLS[name].label for name in fractions)])
  for group in groups:
    table.rows.append([group, *(f"{fractions[name][group]:.3f}" for name in fractions)])
    table.raw.append({"part": group, **{name: fractions[name][group] for name in fractions}})
  if patterns:
    table.notes.append("Trained in full: the parameters matching `--always_trainable` ("
                       + ", ".join(f"`{p}`" for p in sorted(patterns, key=str)) + "); the rest "
                       "competes for one global budget of p × (its number of entries).")
  if fractions:
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(8, 3.8))
    width = 0.8 / len(fractions)
    for offset, name in enumerate(fractions):
      axis.bar(np.arange(len(groups)) + offset * width, [fractions[name][g] for g in groups],
               width, label=cells.CELLS[name].label)
    axis.set_xticks(np.arange(len(groups)) + 0.4 - width / 2, groups, rotation=30, ha="right")
    axis.set_ylabel("fraction in the child network")
    axis.set_title("CT-D child network by layer (MiniLM-L6, Rotten Tomatoes)")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
  return table



# ----------------------------------------------------------------------------- Figure 3: overlap


def _encoder_mask(path: Path) -> dict[str, np.ndarray]:
  """A saved child network without the head (whose shape differs between tasks)."""
  with np.load(path) as data:
    return {name: data[name] for name in sorted(data.files) if not name.startswith("classifier/")}


def figure3_overlap(masks: dict[str, Path], path: Path) -> Table:
  """Figure 3: the Jaccard overlap of the child networks of several tasks (a heatmap), from
  ``{task label: mask.npz}``."""
  masks = {label: _encoder_mask(file) for label, file in masks.items() if file.exists()}
  labels = list(masks)
  matrix = np.array([[mask_jaccard(masks[a], masks[b]) for b in labels] for a in labels])
  chance = cells.OVERLAP_P ** 2 / (2 * cells.OVERLAP_P - cells.OVERLAP_P ** 2)  # two independent random masks
  table = Table("overlap", f"Jaccard overlap of the CT-D child networks (p={cells.OVERLAP_P})",
                ["", *labels])
  for label, row in zip(labels, matrix):
    table.rows.append([label, *(f"{v:.3f}" for v in row)])
    table.raw.append({"task": label, **dict(zip(labels, row))})
  table.notes.append(f"Two independent random child networks of this size overlap by "
                     f"{chance:.3f} in expectation. The head is left out (its shape differs "
                     "between binary and rating tasks).")
  if labels:
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(7, 6))
    image = axis.imshow(matrix, cmap="viridis", vmin=chance, vmax=1)
    for (i, j), value in np.ndenumerate(matrix):
      axis.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=8,
                color="white" if value < (1 + chance) / 2 else "black")
    axis.set_xticks(range(len(labels)), labels, rotation=40, ha="right", fontsize=8)
    axis.set_yticks(range(len(labels)), labels, fontsize=8)
    figure.colorbar(image, label=f"Jaccard (colour scale from chance, {chance:.2f})")
    axis.set_title(f"Overlap of CT-D child networks (p={cells.OVERLAP_P}), MiniLM-L6")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
  return table


# ----------------------------------------------------------------------------- Figure 2: probe


def figure2_probe(scores: dict[str, dict[str, dict[int, float]]], probe_examples: int,
                  path: Path) -> Table:
  """Figure 2: linear probes of the fine-tuned encoders on other tasks, from the probe's
  ``{task: {encoder: {seed: score}}}``."""
  encoders = list(next(iter(scores.values())))
  table = Table("probe", "Task generalisation: a linear probe on the frozen encoder fine-tuned "
                "on Rotten Tomatoes, mean (max) over fine-tuning seeds",
                ["Encoder", *scores])
  for encoder in encoders:
    table.rows.append([encoder, *(mean_max(list(scores[task][encoder].values())) for task in scores)])
    table.raw.append({"encoder": encoder, **{task: np.mean(list(scores[task][encoder].values()))
                                             if scores[task][encoder] else None for task in scores}})
  table.notes.append(f"Probe: logistic regression (accuracy) or ridge regression (Pearson, for "
                     f"the rating task) on the head's input features, trained on "
                     f"{probe_examples} examples of the target task and tested on "
                     f"{probe_examples} others.")
  plt = _pyplot()
  figure, axes = plt.subplots(1, len(scores), figsize=(3.2 * len(scores), 3.6))
  for axis, task in zip(np.atleast_1d(axes), scores):
    for index, encoder in enumerate(encoders):
      values = list(scores[task][encoder].values())
      if values:
        axis.bar(index, np.mean(values), color=f"C{index}")
        axis.scatter(np.full(len(values), index), values, s=10, color="black", zorder=3)
    values = [v for e in encoders for v in scores[task][e].values()]
    if values:
      spread = max(values) - min(values)
      axis.set_ylim(min(values) - spread - 1, max(values) + 0.5 * spread + 1)
    axis.set_xticks(range(len(encoders)), [e.split(" (no")[0] for e in encoders], rotation=40,
                    ha="right", fontsize=8)
    axis.set_title(task, fontsize=10)
  np.atleast_1d(axes)[0].set_ylabel("probe score (accuracy or Pearson, %)")
  figure.suptitle("Linear probes of encoders fine-tuned on Rotten Tomatoes (dots: seeds)")
  figure.tight_layout()
  figure.savefig(path, dpi=120)
  plt.close(figure)
  return table



# ----------------------------------------------------------------------------- RESULTS.md

READING_START, READING_END = "<!-- reading -->", "<!-- /reading -->"
FIGURES = {"protocol": "protocol.png", "methods": "methods.png", "layers": "layers.png", "overlap": "overlap.png",
           "probe": "probe.png"}


def has_runs(setting: Setting, experiment: str) -> bool:
  """Whether any finished run (or child network) of ``experiment`` is on disk."""
  if experiment == "protocol":
    return any((setting.root / "protocol").glob("*/*/*/*/*/*/all_results.json"))
  if experiment == "overlap":
    return any((setting.overlap_dir(relative, seed) / "mask.npz").exists()
               for relative, seed in cells.OVERLAP_TASKS.values())
  return any(results_of(setting, name) for name in cells.EXPERIMENT_CELLS.get(experiment, []))


def write_tables(setting: Setting, experiments: Sequence[str]) -> None:
  """The tables and figures of these experiments (``protocol``, ``methods``, ``ablations``,
  ``domain``, ``layers``; ``overlap`` from the child networks on disk) into ``results_dir``.
  An experiment with no finished run on disk keeps the files it has there (a report from
  another machine's runs is not replaced by empty tables)."""
  out = setting.results_dir
  out.mkdir(parents=True, exist_ok=True)
  known = ("protocol", "methods", "ablations", "domain", "layers", "overlap")
  experiments = [experiment for experiment in experiments if experiment in known]
  for experiment in experiments:
    if not has_runs(setting, experiment):
      logger.info("no runs of %s under %s: its tables and figures are left as they are",
                  experiment, setting.root)
  experiments = [experiment for experiment in experiments if has_runs(setting, experiment)]
  if "protocol" in experiments:
    protocol_table(setting).write(out)
    protocol_compute(setting).write(out)
    protocol_figure(setting, out / FIGURES["protocol"])
  if "methods" in experiments:
    table3_methods(setting).write(out)
    table3_methods_figure(setting, out / FIGURES["methods"])
  if "ablations" in experiments:
    table5_ablations(setting).write(out)
  if "domain" in experiments:
    table2_domain(setting).write(out)
  if "layers" in experiments:
    child_network_layers(setting, out / FIGURES["layers"]).write(out)
  if "overlap" in experiments:
    masks = {label: setting.overlap_dir(relative, seed) / "mask.npz"
             for label, (relative, seed) in cells.OVERLAP_TASKS.items()}
    figure3_overlap(masks, out / FIGURES["overlap"]).write(out)


SECTIONS = [
    ("methods", "Child-Tuning against vanilla fine-tuning and five prior methods (paper Tables 3 and 4)",
     "`python -m train.experiments methods`. The paper's low-resource setting (1k training "
     "examples, its Table 4) is this table's setting. CT-F at p ∈ {0.2, 0.3, 0.4}, CT-D at "
     "p ∈ {0.1, 0.2, 0.3}; each prior method at one point of the paper's grid (not tuned); "
     "CT-D + R3F for the orthogonality claim."),
    ("ablations", "Is the Fisher-chosen child network what matters? (paper Table 5)",
     "`python -m train.experiments ablations`."),
    ("domain", "Domain generalisation (paper Table 2)", "`python -m train.experiments domain`."),
    ("probe", "Task generalisation (paper Figure 2)", "`python -m train.experiments probe`."),
    ("overlap", "Child networks of different tasks (paper Figure 3)",
     "`python -m train.experiments overlap`."),
    ("layers", "Where the child network lies", "`python -m train.experiments layers`."),
]
PROTOCOL_SECTION = (
    "protocol", "Each method at its own learning rate, two training sizes, sentence pairs, "
    "intervals",
    "`python -m train.experiments protocol --jobs 2`. For each task, training-set size and "
    "method, a grid of learning rates runs on a dev split carved out of the training data; "
    "the best rate by mean dev accuracy is taken (the grid is extended where it does not "
    "bracket it), and fresh seeds at that rate are scored on the untouched validation set.")
EARLIER_START, EARLIER_END = "<!-- earlier-setting -->", "<!-- /earlier-setting -->"


def _kept(path: Path, start: str, end: str, default: str) -> str:
  """The text between two markers of an existing file (``default`` where there is none)."""
  if path.exists():
    text = path.read_text()
    if start in text and end in text:
      return text[text.index(start) + len(start):text.index(end)].strip()
  return default


def _span(counts) -> str:
  counts = list(counts)
  low, high = min(counts, default=0), max(counts, default=0)
  return str(low) if low == high else f"{low} to {high}"


def _minutes(seconds: float) -> str:
  return f"{seconds / 60:.0f} min"


def _seeds_text(seeds: Sequence[int]) -> str:
  seeds = list(seeds)
  contiguous = seeds == list(range(seeds[0], seeds[-1] + 1))
  return f"{seeds[0]}–{seeds[-1]}" if contiguous and len(seeds) > 2 else ", ".join(map(str, seeds))


def protocol_compute(setting: Setting, grid: cells.Protocol | None = None) -> Table:
  """The protocol's finished runs and their summed wall time, per model, task and size."""
  grid = grid or cells.PROTOCOL
  table = Table("protocol_compute", "Compute spent on the protocol: finished runs and their "
                "summed wall time", ["Model", "Task", "Train size", "Selection runs",
                                     "Final runs", "Fine-tuning (summed)"])
  totals = {"select": 0, "final": 0, "seconds": 0.0}
  for model, task, size in dict.fromkeys(key[:3] for key in grid.keys()):
    base = setting.root / "protocol" / model / f"{task}_{size}"
    counts = {stage: len(list(base.glob(f"*/{stage}/*/*/all_results.json")))
              for stage in ("select", "final")}
    seconds = sum(json.loads(path.read_text())["wall_seconds"]
                  for path in base.glob("*/*/*/*/wall_seconds.json"))
    table.rows.append([model, cells.TASKS[task].label, str(size), str(counts["select"]),
                       str(counts["final"]), _minutes(seconds)])
    table.raw.append({"model": model, "task": task, "train_size": size, **counts,
                      "seconds": seconds})
    totals = {"select": totals["select"] + counts["select"],
              "final": totals["final"] + counts["final"], "seconds": totals["seconds"] + seconds}
  planned = sum(len(grid.selection_seeds) * len(grid.rates_of(*key)) for key in grid.keys())
  unlearned = {group for group, majority in protocol_majorities(setting, grid).items()
               if majority is not None}
  finals = sum(len(grid.seeds_of_final(*key)) for key in grid.keys()  # one p of each method
               if key[:3] not in unlearned and grid.family(*key)[0] == key[3])
  # Finals of a p the dev split did not choose (run before the p grid was whole): spent, not planned.
  unchosen = sum(len(list((setting.protocol_cell_dir(*key) / "final").glob("*/*/all_results.json")))
                 for key, (_, member) in protocol_selection(setting, grid).items()
                 if member not in (None, key[3]))
  table.rows.append(["all", "", "", f"**{totals['select']}** (the first grids plan {planned}, "
                     "before any extension)", f"**{totals['final'] - unchosen}** of {finals}"
                     + (" (none where the task was not learned)" if unlearned else "")
                     + (f", and {unchosen} of a p the dev split did not choose" if unchosen else ""),
                     f"**{_minutes(totals['seconds'])}**"])
  table.notes.append(f"Wall time as each trainer process measured it, on {machines(setting)}; "
                     "with `--jobs 2` two processes share the CPU, so each run takes longer and "
                     "the campaign about half the summed time.")
  return table


def _method_label(cell: str) -> str:
  """A cell's label, without its p where the protocol may choose p (its ``family``)."""
  label = cells.CELLS[cell].label
  return label if cells.CELLS[cell].family is None else label.split(" (")[0] + " (the p chosen)"


def _protocol_setting(setting: Setting, grid: cells.Protocol) -> list[str]:
  """The protocol's setting, from its grid and the runs' recorded flags."""
  tasks = "; ".join(
      f"{task.label}, {task.max_seq_length} tokens"
      + (f" (the dev split keeps each `{task.group_by}` on one side)" if task.group_by else "")
      for task in (cells.TASKS[name] for name in grid.tasks()))
  lines = [
      "- Models: `minilm` is all-MiniLM-L6-v2 (the embedded default); `mpnet` is "
      "all-mpnet-base-v2 (from its PyPI wheels, `prepare_data --mpnet`).",
      f"- Tasks (`train.prepare_data`): {tasks}.",
      "- The grid:"]
  for study in grid.studies:
    lines.append(
        f"  - {study.model} on {', '.join(cells.TASKS[t].label.split(' (')[0] for t in study.tasks)}"
        f" at {' and '.join(map(str, study.sizes))} training examples: "
        f"{', '.join(cells.CELLS[c].label for c in study.cells)}; learning rates "
        f"{', '.join(f'{rate:g}' for rate in study.rates)} to start.")
  lines += [
      f"- Selection: each rate runs seeds {_seeds_text(grid.selection_seeds)}, each on its own "
      "random subset of the training pool, scored on a dev split of "
      f"{grid.dev_size} examples carved out of the training data (not in the pool). The rate "
      "with the best mean dev score is taken; where it is at the grid's end the grid grows a "
      f"step that way, {grid.max_rate_steps} steps at most."
      + (" Where a method runs at several p, p is chosen the same way: the p whose chosen rate "
         "has the best mean dev score runs the final seeds, the others none."
         if any(len(grid.family(*key)) > 1 for key in grid.keys()) else ""),
      f"- Finals at the chosen rate: seeds {_seeds_text(grid.headline_seeds)} for "
      + " and ".join([", ".join(_method_label(cell) for cell in grid.headline_cells)
                      + " everywhere"] * bool(grid.headline_cells)
                     + [f"every method on {model}'s {cells.TASKS[task].label.split(' (')[0]} "
                        f"at {size}" for model, task, size in grid.headlines])
      + f"; {_seeds_text(grid.final_seeds)} elsewhere; "
      f"scored on the first {setting.max_eval_samples} examples of the validation set.",
      f"- A task not learned: where {cells.CELLS[grid.baseline].label}'s chosen rate scores no "
      "better on the dev split than always predicting its most frequent class, that model, "
      "task and size stop after its selection: no final runs, no other method.",
      f"- Training: {setting.num_train_epochs:g} epochs, batch "
      f"{setting.per_device_train_batch_size}, AdamW (eps 1e-6) with 10% warmup and linear "
      "decay, gradient clipping at 1. CT-D's Fisher information from "
      f"{setting.fisher_num_examples} training examples, per example (Eq. 10); "
      f"{_budget(sorted(setting.root.glob('protocol/*/*/*/*/*/*/run_args.json')))}.",
      "", "Commands (`--jobs 2` runs two trainer processes side by side, as we did on 2 cores):",
      "", "```", "python -m train.prepare_data --output_dir data --mpnet",
      "python -m train.experiments protocol --jobs 2", "python -m train.experiments report",
      "```", ""]
  return lines


def _earlier_setting(setting: Setting) -> str:
  """The setting of the one-rate experiments, from their runs."""
  seeds = {name: len(results_of(setting, name)) for name in cells.CELLS}
  out = setting.results_dir
  overlap_seconds = sum(json.loads(p.read_text())["wall_seconds"]
                        for p in (setting.root / "overlap").glob("*/wall_seconds.json"))
  probe_file = out / "probe_seconds.json"
  probe_seconds = json.loads(probe_file.read_text())["seconds"] if probe_file.exists() else 0.0
  all_cells = [n for e in ("methods", "ablations") for n in cells.EXPERIMENT_CELLS[e]]
  timed = sum(1 for n in dict.fromkeys(all_cells)
              for _ in (setting.root / "runs" / n).glob("seed_*/wall_seconds.json"))
  experiments = [e for e in cells.EXPERIMENT_CELLS if e != "protocol"]
  return "\n".join([
      f"- {setting.max_train_samples} training examples of Rotten Tomatoes (a random subset per "
      f"seed: the paper's low-resource setting), {setting.max_seq_length} tokens, "
      f"{setting.num_train_epochs:g} epochs, batch {setting.per_device_train_batch_size}, "
      f"AdamW (eps 1e-6) at {setting.learning_rate:.0e} with 10% warmup and linear decay, "
      "gradient clipping at 1.",
      f"- Evaluation on the first {setting.max_eval_samples} of the held-out Rotten Tomatoes "
      "reviews (whole movies held out).",
      f"- CT-D's Fisher information from {setting.fisher_num_examples} of the training examples, "
      f"per example (Eq. 10); "
      f"{_budget(sorted((setting.root / 'runs').glob('*/seed_*/run_args.json')))}.",
      f"- Seeds per cell: {_span(seeds[n] for n in all_cells)}. A seed fixes the training "
      "subset, the head's initialisation, the data order, dropout and CT-F's masks.", "",
      "```", "python -m train.prepare_data --output_dir data",
      f"python -m train.experiments {' '.join(experiments)} report --seeds "
      f"{max(seeds.values(), default=0)}", "```", "",
      f"Wall time: fine-tuning runs {_minutes(wall_seconds(setting, all_cells))} summed over "
      f"the {timed} of {sum(seeds[n] for n in dict.fromkeys(all_cells))} runs with a recorded time "
      "(with `--jobs 2` two share the CPU, so each takes longer and the campaign less), "
      "child networks for the overlap "
      f"{_minutes(overlap_seconds)}, probes {_minutes(probe_seconds)}; on {machines(setting)}."])


def _section(out: Path, relative: str, level: str, name: str, title: str, how: str) -> list[str]:
  lines = [f"{level} {title}", "", how, ""]
  table = out / f"{name}.md"
  if table.exists():
    lines += [table.read_text().rstrip(), "", f"CSV: [{name}.csv]({relative}/{name}.csv)", ""]
  else:
    lines += ["Not run yet.", ""]
  figure = out / FIGURES.get(name, "-")
  if name in FIGURES and figure.exists():
    lines += [f"![{title}]({relative}/{FIGURES[name]})", ""]
  return lines


def write_results_md(setting: Setting, grid: cells.Protocol | None = None) -> Path:
  """RESULTS.md from the tables and figures in ``results_dir`` and the runs on disk. Kept from
  an existing RESULTS.md: the hand-written reading between the reading markers, and the
  one-rate experiments' setting where their runs are not on this machine."""
  grid = grid or cells.PROTOCOL
  out, md = setting.results_dir, setting.results_md
  relative = os.path.relpath(out, md.parent)
  earlier = (_earlier_setting(setting)
             if has_runs(setting, "methods") or has_runs(setting, "ablations") else
             _kept(md, EARLIER_START, EARLIER_END, "Their runs are not on this machine."))
  lines = [
      "# Results", "",
      "<!-- Written by `python -m train.experiments report` from the run outputs; only the "
      "reading between the reading markers is written by hand. -->", "",
      "Child-Tuning on real data that works offline, in two parts. **The protocol** tests the "
      "paper's claim the way the paper made it: each method at the learning rate a dev split "
      "chose for it, two low-resource training-set sizes, a sentiment task and two "
      "sentence-pair tasks, a small and a base-size model, and every comparison to vanilla as "
      "a paired difference with its 95% bootstrap interval. **The earlier experiments** ran "
      "every method at one shared learning rate on MiniLM-L6 and Rotten Tomatoes, and "
      "reproduce the paper's other tables (ablations, domain and task generalisation, child "
      "networks). Scores are ×100, as in the paper.", "",
      "## The protocol's setting", "", *_protocol_setting(setting, grid)]
  compute = out / "protocol_compute.md"
  if compute.exists():
    lines += [compute.read_text().rstrip(), ""]
  lines += ["## Reading", "", READING_START,
            _kept(md, READING_START, READING_END, "(No reading written yet.)"), READING_END, ""]
  lines += _section(out, relative, "##", *PROTOCOL_SECTION)
  lines += ["## Earlier experiments: one learning rate for every method", "",
            EARLIER_START, earlier, EARLIER_END, ""]
  for name, title, how in SECTIONS:
    lines += _section(out, relative, "###", name, title, how)
  md.write_text("\n".join(lines))
  return md
