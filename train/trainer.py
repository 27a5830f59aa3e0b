"""The training loop: optimizer, jitted steps, CT-D's child network, evaluation, outputs.

Everything that changes during training lives in one :class:`TrainState`
pytree (step, parameters, optimizer state, dropout key), which is also what a
checkpoint holds; the data order is a function of ``(seed, epoch)`` and the
dropout key of a step is ``fold_in(dropout_key, step)``. So a run resumed from
a checkpoint takes exactly the steps the uninterrupted run would have.

Data parallelism: a one-axis ``Mesh`` over the devices (``AxisType.Auto``),
the batch split over its ``data`` axis, parameters and optimizer state
replicated; ``jax.jit`` inserts the gradient all-reduce.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import json
import logging
import math
import re
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm.auto import tqdm

import childtuning_jax as ct
from childtuning_jax import _trees
from train.text_datasets import batch_indices
from train.metrics import compute_metrics
from childtuning_jax.models import embedded_model_path, load_config, load_pretrained, resolve_checkpoint
from train import checkpoints as checkpoints_lib
from train import distributed, input_pipeline, methods
from train.arguments import DataArguments, ModelArguments, TrainingArguments, as_dict

logger = logging.getLogger(__name__)

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
DEFAULT_DATA_MAX_TRAIN_SAMPLES = 2000
DEFAULT_DATA_MAX_SEQ_LENGTH = 64


class TrainState(flax.struct.PyTreeNode):
  step: jax.Array  # int32 scalar: optimizer steps taken
  params: Any
  opt_state: Any
  dropout_key: jax.Array  # typed PRNG key; step s uses fold_in(dropout_key, s)
  # The pretrained weights w0, one copy for every method that needs them (train/methods.py);
  # None when none does.
  pretrained: Any = None


# ----------------------------------------------------------------------------- optimizer


def learning_rate_schedule(args: TrainingArguments, total_steps: int) -> optax.Schedule:
  """Linear warmup from 0, then linear decay to 0 at ``total_steps`` (or constant), as
  transformers' ``get_linear_schedule_with_warmup``; the same in every mode."""
  warmup = args.warmup_steps if args.warmup_steps > 0 else math.ceil(args.warmup_ratio * total_steps)
  warmup = min(warmup, total_steps)
  if args.lr_scheduler_type == "linear":
    after = optax.linear_schedule(args.learning_rate, 0.0, max(total_steps - warmup, 1))
  else:
    after = optax.constant_schedule(args.learning_rate)
  if warmup == 0:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, args.learning_rate, warmup), after], [warmup])


def decays(params: Any) -> Any:
  """Weight decay applies to weight matrices and embeddings, not to biases or LayerNorm
  parameters (transformers' Trainer, which the published code uses, does the same)."""
  def flag(path, _):
    name = _trees.path_name(path)
    return not (name.endswith("bias") or "LayerNorm" in name)
  return jax.tree_util.tree_map_with_path(flag, params)


def optimizer(args: TrainingArguments, schedule: optax.Schedule,
              pieces: Sequence[methods.Pieces] = (), *, key: jax.Array, mask: Any = None
              ) -> optax.GradientTransformation:
  """The chain of a run: the methods' gradient terms, clipping (before the mask, as the
  published code), AdamW with the mode's mask (or a method's fixed mask), the methods'
  transforms after the optimizer. ``mask``: CT-D's child network."""
  adamw_args = dict(b1=args.adam_beta1, b2=args.adam_beta2, eps=args.adam_epsilon,
                    weight_decay=args.weight_decay, weight_decay_mask=decays)
  fixed = [piece.mask for piece in pieces if piece.mask is not None]
  if fixed:  # Top-K tuning (vanilla mode): a fixed mask of its own, frozen exactly
    core = ct.child_tuning_adamw(schedule, mode="driven", mask=fixed[0], **adamw_args)
  elif args.mode == "vanilla":
    adamw_args["mask"] = adamw_args.pop("weight_decay_mask")
    core = optax.adamw(schedule, **adamw_args)
  elif args.mode == "ChildTuning-F":
    core = ct.child_tuning_adamw(schedule, mode="free", reserve_p=args.reserve_p, key=key,
                                 **adamw_args)
  else:
    core = ct.child_tuning_adamw(schedule, mode="driven", mask=mask, **adamw_args)
  clip = [optax.clip_by_global_norm(args.max_grad_norm)] if args.max_grad_norm > 0 else []
  return optax.chain(*(t for piece in pieces for t in piece.before_clipping), *clip, core,
                     *(t for piece in pieces for t in piece.after_optimizer))


def check_flags_against_data(args: TrainingArguments, data_args: DataArguments, datasets,
                             config) -> None:
  """Refuses flags that cannot work with this data and model (the flags alone are checked by
  the argument classes)."""
  if args.r3f_sigma > 0 and datasets.is_regression:
    raise ValueError("R3F compares output distributions: it applies to classification only, "
                     "as in the paper.")
  if data_args.max_seq_length is not None and data_args.max_seq_length > config.max_tokens:
    raise ValueError(f"--max_seq_length {data_args.max_seq_length} is longer than the model's "
                     f"{config.max_tokens} positions (max_position_embeddings in its config.json): "
                     f"use at most {config.max_tokens}.")
  if args.top_k_layers is not None and args.top_k_layers > config.num_hidden_layers:
    raise ValueError(f"--top_k_layers {args.top_k_layers}: the model has "
                     f"{config.num_hidden_layers} layers.")


def child_network_of(opt_state: Any) -> Any:
  """The CT-D mask kept in an optimizer state."""
  states = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda s: isinstance(s, ct.ChildTuningDrivenState))
            if isinstance(s, ct.ChildTuningDrivenState)]
  return states[0].mask


# ----------------------------------------------------------------------------- steps


def logits_of(model, params, batch, dropout_key=None, row_offsets=None) -> jax.Array:
  """The model's logits; dropout on when a key is given. ``row_offsets`` (from
  ``estimate_fisher``'s ``embedding_lookups``, or R3F's noise) are added to the looked-up
  word embeddings."""
  variables = {"params": params}
  if row_offsets is not None:
    variables["perturbations"] = model.perturbations(row_offsets)
  return model.apply(variables, *(batch[name] for name in MODEL_INPUTS),
                     deterministic=dropout_key is None,
                     rngs=None if dropout_key is None else {"dropout": dropout_key})


def losses_of(logits, labels, *, is_regression: bool):
  """``(losses, predictions)``: cross-entropy and class ids, or squared error and scores."""
  if is_regression:
    scores = logits[:, 0].astype(jnp.float32)
    return (scores - labels) ** 2, scores
  logits = logits.astype(jnp.float32)
  return (optax.softmax_cross_entropy_with_integer_labels(logits, labels),
          jnp.argmax(logits, axis=-1))


def per_example_losses(model, params, batch, *, is_regression: bool, dropout_key=None,
                       row_offsets=None):
  logits = logits_of(model, params, batch, dropout_key=dropout_key, row_offsets=row_offsets)
  return losses_of(logits, batch["labels"], is_regression=is_regression)


def task_loss(model, *, is_regression: bool) -> methods.Loss:
  """The task's mean loss on a batch, with dropout: ``loss(params, batch, dropout_key,
  pretrained) -> (loss, logits)`` (the methods of train/methods.py wrap it)."""
  def loss(params, batch, dropout_key, pretrained=None):
    logits = logits_of(model, params, batch, dropout_key=dropout_key)
    return losses_of(logits, batch["labels"], is_regression=is_regression)[0].mean(), logits
  return loss


def make_train_step(tx: optax.GradientTransformation, loss: methods.Loss,
                    schedule: optax.Schedule) -> Callable:
  """``(state, batch) -> (state, metrics)``: one optimizer step on ``loss``'s gradient.

  Step ``s`` draws its dropout from ``fold_in(state.dropout_key, s)``; the pretrained
  weights, if the state holds them, go to the loss and to the optimizer (``pretrained=``).
  """
  def train_step(state: TrainState, batch):
    # One flag per row (a row per example, so each process sets its own): whether a process
    # was asked to stop. Reduced here, every process reads the same answer after the same step.
    stop_requested = batch.pop("stop_requested", None)
    dropout_key = jax.random.fold_in(state.dropout_key, state.step)
    value_and_grad = jax.value_and_grad(lambda p: loss(p, batch, dropout_key, state.pretrained)[0])
    value, grads = value_and_grad(state.params)
    extra = {} if state.pretrained is None else {"pretrained": state.pretrained}
    updates, opt_state = tx.update(grads, state.opt_state, state.params, **extra)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": value, "grad_norm": optax.tree.norm(grads),
               "learning_rate": schedule(state.step)}
    if stop_requested is not None:
      metrics["stop_requested"] = jnp.max(stop_requested)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics
  return train_step


def compile_train_step(step_fn: Callable, run) -> Callable:
  """The jitted step: batch split over the devices, state replicated and donated (its buffers
  are reused for the new state, so the state passed in is deleted)."""
  return jax.jit(step_fn, in_shardings=(run.replicated, run.data), out_shardings=run.replicated,
                 donate_argnums=0)


def make_eval_step(model, *, is_regression: bool) -> Callable:
  def eval_step(params, batch):
    return per_example_losses(model, params, batch, is_regression=is_regression)
  return eval_step


# ----------------------------------------------------------------------------- pieces of a run


class Run:
  """What one invocation needs everywhere: devices, shardings, output files."""

  def __init__(self, args: TrainingArguments):
    devices = jax.devices()
    if args.num_devices is not None:
      if not 1 <= args.num_devices <= len(devices):
        raise ValueError(f"--num_devices={args.num_devices}, but there are {len(devices)} devices.")
      devices = devices[:args.num_devices]
    # AxisType.Auto: with Explicit axes (jax.make_mesh's default) the embedding gather fails.
    self.mesh = jax.sharding.Mesh(np.array(devices), ("data",),
                                  axis_types=(jax.sharding.AxisType.Auto,))
    self.replicated = NamedSharding(self.mesh, P())
    self.data = NamedSharding(self.mesh, P("data"))
    self.num_devices = len(devices)
    self.output_dir = Path(args.output_dir)
    self.is_main = jax.process_index() == 0
    self.progress = not args.disable_tqdm and self.is_main

  def write_json(self, name: str, value: Any) -> None:
    if self.is_main:
      (self.output_dir / name).write_text(json.dumps(value, indent=2) + "\n")


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


def earlier_run(output_dir: Path) -> list[str]:
  """What in ``output_dir`` is worth keeping from an earlier run: a complete checkpoint, or
  final results. (A run that crashed before its first checkpoint leaves neither.)"""
  found = []
  if checkpoints_lib.has_checkpoint(output_dir / "checkpoints"):
    found.append("checkpoints/")
  if (output_dir / "all_results.json").is_file():
    found.append("all_results.json")
  return found


def prepare_output_dir(args: TrainingArguments) -> None:
  """Refuse to mix a new run into an earlier one unless asked (--resume continues it,
  --overwrite_output_dir deletes it); remove what a run that never saved left behind."""
  output_dir = Path(args.output_dir)
  if output_dir.exists() and not output_dir.is_dir():
    raise FileExistsError(f"--output_dir {output_dir} is a file.")
  earlier = earlier_run(output_dir)
  if earlier and not args.resume and not args.overwrite_output_dir:
    raise FileExistsError(
        f"{output_dir} holds an earlier run ({', '.join(earlier)}). Pass --resume to continue it "
        "or --overwrite_output_dir to start afresh.")
  fresh = args.overwrite_output_dir or not earlier
  if fresh and jax.process_index() == 0:
    shutil.rmtree(output_dir / "checkpoints", ignore_errors=True)
    for name in ("metrics.jsonl", "all_results.json", "train_results.json", "eval_results.json",
                 "mask.npz", "mask_keep_fractions.json"):
      (output_dir / name).unlink(missing_ok=True)
  output_dir.mkdir(parents=True, exist_ok=True)
  if jax.process_count() > 1:  # no process looks at the directory before process 0 cleared it
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices("prepare_output_dir")


def estimate_child_network(model, params, train_arrays, datasets, args: TrainingArguments,
                           run: Run) -> Any:
  """CT-D: Fisher information over (a subset of) the training set, then the top
  ``reserve_p`` fraction of the entries outside ``--always_trainable`` (or, as the
  ablations of ``--child_network``, a random or the lowest-Fisher fraction)."""
  always = always_trainable(args.always_trainable, params)
  if args.child_network == "random":  # the same budget, chosen without looking at the task
    rng = np.random.default_rng([args.seed, 2])
    scores = jax.tree.map(lambda p: rng.random(p.shape, dtype=np.float32), params)
    logger.info("a random child network (seed %d)", args.seed)
    return ct.select_child_network(scores, args.reserve_p, always_trainable=always)
  num_examples = len(train_arrays["labels"])
  count = min(args.fisher_num_examples or num_examples, num_examples)
  indices = np.sort(np.random.default_rng([args.seed, 1]).permutation(num_examples)[:count])
  examples = input_pipeline.take(train_arrays, indices)
  chunk_size = -(-args.fisher_batch_size // run.num_devices) * run.num_devices

  def loss_fn(params, batch, row_offsets=None):
    losses, _ = per_example_losses(model, params, batch, is_regression=datasets.is_regression,
                                   row_offsets=row_offsets)
    return losses.mean()

  per_example = args.fisher_estimator == "per_example"
  # Per-example word-embedding gradients row by row instead of dense vocab x hidden tables.
  lookups = {model.word_embeddings_path: "input_ids"} if per_example else None

  batches = (input_pipeline.take(examples, np.arange(start, min(start + chunk_size, count)))
             for start in range(0, count, chunk_size))
  logger.info("Fisher information over %d training examples (%s)", count, args.fisher_estimator)
  fisher = ct.estimate_fisher(loss_fn, params, batches, chunk_size=chunk_size,
                              per_example=per_example, embedding_lookups=lookups,
                              data_sharding=run.data, progress=run.progress)
  if args.child_network == "lowest_fisher":
    fisher = jax.tree.map(jnp.negative, fisher)
  return ct.select_child_network(fisher, args.reserve_p, always_trainable=always)


def always_trainable(pattern: str, params: Any) -> Callable | None:
  """``--always_trainable`` as ``select_child_network``'s predicate, refusing a pattern that
  matches no parameter (a typo) or every parameter (nothing left to choose from)."""
  if not pattern:
    return None
  regex = re.compile(pattern)
  names = [name for name, _ in _trees.named_leaves(params)]
  matched = [name for name in names if regex.search(name)]
  if not matched:
    raise ValueError(f"--always_trainable {pattern!r} matches no parameter; parameter names look "
                     f"like {names[0]!r} and {names[-1]!r}.")
  if len(matched) == len(names):
    raise ValueError(f"--always_trainable {pattern!r} matches every parameter, which leaves "
                     "Child-Tuning-D nothing to choose from (that is vanilla fine-tuning: "
                     "--mode vanilla).")
  return lambda path: bool(regex.search(_trees.path_name(path)))


def layer_of(name: str) -> str:
  """``bert/encoder/layer_3/attention/...`` -> ``layer_3``; ``bert/embeddings/...`` ->
  ``embeddings``; ``classifier/...`` -> ``classifier``."""
  parts = name.split("/")
  if "encoder" in parts[:-1]:
    return parts[parts.index("encoder") + 1]
  return parts[0] if parts[0] == "classifier" or len(parts) < 3 else parts[1]


def write_child_network(mask: Any, run: Run) -> None:
  if not run.is_main:
    return
  ct.save_mask(run.output_dir / "mask.npz", jax.device_get(mask))
  fractions = {"overall": ct.keep_fractions(mask, group_by=lambda name: "overall")["overall"],
               "per_layer": ct.keep_fractions(mask, group_by=layer_of)}
  run.write_json("mask_keep_fractions.json", fractions)


def evaluate(eval_step, params, arrays: dict, datasets, args: TrainingArguments, run: Run,
             name: str) -> dict[str, float]:
  """Loss and the task's metrics over one evaluation set."""
  batch_size = args.per_device_eval_batch_size * run.num_devices
  losses, predictions = [], []
  batches = input_pipeline.eval_batches(arrays, batch_size)
  total = -(-len(arrays["labels"]) // batch_size)
  for batch in tqdm(batches, total=total, desc=f"eval {name}", unit="batch", leave=False,
                    disable=not run.progress):
    real = int(batch.pop("weights").sum())
    loss, prediction = eval_step(params, input_pipeline.place(batch, run.data))
    losses.append(np.asarray(loss)[:real])
    predictions.append(np.asarray(prediction)[:real])
  predictions = np.concatenate(predictions)
  results = {"loss": float(np.mean(np.concatenate(losses)))}
  if not math.isfinite(results["loss"]):
    raise Diverged(f"evaluation on {name}: the loss is {results['loss']}; the model's outputs are "
                   "not finite, so its metrics would mean nothing.")
  results.update(compute_metrics(datasets.task_name, predictions, arrays["labels"],
                                 is_regression=datasets.is_regression))
  results["samples"] = len(predictions)
  return results


def evaluate_all(eval_step, params, eval_arrays, datasets, args, run) -> dict[str, float]:
  """``eval_<metric>`` for the validation set, ``eval_<name>_<metric>`` for the others."""
  results = {}
  for index, (name, arrays) in enumerate(eval_arrays.items()):
    prefix = "eval_" if index == 0 else f"eval_{name}_"
    for metric, value in evaluate(eval_step, params, arrays, datasets, args, run, name).items():
      results[prefix + metric] = value
  return results


class MetricsLog:
  """``metrics.jsonl``: one JSON object per training step (and per evaluation).

  Resuming from the checkpoint of step ``k`` keeps what the log held at that checkpoint: the
  steps up to ``k`` and the evaluations before it (an evaluation of step ``k`` is written
  before its checkpoint, except the final one, which comes after the last checkpoint).
  """

  def __init__(self, path: Path, *, keep_until_step: int, final_step: int, enabled: bool):
    self.path, self.enabled = path, enabled
    if enabled and path.exists():
      def kept(record):
        if record["step"] < keep_until_step or "loss" in record:
          return record["step"] <= keep_until_step
        return record["step"] == keep_until_step and keep_until_step != final_step
      lines = [line for line in path.read_text().splitlines()
               if line.strip() and kept(json.loads(line))]
      path.write_text("".join(line + "\n" for line in lines))

  def write(self, record: dict) -> None:
    if self.enabled:
      with open(self.path, "a") as file:
        file.write(json.dumps(record) + "\n")

  def train_losses(self) -> list[float]:
    if not self.path.exists():
      return []
    records = (json.loads(line) for line in self.path.read_text().splitlines() if line.strip())
    return [r["loss"] for r in records if "loss" in r]


# Flags that change what the train state holds: a checkpoint of another value cannot be resumed.
STATE_FLAGS = ("model_name_or_path", "task_name", "train_file", "mode", "top_k_layers",
               "mixout_p", "recadam_k", "decay_to_pretrained", "max_grad_norm", "weight_decay")
# Flags that do not change the result of a resumed run.
IGNORED_ON_RESUME = ("resume", "overwrite_output_dir", "output_dir", "disable_tqdm", "eval_steps",
                     "save_steps", "save_total_limit", "num_devices", "jax_distributed",
                     "coordinator_address", "num_processes", "process_id",
                     "heartbeat_timeout_seconds")
PATH_FLAGS = ("model_name_or_path", "train_file", "validation_file", "extra_eval_files")


def normalized_flags(flags: dict) -> dict:
  """Paths that exist as absolute real paths, so that one file spelled two ways compares equal."""
  def real(value):
    return str(Path(value).resolve()) if isinstance(value, str) and Path(value).exists() else value
  return {name: ([real(v) for v in value] if isinstance(value, list) else real(value))
          if name in PATH_FLAGS else value for name, value in flags.items()}


class Saver:
  """Writes checkpoints of finite states only, and says plainly when writing fails."""

  def __init__(self, manager, flags: dict, batch_size: int):
    self.manager = manager
    self.metadata = {"flags": normalized_flags(flags), "batch_size": batch_size}
    self.last_step = manager.latest_step()

  def save(self, state: TrainState) -> None:
    step = int(state.step)
    if step == self.last_step:
      return
    if not bool(_all_finite(state.params)):
      raise Diverged(f"after step {step} a parameter is NaN or infinite; it is not saved. "
                     + self.kept())
    # Refused here, a full disk gets one clear message instead of orbax's failing writer threads.
    needed = sum(x.nbytes for x in jax.tree.leaves(checkpoints_lib.key_data(state)))
    free = free_bytes(self.manager.directory)
    if free < 1.1 * needed + 2**16:
      raise OSError(errno.ENOSPC, f"the checkpoint of step {step} needs about "
                    f"{needed / 2**20:.1f} MiB, but {self.manager.directory} has "
                    f"{free / 2**20:.1f} MiB free. {self.kept()} Free space (a lower "
                    "--save_total_limit keeps fewer checkpoints), then continue with --resume")
    with self._errors(step):
      checkpoints_lib.save(self.manager, step, state, {"step": step, **self.metadata})
    self.last_step = step

  def kept(self) -> str:
    return (f"The last checkpoint, of step {self.last_step}, is kept." if self.last_step is not None
            else "No checkpoint was written.")

  def close(self) -> None:
    """Waits for the checkpoint being written in the background, then releases the manager."""
    with self._errors(self.last_step):
      self.manager.wait_until_finished()
    self.manager.close()

  @contextlib.contextmanager
  def _errors(self, step):
    try:
      yield
    except Exception as error:
      # Orbax (and tensorstore under it) wrap a file system's error (a full disk, a permission)
      # in their own exception types; tensorstore marks it with "os_error_code".
      chain = [error]
      while chain[-1].__cause__ is not None or chain[-1].__context__ is not None:
        chain.append(chain[-1].__cause__ or chain[-1].__context__)
      cause = next((e for e in reversed(chain)
                    if isinstance(e, OSError) or "os_error_code" in str(e)), None)
      if cause is None:
        raise
      raise OSError(f"could not write the checkpoint of step {step} to {self.manager.directory}: "
                    f"{str(cause).splitlines()[0]}. Free space (a lower --save_total_limit keeps "
                    "fewer checkpoints), then continue with --resume (the last complete checkpoint "
                    "is used).") from None


def free_bytes(directory: Path) -> int:
  return shutil.disk_usage(directory).free


@jax.jit
def _all_finite(params) -> jax.Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(p)) for p in jax.tree.leaves(params)]))


@dataclasses.dataclass(frozen=True)
class Steps:
  """How many optimizer steps a run takes, and of what size."""

  total: int
  per_epoch: int
  batch_size: int  # the global batch: per device x devices


def train_loop(state: TrainState, train_step, evaluate_params: Callable, train_arrays: dict,
               steps: Steps, args: TrainingArguments, run: Run, log: MetricsLog, saver: Saver,
               signals: StopSignals) -> TrainState:
  """Steps from ``state.step`` to ``steps.total``: logs every step, evaluates every
  ``--eval_steps``, saves every ``--save_steps`` and at the end.

  A step's metrics are read after the next step is dispatched (so the device never waits
  for the host). They are checked before the state they led to is saved: a non-finite loss
  or gradient norm raises :class:`Diverged`, and nothing after the last good checkpoint is
  saved. A stop signal is passed through the step to every process; all then finish the
  step they are in, save it and raise :class:`Stopped`.
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
      state, metrics = train_step(state, input_pipeline.place(batch, run.data))
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


# ----------------------------------------------------------------------------- the run


def train_and_evaluate(model_args: ModelArguments, data_args: DataArguments,
                       args: TrainingArguments) -> dict[str, float]:
  """Fine-tunes and evaluates as the flags say; returns the final ``all_results``.

  Raises :class:`Stopped` on SIGTERM/SIGINT (after saving, inside the training loop) and
  :class:`Diverged` on a non-finite loss; with several processes, a process that fails
  alone tells the others, which stop too (``train/distributed.py``).
  """
  with StopSignals() as signals:
    try:
      return _train_and_evaluate(model_args, data_args, args, signals)
    except BaseException as error:
      if not (getattr(error, "agreed", False) or isinstance(error, Diverged)):
        distributed.report_failure(error)  # every process reaches the other two together
      raise


def _train_and_evaluate(model_args, data_args, args, signals) -> dict[str, float]:
  distributed.initialize(args)
  signals.install_again()
  prepare_output_dir(args)
  run = Run(args)
  flags = as_dict(model_args, data_args, args)

  datasets, train_arrays, eval_arrays, model, params, from_checkpoint = load_data_and_model(
      model_args, data_args, args)
  steps = plan_steps(args, run, len(train_arrays["labels"]))
  schedule = learning_rate_schedule(args, steps.total)
  dropout_key, ctf_key = jax.random.split(jax.random.key(args.seed))

  checkpoints = (checkpoints_lib.manager(run.output_dir / "checkpoints", args.save_total_limit)
                 if args.do_train else None)
  resuming = checkpoints is not None and args.resume and checkpoints.latest_step() is not None
  if resuming:
    check_resumable(checkpoints, flags, steps.batch_size)
  run.write_json("run_args.json", flags)

  mask, child_network_runtime = None, None
  if args.mode == "ChildTuning-D":
    if resuming:  # the child network comes back with the optimizer state
      mask = jax.tree.map(lambda p: np.ones(p.shape, bool), params)
    else:
      started = time.perf_counter()
      mask = estimate_child_network(model, checkpoints_lib.place(params, run.replicated),
                                    train_arrays, datasets, args, run)
      child_network_runtime = round(time.perf_counter() - started, 3)
  context = methods.Context(args=args, model=model, params=params, schedule=schedule,
                            from_checkpoint=from_checkpoint,
                            logits=functools.partial(logits_of, model))
  pieces = methods.chosen(context)
  tx = optimizer(args, schedule, pieces, key=ctf_key, mask=mask)
  # w0 is a copy: the state is donated to the step, and a buffer cannot be donated twice.
  needs_pretrained = any(piece.needs_pretrained for piece in pieces)
  pretrained = jax.tree.map(jnp.array, params) if needs_pretrained else None
  state = checkpoints_lib.place(
      TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                 dropout_key=dropout_key, pretrained=pretrained), run.replicated)
  if resuming:
    state = restore(checkpoints, state)
  if args.mode == "ChildTuning-D":
    write_child_network(child_network_of(state.opt_state), run)

  loss = methods.wrap_loss(task_loss(model, is_regression=datasets.is_regression), pieces)
  train_step = compile_train_step(make_train_step(tx, loss, schedule), run)
  eval_step = jax.jit(make_eval_step(model, is_regression=datasets.is_regression),
                      in_shardings=(run.replicated, run.data), out_shardings=run.replicated)
  evaluate_params = lambda params: evaluate_all(eval_step, params, eval_arrays, datasets, args, run)

  start_step = int(state.step)
  log = MetricsLog(run.output_dir / "metrics.jsonl", keep_until_step=start_step,
                   final_step=steps.total, enabled=run.is_main)
  runtime = 0.0
  if args.do_train:
    logger.info("%s: %d examples, %d devices, batch %d, %d steps (%d per epoch), from step %d",
                args.mode, len(train_arrays["labels"]), run.num_devices, steps.batch_size,
                steps.total, steps.per_epoch, start_step)
    saver = Saver(checkpoints, flags, steps.batch_size)
    started = time.perf_counter()
    try:
      state = train_loop(state, train_step, evaluate_params, train_arrays, steps, args, run, log,
                         saver, signals)
    finally:
      saver.close()
    runtime = time.perf_counter() - started

  results = {}
  if args.do_eval:
    results = evaluate_params(state.params)
    if args.prune_at_eval:  # Table 5's "Prune": the weights outside the child network set to 0
      mask = child_network_of(state.opt_state)
      pruned = jax.tree.map(lambda p, keep: jnp.where(keep, p, 0), state.params, mask)
      name, arrays = next(iter(eval_arrays.items()))
      results.update({f"eval_pruned_{metric}": value for metric, value in
                      evaluate(eval_step, pruned, arrays, datasets, args, run, f"{name} pruned").items()})
    log.write({"step": steps.total, **results})
  all_results = dict(results)
  if args.do_train:
    losses = log.train_losses()
    steps_run = steps.total - start_step
    train_results = {
        "train_loss": float(np.mean(losses)) if losses else float("nan"),
        "train_runtime": round(runtime, 3),
        "train_samples": len(train_arrays["labels"]),
        "train_steps": steps.total,
        "train_samples_per_second": (round(steps_run * steps.batch_size / runtime, 3)
                                     if steps_run else 0.0),
        "epoch": round(steps.total / steps.per_epoch, 4),
    }
    if child_network_runtime is not None:  # CT-D: Fisher pass and selection, before training
      train_results["child_network_runtime"] = child_network_runtime
    run.write_json("train_results.json", train_results)
    all_results = {**train_results, **results}
  if args.do_eval:
    run.write_json("eval_results.json", results)
  run.write_json("all_results.json", all_results)
  return all_results


def load_data_and_model(model_args: ModelArguments, data_args: DataArguments,
                        args: TrainingArguments):
  """The data sets (tokenised) and the pretrained model, every check that needs them done
  before any training: ``(datasets, train_arrays, eval_arrays, model, params,
  from_checkpoint)``, where ``from_checkpoint(name)`` says whether a leaf was pretrained."""
  model_path = resolve_checkpoint(model_args.model_name_or_path or embedded_model_path())
  config = load_config(model_path)  # refuses a directory without config.json or weights
  default_data = not (data_args.task_name or data_args.train_file)
  max_train_samples = data_args.max_train_samples
  max_seq_length = data_args.max_seq_length or min(128, config.max_tokens)
  if default_data:
    max_train_samples = max_train_samples or DEFAULT_DATA_MAX_TRAIN_SAMPLES
    max_seq_length = data_args.max_seq_length or DEFAULT_DATA_MAX_SEQ_LENGTH
    logger.info("No --task_name or --train_file: fine-tuning on the embedded Rotten Tomatoes "
                "reviews, %d training examples, max_seq_length %d (for a run of minutes on a CPU).",
                max_train_samples, max_seq_length)
  datasets = input_pipeline.load_datasets(
      task_name=data_args.task_name, train_file=data_args.train_file,
      validation_file=data_args.validation_file, extra_eval_files=data_args.extra_eval_files,
      max_train_samples=max_train_samples, max_eval_samples=data_args.max_eval_samples,
      seed=args.seed)
  logger.info("%s", input_pipeline.describe(datasets))
  check_flags_against_data(args, data_args, datasets, config)
  tokenizer = input_pipeline.load_tokenizer(model_path)
  train_arrays, eval_arrays = input_pipeline.tokenize(
      datasets, tokenizer, max_seq_length, vocab_size=config.vocab_size,
      type_vocab_size=config.type_vocab_size)
  model, params, loading = load_pretrained(model_path, datasets.num_labels, seed=args.seed,
                                           output_loading_info=True)
  if args.mode == "ChildTuning-D":
    always_trainable(args.always_trainable, params)  # a bad pattern fails now, not after the Fisher pass
  not_pretrained = set(loading["missing_keys"])  # incl. a head re-initialised for its shape
  from_checkpoint = lambda name: name not in not_pretrained  # a fresh head has no w0
  return datasets, train_arrays, eval_arrays, model, params, from_checkpoint


def plan_steps(args: TrainingArguments, run: Run, num_examples: int) -> Steps:
  batch_size = args.per_device_train_batch_size * run.num_devices
  per_epoch = num_examples // batch_size
  if per_epoch == 0 and args.do_train:
    raise ValueError(f"{num_examples} training examples are fewer than one batch "
                     f"({args.per_device_train_batch_size} per device x {run.num_devices} devices).")
  per_epoch = max(per_epoch, 1)  # without training: only names the schedule
  total = args.max_steps if args.max_steps > 0 else math.ceil(args.num_train_epochs * per_epoch)
  return Steps(total=total, per_epoch=per_epoch, batch_size=batch_size)


def check_resumable(checkpoints, flags: dict, batch_size: int) -> None:
  """Refuses to resume a checkpoint written with other flags that shape the train state (its
  restore could not work, or would mix two runs); warns about other differences."""
  metadata = checkpoints_lib.latest_metadata(checkpoints) or {}
  saved, current = normalized_flags(metadata.get("flags", {})), normalized_flags(flags)
  changed = {name: (saved[name], current.get(name)) for name in saved
             if name not in IGNORED_ON_RESUME and saved[name] != current.get(name)}
  described = ", ".join(f"--{name} {old!r} -> {new!r}" for name, (old, new) in changed.items())
  blocking = [name for name in changed if name in STATE_FLAGS]
  if blocking:
    raise ValueError(
        f"--resume: the checkpoint in {checkpoints.directory} (step {checkpoints.latest_step()}) "
        f"was written by a run with other flags: {described}. Resume with that run's flags, or "
        "start afresh with --overwrite_output_dir.")
  if "batch_size" in metadata and metadata["batch_size"] != batch_size:
    changed["global batch size"] = (metadata["batch_size"], batch_size)
    described = ", ".join(f"{name}: {old!r} -> {new!r}" for name, (old, new) in changed.items())
  if changed:
    logger.warning("resuming with flags that differ from the checkpoint's run, so the result will "
                   "differ from an uninterrupted run: %s", described)


def restore(checkpoints, state: TrainState) -> TrainState:
  """The latest checkpoint, placed as ``state``; a clear error if it does not fit."""
  try:
    restored, _ = checkpoints_lib.restore_latest(checkpoints, state)
  except Exception as error:  # orbax's message names its internals, not the cause
    raise ValueError(
        f"--resume: the checkpoint of step {checkpoints.latest_step()} in {checkpoints.directory} "
        "does not fit this run's model and optimizer (another model, number of labels or "
        f"method?): {type(error).__name__}: {str(error).splitlines()[0][:300]}. Resume with the "
        "checkpoint's own model and flags, or start afresh with --overwrite_output_dir.") from None
  return restored
