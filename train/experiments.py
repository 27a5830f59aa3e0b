"""The paper's experiments on real offline data: one command each, several seeds, tables and figures.

  python -m train.prepare_data --output_dir data    # once: the CSV files these read
  python -m train.experiments methods     # Table 3/4: vanilla, CT-F, CT-D, five prior methods, CT-D + R3F
  python -m train.experiments ablations   # Table 5: prune, random and lowest-Fisher child networks
  python -m train.experiments domain      # Table 2: trained on Rotten Tomatoes, tested on other domains
  python -m train.experiments probe       # Figure 2: linear probes of the fine-tuned encoders on other tasks
  python -m train.experiments overlap     # Figure 3: Jaccard overlap of the child networks of several tasks
  python -m train.experiments layers      # where CT-D's child network lies, layer by layer
  python -m train.experiments all         # all of the above, then RESULTS.md
  python -m train.experiments report      # RESULTS.md from whatever runs exist

Every fine-tuning run is one ``train/run_glue.py`` process with its own output
directory ``<root>/runs/<cell>/seed_<s>``; a finished run (its
``all_results.json`` exists) is not run again, and an interrupted one resumes
from its checkpoint. Seeds run in the outer loop, so a partial campaign has
the same seeds in every cell. Tables (Markdown + CSV) and figures (PNG) go to
``<root>/results``; ``report`` assembles them into ``RESULTS.md``.

The setting (sizes chosen for a 2-core CPU): the embedded MiniLM-L6, 1,000
Rotten Tomatoes training examples (the paper's low-resource size), 48 tokens,
2 epochs, batch 16, learning rate 5e-5 with 10% warmup, evaluation on 1,000
held-out reviews. Each prior method runs at one point of the paper's grid.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

if __package__ in (None, ""):  # run as `python train/experiments.py`
  sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

logger = logging.getLogger("experiments")

REPO = Path(__file__).resolve().parent.parent
TRAIN = "rotten_tomatoes/train.csv"
VALIDATION = "rotten_tomatoes/validation.csv"
OUT_OF_DOMAIN = {"amazon_binary": "Amazon", "nyt_binary": "NYT", "tweets_binary": "Tweets"}


@dataclasses.dataclass(frozen=True)
class Cell:
  """One row of a table: a method with its flags (``--mode`` included)."""

  name: str
  label: str
  flags: tuple[str, ...]
  out_of_domain: bool = False  # also evaluate on the other domains (Table 2's cells)
  keep_checkpoint: bool = False  # the probe reads the fine-tuned encoder from it


def _ct_f(p):
  return Cell(f"ct_f_{p}", f"CT-F (p={p})", ("--mode", "ChildTuning-F", "--reserve_p", str(p)),
              out_of_domain=p == 0.3, keep_checkpoint=p == 0.3)


def _ct_d(p, *extra, name=None, label=None):
  flags = ("--mode", "ChildTuning-D", "--reserve_p", str(p)) + extra
  return Cell(name or f"ct_d_{p}", label or f"CT-D (p={p})",
              flags + (("--prune_at_eval",) if p == 0.3 and not extra else ()),
              out_of_domain=p == 0.3 and not extra, keep_checkpoint=p == 0.3 and not extra)


# One point of each prior method's grid in the paper (Appendix C), not tuned here.
CELLS = {cell.name: cell for cell in [
    Cell("vanilla", "Vanilla", ("--mode", "vanilla"), out_of_domain=True, keep_checkpoint=True),
    _ct_f(0.2), _ct_f(0.3), _ct_f(0.4),
    _ct_d(0.1), _ct_d(0.2), _ct_d(0.3),
    Cell("weight_decay", "Weight Decay (λ=0.1)", ("--mode", "vanilla", "--decay_to_pretrained", "0.1")),
    Cell("top_k", "Top-K (K=3 of 6)", ("--mode", "vanilla", "--top_k_layers", "3")),
    Cell("mixout", "Mixout (p=0.3)", ("--mode", "vanilla", "--mixout_p", "0.3")),
    Cell("recadam", "RecAdam (k=0.1, t0=50)",
         ("--mode", "vanilla", "--recadam_k", "0.1", "--recadam_t0", "50")),
    Cell("r3f", "R3F (σ=0.1, normal)", ("--mode", "vanilla", "--r3f_sigma", "0.1")),
    _ct_d(0.3, "--r3f_sigma", "0.1", name="ct_d_r3f", label="CT-D (p=0.3) + R3F (σ=0.1)"),
    _ct_d(0.3, "--child_network", "random", name="ct_d_random", label="Random (p=0.3)"),
    _ct_d(0.3, "--child_network", "lowest_fisher", name="ct_d_lowest",
          label="Lowest Info. (p=0.3)"),
]}

EXPERIMENT_CELLS = {
    "methods": ["vanilla", "ct_f_0.2", "ct_f_0.3", "ct_f_0.4", "ct_d_0.1", "ct_d_0.2", "ct_d_0.3",
                "weight_decay", "top_k", "mixout", "recadam", "r3f", "ct_d_r3f"],
    "ablations": ["vanilla", "ct_d_0.3", "ct_d_random", "ct_d_lowest"],
    "domain": ["vanilla", "ct_f_0.3", "ct_d_0.3"],
    "probe": ["vanilla", "ct_f_0.3", "ct_d_0.3"],
    "layers": ["ct_d_0.1", "ct_d_0.2", "ct_d_0.3"],
    "overlap": [],
}


@dataclasses.dataclass
class Setting:
  """What every run shares; the command-line options of this script."""

  root: Path
  data_dir: Path
  seeds: int = 5
  model_name_or_path: str | None = None
  max_train_samples: int = 1000
  max_seq_length: int = 48
  num_train_epochs: float = 2.0
  learning_rate: float = 5e-5
  per_device_train_batch_size: int = 16
  max_eval_samples: int = 1000
  fisher_num_examples: int = 256
  dry_run: bool = False

  def run_dir(self, cell: str, seed: int) -> Path:
    return self.root / "runs" / cell / f"seed_{seed}"

  @property
  def results_dir(self) -> Path:
    return self.root / "results"

  def data(self, relative: str) -> Path:
    path = self.data_dir / relative
    if not path.is_file():
      raise FileNotFoundError(f"{path} is missing: run `python -m train.prepare_data --output_dir "
                              f"{self.data_dir}` first.")
    return path

  def common_flags(self) -> list[str]:
    flags = ["--max_train_samples", self.max_train_samples, "--max_seq_length", self.max_seq_length,
             "--num_train_epochs", self.num_train_epochs, "--learning_rate", self.learning_rate,
             "--per_device_train_batch_size", self.per_device_train_batch_size,
             "--warmup_ratio", 0.1, "--max_eval_samples", self.max_eval_samples,
             "--fisher_num_examples", self.fisher_num_examples, "--disable_tqdm",
             "--save_steps", 100_000, "--save_total_limit", 1]
    if self.model_name_or_path:
      flags += ["--model_name_or_path", self.model_name_or_path]
    return [str(f) for f in flags]

  def command(self, cell: Cell, seed: int) -> list[str]:
    flags = ["--train_file", self.data(TRAIN), "--validation_file", self.data(VALIDATION)]
    if cell.out_of_domain:
      flags += ["--extra_eval_files", *(self.data(f"vader/{name}.csv") for name in OUT_OF_DOMAIN)]
    flags += [*self.common_flags(), *cell.flags, "--seed", seed,
              "--output_dir", self.run_dir(cell.name, seed)]
    return [sys.executable, "-m", "train.run_glue", *map(str, flags)]


# ----------------------------------------------------------------------------- running


def _jax_env(setting: Setting) -> dict[str, str]:
  env = dict(os.environ)
  # Runs of one cell compile the same programs: a shared persistent cache makes repeats loads.
  env.setdefault("JAX_COMPILATION_CACHE_DIR", str(setting.root / "jax_cache"))
  env.setdefault("PYTHONPATH", str(REPO))
  return env


def run_one(setting: Setting, command: list[str], output_dir: Path, *, keep_checkpoint: bool,
            label: str) -> dict | None:
  """Runs (or resumes, or skips if finished) one trainer process; returns its all_results."""
  results_file = output_dir / "all_results.json"
  if results_file.exists():
    return json.loads(results_file.read_text())
  resuming = (output_dir / "checkpoints").is_dir()
  command = command + (["--resume"] if resuming else ["--overwrite_output_dir"])
  if setting.dry_run:
    print(" ".join(command))
    return None
  output_dir.mkdir(parents=True, exist_ok=True)
  started = time.perf_counter()
  with open(output_dir / "log.txt", "a") as log:
    finished = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                              env=_jax_env(setting))
  seconds = time.perf_counter() - started
  if finished.returncode != 0:
    raise RuntimeError(f"{label} failed (exit {finished.returncode}); see {output_dir / 'log.txt'}")
  wall = output_dir / "wall_seconds.json"
  earlier = json.loads(wall.read_text())["wall_seconds"] if wall.exists() else 0.0
  wall.write_text(json.dumps({"wall_seconds": round(earlier + seconds, 1),
                              "command": command[1:]}, indent=2) + "\n")
  if not keep_checkpoint:  # 270 MB each; only the probe reads them
    shutil.rmtree(output_dir / "checkpoints", ignore_errors=True)
  return json.loads(results_file.read_text())


def run_cells(setting: Setting, cell_names: Sequence[str]) -> None:
  """Every (seed, cell) fine-tuning run, seeds in the outer loop."""
  cells = [CELLS[name] for name in dict.fromkeys(cell_names)]
  jobs = [(seed, cell) for seed in range(setting.seeds) for cell in cells]
  for number, (seed, cell) in enumerate(jobs, 1):
    output_dir = setting.run_dir(cell.name, seed)
    label = f"[{number}/{len(jobs)}] {cell.name} seed {seed}"
    done_before = (output_dir / "all_results.json").exists()
    started = time.perf_counter()
    results = run_one(setting, setting.command(cell, seed), output_dir,
                      keep_checkpoint=cell.keep_checkpoint, label=label)
    if results is not None:
      score = {k: round(v, 4) for k, v in results.items() if k in PRIMARY_METRICS}
      logger.info("%s: %s%s", label, score,
                  " (done before)" if done_before else f" in {time.perf_counter() - started:.0f} s")


PRIMARY_METRICS = ("eval_accuracy", "eval_pearson", "eval_matthews_correlation")


# ----------------------------------------------------------------------------- command line


def parse(argv: Sequence[str] | None = None) -> tuple[list[str], Setting]:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("experiments", nargs="+",
                      choices=[*EXPERIMENT_CELLS, "all", "report"], help="what to run")
  defaults = Setting(root=Path("runs/experiments"), data_dir=Path("data"))
  parser.add_argument("--root", type=Path, default=defaults.root,
                      help="where the runs and results go (default: %(default)s)")
  parser.add_argument("--data_dir", type=Path, default=defaults.data_dir,
                      help="train.prepare_data's output (default: %(default)s)")
  for field in dataclasses.fields(Setting):
    if field.name in ("root", "data_dir", "dry_run"):
      continue
    kind = str if field.name == "model_name_or_path" else type(field.default)
    parser.add_argument(f"--{field.name}", type=kind, default=field.default,
                        help="default: %(default)s")
  parser.add_argument("--dry_run", action="store_true", help="print the trainer commands only")
  args = vars(parser.parse_args(argv))
  experiments = args.pop("experiments")
  if "all" in experiments:
    experiments = [*EXPERIMENT_CELLS, "report"]
  return experiments, Setting(**args)


def main(argv: Sequence[str] | None = None) -> None:
  logging.basicConfig(format="%(asctime)s %(message)s", datefmt="%H:%M:%S", level=logging.INFO,
                      force=True)
  experiments, setting = parse(argv)
  cells = [name for experiment in experiments for name in EXPERIMENT_CELLS.get(experiment, [])]
  run_cells(setting, cells)


if __name__ == "__main__":
  main()
