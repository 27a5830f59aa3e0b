"""The command line of ``python -m train.experiments``: run the chosen experiments' trainers,
then write their tables and figures (and RESULTS.md for ``report`` or ``all``)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import signal
import threading
import time
from pathlib import Path
from typing import Sequence

from train import experiments
from train.experiments import cells, launcher, probe, report

logger = logging.getLogger("experiments")


def parse(argv: Sequence[str] | None = None) -> tuple[list[str], cells.Setting]:
  parser = argparse.ArgumentParser(prog="python -m train.experiments", description=experiments.__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("experiments", nargs="+",
                      choices=[*cells.EXPERIMENT_CELLS, "all", "report"], help="what to run")
  defaults = cells.Setting(root=Path("runs/experiments"), data_dir=Path("data"))
  parser.add_argument("--root", type=Path, default=defaults.root,
                      help="where the runs and results go (default: %(default)s)")
  parser.add_argument("--data_dir", type=Path, default=defaults.data_dir,
                      help="train.prepare_data's output (default: %(default)s)")
  for field in dataclasses.fields(cells.Setting):
    if field.name in ("root", "data_dir", "dry_run"):
      continue
    kind = str if field.name == "model_name_or_path" else type(field.default)
    parser.add_argument(f"--{field.name}", type=kind, default=field.default,
                        help="default: %(default)s")
  parser.add_argument("--dry_run", action="store_true", help="print the trainer commands only")
  args = vars(parser.parse_args(argv))
  for name in ("root", "data_dir", "results_dir", "results_md"):  # runs start in the repository
    args[name] = args[name].absolute()
  chosen = args.pop("experiments")
  if "all" in chosen:
    chosen = [*cells.EXPERIMENT_CELLS, "report"]
  return chosen, cells.Setting(**args)


def write_probe(setting: cells.Setting) -> None:
  """Figure 2: the probe's scores (minutes of feature extraction), its table and figure."""
  started = time.perf_counter()
  scores = probe.probe_scores(setting)
  out = setting.results_dir
  out.mkdir(parents=True, exist_ok=True)
  report.figure2_probe(scores, probe.PROBE_EXAMPLES, out / report.FIGURES["probe"]).write(out)
  seconds = time.perf_counter() - started
  (out / "probe_seconds.json").write_text(json.dumps({"seconds": round(seconds, 1)}) + "\n")


def main(argv: Sequence[str] | None = None) -> None:
  logging.basicConfig(format="%(asctime)s %(message)s", datefmt="%H:%M:%S", level=logging.INFO,
                      force=True)
  for noisy in ("absl", "jax"):  # orbax's per-restore chatter, backend start-up notes
    logging.getLogger(noisy).setLevel(logging.WARNING)
  chosen, setting = parse(argv)
  cell_names = [name for experiment in chosen for name in cells.EXPERIMENT_CELLS.get(experiment, [])]
  stop = signal.getsignal(signal.SIGTERM)
  if threading.current_thread() is threading.main_thread():  # SIGTERM stops as Ctrl-C does
    signal.signal(signal.SIGTERM, signal.default_int_handler)
  try:
    launcher.run_cells(setting, cell_names)
    if "protocol" in chosen:
      launcher.run_protocol(setting)
    if "overlap" in chosen:
      launcher.run_overlap_masks(setting)
  finally:
    if threading.current_thread() is threading.main_thread():
      signal.signal(signal.SIGTERM, stop)
  if setting.dry_run:
    return
  report.write_tables(setting, chosen)
  if "probe" in chosen:
    write_probe(setting)
  if "report" in chosen:
    report.write_tables(setting, ["protocol", "methods", "ablations", "domain", "layers"])
    logger.info("wrote %s", report.write_results_md(setting))
