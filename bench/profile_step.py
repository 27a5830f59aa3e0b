"""Where a training step's time goes: an XLA CPU profile of the library's step, grouped.

Runs the MiniLM-L6-sized BERT classifier's training step (batch 32 × 128
tokens, dropout on, clip 1.0, AdamW; vanilla and CT-F) under
``jax.profiler`` with XLA's per-operation trace events, maps every executed
HLO instruction to what it computes (from the ``op_name`` metadata of the
compiled module: the Flax module path and the jax primitive), and sums the
time per group, forward and backward apart. Writes the table into
BENCHMARKS.md.

Run: python bench/profile_step.py            (about 3 minutes on 2 CPU cores)
     python bench/profile_step.py --quick    (print only)
"""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_xprof_traceme=true").strip()

import argparse  # noqa: E402
import collections  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402

from childtuning_jax.cpu import restart_keeping_freed_memory  # noqa: E402

from kernel_profile import traced_op_times  # noqa: E402
from bench_core import (BATCH, MINILM_L6, SEQ_LEN, fake_batch, init_params, machine,  # noqa: E402
                        train_transforms, trainer_step, update_benchmarks_md)

# (group, test on the op_name), first match wins; op_names look like
# "jit(step)/transpose(jvp(EncoderForSequenceClassification))/bert/encoder/layer_3/output/LayerNorm/mul".
GROUPS = (
    ("dropout (random bits, masks)", lambda op: "Dropout" in op or "threefry" in op or "Embed.setup" in op),
    ("attention matmuls (QKᵀ, PV) and their layout copies",
     lambda op: "/attention/self/" in op and re.search(r"/b[a-z]{3},b[a-z]{3}->", op)),
    ("softmax and score scaling", lambda op: "/attention/self/" in op
     and not re.search(r"/(query|key|value)/", op)),
    ("dense layers (matmuls, bias)", lambda op: re.search(r"/(dense|query|key|value|classifier)/", op)),
    ("LayerNorm", lambda op: "LayerNorm" in op),
    ("GELU", lambda op: "/intermediate/" in op),
    ("embeddings", lambda op: "/embeddings/" in op),
    ("other model ops (residual adds, head, loss)", lambda op: "jvp(" in op),
    ("optimizer (clip, mask, AdamW, apply)", lambda op: True),
)


def group_of(op_name):
  phase = "backward" if "transpose(jvp(" in op_name else "forward" if "jvp(" in op_name else ""
  group = next(name for name, test in GROUPS if test(op_name))
  return group, phase


def instruction_groups(compiled_text):
  """{HLO instruction name: (group, phase)} from the compiled module's metadata."""
  groups = {}
  for match in re.finditer(r"^\s*(?:ROOT )?%?([\w.\-]+) = .*?metadata=\{[^}]*op_name=\"([^\"]*)\"",
                           compiled_text, re.MULTILINE):
    groups[match.group(1)] = group_of(match.group(2))
  return groups


def profile(mode, steps):
  model, params = init_params(MINILM_L6)
  batch = jax.device_put(fake_batch(MINILM_L6))
  step = trainer_step(model, train_transforms(params)[mode], params, batch, jax.random.key(1))
  groups = instruction_groups(step.compiled.as_text())
  for _ in range(2):
    jax.block_until_ready(step())
  with tempfile.TemporaryDirectory() as trace_dir:
    jax.profiler.start_trace(trace_dir)
    start = time.perf_counter()
    for _ in range(steps):
      jax.block_until_ready(step())
    wall = (time.perf_counter() - start) / steps
    jax.profiler.stop_trace()
    times, _ = traced_op_times(trace_dir)
  totals = collections.Counter()
  for op, seconds in times.items():
    if op in groups:
      totals[groups[op]] += seconds / steps
  return {"wall_s": wall, "groups": {f"{g}|{p}": t for (g, p), t in totals.items()}}


def render(results):
  m = results["machine"]
  lines = [f"Profiled on {m['cpu']}, {m['cores']} cores, JAX {m['jax']} on {m['backend']} "
           f"(`{results['command']}`). The MiniLM-L6-sized BERT classifier, batch {BATCH} × "
           f"{SEQ_LEN} tokens, dropout on, clip 1.0. Milliseconds per step summed over XLA's "
           "trace events of each group; operations on different threads may overlap, so the "
           "sums are op time, not wall time.", "",
           "| group | vanilla forward | vanilla backward | vanilla share | CT-F total | CT-F share |",
           "| --- | ---: | ---: | ---: | ---: | ---: |"]
  vanilla, free = results["vanilla"]["groups"], results["CT-F"]["groups"]
  total_of = lambda groups, name: sum(t for k, t in groups.items() if k.split("|")[0] == name)
  vanilla_sum, free_sum = sum(vanilla.values()), sum(free.values())
  for name, _ in GROUPS:
    v = total_of(vanilla, name)
    f = total_of(free, name)
    phase = lambda p: f"{vanilla[f'{name}|{p}'] * 1e3:.0f}" if f"{name}|{p}" in vanilla else "–"
    lines.append(f"| {name} | {phase('forward')} | {phase('backward')} | {v / vanilla_sum:.1%} | "
                 f"{f * 1e3:.0f} | {f / free_sum:.1%} |")
  lines += [f"| all groups | | | {vanilla_sum * 1e3:.0f} ms | {free_sum * 1e3:.0f} ms | |", "",
            f"Wall time per step while profiled: vanilla {results['vanilla']['wall_s'] * 1e3:.0f} ms, "
            f"CT-F {results['CT-F']['wall_s'] * 1e3:.0f} ms.", ""]
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  parser.add_argument("--quick", action="store_true", help="one profiled step; print only")
  args = parser.parse_args()
  restart_keeping_freed_memory()  # before JAX runs anything (childtuning_jax/cpu.py)
  steps = 1 if args.quick else 5
  results = {"machine": machine(), "command": "python bench/profile_step.py" + (" --quick" if args.quick else "")}
  for mode in ("vanilla", "CT-F"):
    results[mode] = profile(mode, steps)
  section = render(results)
  print(section)
  if not args.quick:
    out = Path(__file__).resolve().parent / "results" / f"profile_{jax.default_backend()}.json"
    out.write_text(json.dumps(results, indent=1) + "\n")
    update_benchmarks_md(section, jax.default_backend(), name="profile_step",
                         title="Where a training step's time goes")


if __name__ == "__main__":
  main()
