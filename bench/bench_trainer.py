"""The trainer end to end: throughput of vanilla, CT-F and CT-D, and CT-D's time to result.

Each mode runs ``train/run_glue.py`` as a user would (its own process, the
embedded MiniLM-L6 and Rotten Tomatoes data, batch 32 × 128 tokens, all
cores), for ``--steps`` optimizer steps, ``--reps`` times in random order.
Reported, as medians over repetitions:

- examples/s in training: the median over a run's steps of the per-step
  rate the trainer logs (``metrics.jsonl``), first steps (compilation) left out;
- time to result: CT-D's Fisher pass and child-network selection
  (``child_network_runtime``) plus its training time, against vanilla's
  training time for the same steps.

With ``--malloc``, instead: the CT-F trainer under each of glibc's malloc settings of
``MALLOC_SETTINGS`` (childtuning_jax/cpu.py), alternating, with the process's peak host
memory (``peak_host_memory_mib`` of its results) beside its examples/s.

Run: python bench/bench_trainer.py                (about 10 minutes on 2 CPU cores)
     python bench/bench_trainer.py --malloc --steps 25   (about 12 minutes)
     python bench/bench_trainer.py --steps 4 --reps 1 --fisher_num_examples 32   (a smoke run)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench_core import machine, update_benchmarks_md  # noqa: E402
from childtuning_jax.cpu import MALLOC_ENV, MALLOC_ENV_NO_MMAP, MALLOC_VARIABLES  # noqa: E402

MODES = ("vanilla", "ChildTuning-F", "ChildTuning-D")
WARMUP_STEPS = 3  # the first steps compile
MALLOC_SETTINGS = {
    "MALLOC_ENV: one heap, blocks ≥ 32 MiB mapped with huge pages": MALLOC_ENV,
    "MALLOC_ENV_NO_MMAP: one heap, nothing mapped": MALLOC_ENV_NO_MMAP,
    # glibc's own default, set so that the trainer does not restart itself.
    "glibc's defaults (MALLOC_ARENA_MAX = 8 × cores)": {"MALLOC_ARENA_MAX": str(8 * os.cpu_count())},
}


def run_mode(mode: str, args, output_dir: Path, malloc: dict | None = None) -> dict:
  """One trainer process; ``malloc``: its glibc settings (None: the trainer restarts itself
  with childtuning_jax.cpu.malloc_env())."""
  command = [sys.executable, "-m", "train.run_glue", "--output_dir", str(output_dir),
             "--overwrite_output_dir", "--mode", mode, "--reserve_p", "0.3",
             "--per_device_train_batch_size", "32", "--max_seq_length", "128",
             "--max_steps", str(args.steps), "--fisher_num_examples", str(args.fisher_num_examples),
             "--max_eval_samples", "64", "--save_steps", "100000", "--disable_tqdm"]
  env = {k: v for k, v in os.environ.items() if k not in MALLOC_VARIABLES}
  subprocess.run(command, cwd=ROOT, check=True, stdout=subprocess.DEVNULL,
                 stderr=subprocess.DEVNULL, env={**env, **(malloc or {})})
  results = json.loads((output_dir / "all_results.json").read_text())
  rates = [json.loads(line)["examples_per_second"]
           for line in (output_dir / "metrics.jsonl").read_text().splitlines()
           if "examples_per_second" in line]
  steady = rates[WARMUP_STEPS:] or rates
  return {"examples_per_second": float(np.median(steady)),
          "train_runtime": results["train_runtime"],
          "child_network_runtime": results.get("child_network_runtime", 0.0),
          "peak_host_memory_mib": results["peak_host_memory_mib"]}


def medians(runs: dict) -> dict:
  """{name: {key: median over the name's runs}} of ``{name: [run results]}``."""
  return {name: {key: float(np.median([r[key] for r in rs])) for key in rs[0]}
          for name, rs in runs.items()}


def _runs(count: int) -> str:
  return "one run" if count == 1 else f"medians of {count} runs"


def render(results: dict) -> str:
  modes = results["modes"]
  vanilla = modes["vanilla"]
  lines = [f"Trainer, {results['steps']} steps of batch 32 × 128 tokens on the embedded "
           f"MiniLM-L6, {_runs(results['reps'])} per mode "
           f"(`python bench/bench_trainer.py`, {results['machine']['cpu']}, "
           f"{results['machine']['cores']} cores, JAX {results['machine']['jax']}):", "",
           "| mode | examples/s (training) | vs vanilla | child network (s) | training (s) | "
           "time to result (s) | vs vanilla |", "|---|---|---|---|---|---|---|"]
  for mode, m in modes.items():
    total = m["child_network_runtime"] + m["train_runtime"]
    lines.append(f"| {mode} | {m['examples_per_second']:.2f} | "
                 f"{m['examples_per_second'] / vanilla['examples_per_second']:.3f}× | "
                 f"{m['child_network_runtime']:.1f} | {m['train_runtime']:.1f} | {total:.1f} | "
                 f"{total / vanilla['train_runtime']:.3f}× |")
  lines += ["", f"CT-D's child network comes from the Fisher information of "
            f"{results['fisher_num_examples']} training examples (per example, row-sparse word "
            "embeddings). Training time includes the first steps' compilation."]
  return "\n".join(lines) + "\n"


def render_malloc(results: dict) -> str:
  settings = results["malloc"]
  base = next(iter(settings.values()))
  lines = [f"The ChildTuning-F trainer, {results['malloc_steps']} steps of batch 32 × 128 tokens on "
           f"the embedded MiniLM-L6, under each glibc malloc setting, "
           f"{_runs(results['malloc_reps'])} per setting, alternating (`python "
           f"bench/bench_trainer.py --malloc "
           f"--steps {results['malloc_steps']}`, {results['machine']['cpu']}, "
           f"{results['machine']['cores']} cores, JAX {results['machine']['jax']}):", "",
           "| glibc malloc | examples/s (training) | vs the first | peak host memory of each "
           "process |", "|---|---|---|---|"]
  for name, m in settings.items():
    ratio = m["examples_per_second"] / base["examples_per_second"]
    peaks = ", ".join(f"{r['peak_host_memory_mib']:,.0f}" for r in results["malloc_runs"][name])
    lines.append(f"| {name} | {m['examples_per_second']:.2f} | {ratio:.3f}× | {peaks} MiB |")
  lines += ["", "Peak host memory: the trainer process's VmHWM (`peak_host_memory_mib` in its "
            "train_results.json)."]
  return "\n".join(lines) + "\n"


def compare_malloc(args):
  """``--malloc``: the CT-F trainer under each of MALLOC_SETTINGS, merged into ``--out``."""
  runs = {name: [] for name in MALLOC_SETTINGS}
  with tempfile.TemporaryDirectory() as scratch:
    for rep in range(args.reps):
      for i, (name, env) in enumerate(MALLOC_SETTINGS.items()):
        runs[name].append(run_mode("ChildTuning-F", args, Path(scratch) / f"{i}_{rep}", env))
        print(f"rep {rep} {name}: {runs[name][-1]}", flush=True)
  results = json.loads(args.out.read_text()) if args.out.exists() else {}
  results.update({"malloc_machine": machine(), "malloc_steps": args.steps, "malloc_reps": args.reps,
                  "malloc": medians(runs),
                  "malloc_runs": runs})
  args.out.parent.mkdir(parents=True, exist_ok=True)
  args.out.write_text(json.dumps(results, indent=2) + "\n")
  text = render_malloc({**results, "machine": results["malloc_machine"]})
  print(text)
  if not args.no_markdown:
    update_benchmarks_md(text, "cpu", name="bench_trainer_malloc",
                         title="Trainer: throughput and peak host memory per glibc malloc setting")


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--steps", type=int, default=40)
  parser.add_argument("--reps", type=int, default=3)
  parser.add_argument("--fisher_num_examples", type=int, default=256)
  parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "trainer_cpu.json")
  parser.add_argument("--no_markdown", action="store_true", help="do not update BENCHMARKS.md")
  parser.add_argument("--malloc", action="store_true",
                      help="compare glibc's malloc settings on the CT-F trainer instead")
  args = parser.parse_args()
  if args.malloc:
    return compare_malloc(args)
  rng = np.random.default_rng(0)
  runs = {mode: [] for mode in MODES}
  with tempfile.TemporaryDirectory() as scratch:
    for rep in range(args.reps):
      for mode in rng.permutation(MODES):
        runs[mode].append(run_mode(str(mode), args, Path(scratch) / f"{mode}_{rep}"))
        print(f"rep {rep} {mode}: {runs[mode][-1]}", flush=True)
  previous = json.loads(args.out.read_text()) if args.out.exists() else {}
  results = {**{k: v for k, v in previous.items() if k.startswith("malloc")},  # --malloc's
             "machine": machine(), "steps": args.steps, "reps": args.reps,
             "fisher_num_examples": args.fisher_num_examples,
             "modes": medians(runs),
             "runs": runs}
  args.out.parent.mkdir(parents=True, exist_ok=True)
  args.out.write_text(json.dumps(results, indent=2) + "\n")
  text = render(results)
  print(text)
  if not args.no_markdown:
    update_benchmarks_md(text, "cpu", name="bench_trainer", title="Trainer throughput")


if __name__ == "__main__":
  main()
