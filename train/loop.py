"""The training loop and how a run stops: every step logged and checked, evaluations and
checkpoints on schedule, a signal turned into a checkpoint and a clean stop, a non-finite loss
into an error.

A step's metrics are read after the next step is dispatched (so the device never waits for
the host); they are checked before the state they led to is saved, and a stop request rides
in the batch, so that every process of a multi-host run stops after the same step.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np
from tqdm.auto import tqdm

from train import input_pipeline
from train.text_datasets import batch_indices

logger = logging.getLogger(__name__)


class Stopped(KeyboardInterrupt):
  """The run stopped on SIGTERM or SIGINT. ``agreed``: every process stopped after the same
  step (inside the training loop), having saved a checkpoint of it."""

  def __init__(self, signum: int, message: str, *, agreed: bool = False):
    super().__init__(message)
    self.signum, self.agreed = signum, agreed


class Diverged(RuntimeError):
  """A non-finite loss, gradient norm or parameter: the run stops without saving it."""


class StopSignals:
  """SIGTERM (a preempted VM, a cluster's time limit) and SIGINT (Ctrl-C) for a whole run.

  Inside the training loop (``deferred``) a signal is only noted: the loop finishes the step
  it is in, saves a checkpoint and stops, so no buffer the step has donated is ever saved.
  Anywhere else there is no new state to save and the run stops at once; so does a second
  signal. Installed only in the main thread (Python delivers signals there), and again after
  ``jax.distributed.initialize``, whose preemption notifier takes SIGTERM over and ignores it.
  """

  def __init__(self):
    self.signum: int | None = None
    self.deferred = False
    self._previous: dict[int, Any] = {}

  def __enter__(self) -> "StopSignals":
    if threading.current_thread() is threading.main_thread():
      for signum in (signal.SIGTERM, signal.SIGINT):
        self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def install_again(self) -> None:
    for signum in self._previous:
      signal.signal(signum, self._handle)

  def __exit__(self, *exc_info) -> None:
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)

  def _handle(self, signum, frame) -> None:
    name = signal.Signals(signum).name
    if self.deferred and self.signum is None:
      self.signum = signum
      logger.warning("%s: stopping after this step, with a checkpoint (send it again to stop at "
                     "once, without one)", name)
      return
    raise Stopped(signum, f"stopped by {name}")


class MetricsLog:
  """``metrics.jsonl``: one JSON object per training step (and per evaluation).

  Resuming from the checkpoint of step ``k`` keeps what the log held at that checkpoint: the
  steps up to ``k`` and the evaluations before it (an evaluation of step ``k`` is written
  before its checkpoint, except the final one, which comes after the last checkpoint).
  """

  def __init__(self, path: Path, *, keep_until_step: int, final_step: int, enabled: bool):
    self.path, self.enabled, self.start_step = path, enabled, keep_until_step
    if enabled and path.exists():
      def kept(record):
        if record["step"] < keep_until_step or "loss" in record:
          return record["step"] <= keep_until_step
        return record["step"] == keep_until_step and keep_until_step != final_step
      lines = []
      for line in path.read_text().splitlines():
        try:
          record = json.loads(line)
        except json.JSONDecodeError:  # a line a killed process did not finish writing
          logger.warning("%s: dropped a line that is not JSON: %.80s", path, line)
          continue
        if kept(record):
          lines.append(line)
      # A new file renamed over the old one: a process killed meanwhile leaves one or the other.
      partial = path.with_name(path.name + ".tmp")
      partial.write_text("".join(line + "\n" for line in lines))
      os.replace(partial, path)

  def write(self, record: dict) -> None:
    if self.enabled:
      with open(self.path, "a") as file:
        file.write(json.dumps(record) + "\n")

  def train_losses(self) -> list[float]:
    if not self.path.exists():
      return []
    records = (json.loads(line) for line in self.path.read_text().splitlines() if line.strip())
    return [r["loss"] for r in records if "loss" in r]


@dataclasses.dataclass(frozen=True)
class Steps:
  """How many optimizer steps a run takes, and of what size."""

  total: int
  per_epoch: int
  batch_size: int  # the global batch of a step: per device x devices x micro-batches


def train_loop(state, train_step, evaluate_params: Callable, train_arrays: dict,
               steps: Steps, args, run, log: MetricsLog, saver,
               signals: StopSignals):
  """Steps from ``state.step`` to ``steps.total``: logs every step, evaluates every
  ``--eval_steps``, saves every ``--save_steps`` and at the end.

  A step's metrics are read after the next step is dispatched (so an accelerator never
  waits for the host; on the CPU each step finishes first). They are checked before the
  state they led to is saved: a non-finite loss or gradient norm raises :class:`Diverged`,
  and nothing after the last good checkpoint is saved. A stop signal is passed through the
  step to every process; all then finish the step they are in, save it and raise
  :class:`Stopped`.
  """
  start_step = int(state.step)
  bar = tqdm(total=steps.total, initial=start_step, desc="train", unit="step",
             disable=not run.progress)

  def finish(step_metrics, step, seconds) -> bool:
    """Checks and logs one step's metrics; returns whether a process asked to stop."""
    values = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
    stop = values.pop("stop_requested", 0.0) > 0
    if not (math.isfinite(values["loss"]) and math.isfinite(values["grad_norm"])):
      remedies = [f"a lower --learning_rate (now {args.learning_rate:g})"]
      if args.warmup_ratio == 0 and args.warmup_steps == 0:
        remedies.append("a warmup (--warmup_ratio 0.1)")
      if args.max_grad_norm == 0:
        remedies.append("gradient clipping (--max_grad_norm 1)")
      raise Diverged(
          f"step {step}: the loss is {values['loss']} and the gradient norm "
          f"{values['grad_norm']}: training diverged. {saver.kept()} Try {', '.join(remedies)}, "
          "or look for extreme values in the training data.")
    log.write({"step": step, "epoch": round(step / steps.per_epoch, 4), **values,
               "examples_per_second": round(steps.batch_size / seconds, 2)})
    bar.set_postfix(loss=f"{values['loss']:.4f}", ex_s=f"{steps.batch_size / seconds:.1f}")
    return stop

  order_epoch, order = None, None
  pending = None  # the previous step's metrics, read after the next step is dispatched
  # On the CPU the host computes the steps: a step dispatched while the previous one runs
  # would only hold a second copy of the step's temporaries (BENCHMARKS.md, *Where a
  # training process's memory goes*), so each step finishes before the next is dispatched.
  one_step_at_a_time = jax.default_backend() == "cpu"
  stop = False
  signals.deferred = True
  try:
    step_started = time.perf_counter()
    for step in range(start_step, steps.total):
      epoch, position = divmod(step, steps.per_epoch)
      if epoch != order_epoch:
        order_epoch = epoch
        order = list(batch_indices(len(train_arrays["labels"]), steps.batch_size, seed=args.seed,
                                   epoch=epoch))
      batch = input_pipeline.take(train_arrays, order[position])
      batch["stop_requested"] = np.full(steps.batch_size, signals.signum is not None, np.int32)
      batch = input_pipeline.micro_batches(batch, run.micro_batches)
      state, metrics = train_step(state, input_pipeline.place(batch, run.train_data))
      if one_step_at_a_time:
        jax.block_until_ready(metrics)
      if pending is not None:
        stop |= finish(*pending)
      now = time.perf_counter()
      done = step + 1
      pending = (metrics, done, now - step_started)
      step_started = now
      bar.update(1)
      saving = done % args.save_steps == 0 or done == steps.total
      evaluating = args.eval_steps and done % args.eval_steps == 0 and done != steps.total
      if saving or evaluating or stop:  # the log then holds every step up to the checkpoint
        stop |= finish(*pending)
        pending = None
      if evaluating:  # before the checkpoint: a resume from it finds the evaluation logged
        log.write({"step": done, **evaluate_params(state.params)})
      if saving or stop:
        saver.save(state)
      if stop:
        break
  finally:
    signals.deferred = False
    bar.close()
  if stop:
    signum = signals.signum or signal.SIGTERM
    who = (signal.Signals(signum).name if signals.signum is not None
           else "a signal to another process")
    raise Stopped(signum, f"stopped by {who} after step {int(state.step)}, with a checkpoint of "
                  "it: continue with the same command and --resume.", agreed=True)
  return state
