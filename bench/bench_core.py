"""Speed of the core library: CT-F/CT-D optimizer updates, training steps, the Fisher pass.

Every ratio is taken side by side in one process, the variants alternating
(A, B, C, A, B, C, ...), and each time is the median of the repetitions.
Peak memory is the peak resident set size (VmHWM) of a separate process
that runs only that workload. Writes bench/results/core_<backend>.json and the
matching section of BENCHMARKS.md.

Run: python bench/bench_core.py            (BENCHMARKS.md records how long the last run took)
     python bench/bench_core.py --quick    (fewer repetitions, no BENCHMARKS.md update)
     python bench/bench_core.py --only fisher,peak_memory_mib   (rerun sections into the last
                                                                  full run's results)
"""

import argparse
import json
import os
import platform
import statistics
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script: the trainer's steps come from train/

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from childtuning_jax import (_random, child_tuning_adamw, child_tuning_driven,  # noqa: E402
                            child_tuning_free, estimate_fisher, fisher as fisher_module)
from childtuning_jax.cpu import (MALLOC_ENV, MALLOC_ENV_NO_MMAP, MALLOC_VARIABLES,  # noqa: E402
                                 peak_rss_mib,
                                 restart_keeping_freed_memory)
from childtuning_jax.models import (EncoderConfig, EncoderForSequenceClassification,  # noqa: E402
                                    encoder)
from childtuning_jax.models import loading  # noqa: E402
from childtuning_jax.models.matmul import matmul  # noqa: E402
from train import trainer  # noqa: E402
from train.arguments import TrainingArguments  # noqa: E402
import bench_accelerator  # noqa: E402 (one fake batch for both scripts)
from bench_accelerator import CTF_PER_LEAF, patched, traced_as  # noqa: E402
from benchmarks_md import update_benchmarks_md  # noqa: E402

BATCH, SEQ_LEN, RESERVE_P, LR = 32, 128, 0.3, 2e-5
# The library's BERT classifier at two sizes, randomly initialised (speed does not depend on
# the weights): all-MiniLM-L6-v2's shape (22.7M parameters) and BERT-base's (109M).
MINILM_L6 = EncoderConfig(hidden_size=384, num_hidden_layers=6, intermediate_size=1536)
BERT_BASE = EncoderConfig()


def init_params(config, seed=0):
  model = EncoderForSequenceClassification(config)
  ids = jnp.zeros((1, 8), jnp.int32)
  return model, jax.jit(model.init)(jax.random.key(seed), ids)["params"]


def fisher_loss(model):
  """The trainer's loss for its Fisher pass: mean cross-entropy without dropout;
  ``row_offsets`` for the row-sparse word-embedding gradients."""
  def loss(params, batch, row_offsets=None):
    losses, _ = trainer.per_example_losses(model, params, batch, is_regression=False,
                                           row_offsets=row_offsets)
    return losses.mean()
  return loss


def _masking_transform(reserve_p, keep_fn, key=0):
  """CT-F with another way of drawing the keep decisions (for comparison only)."""

  def init_fn(params):
    del params
    return jax.random.key(key)

  def update_fn(updates, state, params=None):
    del params
    state, sub = jax.random.split(state)
    keys = optax.tree_utils.tree_split_key_like(sub, updates)
    updates = jax.tree.map(
        lambda k, u: jnp.where(keep_fn(k, u.shape), u / reserve_p, 0), keys, updates)
    return updates, state

  return optax.GradientTransformation(init_fn, update_fn)


def naive_child_tuning_free(reserve_p):
  """The straightforward CT-F: jax.random.bernoulli per leaf."""
  return _masking_transform(reserve_p, lambda k, shape: jax.random.bernoulli(k, reserve_p, shape))


def packed_child_tuning_free(reserve_p):
  """A rejected design: 16 bits per decision, four decisions unpacked from each hash."""
  from childtuning_jax._random import linear_index as _linear_index, threefry2x32 as _threefry2x32

  threshold = jnp.uint16(round(reserve_p * 2**16))

  def keep(k, shape):
    if not shape or shape[-1] % 4:
      return jax.random.bits(k, shape, jnp.uint16) < threshold
    k1, k2 = jax.random.bits(k, (2,), jnp.uint32)
    counter = _linear_index(shape[:-1] + (shape[-1] // 4,))
    hi, lo = _threefry2x32(k1, k2, counter, jnp.zeros_like(counter))
    words = jax.lax.bitcast_convert_type(jnp.stack([hi, lo], -1), jnp.uint16)
    return words.reshape(shape) < threshold

  return _masking_transform(reserve_p, keep)


def adamw():
  return optax.adamw(LR, eps=1e-6, weight_decay=0.01)


def random_mask(params, p=RESERVE_P):
  rng = np.random.default_rng(0)
  return jax.tree.map(lambda x: rng.random(x.shape) < p, params)


def alternating_times(fns, reps):
  """Times each of fns once per repetition, in a new random order each repetition, after
  one untimed warm-up call each. Returns {name: [seconds per repetition]}."""
  for fn in fns.values():
    jax.block_until_ready(fn())
  names = list(fns)
  times = {name: [] for name in names}
  order_rng = np.random.default_rng(1)
  for _ in range(reps):
    for name in order_rng.permutation(names):
      start = time.perf_counter()
      jax.block_until_ready(fns[name]())
      times[name].append(time.perf_counter() - start)
  return times


def paired_ratio(times, base):
  """Median and 95% bootstrap interval of the per-repetition ratio ``times / base``."""
  ratios = np.array(times) / np.array(base)
  rng = np.random.default_rng(0)
  medians = np.median(rng.choice(ratios, (2000, len(ratios))), axis=1)
  return {"median_s": float(np.median(times)), "ratio": float(np.median(ratios)),
          "ratio_95ci": [float(np.percentile(medians, 2.5)), float(np.percentile(medians, 97.5))]}


def alternating_medians(fns, reps):
  """{name: {"median_s", "ratio", "ratio_95ci"}}: each variant's ratio is to the first
  variant in the same repetition. Paired ratios cancel most of the drift of a shared
  2-core machine."""
  times = alternating_times(fns, reps)
  base = times[next(iter(fns))]
  return {name: paired_ratio(t, base) for name, t in times.items()}


def fake_batch(config, seed=0):
  return bench_accelerator.fake_batch(config, BATCH, SEQ_LEN, seed)


def bench_update(config, reps):
  """Optimizer update alone (no model), on the parameter tree of `config`."""
  _, params = init_params(config)
  grads = jax.tree.map(lambda x: 1e-3 * jnp.ones_like(x), params)
  mask = random_mask(params)
  variants = {
      "adamw": adamw(),
      "CT-F + adamw": optax.chain(child_tuning_free(RESERVE_P, key=0), adamw()),
      CTF_PER_LEAF + " + adamw": optax.chain(child_tuning_free(RESERVE_P, key=0), adamw()),
      "naive CT-F + adamw": optax.chain(naive_child_tuning_free(RESERVE_P), adamw()),
      "16-bit packed CT-F + adamw": optax.chain(packed_child_tuning_free(RESERVE_P), adamw()),
      "CT-D around adamw": child_tuning_driven(mask, adamw()),
      "CT-D around adamw, sparse state": child_tuning_adamw(
          LR, mode="driven", mask=mask, weight_decay=0.01, sparse_state=True),
      "CT-F mask alone": child_tuning_free(RESERVE_P, key=0),
      CTF_PER_LEAF + " mask alone": child_tuning_free(RESERVE_P, key=0),
      "naive CT-F mask alone": naive_child_tuning_free(RESERVE_P),
      "16-bit packed CT-F mask alone": packed_child_tuning_free(RESERVE_P),
  }
  fns = {}
  for name, tx in variants.items():
    state = tx.init(params)
    with traced_as(name):
      update = jax.jit(tx.update).lower(grads, state, params).compile()
    fns[name] = lambda update=update, state=state: update(grads, state, params)
  return alternating_medians(fns, reps)


def bench_threefry(reps):
  """The unrolled Threefry of the CT-F masks vs JAX's threefry2x32 primitive, same outputs."""
  from jax.extend.random import threefry2x32_p

  from childtuning_jax._random import threefry2x32 as _threefry2x32

  counters = jnp.arange(5_600_000, dtype=jnp.uint32)  # one per 4 entries of MiniLM-L6
  k1, k2 = jnp.uint32(1), jnp.uint32(2)
  primitive = jax.jit(lambda c: threefry2x32_p.bind(k1, k2, c, jnp.zeros_like(c)))
  unrolled = jax.jit(lambda c: _threefry2x32(k1, k2, c, jnp.zeros_like(c)))
  return alternating_medians({"threefry2x32 primitive": lambda: primitive(counters),
                              "unrolled (childtuning_jax)": lambda: unrolled(counters)}, reps)


def trainer_step(model, tx, params, batch, dropout_key, compiler_options=None):
  """The trainer's own training step (``train.trainer.make_train_step`` on its task loss),
  jitted as the trainer jits it (the state donated), compiled for ``batch``; returns a
  function that takes one step from the state it holds and returns the step's metrics.
  Traced here, so a module replaced while this runs (``patched``) is in the step."""
  step = jax.jit(trainer.make_train_step(tx, trainer.task_loss(model, is_regression=False),
                                         optax.constant_schedule(LR)), donate_argnums=0)
  # Copies: the step donates the state, and other steps may hold the same params and key.
  state = trainer.TrainState(step=jnp.zeros((), jnp.int32), params=jax.tree.map(jnp.array, params),
                             opt_state=tx.init(params), dropout_key=jax.random.wrap_key_data(
                                 jnp.array(jax.random.key_data(dropout_key)),
                                 impl=jax.random.key_impl(dropout_key)))
  compiled = step.lower(state, batch).compile(compiler_options)
  holder = [state]

  def run():
    holder[0], metrics = compiled(holder[0], batch)
    return metrics
  run.compiled = compiled
  return run


class TokensFirstSelfAttention(nn.Module):
  """``encoder.SelfAttention`` with the layout it had before: the attention matmuls contract
  queries, keys and values in their [batch, length, heads, head_dim] layout."""

  config: EncoderConfig

  @nn.compact
  def __call__(self, x, attention_bias, deterministic):
    c = self.config
    heads, head_dim = c.num_attention_heads, c.hidden_size // c.num_attention_heads
    dense = lambda name: encoder._dense(c, c.hidden_size, name)(x)
    split = lambda t: t.reshape(t.shape[:-1] + (heads, head_dim))
    q, k, v = split(dense("query")), split(dense("key")), split(dense("value"))
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(head_dim).astype(q.dtype)
    probs = encoder.Dropout(c.attention_probs_dropout_prob)(
        jax.nn.softmax(scores + attention_bias, axis=-1), deterministic)
    context = jnp.einsum("bhqk,bkhd->bqhd", probs, v)
    return context.reshape(context.shape[:2] + (c.hidden_size,))


class FusedQKVSelfAttention(nn.Module):
  """``encoder.SelfAttention`` with the query, key and value projections as one matmul
  (their kernels concatenated in the step; the parameters stay three Dense layers)."""

  config: EncoderConfig

  @nn.compact
  def __call__(self, x, attention_bias, deterministic):
    c = self.config
    heads, head_dim = c.num_attention_heads, c.hidden_size // c.num_attention_heads
    kernels, biases = zip(*(DenseParams(x.shape[-1], c.hidden_size, name=name)()
                            for name in ("query", "key", "value")))
    qkv = matmul(x, jnp.concatenate(kernels, axis=1)) + jnp.concatenate(biases)
    split = lambda t: t.reshape(t.shape[:-1] + (heads, head_dim)).transpose(0, 2, 1, 3)
    q, k, v = (split(t) for t in jnp.split(qkv, 3, axis=-1))
    scores = jnp.einsum("bhqd,bhkd->bhqk", q, k) / jnp.sqrt(head_dim).astype(q.dtype)
    probs = encoder.Dropout(c.attention_probs_dropout_prob)(
        jax.nn.softmax(scores + attention_bias, axis=-1), deterministic)
    context = jnp.einsum("bhqk,bhkd->bhqd", probs, v).transpose(0, 2, 1, 3)
    return context.reshape(context.shape[:2] + (c.hidden_size,))


class DenseParams(nn.Module):
  """The parameters of an ``nn.Dense`` (same names and shapes), returned."""

  in_features: int
  features: int

  @nn.compact
  def __call__(self):
    return (self.param("kernel", nn.initializers.lecun_normal(), (self.in_features, self.features)),
            self.param("bias", nn.initializers.zeros, (self.features,)))


class StoredMaskDropout(encoder.Dropout):
  """``encoder.Dropout`` with its keep decisions written to memory in the forward pass
  (an optimization barrier), so the backward pass reads them instead of hashing again."""

  @nn.compact
  def __call__(self, x, deterministic: bool):
    if deterministic or self.rate == 0.0:
      return x
    keep = jax.lax.optimization_barrier(
        _random.bernoulli(self.make_rng("dropout"), 1.0 - self.rate, x.shape, "1 - rate"))
    return jnp.where(keep, x / jnp.asarray(1.0 - self.rate, x.dtype), jnp.zeros((), x.dtype))


class NoDropout(nn.Module):
  rate: float

  def __call__(self, x, deterministic):
    return x


def bench_step_variants(config, reps):
  """Where a vanilla training step's time goes: the step with one piece changed at a time."""
  model, params = init_params(config)
  batch = jax.device_put(fake_batch(config))
  tx = train_transforms(params)["vanilla"]
  tanh_gelu = dict(encoder._ACTIVATIONS, gelu=lambda x: nn.gelu(x, approximate=True))
  erfc_gelu = dict(encoder._ACTIVATIONS, gelu=lambda x: nn.gelu(x, approximate=False))
  key, rbg_key = jax.random.key(1), jax.random.key(1, impl="rbg")
  ynn_eltwise = "LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_ELTWISE"
  # name: (encoder attributes replaced while tracing, dropout key, XLA compiler options)
  variants = {
      "library step (hash dropout)": ({}, key, {}),
      "dense layers with JAX's own backward pass (the layers before)":
          ({"dense_dot_general": jax.lax.dot_general}, key, {}),
      "flax nn.Dropout": ({"Dropout": nn.Dropout}, key, {}),
      "flax nn.Dropout, rbg keys": ({"Dropout": nn.Dropout}, rbg_key, {}),
      "no dropout (bound)": ({"Dropout": NoDropout}, key, {}),
      "tokens-first attention layout (the layout before)":
          ({"SelfAttention": TokensFirstSelfAttention}, key, {}),
      "jax.nn.gelu (erfc form; the GELU before)": ({"_ACTIVATIONS": erfc_gelu}, key, {}),
      "tanh GELU instead of erf (bound)": ({"_ACTIVATIONS": tanh_gelu}, key, {}),
      "query, key and value as one matmul": ({"SelfAttention": FusedQKVSelfAttention}, key, {}),
      "dropout's keep decisions stored for the backward pass":
          ({"Dropout": StoredMaskDropout}, key, {}),
      "XLA: Eigen instead of YNNPACK for matmuls": ({}, key, {"xla_cpu_experimental_ynn_fusion_type": ""}),
      "XLA: oneDNN": ({}, key, {"xla_cpu_use_onednn": True}),
      "XLA: YNNPACK fuses elementwise ops too": ({}, key, {"xla_cpu_experimental_ynn_fusion_type": ynn_eltwise}),
      "XLA: fast math (bound; changes numerics)": ({}, key, {"xla_cpu_enable_fast_math": True}),
  }
  fns = {}
  for name, (attributes, key, options) in variants.items():
    with patched(encoder, **attributes):  # traced and compiled with the replacement in place
      fns[name] = trainer_step(model, tx, params, batch, key, options or None)
  return alternating_medians(fns, reps)


# variant: (mode, other trainer flags)
TRAINER_MODES = {"vanilla": ("vanilla", {}), "CT-F": ("ChildTuning-F", {}),
                 "CT-D": ("ChildTuning-D", {}),
                 "CT-D, sparse optimizer state": ("ChildTuning-D", {"sparse_optimizer_state": True})}


def train_transforms(params):
  """vanilla / CT-F / CT-D as the trainer builds them (``train.trainer.optimizer``: clipping
  first, then the mode's mask and AdamW; CT-D with a random child network of RESERVE_P)."""
  mask = random_mask(params)
  transforms = {}
  for name, (mode, flags) in TRAINER_MODES.items():
    args = TrainingArguments(output_dir="-", mode=mode, reserve_p=RESERVE_P, learning_rate=LR,
                             weight_decay=0.01, max_grad_norm=1.0, **flags)
    transforms[name] = trainer.optimizer(args, optax.constant_schedule(LR), key=jax.random.key(0),
                                         mask=mask if mode == "ChildTuning-D" else None)
  return transforms


def bench_train_step(config, reps):
  model, params = init_params(config)
  batch = jax.device_put(fake_batch(config))
  fns = {name: trainer_step(model, tx, params, batch, jax.random.key(1))
         for name, tx in train_transforms(params).items()}
  return alternating_medians(fns, reps)


def bench_fisher(config, reps):
  """Per-example Fisher over one batch vs one batched forward+backward on the same batch."""
  model, params = init_params(config)
  batch = fake_batch(config)
  loss = fisher_loss(model)
  lookups = {model.word_embeddings_path: "input_ids"}
  batched_grad = jax.jit(jax.grad(loss))
  device_batch = jax.device_put(batch)
  fns = {
      "batched forward+backward": lambda: batched_grad(params, device_batch),
      "per-example Fisher": lambda: estimate_fisher(
          loss, params, [batch], chunk_size=BATCH, embedding_lookups=lookups),
      "per-example Fisher, dense word-embedding gradients":
          lambda: estimate_fisher(loss, params, [batch], chunk_size=BATCH),
      "batch-gradient Fisher (published recipe)":
          lambda: estimate_fisher(loss, params, [batch], chunk_size=BATCH, per_example=False),
  }
  return alternating_medians(fns, reps)


# glibc malloc settings of the host-memory workloads: {name: environment variables}.
HOST_MEMORY_SETTINGS = {
    "glibc's defaults": {},
    "childtuning_jax.cpu.MALLOC_ENV_NO_MMAP (one heap that keeps freed memory)": MALLOC_ENV_NO_MMAP,
    "huge pages (GLIBC_TUNABLES=glibc.malloc.hugetlb=1 MALLOC_ARENA_MAX=1)": {
        "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1", "MALLOC_ARENA_MAX": "1"},
    # One heap that keeps freed memory, but blocks of 32 MiB or more mapped (and unmapped when
    # freed): a step's block of temporaries can then not be split by smaller requests.
    "one heap, blocks ≥ 32 MiB mapped (MALLOC_ENV_NO_MMAP, MALLOC_MMAP_THRESHOLD_=32 MiB)": {
        **{k: v for k, v in MALLOC_ENV_NO_MMAP.items() if k != "MALLOC_MMAP_MAX_"},
        "MALLOC_MMAP_THRESHOLD_": str(32 << 20)},
    "the same with huge pages (childtuning_jax.cpu.MALLOC_ENV)": MALLOC_ENV}


FSDP_SIZES = (1, 2, 4, 8)


def fsdp_memory():
  """Per-device bytes of the trainer's compiled step at BERT-large shapes under
  ``--fsdp N`` on 8 CPU devices (a process of its own: the devices are forced at start)."""
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
         "JAX_PLATFORMS": "cpu"}
  out = subprocess.run([sys.executable, __file__, "--workload", "fsdp memory"], check=True,
                       capture_output=True, text=True, env=env).stdout
  return json.loads(out.strip().splitlines()[-1])


def fsdp_memory_workload():
  model = EncoderForSequenceClassification(BERT_LARGE)
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
  batch = {name: jax.ShapeDtypeStruct((BATCH, SEQ_LEN), jnp.int32) for name in trainer.MODEL_INPUTS}
  batch["labels"] = jax.ShapeDtypeStruct((BATCH,), jnp.int32)
  every = lambda p: jax.tree.map(lambda x: jnp.ones(x.shape, bool), p)  # a mask from shapes
  rows = {}
  for mode in ("vanilla", "ChildTuning-D"):
    args = TrainingArguments(output_dir="-", mode=mode, learning_rate=LR, weight_decay=0.01)
    tx = trainer.optimizer(args, optax.constant_schedule(LR), key=jax.random.key(0),
                           mask=every if mode == "ChildTuning-D" else None)
    state = trainer.TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params,
                               opt_state=jax.eval_shape(tx.init, params),
                               dropout_key=jax.eval_shape(lambda: jax.random.key(0)))
    for fsdp in FSDP_SIZES:
      run = trainer.Run(TrainingArguments(output_dir="-", fsdp=fsdp))
      step = trainer.compile_train_step(trainer.make_train_step(
          tx, trainer.task_loss(model, is_regression=False), optax.constant_schedule(LR)),
          run, state)
      memory = step.lower(state, batch).compile().memory_analysis()
      rows[f"{mode}, --fsdp {fsdp}"] = {"argument_bytes": memory.argument_size_in_bytes,
                                        "temp_bytes": memory.temp_size_in_bytes}
  return json.dumps(rows)


# name: (trainer mode, whether the step donates its state, steps dispatched before the
# previous one finished: 0 (the trainer on CPU) or 1 (a loop that reads metrics late))
RSS_STAGE_WORKLOADS = {"vanilla": ("vanilla", True, 0), "CT-F": ("CT-F", True, 0),
                       "CT-F, state not donated": ("CT-F", False, 0),
                       "CT-F, two steps in flight": ("CT-F", True, 1)}


def rss_now():
  status = Path("/proc/self/status").read_text()
  read = lambda key: int(next(l.split()[1] for l in status.splitlines() if l.startswith(key))) / 1024
  return {"rss_mib": read("VmRSS"), "peak_mib": read("VmHWM")}


def rss_stages_workload(name):
  """The process's resident set after each stage of a MiniLM-L6 training step's life
  (imports before this function ran), and the compiled step's buffers."""
  mode, donate, ahead = RSS_STAGE_WORKLOADS[name]
  stages = {"imports": rss_now()}
  model, params = init_params(MINILM_L6)
  batch = jax.device_put(fake_batch(MINILM_L6))
  tx = train_transforms(params)[mode]
  stages["model and optimizer built"] = rss_now()
  step = jax.jit(trainer.make_train_step(tx, trainer.task_loss(model, is_regression=False),
                                         optax.constant_schedule(LR)),
                 donate_argnums=0 if donate else ())
  state = trainer.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                             opt_state=tx.init(params), dropout_key=jax.random.key(0))
  compiled = step.lower(state, batch).compile()
  stages["step compiled"] = rss_now()
  previous = None
  for i in range(3):
    state, metrics = compiled(state, batch)
    if ahead:  # wait for the step before this one only
      previous, metrics = metrics, previous
    if metrics is not None:
      jax.block_until_ready(metrics)
    stages[f"after step {i + 1}"] = rss_now()
  jax.block_until_ready(state)
  memory = compiled.memory_analysis()
  return json.dumps({"stages": stages, "temp_mib": memory.temp_size_in_bytes / 2**20,
                     "argument_mib": memory.argument_size_in_bytes / 2**20,
                     "output_mib": memory.output_size_in_bytes / 2**20})


def rss_stages():
  """Each RSS_STAGE_WORKLOADS workload in a fresh process (with this script's glibc malloc
  settings, childtuning_jax.cpu.malloc_env())."""
  result = {}
  for name in RSS_STAGE_WORKLOADS:
    out = subprocess.run([sys.executable, __file__, "--workload", f"rss stages: {name}"],
                         check=True, capture_output=True, text=True).stdout
    result[name] = json.loads(out.strip().splitlines()[-1])
  return result


def run_workload(name):
  """Runs one workload in this process. Peak-memory workloads run twice and return the
  peak RSS in MiB; a host-memory workload returns the vanilla step's median time and
  minor page faults per step."""
  if name == "fsdp memory":
    return fsdp_memory_workload()
  if name.startswith("rss stages: "):
    return rss_stages_workload(name.removeprefix("rss stages: "))
  model, params = init_params(MINILM_L6)
  batch = fake_batch(MINILM_L6)
  if name in HOST_MEMORY_SETTINGS:
    step = trainer_step(model, train_transforms(params)["vanilla"], params, jax.device_put(batch),
                        jax.random.key(1))
    times, faults = [], []
    for i in range(7):  # two warm-up steps, then five
      before, start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
      jax.block_until_ready(step())
      if i >= 2:
        times.append(time.perf_counter() - start)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return json.dumps({"median_s": float(np.median(times)), "page_faults": float(np.median(faults)),
                       "peak_mib": peak_rss_mib()})
  if name == "train step (CT-F)":
    step = trainer_step(model, train_transforms(params)["CT-F"], params, jax.device_put(batch),
                        jax.random.key(0))
    for _ in range(2):
      jax.block_until_ready(step())
  elif name == "per-example Fisher":
    for _ in range(2):
      jax.block_until_ready(estimate_fisher(
          fisher_loss(model), params, [batch], chunk_size=BATCH,
          embedding_lookups={model.word_embeddings_path: "input_ids"}))
  else:
    raise ValueError(name)
  return peak_rss_mib()


BERT_LARGE = EncoderConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                           intermediate_size=4096)


def optimizer_state_memory():
  """Optimizer state bytes at BERT-large shapes (``jax.eval_shape`` of ``init``: nothing is
  allocated), against the parameters' float32 bytes; CT-D's child networks are every
  1/p-th entry of each leaf (the size, not the choice, sets the bytes)."""
  shapes = jax.eval_shape(EncoderForSequenceClassification(BERT_LARGE).init, jax.random.key(0),
                          jnp.zeros((1, 8), jnp.int32))["params"]
  param_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(shapes))

  def child(p):
    def leaf(x):
      keep = np.zeros(x.size, bool)
      keep[::round(1 / p)] = True
      return keep.reshape(x.shape)
    return jax.tree.map(leaf, shapes)

  def state_bytes(tx):
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(jax.eval_shape(tx.init, shapes)))

  variants = {"vanilla AdamW": optax.adamw(LR, eps=1e-6, weight_decay=0.01),
              "CT-F AdamW": child_tuning_adamw(LR, reserve_p=0.3, key=0, weight_decay=0.01)}
  for p in (0.1, 0.3):
    mask = child(p)
    variants[f"CT-D AdamW, p={p}"] = child_tuning_adamw(LR, mode="driven", mask=mask,
                                                        weight_decay=0.01)
    variants[f"CT-D AdamW, p={p}, sparse state"] = child_tuning_adamw(
        LR, mode="driven", mask=mask, weight_decay=0.01, sparse_state=True)
  result = {"parameters": sum(x.size for x in jax.tree.leaves(shapes)), "param_bytes": param_bytes}
  result["state_bytes"] = {name: state_bytes(tx) for name, tx in variants.items()}
  return result


def init_compile():
  """Compile time (lower + compile, median of 3) and fused kernels of a whole random
  ``model.init`` against the head's alone (what ``load_pretrained`` compiles)."""
  ids = jnp.zeros((1, 8), jnp.int32)
  rows = {}
  for config_name, config in (("BERT-base", BERT_BASE), ("BERT-large", BERT_LARGE)):
    model = EncoderForSequenceClassification(config)
    head = ["classifier/kernel", "classifier/bias"]
    for label, fn in (("whole model.init", lambda key: model.init(key, ids)),
                      ("head only (load_pretrained)", loading.init_only(model, ids, head))):
      times = []
      for _ in range(3):
        jax.clear_caches()  # else the second compile is a cache hit
        start = time.perf_counter()
        compiled = jax.jit(fn).lower(jax.random.key(0)).compile()
        times.append(time.perf_counter() - start)
      rows[f"{config_name}, {label}"] = {"compile_s": statistics.median(times),
                                         "fusions": compiled.as_text().count(" fusion(")}
  return rows


def fisher_memory():
  """Compiled temporary bytes of one per-example Fisher chunk (``memory_analysis``), with
  the word embeddings' gradients dense and with ``embedding_lookups``."""
  rows = {}
  for config_name, config in (("MiniLM-L6", MINILM_L6), ("BERT-base", BERT_BASE)):
    model, params = init_params(config)
    parameters = sum(x.size for x in jax.tree.leaves(params))
    total = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), params)
    for chunk in (8, 32):
      batch = jax.tree.map(lambda x: x[:chunk], fake_batch(config))
      for label, lookups in (("dense gradients", ()),
                             ("embedding_lookups", ((model.word_embeddings_path, "input_ids"),))):
        add, _ = fisher_module._chunk_functions(fisher_loss(model), "empirical", None, "labels",
                                                lookups)
        compiled = add.lower(total, params, batch, np.ones(chunk, np.float32), jax.random.key(0),
                             0).compile()
        rows[f"{config_name}, chunk {chunk}, {label}"] = {
            "parameters": parameters, "chunk": chunk,
            "temp_bytes": compiled.memory_analysis().temp_size_in_bytes}
  return rows


def peak_memory_of(script, workloads):
  """{workload: peak RSS in MiB}, each workload run alone by ``script --workload NAME``."""
  result = {}
  for name in workloads:
    out = subprocess.run([sys.executable, str(script), "--workload", name], check=True,
                         capture_output=True, text=True).stdout
    result[name] = float(out.strip().splitlines()[-1])
  return result


def peak_memory():
  return peak_memory_of(__file__, ("train step (CT-F)", "per-example Fisher"))


def host_memory(reps):
  """The vanilla step in fresh processes, with each of ``HOST_MEMORY_SETTINGS``, alternating;
  {setting: {"median_s", "page_faults", "ratio", "ratio_95ci", "peak_mib"}}."""
  runs = {name: [] for name in HOST_MEMORY_SETTINGS}
  plain = {k: v for k, v in os.environ.items()
           if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
  for _ in range(reps):
    for name, env in HOST_MEMORY_SETTINGS.items():
      out = subprocess.run([sys.executable, __file__, "--workload", name], check=True,
                           capture_output=True, text=True, env={**plain, **env}).stdout
      runs[name].append(json.loads(out.strip().splitlines()[-1]))
  base = [r["median_s"] for r in runs[next(iter(HOST_MEMORY_SETTINGS))]]
  return {name: {**paired_ratio([r["median_s"] for r in rs], base),
                 "page_faults": float(np.median([r["page_faults"] for r in rs])),
                 "peak_mib": [r["peak_mib"] for r in rs]}
          for name, rs in runs.items()}


def malloc_of_process() -> str:
  """The glibc malloc settings this process runs with, by name where they are one of
  childtuning_jax.cpu's."""
  env = {k: os.environ[k] for k in sorted(MALLOC_VARIABLES) if k in os.environ}
  for name, known in (("MALLOC_ENV", MALLOC_ENV), ("MALLOC_ENV_NO_MMAP", MALLOC_ENV_NO_MMAP)):
    if env == known:
      return f"childtuning_jax.cpu.{name}"
  return " ".join(f"{k}={v}" for k, v in env.items()) or "glibc's defaults"


def malloc_sentence(results) -> str:
  """Which glibc malloc settings measured which sections (``results["malloc"]``)."""
  by_setting = {}
  for section, setting in results.get("malloc", {}).items():
    by_setting.setdefault(setting, []).append(section)
  if len(by_setting) <= 1:
    return "".join(f" glibc malloc: `{setting}`." for setting in by_setting)
  return " glibc malloc: " + "; ".join(
      f"`{setting}` for {', '.join(sections)}" for setting, sections in by_setting.items()) + "."


def merge_rerun(out, results, only):
  """With ``--only``: the rerun sections merged into the last full run's results in ``out``
  (None if there is none)."""
  if not out.exists():
    return None
  previous = json.loads(out.read_text())
  rerun = {key: results[key] for key in only.split(",")}
  rerun["malloc"] = {**previous.get("malloc", {}), **results.get("malloc", {})}
  return {**previous, **rerun,
          "command": previous["command"] + f"; then {results['command']} --only {only}",
          "wall_minutes": previous["wall_minutes"] + results["wall_minutes"]}


def machine():
  cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
              if line.startswith("model name")), platform.processor())
  return {"cpu": cpu, "cores": os.cpu_count(), "backend": jax.default_backend(),
          "devices": len(jax.devices()), "jax": jax.__version__, "optax": optax.__version__,
          "python": platform.python_version()}


def render(results):
  m = results["machine"]
  lines = [f"Measured on {m['cpu']}, {m['cores']} cores, JAX {m['jax']} on {m['backend']}, "
           f"optax {m['optax']}. Command: `{results['command']}` ({results['wall_minutes']:.1f} min). "
           "Times are medians; a ratio is the median, over repetitions, of the row's time over "
           "the first row's time in the same repetition (variants run in a random order in each "
           "repetition); "
           "its interval is a 95% bootstrap interval." + malloc_sentence(results),
           ""]
  for title, key in (("Threefry-2x32 on 5.6M counters", "threefry"),
                     ("Optimizer update alone, all-MiniLM-L6 tree (22.7M parameters)", "update_minilm"),
                     ("Optimizer update alone, BERT-base tree (109M parameters)", "update_bert_base"),
                     (f"Full training step, MiniLM-L6-sized BERT classifier, batch {BATCH} × {SEQ_LEN} tokens, "
                      "dropout on, clip 1.0", "train_step"),
                     ("Where a vanilla step's time goes: the same step with one piece replaced",
                      "step_variants"),
                     (f"Fisher information over {BATCH} examples × {SEQ_LEN} tokens, MiniLM-L6-sized BERT "
                      "classifier", "fisher")):
    if key not in results:  # a results file from before the section existed
      continue
    lines += [f"### {title}", "", "| variant | median | ratio | 95% interval of the ratio |",
              "| --- | ---: | ---: | ---: |"]
    lines += [f"| {name} | {r['median_s'] * 1e3:.1f} ms | {r['ratio']:.3f}× | "
              f"{r['ratio_95ci'][0]:.3f}–{r['ratio_95ci'][1]:.3f} |"
              for name, r in results[key].items()]
    if key == "train_step":
      update = results["update_minilm"]
      added = update["CT-F + adamw"]["median_s"] - update["adamw"]["median_s"]
      step = results[key]["vanilla"]["median_s"]
      lines += ["", "Step ratios carry this machine's run-to-run noise (see the intervals). "
                "The work CT-F adds to a step is its mask, measured more precisely "
                f"in the MiniLM-L6 update table: {added * 1e3:.1f} ms, i.e. "
                f"{added / step:.1%} of the vanilla step."]
    if key == "train_step" and "CT-D, sparse optimizer state" in results[key]:
      dense = [r["median_s"] for name, r in results[key].items() if name == "CT-D"][0]
      sparse = results[key]["CT-D, sparse optimizer state"]["median_s"]
      lines += ["", f"CT-D with the sparse optimizer state (p={RESERVE_P}) against the dense "
                f"one: {sparse / dense:.3f}× the step time (medians)."]
    if key == "fisher":
      per_example = results[key]["per-example Fisher"]["median_s"] / BATCH
      lines += ["", f"Per-example Fisher: {per_example * 1e3:.1f} ms per example."]
    lines.append("")
  if "optimizer_state_memory" in results:
    r = results["optimizer_state_memory"]
    lines += [f"### Optimizer state at BERT-large shapes ({r['parameters'] / 1e6:.0f}M "
              "parameters; `jax.eval_shape` of `init`)", "",
              "| optimizer | state | state / parameters' bytes |", "| --- | ---: | ---: |"]
    lines += [f"| {name} | {b / 2**20:,.0f} MiB | {b / r['param_bytes']:.2f}× |"
              for name, b in r["state_bytes"].items()]
    lines += ["", "CT-D's dense state is AdamW's two moments plus one byte of mask per "
              "parameter; the sparse state holds, per child entry, its int32 position and two "
              "float32 moments.", ""]
  if "fisher_memory" in results:
    lines += ["### Memory of one per-example Fisher chunk (compiled temporary bytes, "
              f"{SEQ_LEN} tokens)", "",
              "| model, chunk, word embeddings | temporary | chunk × parameters' float32 bytes |",
              "| --- | ---: | ---: |"]
    lines += [f"| {name} | {r['temp_bytes'] / 2**30:.2f} GiB | "
              f"{r['chunk'] * r['parameters'] * 4 / 2**30:.2f} GiB |"
              for name, r in results["fisher_memory"].items()]
    lines.append("")
  if "init_compile" in results:
    lines += ["### Compiling a random initialisation: the whole model's against the head's "
              "alone (lower + compile, median of 3)", "",
              "| init | compile | fused kernels |", "| --- | ---: | ---: |"]
    lines += [f"| {name} | {r['compile_s']:.2f} s | {r['fusions']:,} |"
              for name, r in results["init_compile"].items()]
    lines.append("")
  if "host_memory" in results:
    lines += ["### Host memory: the vanilla step in a fresh process, with glibc's malloc "
              "defaults, with one heap that keeps freed memory, and with huge pages", "",
              "| glibc malloc | median step | minor page faults per step | ratio | 95% interval "
              "| peak RSS of each process |",
              "| --- | ---: | ---: | ---: | ---: | ---: |"]
    lines += [f"| {name} | {r['median_s'] * 1e3:.0f} ms | {r['page_faults']:,.0f} | {r['ratio']:.3f}× | "
              f"{r['ratio_95ci'][0]:.3f}–{r['ratio_95ci'][1]:.3f} | "
              + (", ".join(f"{p:,.0f}" for p in r["peak_mib"]) + " MiB" if "peak_mib" in r else "–")
              + " |" for name, r in results["host_memory"].items()]
    lines += ["", f"{len(next(iter(results['host_memory'].values())).get('peak_mib', [])) or 3} "
              "processes per setting, alternating; each time is the median of five steps "
              "after two warm-up steps. The other tables of this section were measured with "
              "the glibc malloc settings named at its top (the script restarts itself with "
              "`childtuning_jax.cpu.malloc_env()`).", ""]
  if "fsdp_memory" in results:
    rows = results["fsdp_memory"]
    lines += [f"### `--fsdp N`: per-device bytes of the trainer's compiled step, BERT-large "
              f"shapes, batch {BATCH} × {SEQ_LEN}, 8 CPU devices (`memory_analysis`)", "",
              "| mode, sharding | arguments (state, batch) per device | vs --fsdp 1 | "
              "temporaries per device |", "| --- | ---: | ---: | ---: |"]
    for name, r in rows.items():
      base = rows[name.rsplit(",", 1)[0] + ", --fsdp 1"]["argument_bytes"]
      lines.append(f"| {name} | {r['argument_bytes'] / 2**20:,.0f} MiB | "
                   f"{r['argument_bytes'] / base:.3f}× | {r['temp_bytes'] / 2**20:,.0f} MiB |")
    lines.append("")
  if "rss_stages" in results:
    runs = results["rss_stages"]
    names = list(runs)
    lines += ["### Where a training process's memory goes: resident set after each stage "
              "(MiniLM-L6 step, batch 32 × 128, a fresh process each, "
              f"`{results.get('malloc', {}).get('rss_stages', 'malloc_env()')}`)", "",
              "| stage | " + " | ".join(names) + " |", "| --- |" + " ---: |" * len(names)]
    for stage in runs[names[0]]["stages"]:
      lines.append(f"| {stage} | " + " | ".join(
          f"{runs[n]['stages'][stage]['rss_mib']:,.0f} MiB" for n in names) + " |")
    lines.append("| peak (VmHWM) at the end | " + " | ".join(
        f"{list(runs[n]['stages'].values())[-1]['peak_mib']:,.0f} MiB" for n in names) + " |")
    for key, label in (("argument_mib", "compiled step: arguments"),
                       ("output_mib", "compiled step: outputs"),
                       ("temp_mib", "compiled step: temporaries (one block)")):
      lines.append(f"| {label} | " + " | ".join(f"{runs[n][key]:,.0f} MiB" for n in names) + " |")
    lines.append("")
  mem = results["peak_memory_mib"]
  lines += ["### Peak memory (resident set of a process running only that workload, MiniLM-L6)", "",
            "| workload | peak RSS | ratio |", "| --- | ---: | ---: |"]
  base = next(iter(mem.values()))
  lines += [f"| {name} | {v:.0f} MiB | {v / base:.2f}× |" for name, v in mem.items()]
  return "\n".join(lines) + "\n"


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  parser.add_argument("--quick", action="store_true", help="few repetitions; print only")
  parser.add_argument("--only", help="comma-separated sections to rerun (e.g. "
                      "fisher,peak_memory_mib), merged into the last full run's results")
  parser.add_argument("--reps", type=int, help="repetitions (default 20; 3 with --quick)")
  parser.add_argument("--workload", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if not args.workload:  # workloads run in the environment their parent gives them
    restart_keeping_freed_memory()  # before JAX runs anything; see childtuning_jax/cpu.py
  if args.workload:
    print(run_workload(args.workload))
    return
  reps = args.reps or (3 if args.quick else 20)
  start = time.time()
  results = {"machine": machine(),
             "command": "python bench/bench_core.py" + (" --quick" if args.quick else "")
             + (f" --reps {args.reps}" if args.reps else "")}
  for key, fn in (("threefry", lambda: bench_threefry(reps)),
                  ("update_minilm", lambda: bench_update(MINILM_L6, reps)),
                  ("update_bert_base", lambda: bench_update(BERT_BASE, reps)),
                  ("train_step", lambda: bench_train_step(MINILM_L6, reps)),
                  ("step_variants", lambda: bench_step_variants(MINILM_L6, max(3, reps // 2))),
                  ("fisher", lambda: bench_fisher(MINILM_L6, max(3, reps // 2))),
                  ("optimizer_state_memory", optimizer_state_memory),
                  ("fisher_memory", fisher_memory),
                  ("init_compile", init_compile),
                  ("peak_memory_mib", peak_memory),
                  ("host_memory", lambda: host_memory(4)),
                  ("fsdp_memory", fsdp_memory),
                  ("rss_stages", rss_stages)):
    if args.only and key not in args.only.split(","):
      continue
    results[key] = fn()
    results.setdefault("malloc", {})[key] = malloc_of_process()
    print(key, json.dumps(results[key], indent=1), flush=True)
  results["wall_minutes"] = (time.time() - start) / 60
  if args.quick:
    print(render(results) if not args.only else "")
    return
  out = ROOT / "bench" / "results" / f"core_{jax.default_backend()}.json"
  if args.only and (results := merge_rerun(out, results, args.only)) is None:
    return
  section = render(results)
  print(section)
  out.parent.mkdir(exist_ok=True)
  out.write_text(json.dumps(results, indent=1) + "\n")
  update_benchmarks_md(section, jax.default_backend())


if __name__ == "__main__":
  main()
