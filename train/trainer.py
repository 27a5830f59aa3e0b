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

import json
import logging
import math
import re
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm.auto import tqdm

import childtuning_jax as ct
from childtuning_jax import _trees, regularizers
from childtuning_jax.data import batch_indices
from childtuning_jax.metrics import compute_metrics
from childtuning_jax.models import embedded_model_path, load_pretrained, resolve_checkpoint
from train import checkpoints as checkpoints_lib
from train import input_pipeline
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
  pretrained: Any = None  # the pretrained weights, for Mixout (None otherwise)


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


def optimizer(args: TrainingArguments, schedule: optax.Schedule, params: Any, *, key: jax.Array,
              mask: Any = None, from_checkpoint: Callable[[str], bool] | None = None
              ) -> optax.GradientTransformation:
  """Weight decay toward the pretrained ``params`` (a gradient term), clipping (before the
  mask, as the published code), AdamW with the mode's mask, then RecAdam's pull.

  ``from_checkpoint`` says which leaves (by path name) have a pretrained value; only
  those are pulled toward it.
  """
  adamw_args = dict(b1=args.adam_beta1, b2=args.adam_beta2, eps=args.adam_epsilon,
                    weight_decay=args.weight_decay)
  if args.top_k_layers is not None:  # Top-K tuning: a fixed mask of the top layers and head
    tx = ct.child_tuning_adamw(schedule, mode="driven", weight_decay_mask=decays, **adamw_args,
                               mask=regularizers.top_layers_mask(params, args.top_k_layers))
  elif args.mode == "vanilla":
    tx = optax.adamw(schedule, mask=decays, **adamw_args)
  elif args.mode == "ChildTuning-F":
    tx = ct.child_tuning_adamw(schedule, mode="free", reserve_p=args.reserve_p, key=key,
                               weight_decay_mask=decays, **adamw_args)
  else:
    tx = ct.child_tuning_adamw(schedule, mode="driven", mask=mask, weight_decay_mask=decays,
                               **adamw_args)
  if args.recadam_k is not None:  # after AdamW: the pull stays out of Adam's moments
    tx = optax.chain(tx, regularizers.recadam(params, schedule, k=args.recadam_k,
                                              t0=args.recadam_t0, strength=args.recadam_strength,
                                              where=from_checkpoint))
  if args.max_grad_norm > 0:
    tx = optax.chain(optax.clip_by_global_norm(args.max_grad_norm), tx)
  if args.decay_to_pretrained > 0:  # a loss term's gradient, before clipping
    tx = optax.chain(regularizers.decay_to_pretrained(args.decay_to_pretrained, params,
                                                      where=from_checkpoint), tx)
  return tx


def check_method_flags(args: TrainingArguments, is_regression: bool | None = None) -> None:
  """Refuses flag values and combinations that cannot work (``is_regression=None``: the
  checks that do not depend on the data)."""
  if not 0 < args.reserve_p <= 1:
    raise ValueError(f"--reserve_p must be in (0, 1], got {args.reserve_p}.")
  if args.top_k_layers is not None and args.mode != "vanilla":
    raise ValueError("--top_k_layers is a fixed mask of its own: use it with --mode vanilla.")
  if not 0 <= args.mixout_p < 1:
    raise ValueError(f"--mixout_p must be in [0, 1), got {args.mixout_p}.")
  if args.r3f_sigma < 0 or args.decay_to_pretrained < 0:
    raise ValueError("--r3f_sigma and --decay_to_pretrained must be >= 0.")
  if args.recadam_k is not None and args.learning_rate * args.recadam_strength >= 1:
    raise ValueError(
        f"RecAdam pulls by learning_rate x recadam_strength = "
        f"{args.learning_rate * args.recadam_strength:g} of (w - w0) per step; at 1 or more it "
        "overshoots. Lower --recadam_strength (5000 suits learning rates around 2e-5).")
  if args.mode != "ChildTuning-D" and (args.child_network != "fisher" or args.prune_at_eval):
    raise ValueError("--child_network and --prune_at_eval are options of --mode ChildTuning-D.")
  if args.prune_at_eval and not args.do_eval:
    raise ValueError("--prune_at_eval is an evaluation: it needs --do_eval.")
  if args.r3f_sigma > 0 and is_regression is True:
    raise ValueError("R3F compares output distributions: it applies to classification only, "
                     "as in the paper.")


def child_network_of(opt_state: Any) -> Any:
  """The CT-D mask kept in an optimizer state."""
  states = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda s: isinstance(s, ct.ChildTuningDrivenState))
            if isinstance(s, ct.ChildTuningDrivenState)]
  return states[0].mask


# ----------------------------------------------------------------------------- steps


def logits_of(model, params, batch, *, dropout_key=None, row_offsets=None) -> jax.Array:
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


def make_train_step(model, tx, schedule, *, is_regression: bool, mixout_p: float = 0.0,
                    mixout_where: Callable[[str], bool] | None = None,
                    r3f: tuple[float, str, float] | None = None) -> Callable:
  """``(state, batch) -> (state, metrics)``. With ``mixout_p`` the forward pass uses
  Mixout's weights (``state.pretrained`` holds w0); with ``r3f = (sigma, noise, lambda)``
  the loss adds R3F's symmetric KL to a pass on noisy word embeddings."""
  def train_step(state: TrainState, batch):
    dropout_key = jax.random.fold_in(state.dropout_key, state.step)

    def loss_fn(params):
      if mixout_p:
        params = regularizers.mixout(params, state.pretrained, mixout_p,
                                     jax.random.fold_in(dropout_key, 1), where=mixout_where)
      logits = logits_of(model, params, batch, dropout_key=dropout_key)
      loss = losses_of(logits, batch["labels"], is_regression=is_regression)[0].mean()
      if r3f is not None:
        sigma, noise_kind, weight = r3f
        noise = regularizers.r3f_noise(jax.random.fold_in(dropout_key, 2),
                                       batch["input_ids"].shape + (model.config.embedding_size
                                                                   or model.config.hidden_size,),
                                       sigma, noise_kind)
        noisy = logits_of(model, params, batch, dropout_key=jax.random.fold_in(dropout_key, 3),
                          row_offsets={model.word_embeddings_path: noise})
        loss = loss + weight * regularizers.symmetric_kl(logits, noisy)
      return loss

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads),
               "learning_rate": schedule(state.step)}
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics
  return train_step


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
      if jax.process_count() > 1:
        raise ValueError("--num_devices is for a single process; multi-host runs use all devices.")
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


def prepare_output_dir(args: TrainingArguments) -> None:
  """Refuse to mix a new run into an old one unless asked (--resume / --overwrite_output_dir)."""
  output_dir = Path(args.output_dir)
  checkpoints = output_dir / "checkpoints"
  earlier = [p for p in (checkpoints, output_dir / "metrics.jsonl") if p.exists()]
  if earlier and not args.resume:
    if not args.overwrite_output_dir:
      raise FileExistsError(
          f"{output_dir} holds an earlier run ({', '.join(p.name for p in earlier)}). Pass --resume "
          "to continue it or --overwrite_output_dir to start afresh.")
    if jax.process_index() == 0:
      shutil.rmtree(checkpoints, ignore_errors=True)
      (output_dir / "metrics.jsonl").unlink(missing_ok=True)
  output_dir.mkdir(parents=True, exist_ok=True)


def estimate_child_network(model, params, train_arrays, datasets, args: TrainingArguments,
                           run: Run) -> Any:
  """CT-D: Fisher information over (a subset of) the training set, then the top
  ``reserve_p`` fraction of the entries outside ``--always_trainable`` (or, as the
  ablations of ``--child_network``, a random or the lowest-Fisher fraction)."""
  pattern = re.compile(args.always_trainable) if args.always_trainable else None
  always = (lambda path: bool(pattern.search(_trees.path_name(path)))) if pattern else None
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
  """``metrics.jsonl``: one JSON object per training step (and per evaluation)."""

  def __init__(self, path: Path, *, keep_until_step: int, enabled: bool):
    self.path, self.enabled = path, enabled
    if enabled and path.exists():
      # A resumed run re-takes the steps after its checkpoint; drop their old lines.
      kept = [line for line in path.read_text().splitlines()
              if line.strip() and json.loads(line)["step"] <= keep_until_step]
      path.write_text("".join(line + "\n" for line in kept))

  def write(self, record: dict) -> None:
    if self.enabled:
      with open(self.path, "a") as file:
        file.write(json.dumps(record) + "\n")

  def train_losses(self) -> list[float]:
    if not self.path.exists():
      return []
    records = (json.loads(line) for line in self.path.read_text().splitlines() if line.strip())
    return [r["loss"] for r in records if "loss" in r]


# ----------------------------------------------------------------------------- the run


def train_and_evaluate(model_args: ModelArguments, data_args: DataArguments,
                       args: TrainingArguments) -> dict[str, float]:
  """Fine-tunes and evaluates as the flags say; returns the final ``all_results``."""
  if args.jax_distributed:
    jax.distributed.initialize()
  check_method_flags(args)
  prepare_output_dir(args)
  run = Run(args)
  run.write_json("run_args.json", as_dict(model_args, data_args, args))

  default_data = not (data_args.task_name or data_args.train_file)
  max_train_samples = data_args.max_train_samples
  max_seq_length = data_args.max_seq_length or 128
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

  model_path = resolve_checkpoint(model_args.model_name_or_path or embedded_model_path())
  from transformers import AutoTokenizer  # only the trainer needs transformers

  tokenizer = AutoTokenizer.from_pretrained(model_path)
  train_arrays, eval_arrays = input_pipeline.tokenize(datasets, tokenizer, max_seq_length)
  check_method_flags(args, datasets.is_regression)
  model, params, loading = load_pretrained(model_path, datasets.num_labels, seed=args.seed,
                                           output_loading_info=True)
  not_pretrained = set(loading["missing_keys"])  # incl. a head re-initialised for its shape
  from_checkpoint = lambda name: name not in not_pretrained  # a fresh head has no w0

  batch_size = args.per_device_train_batch_size * run.num_devices
  steps_per_epoch = len(train_arrays["labels"]) // batch_size
  if steps_per_epoch == 0 and args.do_train:
    raise ValueError(f"{len(train_arrays['labels'])} training examples are fewer than one batch "
                     f"({args.per_device_train_batch_size} per device x {run.num_devices} devices).")
  steps_per_epoch = max(steps_per_epoch, 1)  # without training: only names the schedule
  total_steps = (args.max_steps if args.max_steps > 0
                 else math.ceil(args.num_train_epochs * steps_per_epoch))
  schedule = learning_rate_schedule(args, total_steps)
  dropout_key, ctf_key = jax.random.split(jax.random.key(args.seed))

  checkpoints = (checkpoints_lib.manager(run.output_dir / "checkpoints", args.save_total_limit)
                 if args.do_train else None)
  resuming = checkpoints is not None and args.resume and checkpoints.latest_step() is not None
  mask, child_network_runtime = None, None
  if args.mode == "ChildTuning-D":
    if resuming:  # the child network comes back with the optimizer state
      mask = jax.tree.map(lambda p: np.ones(p.shape, bool), params)
    else:
      started = time.perf_counter()
      mask = estimate_child_network(model, jax.device_put(params, run.replicated), train_arrays,
                                    datasets, args, run)
      child_network_runtime = round(time.perf_counter() - started, 3)
  tx = optimizer(args, schedule, params, key=ctf_key, mask=mask, from_checkpoint=from_checkpoint)
  # Mixout's w0 is a copy: the state is donated to the step, and a buffer cannot be donated twice.
  pretrained = jax.tree.map(jnp.array, params) if args.mixout_p else None
  state = jax.device_put(TrainState(step=jnp.zeros((), jnp.int32), params=params,
                                    opt_state=tx.init(params), dropout_key=dropout_key,
                                    pretrained=pretrained),
                         run.replicated)
  if resuming:
    state, metadata = checkpoints_lib.restore_latest(checkpoints, state)
    _warn_on_changed_flags(metadata.get("flags", {}), as_dict(model_args, data_args, args))
  if args.mode == "ChildTuning-D":
    write_child_network(child_network_of(state.opt_state), run)

  step_fn = make_train_step(
      model, tx, schedule, is_regression=datasets.is_regression, mixout_p=args.mixout_p,
      mixout_where=lambda name: name.endswith("/kernel") and from_checkpoint(name),
      r3f=(args.r3f_sigma, args.r3f_noise, args.r3f_lambda) if args.r3f_sigma > 0 else None)
  train_step = jax.jit(step_fn,
                       in_shardings=(run.replicated, run.data), out_shardings=run.replicated,
                       donate_argnums=0)
  eval_step = jax.jit(make_eval_step(model, is_regression=datasets.is_regression),
                      in_shardings=(run.replicated, run.data), out_shardings=run.replicated)

  start_step = int(state.step)
  log = MetricsLog(run.output_dir / "metrics.jsonl", keep_until_step=start_step, enabled=run.is_main)
  flags = as_dict(model_args, data_args, args)

  def save(state):
    checkpoints_lib.save(checkpoints, int(state.step), state,
                         {"step": int(state.step), "flags": flags})

  runtime = 0.0
  if args.do_train:
    logger.info("%s: %d examples, %d devices, batch %d, %d steps (%d per epoch), from step %d",
                args.mode, len(train_arrays["labels"]), run.num_devices, batch_size, total_steps,
                steps_per_epoch, start_step)
    started = time.perf_counter()
    bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step",
               disable=not run.progress)
    order_epoch, order = None, None
    pending = None  # the previous step's metrics, read after the next step is dispatched

    def record(step_metrics, step, seconds):
      values = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
      log.write({"step": step, "epoch": round(step / steps_per_epoch, 4), **values,
                 "examples_per_second": round(batch_size / seconds, 2)})
      bar.set_postfix(loss=f"{values['loss']:.4f}", ex_s=f"{batch_size / seconds:.1f}")

    stop_on_sigterm = _StopOnSigterm()
    try:
      step_started = time.perf_counter()
      for step in range(start_step, total_steps):
        epoch, position = divmod(step, steps_per_epoch)
        if epoch != order_epoch:
          order_epoch = epoch
          order = list(batch_indices(len(train_arrays["labels"]), batch_size, seed=args.seed,
                                     epoch=epoch))
        batch = input_pipeline.take(train_arrays, order[position])
        state, metrics = train_step(state, input_pipeline.place(batch, run.data))
        if pending is not None:
          record(*pending)
        now = time.perf_counter()
        pending = (metrics, step + 1, now - step_started)
        step_started = now
        bar.update(1)
        done = step + 1
        saving = done % args.save_steps == 0 or done == total_steps
        evaluating = args.eval_steps and done % args.eval_steps == 0 and done != total_steps
        if saving or evaluating:  # the log then holds every step up to the checkpoint
          record(*pending)
          pending = None
        if saving:
          save(state)
        if evaluating:
          log.write({"step": done, **evaluate_all(eval_step, state.params, eval_arrays, datasets,
                                                  args, run)})
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (a preempted TPU VM, a cluster's time limit)
      logger.warning("interrupted; saving a checkpoint at step %d (resume with --resume)",
                     int(state.step))
      save(state)
      raise
    finally:
      stop_on_sigterm.restore()
      bar.close()
      checkpoints.wait_until_finished()
      checkpoints.close()
    runtime = time.perf_counter() - started

  results = {}
  if args.do_eval:
    results = evaluate_all(eval_step, state.params, eval_arrays, datasets, args, run)
    if args.prune_at_eval:  # Table 5's "Prune": the weights outside the child network set to 0
      mask = child_network_of(state.opt_state)
      pruned = jax.tree.map(lambda p, keep: jnp.where(keep, p, 0), state.params, mask)
      name, arrays = next(iter(eval_arrays.items()))
      results.update({f"eval_pruned_{metric}": value for metric, value in
                      evaluate(eval_step, pruned, arrays, datasets, args, run, f"{name} pruned").items()})
    log.write({"step": total_steps, **results})
  all_results = dict(results)
  if args.do_train:
    losses = log.train_losses()
    steps_run = total_steps - start_step
    train_results = {
        "train_loss": float(np.mean(losses)) if losses else float("nan"),
        "train_runtime": round(runtime, 3),
        "train_samples": len(train_arrays["labels"]),
        "train_steps": total_steps,
        "train_samples_per_second": round(steps_run * batch_size / runtime, 3) if steps_run else 0.0,
        "epoch": round(total_steps / steps_per_epoch, 4),
    }
    if child_network_runtime is not None:  # CT-D: Fisher pass and selection, before training
      train_results["child_network_runtime"] = child_network_runtime
    run.write_json("train_results.json", train_results)
    all_results = {**train_results, **results}
  if args.do_eval:
    run.write_json("eval_results.json", results)
  run.write_json("all_results.json", all_results)
  return all_results


class _StopOnSigterm:
  """While training, SIGTERM stops the loop as Ctrl-C does, so the state is saved first."""

  def __init__(self):
    self.previous = None
    if threading.current_thread() is threading.main_thread():
      self.previous = signal.signal(signal.SIGTERM, self._raise)

  @staticmethod
  def _raise(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")

  def restore(self) -> None:
    if self.previous is not None:
      signal.signal(signal.SIGTERM, self.previous)


def _warn_on_changed_flags(saved: dict, current: dict) -> None:
  ignore = {"resume", "overwrite_output_dir", "output_dir", "disable_tqdm", "eval_steps",
            "save_steps", "save_total_limit"}
  changed = {k: (saved[k], current.get(k)) for k in saved
             if k not in ignore and saved[k] != current.get(k)}
  if changed:
    logger.warning("resuming with flags that differ from the checkpoint's run, so the result will "
                   "differ from an uninterrupted run: %s",
                   ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items()))
