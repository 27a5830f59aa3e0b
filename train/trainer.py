"""A fine-tuning run: the optimizer, the jitted steps, CT-D's child network, evaluation, outputs.

``train_and_evaluate`` runs the phases in order: :func:`start` (processes, output
directory, data and model, every check that can fail before training), the
:func:`child_network_phase` (CT-D's Fisher pass), :func:`initial_state` (the optimizer of
the mode and the prior methods, train/methods.py; a resumed state), :func:`train` (the
loop of train/loop.py), :func:`evaluate_and_write`.

Everything that changes during training lives in one :class:`TrainState`
pytree (step, parameters, optimizer state, dropout key), which is also what a
checkpoint holds; the data order is a function of ``(seed, epoch)`` and the
dropout key of a step is ``fold_in(dropout_key, step)``. So a run resumed from
a checkpoint takes exactly the steps the uninterrupted run would have.

Parallelism: a ``Mesh`` over the devices with axes ``data`` and ``fsdp`` (``--fsdp N``:
N devices along ``fsdp``; ``AxisType.Auto``). The batch is split over all devices; every
leaf of the train state is split over ``fsdp`` along its largest axis N divides
(:func:`fsdp_spec`), or replicated (N = 1, the default: plain data parallelism). ``jax.jit``
inserts the collectives: the parameters' all-gathers and the gradients' reductions.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import re
import shutil
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
from childtuning_jax.cpu import peak_rss_mib
from train.metrics import compute_metrics
from childtuning_jax.models import embedded_model_path, load_config, load_pretrained, resolve_checkpoint
from train import checkpoints as checkpoints_lib
from train import distributed, input_pipeline, loop, methods
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
  sparse = dict(sparse_state=args.sparse_optimizer_state)
  if fixed:  # Top-K tuning (vanilla mode): a fixed mask of its own, frozen exactly
    core = ct.child_tuning_adamw(schedule, mode="driven", mask=fixed[0], **adamw_args, **sparse)
  elif args.mode == "vanilla":
    adamw_args["mask"] = adamw_args.pop("weight_decay_mask")
    core = optax.adamw(schedule, **adamw_args)
  elif args.mode == "ChildTuning-F":
    core = ct.child_tuning_adamw(schedule, mode="free", reserve_p=args.reserve_p, key=key,
                                 **adamw_args)
  else:
    core = ct.child_tuning_adamw(schedule, mode="driven", mask=mask, **adamw_args, **sparse)
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


def child_network_of(opt_state: Any, params: Any) -> Any:
  """The CT-D mask kept in an optimizer state (rebuilt from the positions a sparse state
  keeps instead)."""
  mask = optax.tree_utils.tree_get(opt_state, "mask")
  if mask is not None:
    return mask
  return jax.tree.map(lambda where, p: jnp.zeros(p.size, bool).at[where].set(True, mode="drop").reshape(p.shape),
                      optax.tree_utils.tree_get(opt_state, "indices"), params)


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
                    schedule: optax.Schedule, *, micro_batches: int = 1) -> Callable:
  """``(state, batch) -> (state, metrics)``: one optimizer step on ``loss``'s gradient.

  Step ``s`` draws its dropout from ``fold_in(state.dropout_key, s)``; the pretrained
  weights, if the state holds them, go to the loss and to the optimizer (``pretrained=``).

  ``micro_batches`` > 1 (gradient accumulation): every leaf of ``batch`` has a leading axis
  of that many equal micro-batches; the step's loss and gradient are their means (a loop
  over them: activations of one micro-batch at a time), and micro-batch ``i`` draws its
  dropout from ``fold_in(fold_in(state.dropout_key, s), i)``. The optimizer, and so
  Child-Tuning's mask, runs once per step.
  """
  def train_step(state: TrainState, batch):
    # One flag per row (a row per example, so each process sets its own): whether a process
    # was asked to stop. Reduced here, every process reads the same answer after the same step.
    stop_requested = batch.pop("stop_requested", None)
    dropout_key = jax.random.fold_in(state.dropout_key, state.step)

    def value_and_grad(batch, dropout_key):
      return jax.value_and_grad(lambda p: loss(p, batch, dropout_key, state.pretrained)[0])(
          state.params)

    if micro_batches == 1:
      value, grads = value_and_grad(batch, dropout_key)
    else:
      def accumulate(total, micro_batch):
        index, batch = micro_batch
        return jax.tree.map(jnp.add, total,
                            value_and_grad(batch, jax.random.fold_in(dropout_key, index))), None
      zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, state.params))
      total, _ = jax.lax.scan(accumulate, zeros, (jnp.arange(micro_batches), batch))
      value, grads = jax.tree.map(lambda x: x / micro_batches, total)
    extra = {} if state.pretrained is None else {"pretrained": state.pretrained}
    updates, opt_state = tx.update(grads, state.opt_state, state.params, **extra)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": value, "grad_norm": optax.tree.norm(grads),
               "learning_rate": schedule(state.step)}
    if stop_requested is not None:
      metrics["stop_requested"] = jnp.max(stop_requested)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics
  return train_step


def fsdp_spec(shape: tuple[int, ...], n: int) -> P:
  """How ``--fsdp n`` splits a leaf of ``shape``: along its largest axis that ``n`` divides
  (the first such axis of that size), over the mesh's ``fsdp`` axis; whole (replicated)
  when ``n`` is 1 or divides no axis (scalars, odd-sized vectors)."""
  axes = [axis for axis, size in enumerate(shape) if n > 1 and size % n == 0]
  if not axes:
    return P()
  axis = max(axes, key=lambda a: (shape[a], -a))
  return P(*(("fsdp" if a == axis else None) for a in range(len(shape))))


def compile_train_step(step_fn: Callable, run, state: TrainState) -> Callable:
  """The jitted step: batch split over the devices, the state placed as ``run.shardings``
  places ``state`` and donated (its buffers are reused for the new state, so the state
  passed in is deleted)."""
  shardings = run.shardings(state)
  return jax.jit(step_fn, in_shardings=(shardings, run.train_data),
                 out_shardings=(shardings, run.replicated), donate_argnums=0)


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
    if len(devices) % args.fsdp:
      raise ValueError(f"--fsdp {args.fsdp} must divide the number of devices, {len(devices)}.")
    # AxisType.Auto: with Explicit axes (jax.make_mesh's default) the embedding gather fails.
    self.mesh = jax.sharding.Mesh(np.array(devices).reshape(-1, args.fsdp), ("data", "fsdp"),
                                  axis_types=(jax.sharding.AxisType.Auto,) * 2)
    self.fsdp = args.fsdp
    self.replicated = NamedSharding(self.mesh, P())
    self.data = NamedSharding(self.mesh, P(("data", "fsdp")))  # the batch over every device
    # A training batch: with --gradient_accumulation_steps N, N micro-batches along a leading
    # axis, each split over every device.
    self.micro_batches = args.gradient_accumulation_steps
    self.train_data = (self.data if self.micro_batches == 1
                       else NamedSharding(self.mesh, P(None, ("data", "fsdp"))))
    self.num_devices = len(devices)
    self.output_dir = Path(args.output_dir)
    self.is_main = jax.process_index() == 0
    self.progress = not args.disable_tqdm and self.is_main

  def shardings(self, tree: Any) -> Any:
    """A ``NamedSharding`` per leaf of ``tree`` (a train state, parameters, a mask): split
    over ``fsdp`` as :func:`fsdp_spec` says; typed PRNG keys and scalars replicated."""
    def sharding(leaf):
      if checkpoints_lib.is_typed_key(leaf):
        return self.replicated
      return NamedSharding(self.mesh, fsdp_spec(np.shape(leaf), self.fsdp))
    return jax.tree.map(sharding, tree)

  def place(self, tree: Any) -> Any:
    """``tree`` on the devices, placed as :meth:`shardings` says."""
    return checkpoints_lib.place(tree, self.shardings(tree))

  def to_host(self, tree: Any) -> Any:
    """``tree`` as numpy arrays on every process, also where a process holds only shards."""
    if all(getattr(x, "is_fully_addressable", True) for x in jax.tree.leaves(tree)):
      return jax.device_get(tree)
    from jax.experimental import multihost_utils
    return multihost_utils.process_allgather(tree, tiled=True)

  def write_json(self, name: str, value: Any) -> None:
    if self.is_main:
      (self.output_dir / name).write_text(json.dumps(value, indent=2) + "\n")


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
                 "mask.npz", "mask_keep_fractions.json", "child_delta.npz"):
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


def write_child_network(mask: Any, run: Run, always_trainable_pattern: str) -> None:
  """``mask.npz`` and ``mask_keep_fractions.json``: the child's share of all entries, of the
  entries that competed for it (outside ``--always_trainable``: p by construction), of the
  encoder blocks' entries, and of each layer's."""
  mask = run.to_host(mask)  # every process takes part in gathering shards
  if not run.is_main:
    return
  ct.save_mask(run.output_dir / "mask.npz", mask)
  always = re.compile(always_trainable_pattern) if always_trainable_pattern else None

  def share(selected: Callable[[str], bool]) -> float | None:
    groups = ct.keep_fractions(mask, group_by=lambda name: "in" if selected(name) else "out")
    return groups.get("in")
  fractions = {"overall": share(lambda name: True),
               "competing": share(lambda name: not (always and always.search(name))),
               "encoder_blocks": share(lambda name: "/encoder/layer_" in name),
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
    raise loop.Diverged(f"evaluation on {name}: the loss is {results['loss']}; the model's "
                        "outputs are not finite, so its metrics would mean nothing.")
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


# ----------------------------------------------------------------------------- the run


def train_and_evaluate(model_args: ModelArguments, data_args: DataArguments,
                       args: TrainingArguments) -> dict[str, float]:
  """Fine-tunes and evaluates as the flags say; returns the final ``all_results``.

  Raises :class:`Stopped` on SIGTERM/SIGINT (after saving, inside the training loop) and
  :class:`loop.Diverged` on a non-finite loss; with several processes, a process that fails
  alone tells the others, which stop too (``train/distributed.py``).
  """
  with loop.StopSignals() as signals:
    try:
      results = _train_and_evaluate(model_args, data_args, args, signals)
      distributed.finished()
      return results
    except BaseException as error:
      if not (getattr(error, "agreed", False) or isinstance(error, loop.Diverged)):
        distributed.report_failure(error)  # every process reaches the other two together
      raise


@dataclasses.dataclass
class Setup:
  """What the phases of a run share, once start-up is done."""

  args: TrainingArguments
  flags: dict  # every flag, as run_args.json and the checkpoints' metadata hold them
  run: Run
  datasets: Any
  train_arrays: dict
  eval_arrays: dict
  model: Any
  params: Any  # the pretrained parameters (a fresh head where the checkpoint has none)
  pretrained: Callable[[], Any]  # reads them again (training donates the copy above)
  from_checkpoint: Callable[[str], bool]
  steps: loop.Steps
  schedule: optax.Schedule
  checkpoints: Any  # the orbax manager (None without training)
  resuming: bool


def _train_and_evaluate(model_args, data_args, args, signals) -> dict[str, float]:
  setup = start(model_args, data_args, args, signals)
  mask, child_network_runtime = child_network_phase(setup)
  state, tx, pieces = initial_state(setup, mask)
  state, runtime, log = train(setup, state, tx, pieces, signals)
  return evaluate_and_write(setup, state, log, runtime, child_network_runtime)


def start(model_args, data_args, args, signals) -> Setup:
  """Processes, output directory, devices, data and model, the plan of steps, and every check
  that can fail before training (a resume included)."""
  distributed.initialize(args)
  signals.install_again()
  prepare_output_dir(args)
  run = Run(args)
  flags = as_dict(model_args, data_args, args)
  datasets, train_arrays, eval_arrays, model, params, from_checkpoint, pretrained = (
      load_data_and_model(model_args, data_args, args))
  steps = plan_steps(args, run, len(train_arrays["labels"]))
  checkpoints = (checkpoints_lib.manager(run.output_dir / "checkpoints", args.save_total_limit)
                 if args.do_train else None)
  resuming = checkpoints is not None and args.resume and checkpoints.latest_step() is not None
  if resuming:
    checkpoints_lib.check_resumable(checkpoints, flags, steps.batch_size)
  run.write_json("run_args.json", flags)
  return Setup(args=args, flags=flags, run=run, datasets=datasets, train_arrays=train_arrays,
               eval_arrays=eval_arrays, model=model, params=params, pretrained=pretrained,
               from_checkpoint=from_checkpoint, steps=steps,
               schedule=learning_rate_schedule(args, steps.total), checkpoints=checkpoints,
               resuming=resuming)


def child_network_phase(setup: Setup) -> tuple[Any, float | None]:
  """CT-D's child network before training (``(mask, seconds)``; ``(None, None)`` in the
  other modes). A resumed run's child network comes back with its optimizer state."""
  if setup.args.mode != "ChildTuning-D":
    return None, None
  if setup.resuming:  # a stand-in of the right structure, replaced by the restore
    return jax.tree.map(lambda p: np.ones(p.shape, bool), setup.params), None
  started = time.perf_counter()
  mask = estimate_child_network(setup.model, setup.run.place(setup.params),
                                setup.train_arrays, setup.datasets, setup.args, setup.run)
  return mask, round(time.perf_counter() - started, 3)


def initial_state(setup: Setup, mask: Any):
  """``(state, tx, pieces)``: the optimizer of the mode and the chosen methods, and the train
  state at step 0 or, resuming, at the latest checkpoint."""
  args = setup.args
  dropout_key, ctf_key = jax.random.split(jax.random.key(args.seed))
  context = methods.Context(args=args, model=setup.model, params=setup.params,
                            schedule=setup.schedule, from_checkpoint=setup.from_checkpoint,
                            logits=functools.partial(logits_of, setup.model))
  pieces = methods.chosen(context)
  tx = optimizer(args, setup.schedule, pieces, key=ctf_key, mask=mask)
  # w0 is a copy: the state is donated to the step, and a buffer cannot be donated twice.
  needs_pretrained = any(piece.needs_pretrained for piece in pieces)
  pretrained = jax.tree.map(jnp.array, setup.params) if needs_pretrained else None
  params = setup.run.place(setup.params)  # the optimizer state is made where its leaf is
  state = setup.run.place(
      TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                 dropout_key=dropout_key, pretrained=pretrained))
  if setup.resuming:
    state = checkpoints_lib.restore(setup.checkpoints, state)
  if args.mode == "ChildTuning-D":
    write_child_network(child_network_of(state.opt_state, state.params), setup.run,
                        args.always_trainable)
  return state, tx, pieces


def write_child_delta(setup: Setup, state: TrainState) -> int:
  """``child_delta.npz``: the child entries training changed (``ct.apply_child_delta`` on the
  pretrained parameters rebuilds the fine-tuned ones). Returns its size in bytes."""
  # Every process takes part in gathering shards.
  params = setup.run.to_host(state.params)
  mask = setup.run.to_host(child_network_of(state.opt_state, state.params))
  if not setup.run.is_main:
    return 0
  written = ct.save_child_delta(setup.run.output_dir / "child_delta.npz", params,
                                setup.pretrained(), mask)
  logger.info("child_delta.npz: %d changed entries of %d, %.1f MiB", written["entries"],
              written["parameters"], written["bytes"] / 2**20)
  return written["bytes"]


def _evaluator(setup: Setup) -> tuple[Callable, Callable]:
  """``(eval_step, evaluate_params)``: the jitted evaluation step, and every evaluation set's
  metrics for some parameters."""
  run, datasets = setup.run, setup.datasets
  eval_step = jax.jit(make_eval_step(setup.model, is_regression=datasets.is_regression),
                      in_shardings=(run.shardings(setup.params), run.data),
                      out_shardings=run.replicated)
  return eval_step, lambda params: evaluate_all(eval_step, params, setup.eval_arrays, datasets,
                                                setup.args, run)


def train(setup: Setup, state: TrainState, tx, pieces, signals: loop.StopSignals):
  """The training loop from the state's step (``(state, seconds, metrics log)``)."""
  args, run, steps = setup.args, setup.run, setup.steps
  start_step = int(state.step)
  log = loop.MetricsLog(run.output_dir / "metrics.jsonl", keep_until_step=start_step,
                   final_step=steps.total, enabled=run.is_main)
  if not args.do_train:
    return state, 0.0, log
  loss = methods.wrap_loss(task_loss(setup.model, is_regression=setup.datasets.is_regression),
                           pieces)
  train_step = compile_train_step(
      make_train_step(tx, loss, setup.schedule, micro_batches=run.micro_batches), run, state)
  logger.info("%s: %d examples, %d devices, batch %d%s, %d steps (%d per epoch), from step %d",
              args.mode, len(setup.train_arrays["labels"]), run.num_devices, steps.batch_size,
              f" ({run.micro_batches} micro-batches of {steps.batch_size // run.micro_batches})"
              if run.micro_batches > 1 else "", steps.total, steps.per_epoch, start_step)
  saver = checkpoints_lib.Saver(setup.checkpoints, setup.flags, steps.batch_size)
  started = time.perf_counter()
  try:
    state = loop.train_loop(state, train_step, _evaluator(setup)[1], setup.train_arrays, steps,
                            args, run, log, saver, signals)
  finally:
    saver.close()
  return state, time.perf_counter() - started, log


def evaluate_and_write(setup: Setup, state: TrainState, log: loop.MetricsLog, runtime: float,
                       child_network_runtime: float | None) -> dict[str, float]:
  """The final evaluation (with CT-D's pruned one if asked) and run_glue's result files."""
  args, run, steps = setup.args, setup.run, setup.steps
  results = {}
  if args.do_eval:
    eval_step, evaluate_params = _evaluator(setup)
    results = evaluate_params(state.params)
    if args.prune_at_eval:  # Table 5's "Prune": the weights outside the child network set to 0
      mask = child_network_of(state.opt_state, state.params)
      pruned = jax.tree.map(lambda p, keep: jnp.where(keep, p, 0), state.params, mask)
      name, arrays = next(iter(setup.eval_arrays.items()))
      results.update({f"eval_pruned_{metric}": value for metric, value in evaluate(
          eval_step, pruned, arrays, setup.datasets, args, run, f"{name} pruned").items()})
    log.write({"step": steps.total, **results})
  all_results = dict(results)
  if args.do_train:
    losses = log.train_losses()
    steps_run = steps.total - log.start_step
    train_results = {
        "train_loss": float(np.mean(losses)) if losses else float("nan"),
        "train_runtime": round(runtime, 3),
        "train_samples": len(setup.train_arrays["labels"]),
        "train_steps": steps.total,
        "train_samples_per_second": (round(steps_run * steps.batch_size / runtime, 3)
                                     if steps_run else 0.0),
        "epoch": round(steps.total / steps.per_epoch, 4),
        # This process's peak host memory so far (childtuning_jax/cpu.py sets how glibc
        # allocates it on CPU; BENCHMARKS.md, Trainer: throughput and peak host memory per
        # glibc malloc setting, compares the settings).
        "peak_host_memory_mib": round(peak_rss_mib(), 1),
    }
    if child_network_runtime is not None:  # CT-D: Fisher pass and selection, before training
      train_results["child_network_runtime"] = child_network_runtime
    if args.mode == "ChildTuning-D":
      train_results["child_delta_bytes"] = write_child_delta(setup, state)
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
  from_checkpoint, pretrained)``, where ``from_checkpoint(name)`` says whether a leaf was
  pretrained and ``pretrained()`` reads the same parameters again."""
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
                                           output_loading_info=True, **model_args.config_overrides())
  logger.info("model: %s, %s, computing in %s%s", model_path, ", ".join(
      f"{name} {value}" for name, value in model.config.resolved_speed_paths().items()),
      model.config.dtype, ", layers recomputed in the backward pass (gradient checkpointing)"
      if model.config.gradient_checkpointing else "")
  if model.config.gradient_checkpointing and jax.default_backend() == "cpu":
    logger.warning("--gradient_checkpointing on the CPU backend: XLA's CPU compiler merges most of "
                   "the recomputation back, so the step saves little memory and does more work "
                   "(BENCHMARKS.md, compile times and memory of the training step).")
  if args.mode == "ChildTuning-D":
    always_trainable(args.always_trainable, params)  # a bad pattern fails now, not after the Fisher pass
  not_pretrained = set(loading["missing_keys"])  # incl. a head re-initialised for its shape
  from_checkpoint = lambda name: name not in not_pretrained  # a fresh head has no w0
  pretrained = lambda: load_pretrained(model_path, datasets.num_labels, seed=args.seed)[1]
  return datasets, train_arrays, eval_arrays, model, params, from_checkpoint, pretrained


def plan_steps(args: TrainingArguments, run: Run, num_examples: int) -> loop.Steps:
  """Optimizer steps: ``batch_size`` examples each (per device x devices x micro-batches)."""
  batch_size = args.per_device_train_batch_size * run.num_devices * run.micro_batches
  per_epoch = num_examples // batch_size
  if per_epoch == 0 and args.do_train:
    accumulation = (f" x {run.micro_batches} micro-batches (--gradient_accumulation_steps)"
                    if run.micro_batches > 1 else "")
    raise ValueError(f"{num_examples} training examples are fewer than one batch "
                     f"({args.per_device_train_batch_size} per device x {run.num_devices} devices"
                     f"{accumulation}).")
  per_epoch = max(per_epoch, 1)  # without training: only names the schedule
  total = args.max_steps if args.max_steps > 0 else math.ceil(args.num_train_epochs * per_epoch)
  return loop.Steps(total=total, per_epoch=per_epoch, batch_size=batch_size)
