"""What the experiments run: the shared setting, the cells (a method and its flags) and the
child networks of the overlap figure, each turned into the trainer's argument dataclasses.

A cell's flags are field values of ``train.arguments.TrainingArguments``; the setting adds
the data, the model and the shared training flags. :func:`arguments_of` builds the three
argument groups, which validate themselves (a typo or an impossible value fails here, in
the campaign's own process, before any run starts), and :func:`command` writes them as a
``train.run_glue`` command line.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

from train import arguments

TRAIN = "rotten_tomatoes/train.csv"
VALIDATION = "rotten_tomatoes/validation.csv"
OUT_OF_DOMAIN = {"amazon_binary": "Amazon", "nyt_binary": "NYT", "tweets_binary": "Tweets"}


@dataclasses.dataclass(frozen=True)
class Cell:
  """One row of a table: a method, as ``TrainingArguments`` field values (``mode`` included)."""

  name: str
  label: str
  flags: dict[str, Any]
  out_of_domain: bool = False  # also evaluate on the other domains (Table 2's cells)
  keep_checkpoint: bool = False  # the probe reads the fine-tuned encoder from it
  family: str | None = None  # the method whose p this cell fixes (the protocol chooses p)

  @property
  def method(self) -> str:
    """The method this cell runs: its ``family`` where it fixes one p of it, else the cell."""
    return self.family or self.name


def _ct_f(p):
  return Cell(f"ct_f_{p}", f"CT-F (p={p})", {"mode": "ChildTuning-F", "reserve_p": p},
              out_of_domain=p == 0.3, keep_checkpoint=p == 0.3, family="ct_f")


def _ct_d(p, name=None, label=None, **extra):
  main = p == 0.3 and not extra  # the CT-D cell of the ablations, domain and probe
  return Cell(name or f"ct_d_{p}", label or f"CT-D (p={p})",
              {"mode": "ChildTuning-D", "reserve_p": p, **extra, "prune_at_eval": main},
              out_of_domain=main, keep_checkpoint=main,
              family=None if name or extra else "ct_d")


# One point of each prior method's grid in the paper (Appendix C), not tuned here.
CELLS = {cell.name: cell for cell in [
    Cell("vanilla", "Vanilla", {"mode": "vanilla"}, out_of_domain=True, keep_checkpoint=True),
    _ct_f(0.2), _ct_f(0.3), _ct_f(0.4),
    _ct_d(0.1), _ct_d(0.2), _ct_d(0.3),
    Cell("weight_decay", "Weight Decay (λ=0.1)", {"mode": "vanilla", "decay_to_pretrained": 0.1}),
    Cell("top_k", "Top-K (K=3 of 6)", {"mode": "vanilla", "top_k_layers": 3}),
    Cell("mixout", "Mixout (p=0.3)", {"mode": "vanilla", "mixout_p": 0.3}),
    Cell("recadam", "RecAdam (k=0.1, t0=50)", {"mode": "vanilla", "recadam_k": 0.1, "recadam_t0": 50}),
    # The protocol's RecAdam: a pull of learning rate x strength below 1 over its whole rate grid.
    Cell("recadam_500", "RecAdam (k=0.1, t0=50, strength 500)",
         {"mode": "vanilla", "recadam_k": 0.1, "recadam_t0": 50, "recadam_strength": 500.0}),
    Cell("r3f", "R3F (σ=0.1, normal)", {"mode": "vanilla", "r3f_sigma": 0.1}),
    _ct_d(0.3, name="ct_d_r3f", label="CT-D (p=0.3) + R3F (σ=0.1)", r3f_sigma=0.1),
    _ct_d(0.3, name="ct_d_random", label="Random (p=0.3)", child_network="random"),
    _ct_d(0.3, name="ct_d_lowest", label="Lowest Info. (p=0.3)", child_network="lowest_fisher"),
]}

# The cells each experiment runs (the overlap figure runs child networks only: OVERLAP_TASKS).
EXPERIMENT_CELLS = {
    "methods": ["vanilla", "ct_f_0.2", "ct_f_0.3", "ct_f_0.4", "ct_d_0.1", "ct_d_0.2", "ct_d_0.3",
                "weight_decay", "top_k", "mixout", "recadam", "r3f", "ct_d_r3f"],
    "ablations": ["vanilla", "ct_d_0.3", "ct_d_random", "ct_d_lowest"],
    "domain": ["vanilla", "ct_f_0.3", "ct_d_0.3"],
    "probe": ["vanilla", "ct_f_0.3", "ct_d_0.3"],
    "layers": ["ct_d_0.1", "ct_d_0.2", "ct_d_0.3"],
    "overlap": [],
    "protocol": [],  # its own grid: PROTOCOL
}

# Figure 3: name -> (training file under data_dir, seed); each a CT-D child network (p=0.3)
# from the Fisher information of a task; Rotten Tomatoes twice, with different subsets.
OVERLAP_TASKS = {
    "Rotten Tomatoes": (TRAIN, 0),
    "Rotten Tomatoes (other 1k)": (TRAIN, 1),
    "VADER movies (rating)": ("vader/movie_regression.csv", 0),
    "Amazon": ("vader/amazon_binary.csv", 0),
    "NYT": ("vader/nyt_binary.csv", 0),
    "NYT (rating)": ("vader/nyt_regression.csv", 0),
    "Tweets": ("vader/tweets_binary.csv", 0),
}
OVERLAP_P = 0.3


@dataclasses.dataclass(frozen=True)
class Task:
  """A data set of the protocol experiment: CSV files under the data directory
  (``train.prepare_data``'s), the tokens its examples need, and the column whose equal
  values must stay on one side of the dev split (a claim with several evidence pairs)."""

  name: str
  label: str
  train: str
  validation: str
  max_seq_length: int
  group_by: str | None = None


TASKS = {task.name: task for task in [
    Task("rotten_tomatoes", "Rotten Tomatoes (sentiment)", TRAIN, VALIDATION, 48),
    Task("epistemic_reasoning", "Epistemic reasoning (entailment, pairs)",
         "epistemic_reasoning/train.csv", "epistemic_reasoning/validation.csv", 128),
    Task("vitaminc", "VitaminC (fact verification, pairs, 3 classes)", "vitaminc/train.csv",
         "vitaminc/validation.csv", 128, group_by="sentence2"),
]}


# The protocol's models: the embedded all-MiniLM-L6-v2 (None: the trainer's default), and
# all-mpnet-base-v2 as `python -m train.prepare_data --mpnet` writes it under the data directory.
MODELS = {"minilm": None, "mpnet": "models/all-mpnet-base-v2"}


@dataclasses.dataclass(frozen=True)
class Study:
  """A block of the protocol's grid: a model, its tasks, training-set sizes and methods, and
  the learning rates its selection starts from."""

  model: str
  tasks: tuple[str, ...]
  sizes: tuple[int, ...]
  cells: tuple[str, ...]
  rates: tuple[float, ...]


HEADLINE_CELLS = ("vanilla", "ct_f_0.3", "ct_d_0.3")
PRIOR_CELLS = ("weight_decay", "top_k", "mixout", "recadam_500", "r3f")


@dataclasses.dataclass(frozen=True)
class Protocol:
  """The protocol experiment's grid (issue 18): for every study's model, task, training-set
  size and method, each learning rate runs ``selection_seeds`` on the dev split carved out of
  the training data; the rate with the best mean dev score is taken (the grid is extended by
  a step where that rate is at its end, ``max_rate_steps`` times at most), and then
  ``final_seeds`` (``headline_seeds`` for the ``headline_cells`` and at each of ``headlines``)
  run at that rate and are scored on the untouched validation set. Where a model, task and
  size list one method at several p (cells of one ``Cell.family``), p is chosen the same way:
  the member whose chosen rate has the best mean dev score (ties: the first listed) runs the
  final seeds, the others none.

  A comparison needs a task the model learns: where the ``baseline``'s chosen rate scores no
  better on the dev split than always predicting its most frequent class, that model, task
  and size stop there (no final runs, no other method), and the report says so."""

  studies: tuple[Study, ...] = (
      Study("minilm", ("rotten_tomatoes", "epistemic_reasoning"), (1000, 300),
            HEADLINE_CELLS, (1e-4, 3e-4, 1e-3)),
      Study("minilm", ("rotten_tomatoes",), (1000,), PRIOR_CELLS, (1e-4, 3e-4, 1e-3)),
      # MPNet was trained on NLI and paraphrase data: sentiment only.
      Study("mpnet", ("rotten_tomatoes",), (300,), HEADLINE_CELLS, (1e-5, 3e-5, 1e-4)),
      # The paper's p grids (CT-F 0.2-0.4, CT-D 0.1-0.3) at the cheapest setting, where the
      # first grid's p = 0.3 was above vanilla: p chosen on the dev split with the rate.
      Study("minilm", ("rotten_tomatoes",), (300,),
            ("ct_f_0.2", "ct_f_0.4", "ct_d_0.1", "ct_d_0.2"), (1e-4, 3e-4, 1e-3)),
      # Last: vanilla's selection at 1,000 examples stayed at the majority class at every
      # rate (7 minutes a run), so the cells that can tell methods apart run first; a task
      # vanilla does not learn stops after its selection (``baseline``).
      Study("minilm", ("vitaminc",), (1000, 300), HEADLINE_CELLS, (1e-4, 3e-4, 1e-3)),
  )
  selection_seeds: tuple[int, ...] = (0, 1, 2)
  final_seeds: tuple[int, ...] = tuple(range(100, 105))
  # 10 final seeds for vanilla, CT-F and CT-D (at the p chosen) everywhere (the issue's
  # headline cells), and for every method at the headline setting, MiniLM on Rotten Tomatoes
  # at 1,000 examples.
  headline_cells: tuple[str, ...] = HEADLINE_CELLS
  headlines: tuple[tuple[str, str, int], ...] = (("minilm", "rotten_tomatoes", 1000),)
  headline_seeds: tuple[int, ...] = tuple(range(100, 110))
  dev_size: int = 300
  max_rate_steps: int = 2
  baseline: str = "vanilla"  # what every method is compared with (each study lists it first)
  compare_unlearned: bool = False  # True: compare methods even where the baseline learned nothing

  def keys(self) -> list[tuple[str, str, int, str]]:
    """Every (model, task, size, cell), in the studies' order."""
    return list(dict.fromkeys((study.model, task, size, cell) for study in self.studies
                              for task in study.tasks for size in study.sizes
                              for cell in study.cells))

  def rates_of(self, model: str, task: str, size: int, cell: str) -> tuple[float, ...]:
    return next(study.rates for study in self.studies if study.model == model
                and task in study.tasks and size in study.sizes and cell in study.cells)

  def tasks(self) -> list[str]:
    return list(dict.fromkeys(task for study in self.studies for task in study.tasks))

  def family(self, model: str, task: str, size: int, cell: str) -> tuple[str, ...]:
    """The cells among which the dev split chooses p for ``cell`` at this model, task and
    size, in the grid's order: those of its ``Cell.family`` (``(cell,)`` where it has none)."""
    family = CELLS[cell].family
    if family is None:
      return (cell,)
    return tuple(key[3] for key in self.keys()
                 if key[:3] == (model, task, size) and CELLS[key[3]].family == family) or (cell,)

  def seeds_of_final(self, model: str, task: str, size: int, cell: str) -> tuple[int, ...]:
    headline = (CELLS[cell].method in {CELLS[name].method for name in self.headline_cells}
                or (model, task, size) in self.headlines)
    return self.headline_seeds if headline else self.final_seeds


PROTOCOL = Protocol()


@dataclasses.dataclass
class Setting:
  """What every run shares; the command-line options of ``python -m train.experiments``."""

  root: Path
  data_dir: Path
  seeds: int = 5
  model_name_or_path: str | None = None
  max_train_samples: int = 1000
  max_seq_length: int = 48
  num_train_epochs: float = 3.0
  learning_rate: float = 1e-4
  per_device_train_batch_size: int = 16
  max_eval_samples: int = 1000
  fisher_num_examples: int = 256
  jobs: int = 1
  results_dir: Path = Path("results")
  results_md: Path = Path("RESULTS.md")
  dry_run: bool = False

  def run_dir(self, cell: str, seed: int) -> Path:
    return self.root / "runs" / cell / f"seed_{seed}"

  def protocol_cell_dir(self, model: str, task: str, size: int, cell: str) -> Path:
    return self.root / "protocol" / model / f"{task}_{size}" / cell

  def protocol_dir(self, model: str, task: str, size: int, cell: str, stage: str, rate: float,
                   seed: int) -> Path:
    """A protocol run: ``stage`` is "select" (scored on the dev split) or "final"."""
    return (self.protocol_cell_dir(model, task, size, cell) / stage / f"lr_{rate:g}"
            / f"seed_{seed}")

  def split_dir(self, task: str) -> Path:
    return self.root / "protocol" / "splits" / task

  def overlap_dir(self, relative: str, seed: int) -> Path:
    return self.root / "overlap" / f"{Path(relative).stem}_seed_{seed}"

  def data(self, relative: str) -> Path:
    path = self.data_dir / relative
    if not path.is_file():
      raise FileNotFoundError(f"{path} is missing: run `python -m train.prepare_data --output_dir "
                              f"{self.data_dir}` first.")
    return path


def _groups(setting: Setting, data: dict, training: dict, model_name_or_path: str | None = None):
  """The three argument groups of one run: the setting's shared flags, then the run's own."""
  shared = {"num_train_epochs": setting.num_train_epochs, "learning_rate": setting.learning_rate,
            "per_device_train_batch_size": setting.per_device_train_batch_size,
            "warmup_ratio": 0.1, "fisher_num_examples": setting.fisher_num_examples,
            "disable_tqdm": True, "save_steps": 100_000, "save_total_limit": 1}
  shared_data = {"max_train_samples": setting.max_train_samples,
                 "max_seq_length": setting.max_seq_length,
                 "max_eval_samples": setting.max_eval_samples}
  model = model_name_or_path or setting.model_name_or_path
  return (arguments.ModelArguments(model_name_or_path=model),
          arguments.DataArguments(**{**shared_data, **data}),
          arguments.TrainingArguments(**{**shared, **training}))


def arguments_of(setting: Setting, cell: Cell, seed: int):
  """The validated argument groups of one fine-tuning run (a cell at a seed)."""
  data = {"train_file": str(setting.data(TRAIN)), "validation_file": str(setting.data(VALIDATION))}
  if cell.out_of_domain:
    data["extra_eval_files"] = [str(setting.data(f"vader/{name}.csv")) for name in OUT_OF_DOMAIN]
  try:
    return _groups(setting, data, {**cell.flags, "seed": seed,
                                   "output_dir": str(setting.run_dir(cell.name, seed))})
  except (TypeError, ValueError) as error:  # TypeError: a flag the trainer does not have
    raise ValueError(f"cell {cell.name!r}: {error}") from None


def protocol_arguments_of(setting: Setting, model: str, task: Task, size: int, cell: Cell,
                          stage: str, rate: float, seed: int):
  """The validated argument groups of one protocol run: ``model`` (a key of ``MODELS``)
  fine-tuned on ``size`` examples sampled (by ``seed``) from the task's training pool, at
  learning rate ``rate``, scored on the dev split (``stage`` "select") or on the validation
  set ("final"). The splits must exist (:func:`train.experiments.protocol.carve_dev` into
  ``setting.split_dir``)."""
  if stage not in ("select", "final"):
    raise ValueError(f"stage must be 'select' or 'final', got {stage!r}.")
  checkpoint = None
  if MODELS[model] is not None:
    checkpoint = setting.data_dir / MODELS[model]
    if not (checkpoint / "config.json").is_file():
      raise FileNotFoundError(f"{checkpoint} is missing: run `python -m train.prepare_data "
                              f"--output_dir {setting.data_dir} --mpnet` first.")
  splits = setting.split_dir(task.name)
  data = {"train_file": str(splits / "pool.csv"),
          "validation_file": str(splits / "dev.csv" if stage == "select"
                                 else setting.data(task.validation)),
          "max_train_samples": size, "max_seq_length": task.max_seq_length}
  flags = {k: v for k, v in cell.flags.items() if k != "prune_at_eval"}
  output_dir = setting.protocol_dir(model, task.name, size, cell.name, stage, rate, seed)
  try:
    return _groups(setting, data, {**flags, "learning_rate": rate, "seed": seed,
                                   "output_dir": str(output_dir)},
                   None if checkpoint is None else str(checkpoint))
  except (TypeError, ValueError) as error:
    raise ValueError(f"cell {cell.name!r} on {task.name}: {error}") from None


def overlap_arguments_of(setting: Setting, relative: str, seed: int):
  """The validated argument groups of one child network of the overlap figure (no training:
  the mask only)."""
  train_file = str(setting.data(relative))
  return _groups(setting, {"train_file": train_file, "validation_file": train_file},
                 {"mode": "ChildTuning-D", "reserve_p": OVERLAP_P, "seed": seed,
                  "do_train": False, "do_eval": False,
                  "output_dir": str(setting.overlap_dir(relative, seed))})


def command(groups) -> list[str]:
  """``python -m train.run_glue`` with these argument groups."""
  return [sys.executable, "-m", "train.run_glue", *arguments.to_argv(*groups)]
