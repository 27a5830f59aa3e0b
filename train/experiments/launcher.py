"""Running an experiment's trainer processes: skip what is finished, resume what was
interrupted, several at a time (``--jobs``), failures reported without stopping the others,
and a clean stop of all of them on Ctrl-C or SIGTERM.

Every run is one ``train.run_glue`` process with its own output directory; a finished run
(its ``all_results.json`` exists) is not run again, an interrupted one resumes from its
checkpoint. In the paper's experiments seeds run in the outer loop, so a partial campaign has
the same seeds in every cell; the protocol runs each cell whole (its rate selection, then its
final seeds), in the grid's order (Child-Tuning against vanilla on every task and size
first). Every command is built (and so validated) before the first run starts (a protocol
cell's grid extensions, when they are chosen).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import logging
import os
import platform
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Sequence

from train.experiments import cells, protocol, report

logger = logging.getLogger("experiments")

REPO = Path(__file__).resolve().parents[2]

_running: set[subprocess.Popen] = set()  # the trainer processes started by run_trainer
_running_lock = threading.Lock()
_stopping = threading.Event()  # the campaign was asked to stop: start no more runs


def run_trainer(command: list[str], log: Path, env: dict[str, str]) -> int:
  """Runs one trainer command in a process of its own, its output appended to ``log``;
  returns its exit status (tests replace this function to run the trainer in-process).

  The process gets a session of its own, so that Ctrl-C in the campaign's terminal does not
  reach it directly: :func:`stop_trainers` passes one stop signal on to every trainer.
  """
  with open(log, "a") as file:
    process = subprocess.Popen(command, stdout=file, stderr=subprocess.STDOUT, cwd=REPO, env=env,
                               start_new_session=True)
  with _running_lock:
    _running.add(process)
  try:
    return process.wait()
  finally:
    with _running_lock:
      _running.discard(process)


def stop_trainers() -> int:
  """Sends SIGTERM to every running trainer (each finishes its step, saves a checkpoint and
  exits) and waits for them; returns how many there were."""
  with _running_lock:
    processes = list(_running)
  for process in processes:
    process.send_signal(signal.SIGTERM)
  for process in processes:
    process.wait()
  return len(processes)


def machine() -> dict[str, object]:
  """The machine a run ran on, as RESULTS.md describes it."""
  cpuinfo = Path("/proc/cpuinfo")
  lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
  cpu = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")),
             platform.processor() or platform.machine())
  return {"cpu": cpu, "cores": os.cpu_count()}


def _environment(setting: cells.Setting) -> dict[str, str]:
  env = dict(os.environ)
  # Runs of one cell compile the same programs: a shared persistent cache makes repeats loads.
  env.setdefault("JAX_COMPILATION_CACHE_DIR", str(setting.root / "jax_cache"))
  env.setdefault("PYTHONPATH", str(REPO))
  return env


def run_one(setting: cells.Setting, command: list[str], output_dir: Path, *, keep_checkpoint: bool,
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
  code = run_trainer(command, output_dir / "log.txt", _environment(setting))
  seconds = time.perf_counter() - started
  if code != 0:
    raise RuntimeError(f"{label} failed (exit {code}); see {output_dir / 'log.txt'}")
  wall = output_dir / "wall_seconds.json"
  earlier = json.loads(wall.read_text())["wall_seconds"] if wall.exists() else 0.0
  wall.write_text(json.dumps({"wall_seconds": round(earlier + seconds, 1), "command": command[1:],
                              "machine": machine()}, indent=2) + "\n")
  if not keep_checkpoint:  # 270 MB each, and CT-D's 40 MB child delta; only the probe reads them
    shutil.rmtree(output_dir / "checkpoints", ignore_errors=True)
    (output_dir / "child_delta.npz").unlink(missing_ok=True)
  return json.loads(results_file.read_text())


@dataclasses.dataclass(frozen=True)
class Job:
  """One trainer process of a campaign."""

  label: str
  command: list[str]
  output_dir: Path
  keep_checkpoint: bool = False


def run_cells(setting: cells.Setting, cell_names: Sequence[str]) -> None:
  """Every (seed, cell) fine-tuning run, seeds in the outer loop; ``setting.jobs`` trainer
  processes at a time (on a 2-core CPU two overlap one's single-threaded start-up and
  host work with the other's compute)."""
  pairs = [(seed, cells.CELLS[name]) for seed in range(setting.seeds)
           for name in dict.fromkeys(cell_names)]
  run_jobs(setting, [Job(f"{cell.name} seed {seed}",
                         cells.command(cells.arguments_of(setting, cell, seed)),
                         setting.run_dir(cell.name, seed), cell.keep_checkpoint)
                     for seed, cell in pairs])  # every cell validated before the first run


def run_jobs(setting: cells.Setting, jobs: Sequence[Job]) -> None:
  """Runs the jobs, ``setting.jobs`` at a time, in their order; a failed run is reported at
  the end and does not stop the others; Ctrl-C or SIGTERM stops them all, keeping their work."""
  failed = []
  _stopping.clear()

  def work(number, job):
    if _stopping.is_set():
      return
    label = f"[{number}/{len(jobs)}] {job.label}"
    done_before = (job.output_dir / "all_results.json").exists()
    started = time.perf_counter()
    try:
      results = run_one(setting, job.command, job.output_dir, keep_checkpoint=job.keep_checkpoint,
                        label=label)
    except RuntimeError as error:  # one failed run does not stop a campaign of hours
      if not _stopping.is_set():
        logger.error("%s", error)
        failed.append(label)
      return
    if results is not None:
      score = {k: round(v, 4) for k, v in results.items() if k in protocol.PRIMARY_METRICS}
      logger.info("%s: %s%s", label, score,
                  " (done before)" if done_before else f" in {time.perf_counter() - started:.0f} s")

  with concurrent.futures.ThreadPoolExecutor(max(1, setting.jobs)) as pool:
    futures = [pool.submit(work, number, job) for number, job in enumerate(jobs, 1)]
    try:
      for future in futures:
        future.result()
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (see __main__): stop the runs, keep their work
      _stopping.set()
      pool.shutdown(wait=False, cancel_futures=True)
      logger.warning("stopping: %d run(s) save a checkpoint and stop; the same command continues "
                     "the campaign", stop_trainers())
      raise
  if failed:
    raise RuntimeError(f"{len(failed)} run(s) failed: {', '.join(sorted(failed))}. Run the same "
                       "command again to retry them (finished runs are skipped).")


def _protocol_job(setting, model, task, size, cell, stage, rate, seed) -> Job:
  return Job(f"{model} {task}/{size} {cell} {stage} lr {rate:g} seed {seed}",
             cells.command(cells.protocol_arguments_of(
                 setting, model, cells.TASKS[task], size, cells.CELLS[cell], stage, rate, seed)),
             setting.protocol_dir(model, task, size, cell, stage, rate, seed))


def run_protocol(setting: cells.Setting, grid: cells.Protocol | None = None
                 ) -> dict[tuple[str, str, int, str], protocol.RateChoice]:
  """The protocol experiment: carve each task's dev split, then for each (model, task, size,
  method), in the grid's order, its rate selection (:func:`run_protocol_selection`) and then
  its final seeds (:func:`run_protocol_finals`), so that a campaign stopped part-way has whole
  cells. Where a method runs at several p (:meth:`cells.Protocol.family`), the finals wait
  for the last p's selection and run for the chosen p only (:func:`report.protocol_member`).
  A cell whose runs fail is reported at the end; the others go on. Returns ``{(model, task,
  size, cell): RateChoice}`` of the cells whose rate was chosen (none with ``--dry_run``)."""
  grid = grid or cells.PROTOCOL
  for task in grid.tasks():
    protocol.carve_dev(setting.data(cells.TASKS[task].train), setting.split_dir(task),
                       grid.dev_size, group_by=cells.TASKS[task].group_by)
  keys = grid.keys()
  for key in keys:  # every command validated before the first run
    for rate in grid.rates_of(*key):
      _protocol_job(setting, *key, "select", rate, grid.selection_seeds[0])
  choices, failed = {}, []
  for key in keys:
    try:
      choice = run_protocol_selection(setting, grid, key)
      if choice is not None:
        choices[key] = choice
        member = None
        if grid.family(*key)[-1] == key[3]:  # its last p: the family's selection is whole
          member = report.protocol_member(setting, *key, grid)
        if member is not None:
          chosen = (*key[:3], member)
          run_protocol_finals(setting, grid, chosen, choices[chosen])
    except RuntimeError as error:  # its runs failed: the next cells still run
      if _stopping.is_set():
        raise
      logger.error("%s", error)
      failed.append(" ".join(map(str, key)))
  if failed:
    raise RuntimeError(f"{len(failed)} protocol cell(s) had failed runs: {'; '.join(failed)}. "
                       "Run the same command again to retry them (finished runs are skipped).")
  return choices


def run_protocol_selection(setting: cells.Setting, grid: cells.Protocol,
                           key: tuple[str, str, int, str]) -> protocol.RateChoice | None:
  """One cell's rate selection: the selection seeds at every rate of its grid (and at any
  rate an earlier campaign ran for it), a step beyond the grid's end while the best rate is
  there (``grid.max_rate_steps`` steps at most). None where the baseline did not learn the
  task (:func:`report.protocol_not_learned`: the other methods do not run) or with
  ``--dry_run``."""
  if key[3] != grid.baseline and not setting.dry_run and _not_learned(setting, grid, key):
    return None
  first = list(grid.rates_of(*key))
  rates = sorted(set(first) | set(report.protocol_rates(setting, *key)))
  while True:
    run_jobs(setting, [_protocol_job(setting, *key, "select", rate, seed)
                       for seed in grid.selection_seeds for rate in rates])
    if setting.dry_run:
      return None
    choice = protocol.choose_rate(report.protocol_dev_scores(setting, *key, rates, grid))
    if choice.bracketed or len(set(rates) - set(first)) >= grid.max_rate_steps:
      break
    try:
      _protocol_job(setting, *key, "select", choice.next_rate, grid.selection_seeds[0])
    except ValueError as error:  # a rate the method cannot take (RecAdam's pull): not tried
      logger.warning("%s: the best rate %g is at the end of the grid, but %g cannot run: %s",
                     key, choice.rate, choice.next_rate, error)
      break
    logger.info("%s: the best rate %g is at the end of the grid; trying %g", key, choice.rate,
                choice.next_rate)
    rates.append(choice.next_rate)
  logger.info("%s: rate %g chosen (mean dev score %.4f over %s)%s", key, choice.rate,
              choice.mean_dev_score, ", ".join(f"{rate:g}" for rate in sorted(rates)),
              "" if choice.bracketed else "; the grid's end, not bracketed")
  return choice


def run_protocol_finals(setting: cells.Setting, grid: cells.Protocol,
                        key: tuple[str, str, int, str], choice: protocol.RateChoice) -> None:
  """A cell's final seeds at its chosen rate; none where the baseline did not learn the task."""
  if len(grid.family(*key)) > 1:
    logger.info("%s: p chosen among %s (mean dev score %.4f)", key,
                ", ".join(grid.family(*key)), choice.mean_dev_score)
  if key[3] == grid.baseline and _not_learned(setting, grid, key):
    return
  run_jobs(setting, [_protocol_job(setting, *key, "final", choice.rate, seed)
                     for seed in grid.seeds_of_final(*key)])


def _not_learned(setting: cells.Setting, grid: cells.Protocol, key) -> bool:
  majority = report.protocol_not_learned(setting, *key[:3], grid)
  if majority is not None:
    logger.warning("%s: no final runs: %s's chosen rate scores no better on the dev split than "
                   "its majority class (%.4f); the model did not learn %s at %d examples",
                   key, grid.baseline, majority, key[1], key[2])
  return majority is not None


def run_overlap_masks(setting: cells.Setting) -> dict[str, Path]:
  """The child network of each task of the overlap figure (the trainer with ``--do_train
  false``); ``{task label: its mask.npz}``."""
  commands = {label: cells.command(cells.overlap_arguments_of(setting, relative, seed))
              for label, (relative, seed) in cells.OVERLAP_TASKS.items()}
  masks = {}
  for number, (label, (relative, seed)) in enumerate(cells.OVERLAP_TASKS.items(), 1):
    output_dir = setting.overlap_dir(relative, seed)
    started = time.perf_counter()
    run_one(setting, commands[label], output_dir, keep_checkpoint=False,
            label=f"[{number}/{len(cells.OVERLAP_TASKS)}] child network of {label}")
    if not setting.dry_run:
      logger.info("[%d/%d] child network of %s (%.0f s)", number, len(cells.OVERLAP_TASKS), label,
                  time.perf_counter() - started)
    masks[label] = output_dir / "mask.npz"
  return masks
