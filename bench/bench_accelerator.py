"""The training step on whatever backend JAX sees: vanilla, CT-F and CT-D, float32 and
bfloat16, at BERT-base and BERT-large shapes with random weights.

For each (model, dtype, mode) it reports the compile time of the step (lower + compile),
its step time, the model FLOP utilisation against the chip's peak (``PEAK_TFLOPS``; the
FLOPs are the usual analytic count of the matmuls: 6 × matmul parameters × tokens, plus
the attention products), and the step's ratio to vanilla's. The modes of one (model,
dtype) are compiled and held together and timed in interleaved rounds in one process (on
an H200, CT-F's step was 1.82× vanilla's in one process and 1.14× in another, each mode
timed alone: BENCHMARKS.md), so the ratio is taken within each round; holding three training states needs about three times
one mode's device memory (BERT-large: ~15 GiB in float32).
It also times the per-example Fisher over one batch against one batched backward pass.
``--profile`` traces each mode's steps with JAX's profiler and reports the device's busy
time per step by kind of kernel (``bench/kernel_profile.py``): on a GPU, busy time well
below the step's wall time means the device waits on the host, and the profile names the
host's events (XLA's runtime, the CUDA driver's calls, Python) that ran while it waited,
beside the time the timing loop spent inside the call to the compiled step. XLA runs a GPU step as CUDA
graphs, each traced as one operation; ``XLA_FLAGS=--xla_gpu_enable_command_buffer=`` turns
them off, so that the profile shows each kernel (and the step pays for each launch).
``--modes`` can add ``CT-F-trip-per-leaf``: CT-F with the mask loop it had before (a trip
per leaf, where it now makes two trips per shape), timed beside the others.
``--gradient_checkpointing off,on`` compiles (and times) each step also with every encoder
layer recomputed in the backward pass.

``--topology v5e:1x1`` (or ``v4:2x2x1``, ``v6e:2x2``, ...) compiles the steps for that TPU
slice on a machine without one (``jax.experimental.topologies``: XLA's TPU compiler from
libtpu, ``pip install "jax[tpu]"``; set ``JAX_PLATFORMS=cpu``): the TPU compiler's own compile
time and per-chip memory (``memory_analysis``), and a step that does not fit a chip's HBM
is reported as such; nothing runs. The batch is split over the slice's chips, the state
replicated. ``make bench-tpu-compile`` makes such an environment (.venv-tpu) and runs it.

It needs only jax, flax, optax and numpy (nothing from the trainer's extras) and the
library in this repository:

  PYTHONPATH=. python3 bench/bench_accelerator.py                 (BERT-base and BERT-large)
  PYTHONPATH=. python3 bench/bench_accelerator.py --tiny          (a tiny model, seconds, CPU)
  PYTHONPATH=. python3 bench/bench_accelerator.py --compile_only --sizes minilm,bert-base,bert-large
  JAX_PLATFORMS=cpu PYTHONPATH=. python3 bench/bench_accelerator.py --topology v5e:1x1 --dtypes bfloat16
  PYTHONPATH=. python3 bench/bench_accelerator.py --render bench/results/accelerator_steps_gpu.json

The step is the trainer's: dropout on, gradients clipped to norm 1, then the mode's mask
and AdamW (weight decay 0.01); CT-D's child network is a random one of ``--reserve_p``
(speed does not depend on which entries). ``--compile_only`` lowers the steps from
shapes alone (``jax.eval_shape``), so BERT-large's compile time needs no memory for its
weights; it also reports the compiled step's memory per device (``memory_analysis``:
arguments, outputs not aliased to them, temporaries). A table goes to stdout and everything
to ``--out`` (JSON); ``--budget_s`` stops before a configuration that would start past it,
and the JSON says which were left out.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import os
import platform
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

ROOT = Path(__file__).resolve().parent.parent
for path in (ROOT, ROOT / "bench"):  # run as a script from anywhere
  if str(path) not in sys.path:
    sys.path.insert(0, str(path))

from childtuning_jax import _random, child_tuning_adamw, estimate_fisher  # noqa: E402
from kernel_profile import KINDS, profile_kernels  # noqa: E402  (bench/, beside this file)
from childtuning_jax.models import EncoderConfig, EncoderForSequenceClassification  # noqa: E402

SIZES = {
    "tiny": EncoderConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2,
                          num_attention_heads=4, intermediate_size=128),
    "minilm": EncoderConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                            intermediate_size=1536),
    "bert-base": EncoderConfig(),
    "bert-large": EncoderConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                                intermediate_size=4096),
}
MODES = ("vanilla", "CT-F", "CT-D")
# Not run by default (--modes): CT-F as it drew the leaves of one shape before, in a loop
# trip per leaf (_random.MASK_LOOP_TRIPS; BENCHMARKS.md, how CT-F draws its masks).
CTF_PER_LEAF = "CT-F-trip-per-leaf"
DTYPES = ("float32", "bfloat16")
LEARNING_RATE, WEIGHT_DECAY, MAX_GRAD_NORM = 2e-5, 0.01, 1.0
CPU_MATMUL_N, ACCELERATOR_MATMUL_N = 2048, 8192  # the measured matmul ceiling's size

# Dense peak TFLOP/s per chip: (float32 matmuls at JAX's default precision, bfloat16).
# JAX's default precision runs float32 matmuls as TF32 on NVIDIA GPUs since Ampere and
# as bfloat16 passes on TPUs, so those are the float32 peaks; vendor data sheets.
PEAK_TFLOPS = {
    "H100 PCIe": (378.0, 756.0),
    "H100": (494.7, 989.4),  # SXM
    "H200": (494.7, 989.4),
    "A100": (156.0, 312.0),
    "TPU v4": (275.0, 275.0),
    "TPU v5 lite": (197.0, 197.0),  # v5e
    "TPU v5e": (197.0, 197.0),
    "TPU v5p": (459.0, 459.0),
    "TPU v6 lite": (918.0, 918.0),  # v6e (Trillium)
    "TPU v6e": (918.0, 918.0),
}
# Memory per chip (GiB), vendor data sheets; the first match by name, as PEAK_TFLOPS.
MEMORY_GIB = {"H100 PCIe": 80, "H100": 80, "H200": 141, "A100": 80, "TPU v4": 32,
              "TPU v5 lite": 16, "TPU v5e": 16, "TPU v5p": 95, "TPU v6 lite": 32, "TPU v6e": 32}


def matmul_tflops(n: int, reps: int = 5) -> tuple[float, float]:
  """The best rate of an n × n × n matmul through XLA on random data, float32 (at JAX's
  default precision) and bfloat16: the ceiling this machine shows, beside the data sheet's
  (on a CPU, whose clocks and vector units a VM does not report, the only estimate)."""
  rates = []
  for dtype in (jnp.float32, jnp.bfloat16):
    a, b = (jax.random.normal(jax.random.key(seed), (n, n), dtype) for seed in (0, 1))
    matmul = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
    matmul(a, b).block_until_ready()
    best = float("inf")
    for _ in range(reps):
      start = time.perf_counter()
      matmul(a, b).block_until_ready()
      best = min(best, time.perf_counter() - start)
    rates.append(2 * n**3 / best / 1e12)
  return rates[0], rates[1]


def chip_peak(device) -> tuple[str, tuple[float, float] | None]:
  """(name, (float32, bfloat16) peak TFLOP/s) of ``device``; None where unknown."""
  kind = getattr(device, "device_kind", "") or device.platform
  if device.platform == "cpu":
    return (f"CPU ({platform.processor() or kind}); peak: the rate of a {CPU_MATMUL_N}² matmul",
            matmul_tflops(CPU_MATMUL_N))
  return kind, by_chip_name(PEAK_TFLOPS, kind)


def by_chip_name(table: dict, kind: str):
  """The entry of ``table`` whose name the device kind contains (the first match: "H100
  PCIe" before "H100"); None where none does."""
  return next((value for name, value in table.items() if name.lower() in kind.lower()), None)


def topology_devices(name: str) -> list:
  """The chips of the TPU slice ``name`` (``v5e:2x2``, ``v4:2x2x1``, ...) as devices to compile
  for, on a machine without them (libtpu's compiler; no TPU is opened)."""
  from jax.experimental import topologies

  # A host holds 2 x 2 chips (libtpu's default); a slice smaller than that is one host.
  shape = [int(n) for n in name.split(":")[-1].split("x")] + [1]
  hosts_chips = (min(shape[0], 2), min(shape[1], 2), 1)
  return list(topologies.get_topology_desc(name, platform="tpu",
                                           chips_per_host_bounds=hosts_chips).devices)


def step_flops(config: EncoderConfig, batch: int, length: int) -> float:
  """Matmul FLOPs of one training step (forward + backward = 3 × forward): 2 per
  multiply-add of every dense layer over every token, plus the attention's two products."""
  h, i, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
  per_token = layers * (4 * h * h + 2 * h * i) + h * h + h * config.num_labels  # + pooler, head
  attention = layers * 2 * length * h  # QKᵀ and PV: 2 · length · hidden multiply-adds per token
  return 3 * 2 * batch * length * (per_token + attention)


def fake_batch(config: EncoderConfig, batch: int, length: int, seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  lengths = rng.integers(length // 2, length + 1, batch)
  return {"input_ids": rng.integers(1, config.vocab_size, (batch, length)).astype(np.int32),
          "attention_mask": (np.arange(length)[None] < lengths[:, None]).astype(np.int32),
          "token_type_ids": np.zeros((batch, length), np.int32),
          "labels": rng.integers(0, config.num_labels, batch).astype(np.int32)}


def loss_fn(model):
  def loss(params, batch, dropout_key=None):
    logits = model.apply({"params": params}, batch["input_ids"], batch["attention_mask"],
                         batch["token_type_ids"], deterministic=dropout_key is None,
                         rngs=None if dropout_key is None else {"dropout": dropout_key})
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean()
  return loss


def optimizer(mode: str, reserve_p: float, shapes) -> optax.GradientTransformation:
  """The trainer's optimizer for ``mode``: clipping, then the mask and AdamW. CT-D's child
  network is a random one drawn on the host from the parameters' ``shapes``."""
  common = dict(weight_decay=WEIGHT_DECAY)
  if mode == "vanilla":
    inner = optax.adamw(LEARNING_RATE, eps=1e-6, **common)
  elif mode in ("CT-F", CTF_PER_LEAF):
    inner = child_tuning_adamw(LEARNING_RATE, reserve_p=reserve_p, key=0, **common)
  else:
    rng = np.random.default_rng(1)
    mask = jax.tree.map(lambda leaf: rng.random(leaf.shape, np.float32) < reserve_p, shapes)
    inner = child_tuning_adamw(LEARNING_RATE, mode="driven", mask=mask, **common)
  return optax.chain(optax.clip_by_global_norm(MAX_GRAD_NORM), inner)


@functools.lru_cache(maxsize=2)
def host_params(size: str) -> dict:
  """The model's own random initialisation, computed by the host's CPU backend and kept as
  NumPy arrays (the same for both dtypes and every mode). Compiling a whole model's init for
  an accelerator costs minutes: on an H100 BERT-base's took 3 min (every initializer its own
  large random-number kernel), against seconds on a CPU."""
  model = EncoderForSequenceClassification(SIZES[size])
  with jax.default_device(jax.devices("cpu")[0]):
    params = jax.jit(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))()
  return jax.device_get(params["params"])


def make_step(loss, tx):
  def step(state, batch):
    params, opt_state, key = state
    key, dropout_key = jax.random.split(key)
    value, grads = jax.value_and_grad(loss)(params, batch, dropout_key)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state, key), value
  return jax.jit(step, donate_argnums=0)


@contextlib.contextmanager
def patched(module, **attributes):
  """Temporarily replaces attributes of ``module`` (read when a step is traced)."""
  saved = {name: getattr(module, name) for name in attributes}
  for name, value in attributes.items():
    setattr(module, name, value)
  try:
    yield
  finally:
    for name, value in saved.items():
      setattr(module, name, value)


def traced_as(name: str):
  """The library as the mode (or variant) ``name`` traces it: CT-F-trip-per-leaf, and a
  name that starts with it, with CT-F's mask loop as it was (a trip per leaf)."""
  if name.startswith(CTF_PER_LEAF):
    return patched(_random, MASK_LOOP_TRIPS=None)
  return contextlib.nullcontext()


# One step traced at a time: a mode's trace may patch the library (``traced_as``) while the
# compiles of the others, in other threads, overlap.
_TRACING = threading.Lock()


def block(tree):
  return jax.tree.map(lambda x: x.block_until_ready() if hasattr(x, "block_until_ready") else x,
                      tree)


def placed_shapes(tree, devices, *, split: bool):
  """``tree``'s shapes placed on ``devices``: each leaf's leading axis split over them
  (``split``: a batch), or whole on each (the state)."""
  mesh = jax.sharding.Mesh(np.array(devices), ("data",),
                           axis_types=(jax.sharding.AxisType.Auto,))
  spec = jax.sharding.PartitionSpec("data") if split else jax.sharding.PartitionSpec()
  sharding = jax.sharding.NamedSharding(mesh, spec)
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def memory_mib(memory) -> dict:
  """A compiled step's bytes per device (``memory_analysis``), in MiB: its arguments, the
  outputs not aliased to them (the donated state's buffers are reused) and temporaries."""
  if memory is None:  # a backend that does not say
    return {}
  return {"argument_mib": memory.argument_size_in_bytes / 2**20,
          "output_mib": (memory.output_size_in_bytes - memory.alias_size_in_bytes) / 2**20,
          "temp_mib": memory.temp_size_in_bytes / 2**20}


def is_out_of_memory(error: Exception) -> bool:
  return "RESOURCE_EXHAUSTED" in str(error) or "Ran out of memory" in str(error)


def prepare(size: str, dtype: str, mode: str, args, checkpointing: bool = False
            ) -> tuple[dict, object]:
  """Compiles the step of (size, dtype, mode), with every encoder layer recomputed in the
  backward pass if ``checkpointing``: ``({"compile_s", memory per device}, run)``, where
  ``run(steps)`` runs that many steps from the state it keeps and returns their mean time,
  the last loss and the mean time the host spent inside the call to the compiled step
  (``run`` is None with ``--compile_only``). Compiled for ``args.devices`` (a TPU slice of
  ``--topology``) from shapes, a step too large for the chips gives ``{"compile_s",
  "out_of_memory"}``."""
  config = dataclasses.replace(SIZES[size], dtype=dtype, gradient_checkpointing=checkpointing)
  model = EncoderForSequenceClassification(config)
  batch = fake_batch(config, args.batch_size, args.seq_len)
  shapes = jax.eval_shape(model.init, jax.random.key(0), batch["input_ids"][:1])["params"]
  loss = loss_fn(model)
  tx = optimizer(mode, args.reserve_p, shapes)
  devices = getattr(args, "devices", None)
  if args.compile_only:
    state = (shapes, jax.eval_shape(tx.init, shapes), jax.eval_shape(lambda: jax.random.key(0)))
    batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), batch)
    if devices is not None:
      state, batch = (placed_shapes(state, devices, split=False),
                      placed_shapes(batch, devices, split=True))
  else:
    params = jax.device_put(host_params(size))
    state = (params, tx.init(params), jax.random.key(0))  # eager: no large kernel to compile
    batch = jax.device_put(batch)
  name = f"{size}/{dtype}/{mode}" + (", gradient checkpointing" if checkpointing else "")
  print(f"compiling {name}", flush=True)  # a slow compile shows where it is
  step = make_step(loss, tx)
  with _TRACING, traced_as(mode):
    start = time.perf_counter()
    lowered = step.lower(state, batch)
  try:
    compiled = lowered.compile()
  except Exception as error:  # noqa: BLE001
    if not (args.compile_only and is_out_of_memory(error)):
      raise
    result = {"compile_s": time.perf_counter() - start,
              "out_of_memory": str(error).strip().splitlines()[0][:300]}
    print(f"  does not fit: {result['out_of_memory']}", flush=True)
    return result, None
  result = {"compile_s": time.perf_counter() - start, **memory_mib(compiled.memory_analysis())}
  print(f"  compiled in {result['compile_s']:.1f} s", flush=True)
  if args.compile_only:
    return result, None
  # Steps dispatched as the trainer's loop does: back to back on an accelerator (it queues
  # the next step while one runs), one at a time on the CPU (train/loop.py: a second step in
  # flight holds a second block of temporaries).
  one_at_a_time = jax.default_backend() == "cpu"
  carry = [state]

  def run(steps: int) -> tuple[float, float, float]:
    calling = 0.0  # inside the calls: where the host, not the device, sets the pace
    start = time.perf_counter()
    for _ in range(steps):
      called = time.perf_counter()
      carry[0], value = compiled(carry[0], batch)
      calling += time.perf_counter() - called
      if one_at_a_time:
        block(value)
    block((carry[0], value))
    return (time.perf_counter() - start) / steps, float(value), calling / steps

  run(2)  # warm-up
  if args.profile:
    run.hlo_text = compiled.as_text()  # what each traced operation is made of
  return result, run


def time_interleaved(runs: dict, args) -> dict:
  """Rounds of ``--steps`` steps of every mode in turn (the order rotated each round), so
  that a drift of the machine's speed during the run reaches every mode alike; per mode:
  the median over rounds of a round's mean step, and its ratio to vanilla's step of the
  same round (median and range over rounds); and the median of a step's time inside the
  call to the compiled step (``call_s``: near the step time, the host sets the pace)."""
  rounds = {mode: [] for mode in runs}
  calls = {mode: [] for mode in runs}
  losses = {}
  order = list(runs)
  for r in range(args.rounds):
    for mode in order[r % len(order):] + order[:r % len(order)]:
      seconds, losses[mode], calling = runs[mode](args.steps)
      rounds[mode].append(seconds)
      calls[mode].append(calling)
  timed = {}
  for mode, times in rounds.items():
    timed[mode] = {"step_s": statistics.median(times), "round_step_s": times,
                   "loss": losses[mode], "call_s": statistics.median(calls[mode])}
    if "vanilla" in rounds:
      ratios = [t / v for t, v in zip(times, rounds["vanilla"])]
      timed[mode].update(ratio=statistics.median(ratios), ratio_range=[min(ratios), max(ratios)])
  return timed


def compile_interleaved(prepare_mode, modes, reps: int) -> dict:
  """Each mode's step compiled ``reps`` times, the modes in turn (the order rotated each
  round, XLA's caches cleared before each compile); per mode, its first compile's row with
  the median compile time, and the median and range of its ratio to vanilla's compile in
  the same round."""
  times = {mode: [] for mode in modes}
  rows = {}
  for r in range(reps):
    for mode in modes[r % len(modes):] + modes[:r % len(modes)]:
      jax.clear_caches()  # else a compile of the same program is a cache hit
      row, _ = prepare_mode(mode)
      rows.setdefault(mode, row)
      times[mode].append(row["compile_s"])
  for mode, row in rows.items():
    row.update(compile_s=statistics.median(times[mode]), round_compile_s=times[mode])
    if "vanilla" in times:
      ratios = [t / v for t, v in zip(times[mode], times["vanilla"])]
      row.update(compile_ratio=statistics.median(ratios),
                 compile_ratio_range=[min(ratios), max(ratios)])
  return rows


def bench_fisher(size: str, args) -> dict:
  """The per-example Fisher over one batch (the library's row-sparse word embeddings)
  against one batched forward + backward on the same batch, float32."""
  config = SIZES[size]
  model = EncoderForSequenceClassification(config)
  batch = fake_batch(config, args.batch_size, args.seq_len)
  params = jax.device_put(host_params(size))

  def loss(params, batch, row_offsets=None):
    variables = {"params": params}
    if row_offsets is not None:
      variables["perturbations"] = model.perturbations(row_offsets)
    logits = model.apply(variables, batch["input_ids"], batch["attention_mask"],
                         batch["token_type_ids"], deterministic=True)
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean()

  lookups = {model.word_embeddings_path: "input_ids"}
  batched = jax.jit(jax.grad(loss))
  device_batch = jax.device_put(batch)
  fns = {"batched_backward_s": lambda: block(batched(params, device_batch)),
         "per_example_fisher_s": lambda: block(estimate_fisher(
             loss, params, [batch], chunk_size=args.fisher_chunk, embedding_lookups=lookups))}
  times = {name: [] for name in fns}
  for rep in range(args.fisher_reps + 1):
    for name, fn in fns.items():
      start = time.perf_counter()
      fn()
      if rep:  # the first round compiles
        times[name].append(time.perf_counter() - start)
  result = {name: statistics.median(t) for name, t in times.items()}
  result["ratio"] = result["per_example_fisher_s"] / result["batched_backward_s"]
  return result


def machine(topology: str | None = None, devices=None) -> dict:
  """The device the steps run on (or, with a ``topology``, are compiled for), its peaks and
  memory, and the software."""
  device = (devices or jax.devices())[0]
  name, peaks = chip_peak(device)
  if topology:  # nothing runs: no measured matmul rate
    from importlib import metadata

    measured = None
    extra = {"topology": topology, "compiled_on": platform.processor() or platform.machine(),
             "libtpu": metadata.version("libtpu")}
  else:
    measured = peaks if device.platform == "cpu" else matmul_tflops(ACCELERATOR_MATMUL_N)
    extra = {}
  return {"backend": device.platform if topology else jax.default_backend(), "device": name,
          "devices": len(devices) if topology else jax.device_count(),
          "memory_gib": by_chip_name(MEMORY_GIB, name), **extra,
          "peak_tflops": None if peaks is None else dict(zip(DTYPES, peaks)),
          "matmul_tflops": None if measured is None else dict(zip(DTYPES, measured)),
          "jax": jax.__version__, "flax": flax.__version__, "optax": optax.__version__,
          "python": platform.python_version(), "host_cores": os.cpu_count(),
          "xla_flags": os.environ.get("XLA_FLAGS", "")}


def render(results: dict) -> str:
  m = results["machine"]
  peaks = m["peak_tflops"]
  if m.get("topology"):
    device = (f"Compiled for {m['devices']} × {m['device']} (TPU slice {m['topology']}, "
              f"{m['memory_gib']} GiB each) by libtpu {m['libtpu']}'s compiler on a CPU host "
              f"({m['compiled_on']}, JAX {m['jax']}): no chip ran. Peak TFLOP/s ")
  else:
    device = f"Device: {m['device']} ({m['backend']}, JAX {m['jax']}); peak TFLOP/s "
  lines = [device
           + ("unknown" if peaks is None else
              f"{peaks['float32']:.1f} float32 / {peaks['bfloat16']:.1f} bfloat16")
           + ("" if m["backend"] == "cpu" or m["matmul_tflops"] is None else
              f" (measured: {m['matmul_tflops']['float32']:.1f} / "
              f"{m['matmul_tflops']['bfloat16']:.1f} on an {ACCELERATOR_MATMUL_N}² matmul)")
           + (f"; XLA_FLAGS `{m['xla_flags']}`" if m.get("xla_flags") else "")
           + f". Batch {results['batch_size']} × {results['seq_len']} tokens"
           + (f" ({results['batch_size'] // m['devices']} per chip)" if m.get("topology") else "")
           + (f"; the modes compiled {results['compile_threads']} at a time (each compile "
              "time measured while others ran)" if results.get("compile_threads", 1) > 1
              and results.get("compile_reps", 1) == 1 else "")
           + (f"; each compile time the median of {results['compile_reps']}, the modes compiled "
              "in turn, one at a time" if results.get("compile_reps", 1) > 1 else "")
           + ". "
           f"Command: `{results['command']}` ({results['wall_s']:.0f} s).", ""]
  rows = results["steps"]
  # Memory per device: runs since it was added.
  memory = results["compile_only"] and any("argument_mib" in row for row in rows)
  label = lambda row: (f"{row['mode']}, gradient checkpointing"
                       if row.get("gradient_checkpointing") else row["mode"])
  if results["compile_only"]:
    lines += ["| model | dtype | mode | compile | / vanilla"
              + (" (range over rounds) |" if results.get("compile_reps", 1) > 1 else " |")
              + (" memory per device: arguments + outputs + temporaries |" if memory else ""),
              "| --- | --- | --- | ---: | ---: |" + (" ---: |" if memory else "")]
  else:
    lines += ["| model | dtype | mode | compile | step | / vanilla (range over rounds) | "
              "TFLOP/s | MFU |",
              "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
  for row in rows:
    base = next((r for r in rows if (r["size"], r["dtype"], r["mode"],
                                     r.get("gradient_checkpointing", False)) ==
                 (row["size"], row["dtype"], "vanilla", row.get("gradient_checkpointing", False))),
                None)
    ratio = lambda key, digits: "–" if base is None else f"{row[key] / base[key]:.{digits}f}×"
    if results["compile_only"]:
      if "out_of_memory" in row or "out_of_memory" in (base or {}):  # a failed compile's time
        base = None
      compile_ratio = ratio("compile_s", 2) if "compile_ratio" not in row else (  # --compile_reps
          f"{row['compile_ratio']:.2f}× ({row['compile_ratio_range'][0]:.2f}–"
          f"{row['compile_ratio_range'][1]:.2f})")
      line = (f"| {row['size']} | {row['dtype']} | {label(row)} | {row['compile_s']:.1f} s "
              f"| {compile_ratio} |")
      if memory and "out_of_memory" in row:
        line += f" does not fit: {row['out_of_memory'].removeprefix('RESOURCE_EXHAUSTED: ')} |"
      elif memory:
        total = row["argument_mib"] + row["output_mib"] + row["temp_mib"]
        line += (f" {row['argument_mib']:,.0f} + {row['output_mib']:,.0f} + "
                 f"{row['temp_mib']:,.0f} = {total:,.0f} MiB |")
      lines.append(line)
      continue
    mfu = "–" if row["mfu"] is None else f"{row['mfu']:.1%}"
    step_ratio = ratio("step_s", 3) if "ratio" not in row else (  # runs before the rounds
        f"{row['ratio']:.3f}× ({row['ratio_range'][0]:.3f}–{row['ratio_range'][1]:.3f})")
    lines.append(f"| {row['size']} | {row['dtype']} | {label(row)} | {row['compile_s']:.1f} s | "
                 f"{row['step_s'] * 1e3:.1f} ms | {step_ratio} | "
                 f"{row['tflops']:.3g} | {mfu} |")
  profiled = [row for row in rows if "profile" in row]
  if profiled:
    lines += ["", "Device time per step by kind of kernel (JAX's profiler, "
              "`bench/kernel_profile.py`): busy is the sum over the device's kernels (a CUDA "
              "graph counts as one), beside the step's wall time; busy MFU is the MFU the "
              "step would have if the device never waited:", "",
              "| model | dtype | mode | step | busy | busy MFU | " + " | ".join(KINDS)
              + " | slowest |",
              "| --- | --- | --- | ---: | ---: | ---: | " + "---: | " * len(KINDS) + "--- |"]
    for row in profiled:
      prof = row["profile"]
      op, kind, seconds = prof["top"][0] if prof["top"] else ("–", "", 0.0)
      busy_mfu = ("–" if row["mfu"] is None or not prof["total_s"]
                  else f"{row['mfu'] * row['step_s'] / prof['total_s']:.1%}")
      lines.append(f"| {row['size']} | {row['dtype']} | {label(row)} | "
                   f"{row['step_s'] * 1e3:.2f} ms | {prof['total_s'] * 1e3:.2f} ms | {busy_mfu} | "
                   + " | ".join(f"{prof['by_kind'][k] * 1e3:.2f} ms" for k in KINDS)
                   + f" | `{op[:40]}` ({kind}, {seconds * 1e3:.2f} ms) |")
    waited = [row for row in profiled if "idle_s" in row["profile"]]  # runs since it was added
    if waited:
      lines += ["", "Where the device waited: per step, the time the timing loop spent inside "
                "the call to the compiled step (near the step's time, the host sets the pace), "
                "the time between the device's first and last traced operation in which it ran "
                "nothing (idle), and the host's events whose self time (outside the events they "
                "contain) fell in that time most, each with its self time in all (the host's "
                "threads summed):", "",
                "| model | dtype | mode | step | in the call | idle | host events in the idle "
                "time (in idle / in all) |",
                "| --- | --- | --- | ---: | ---: | ---: | --- |"]
      for row in waited:
        prof = row["profile"]
        events = "; ".join(f"`{name[:60]}` {in_gaps * 1e3:.2f} / {total * 1e3:.2f} ms"
                           for name, in_gaps, total in prof["host_while_idle"][:3]) or "–"
        lines.append(f"| {row['size']} | {row['dtype']} | {label(row)} | "
                     f"{row['step_s'] * 1e3:.2f} ms | {row['call_s'] * 1e3:.2f} ms | "
                     f"{prof['idle_s'] * 1e3:.2f} ms | {events} |")
  if results.get("fisher"):
    f = results["fisher"]
    lines += ["", f"Per-example Fisher over {results['batch_size']} examples ({f['size']}, "
              f"float32, chunks of {results['fisher_chunk']}): {f['per_example_fisher_s'] * 1e3:.0f} ms, "
              f"{f['ratio']:.2f}× one batched backward ({f['batched_backward_s'] * 1e3:.0f} ms)."]
  if results["left_out"]:
    lines += ["", "Left out (past --budget_s): " + ", ".join(results["left_out"]) + "."]
  return "\n".join(lines) + "\n"


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--sizes", default="bert-large,bert-base",
                      help=f"comma-separated, of {', '.join(SIZES)}")
  parser.add_argument("--dtypes", default="bfloat16,float32",
                      help="run in this order, each over every size (default: %(default)s: a "
                      "run --budget_s stops keeps the bfloat16 steps)")
  parser.add_argument("--modes", default=",".join(MODES),
                      help=f"comma-separated, of {', '.join(MODES + (CTF_PER_LEAF,))}")
  parser.add_argument("--batch_size", type=int, default=32)
  parser.add_argument("--seq_len", type=int, default=128)
  parser.add_argument("--steps", type=int, default=10, help="steps per timed round")
  parser.add_argument("--rounds", type=int, default=5,
                      help="timed rounds; each runs --steps steps of every mode in turn (the "
                      "step time is the median over rounds, its ratio to vanilla's the median "
                      "of the rounds' ratios)")
  parser.add_argument("--reserve_p", type=float, default=0.3)
  parser.add_argument("--compile_only", action="store_true",
                      help="compile times and memory per device only, from shapes (no weights "
                      "in memory)")
  parser.add_argument("--gradient_checkpointing", default="off",
                      help="off, on, or off,on: each step without and with every encoder layer "
                      "recomputed in the backward pass")
  parser.add_argument("--compile_reps", type=int, default=1,
                      help="--compile_only: compile each step this many times, the modes of a "
                      "group in turn (the order rotated each round, one compile at a time); "
                      "the compile time is the median, its ratio to vanilla's the median of "
                      "the rounds' ratios")
  parser.add_argument("--topology", help="compile for this TPU slice (v5e:1x1, v4:2x2x1, ...) "
                      "on this machine, without one: implies --compile_only; needs libtpu "
                      "(pip install 'jax[tpu]') and JAX_PLATFORMS=cpu")
  parser.add_argument("--fisher_size", default="bert-base",
                      help="the model of the Fisher measurement ('none' to skip)")
  parser.add_argument("--fisher_chunk", type=int, default=32,
                      help="examples per per-example-gradient call (default: the trainer's "
                      "--fisher_batch_size; the runs BENCHMARKS.md records so far had 8)")
  parser.add_argument("--fisher_reps", type=int, default=3)
  parser.add_argument("--profile", action="store_true",
                      help="after the timed rounds, trace --steps more steps of each mode with "
                      "JAX's profiler and report the device time per step by kind of kernel "
                      "(matmul, random bits, other) and the slowest operations")
  parser.add_argument("--compile_threads", type=int, default=None,
                      help="compile the modes of a (model, dtype) this many at a time, in "
                      "threads: less wall time where compiling leaves cores idle (a GPU host), "
                      "each compile time then measured while others run (default: all modes "
                      "at once on an accelerator, one at a time on the CPU)")
  parser.add_argument("--budget_s", type=float, default=420.0,
                      help="start no configuration after this many seconds")
  parser.add_argument("--tiny", action="store_true",
                      help="the tiny model, batch 4 x 32, 2 steps: a smoke run (CPU, seconds)")
  parser.add_argument("--out", help="write the results as JSON here")
  parser.add_argument("--render", metavar="JSON",
                      help="run nothing: print the table of a stored run's JSON (with "
                      "--benchmarks_md, rewrite its section of BENCHMARKS.md)")
  parser.add_argument("--section", help="the BENCHMARKS.md section --benchmarks_md writes "
                      "(default: bench_accelerator_steps, or _compile with --compile_only)")
  parser.add_argument("--benchmarks_md", action="store_true",
                      help="also write the table into BENCHMARKS.md (its own section per backend "
                      "and kind of run) and the JSON into bench/results/")
  args = parser.parse_args(argv)
  if args.tiny:
    args.sizes, args.fisher_size, args.batch_size, args.seq_len = "tiny", "tiny", 4, 32
    args.steps, args.rounds, args.fisher_reps, args.fisher_chunk = 2, 1, 1, 2
  sizes, dtypes, modes, settings = (value.split(",") for value in (
      args.sizes, args.dtypes, args.modes, args.gradient_checkpointing))
  for name, values, allowed in (("--sizes", sizes, SIZES), ("--dtypes", dtypes, DTYPES),
                                ("--modes", modes, MODES + (CTF_PER_LEAF,)),
                                ("--gradient_checkpointing", settings, ("off", "on"))):
    if unknown := [v for v in values if v not in allowed]:
      parser.error(f"{name}: unknown {unknown}; choose from {list(allowed)}")
  args.devices = None
  if args.topology and not args.render:
    args.compile_only = True
    try:
      args.devices = topology_devices(args.topology)
    except Exception as error:  # noqa: BLE001  (libtpu missing, or a name it does not know)
      parser.error(f"--topology {args.topology}: {type(error).__name__}: "
                   f"{str(error).strip().splitlines()[0][:300]} (it needs libtpu: pip install "
                   "'jax[tpu]', or make bench-tpu-compile)")
    if args.batch_size % len(args.devices):
      parser.error(f"--batch_size {args.batch_size} does not split over the "
                   f"{len(args.devices)} chips of {args.topology}")
  if args.compile_threads is None:  # a CPU's compiles already use its cores
    args.compile_threads = 1 if jax.default_backend() == "cpu" else len(modes)
  if args.render:
    results = json.loads(Path(args.render).read_text())
    section = render(results)
    print(section)
    if args.benchmarks_md:
      write_section(section, results, args.section)
    return results
  kind = "compile" if args.compile_only else "steps"
  results = {"machine": machine(args.topology, args.devices)}
  if args.benchmarks_md and not args.out:
    args.out = str(ROOT / "bench" / "results"
                   / f"accelerator_{kind}_{results['machine']['backend']}.json")
  start = time.perf_counter()
  results.update({
      "batch_size": args.batch_size, "seq_len": args.seq_len, "compile_only": args.compile_only,
      "fisher_chunk": args.fisher_chunk, "compile_threads": args.compile_threads,
      "compile_reps": args.compile_reps,
      "command": "python3 bench/bench_accelerator.py " + " ".join(argv or sys.argv[1:]),
      "steps": [], "left_out": []})
  peaks = results["machine"]["peak_tflops"]
  groups = [(setting == "on", dtype, size) for setting in settings
            for dtype in dtypes for size in sizes]  # in the order asked: what matters most first
  for checkpointing, dtype, size in groups:
    rows, runs = {}, {}  # the modes of one group held at once, timed interleaved
    prepare_mode = functools.partial(prepare, size, dtype, args=args,
                                     checkpointing=checkpointing)
    if args.compile_only and args.compile_reps > 1:
      rows = compile_interleaved(prepare_mode, modes, args.compile_reps)
    elif args.compile_threads > 1 and time.perf_counter() - start <= args.budget_s:
      with ThreadPoolExecutor(args.compile_threads) as pool:  # the compiles overlap
        for mode, (row, run) in zip(modes, pool.map(prepare_mode, modes)):
          rows[mode], runs[mode] = row, run
    else:
      for mode in modes:
        if time.perf_counter() - start > args.budget_s:
          results["left_out"].append(f"{size}/{dtype}/{mode}"
                                     + (", gradient checkpointing" if checkpointing else ""))
          continue
        rows[mode], runs[mode] = prepare_mode(mode)
    if runs and not args.compile_only:
      for mode, timed in time_interleaved(runs, args).items():
        if args.profile:
          try:  # a profiler this platform lacks costs the profile, not the run
            run = runs[mode]
            timed["profile"] = profile_kernels(functools.partial(run, args.steps),
                                               run.hlo_text, args.steps)
          except Exception as error:  # noqa: BLE001
            timed["profile_error"] = f"{type(error).__name__}: {error}"
            print(f"  profile failed: {timed['profile_error']}", flush=True)
        rows[mode].update(timed)
        rows[mode]["tflops"] = (step_flops(SIZES[size], args.batch_size, args.seq_len)
                                / timed["step_s"] / 1e12)
        rows[mode]["mfu"] = None if peaks is None else rows[mode]["tflops"] / peaks[dtype]
    del runs  # frees this group's device memory before the next
    for mode, row in rows.items():
      results["steps"].append({"size": size, "dtype": dtype, "mode": mode,
                               "gradient_checkpointing": checkpointing, **row})
      print(f"{size}/{dtype}/{mode}" + (", gradient checkpointing" if checkpointing else ""),
            json.dumps({k: v for k, v in row.items()
                        if k.endswith("_s") or k in ("mfu", "ratio")}), flush=True)
    write_json(results, args.out)  # so far: a run stopped later keeps what it measured
  if not args.compile_only and args.fisher_size != "none":
    if time.perf_counter() - start > args.budget_s:
      results["left_out"].append(f"{args.fisher_size}/fisher")
    else:
      results["fisher"] = {"size": args.fisher_size, **bench_fisher(args.fisher_size, args)}
  results["wall_s"] = time.perf_counter() - start
  section = render(results)
  print(section)
  if args.benchmarks_md:
    write_section(section, results, args.section)
  write_json(results, args.out)
  return results


def write_section(section: str, results: dict, name: str | None):
  """Writes ``section`` into its place in BENCHMARKS.md (one per backend and kind of run)."""
  from benchmarks_md import update_benchmarks_md  # bench/ is on the path when run as a script

  name = name or f"bench_accelerator_{'compile' if results['compile_only'] else 'steps'}"
  title = ("Compile times of the training step" if results["compile_only"]
           else "Accelerator benchmark: training step, MFU, Fisher")
  if results["machine"].get("topology"):
    title = ("Compiled for a TPU on a CPU host: the training step's compile time and memory "
             f"per chip, batch {results['batch_size']} × {results['seq_len']}")
  update_benchmarks_md(section, results["machine"]["backend"], name=name, title=title)


def write_json(results: dict, path: str | None):
  if path:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
  main()
