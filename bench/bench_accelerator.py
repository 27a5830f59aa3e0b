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

It needs only jax, flax, optax and numpy (nothing from the trainer's extras) and the
library in this repository:

  PYTHONPATH=. python3 bench/bench_accelerator.py                 (BERT-base and BERT-large)
  PYTHONPATH=. python3 bench/bench_accelerator.py --tiny          (a tiny model, seconds, CPU)
  PYTHONPATH=. python3 bench/bench_accelerator.py --compile_only --sizes minilm,bert-base,bert-large
  PYTHONPATH=. python3 bench/bench_accelerator.py --render bench/results/accelerator_steps_gpu.json

The step is the trainer's: dropout on, gradients clipped to norm 1, then the mode's mask
and AdamW (weight decay 0.01); CT-D's child network is a random one of ``--reserve_p``
(speed does not depend on which entries). ``--compile_only`` lowers the steps from
shapes alone (``jax.eval_shape``), so BERT-large's compile time needs no memory for its
weights. A table goes to stdout and everything to ``--out`` (JSON); ``--budget_s`` stops
before a configuration that would start past it, and the JSON says which were left out.
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
  for name, peaks in PEAK_TFLOPS.items():  # the first match: "H100 PCIe" before "H100"
    if name.lower() in kind.lower():
      return kind, peaks
  return kind, None


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


def prepare(size: str, dtype: str, mode: str, args) -> tuple[dict, object]:
  """Compiles the step of (size, dtype, mode): ``({"compile_s", "temp_mib"}, run)``, where
  ``run(steps)`` runs that many steps from the state it keeps and returns their mean time,
  the last loss and the mean time the host spent inside the call to the compiled step
  (``run`` is None with ``--compile_only``)."""
  config = dataclasses.replace(SIZES[size], dtype=dtype)
  model = EncoderForSequenceClassification(config)
  batch = fake_batch(config, args.batch_size, args.seq_len)
  shapes = jax.eval_shape(model.init, jax.random.key(0), batch["input_ids"][:1])["params"]
  loss = loss_fn(model)
  tx = optimizer(mode, args.reserve_p, shapes)
  if args.compile_only:
    state = (shapes, jax.eval_shape(tx.init, shapes), jax.eval_shape(lambda: jax.random.key(0)))
    batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), batch)
  else:
    params = jax.device_put(host_params(size))
    state = (params, tx.init(params), jax.random.key(0))  # eager: no large kernel to compile
    batch = jax.device_put(batch)
  print(f"compiling {size}/{dtype}/{mode}", flush=True)  # a slow compile shows where it is
  step = make_step(loss, tx)
  with _TRACING, traced_as(mode):
    start = time.perf_counter()
    lowered = step.lower(state, batch)
  compiled = lowered.compile()
  result = {"compile_s": time.perf_counter() - start}
  print(f"  compiled in {result['compile_s']:.1f} s", flush=True)
  memory = compiled.memory_analysis()
  if memory is not None:  # what the step needs beyond its arguments (backend's own count)
    result["temp_mib"] = memory.temp_size_in_bytes / 2**20
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


def machine() -> dict:
  device = jax.devices()[0]
  name, peaks = chip_peak(device)
  measured = peaks if device.platform == "cpu" else matmul_tflops(ACCELERATOR_MATMUL_N)
  return {"backend": jax.default_backend(), "device": name, "devices": jax.device_count(),
          "peak_tflops": None if peaks is None else dict(zip(DTYPES, peaks)),
          "matmul_tflops": dict(zip(DTYPES, measured)),
          "jax": jax.__version__, "flax": flax.__version__, "optax": optax.__version__,
          "python": platform.python_version(), "host_cores": os.cpu_count(),
          "xla_flags": os.environ.get("XLA_FLAGS", "")}


def render(results: dict) -> str:
  m = results["machine"]
  peaks = m["peak_tflops"]
  lines = [f"Device: {m['device']} ({m['backend']}, JAX {m['jax']}); peak TFLOP/s "
           + ("unknown" if peaks is None else
              f"{peaks['float32']:.1f} float32 / {peaks['bfloat16']:.1f} bfloat16")
           + ("" if m["backend"] == "cpu" else
              f" (measured: {m['matmul_tflops']['float32']:.1f} / "
              f"{m['matmul_tflops']['bfloat16']:.1f} on an {ACCELERATOR_MATMUL_N}² matmul)")
           + (f"; XLA_FLAGS `{m['xla_flags']}`" if m.get("xla_flags") else "")
           + f". Batch {results['batch_size']} × {results['seq_len']} tokens"
           + (f"; the modes compiled {results['compile_threads']} at a time (each compile "
              "time measured while others ran)" if results.get("compile_threads", 1) > 1 else "")
           + ". "
           f"Command: `{results['command']}` ({results['wall_s']:.0f} s).", ""]
  rows = results["steps"]
  if results["compile_only"]:
    lines += ["| model | dtype | mode | compile | / vanilla |", "| --- | --- | --- | ---: | ---: |"]
  else:
    lines += ["| model | dtype | mode | compile | step | / vanilla (range over rounds) | "
              "TFLOP/s | MFU |",
              "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
  for row in rows:
    base = next((r for r in rows if (r["size"], r["dtype"], r["mode"]) ==
                 (row["size"], row["dtype"], "vanilla")), None)
    ratio = lambda key, digits: "–" if base is None else f"{row[key] / base[key]:.{digits}f}×"
    if results["compile_only"]:
      lines.append(f"| {row['size']} | {row['dtype']} | {row['mode']} | {row['compile_s']:.1f} s "
                   f"| {ratio('compile_s', 2)} |")
      continue
    mfu = "–" if row["mfu"] is None else f"{row['mfu']:.1%}"
    step_ratio = ratio("step_s", 3) if "ratio" not in row else (  # runs before the rounds
        f"{row['ratio']:.3f}× ({row['ratio_range'][0]:.3f}–{row['ratio_range'][1]:.3f})")
    lines.append(f"| {row['size']} | {row['dtype']} | {row['mode']} | {row['compile_s']:.1f} s | "
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
      lines.append(f"| {row['size']} | {row['dtype']} | {row['mode']} | "
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
        lines.append(f"| {row['size']} | {row['dtype']} | {row['mode']} | "
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
                      help="compile times only, from shapes (no weights in memory)")
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
  sizes, dtypes, modes = (value.split(",") for value in (args.sizes, args.dtypes, args.modes))
  for name, values, allowed in (("--sizes", sizes, SIZES), ("--dtypes", dtypes, DTYPES),
                                ("--modes", modes, MODES + (CTF_PER_LEAF,))):
    if unknown := [v for v in values if v not in allowed]:
      parser.error(f"{name}: unknown {unknown}; choose from {list(allowed)}")
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
  if args.benchmarks_md and not args.out:
    args.out = str(ROOT / "bench" / "results" / f"accelerator_{kind}_{jax.default_backend()}.json")
  start = time.perf_counter()
  results = {"machine": machine(), "batch_size": args.batch_size, "seq_len": args.seq_len,
             "compile_only": args.compile_only, "fisher_chunk": args.fisher_chunk,
             "compile_threads": args.compile_threads,
             "command": "python3 bench/bench_accelerator.py " + " ".join(argv or sys.argv[1:]),
             "steps": [], "left_out": []}
  peaks = results["machine"]["peak_tflops"]
  for dtype in dtypes:  # in the order asked: the default puts what matters most first
    for size in sizes:
      rows, runs = {}, {}  # the modes of one (dtype, size) held at once, timed interleaved
      if args.compile_threads > 1 and time.perf_counter() - start <= args.budget_s:
        with ThreadPoolExecutor(args.compile_threads) as pool:  # the compiles overlap
          prepared = pool.map(functools.partial(prepare, size, dtype, args=args), modes)
          for mode, (row, run) in zip(modes, prepared):
            rows[mode], runs[mode] = row, run
      else:
        for mode in modes:
          if time.perf_counter() - start > args.budget_s:
            results["left_out"].append(f"{size}/{dtype}/{mode}")
            continue
          rows[mode], runs[mode] = prepare(size, dtype, mode, args)
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
        results["steps"].append({"size": size, "dtype": dtype, "mode": mode, **row})
        print(f"{size}/{dtype}/{mode}",
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
  update_benchmarks_md(section, results["machine"]["backend"], name=name, title=title)


def write_json(results: dict, path: str | None):
  if path:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
  main()
