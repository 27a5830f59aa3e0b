"""bench/bench_accelerator.py --tiny: runs where Python has only jax, flax, optax and numpy
(imports of the trainer, its extras or torch fail here), and writes what it prints."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Run the script with the trainer's package and extras made unimportable, as on a machine
# that has only JAX's stack.
BLOCKED_RUN = """
import runpy, sys
BLOCKED = {"train", "transformers", "datasets", "orbax", "tqdm", "torch", "safetensors",
           "matplotlib"}
class Blocker:
  def find_spec(self, name, path=None, target=None):
    if name.split(".")[0] in BLOCKED:
      raise ImportError(f"{name} is not installed on the accelerator machine")
sys.meta_path.insert(0, Blocker())
sys.argv = ["bench/bench_accelerator.py"] + sys.argv[1:]
runpy.run_path("bench/bench_accelerator.py", run_name="__main__")
"""


def test_tiny_run_needs_only_jax_flax_optax_numpy(tmp_path):
  out = tmp_path / "accelerator.json"
  env = {**os.environ, "PYTHONPATH": str(ROOT)}
  env.pop("XLA_FLAGS", None)  # one device, as the command line runs it
  # Two compiles at a time: the threaded path (the serial one is the same prepare()).
  done = subprocess.run([sys.executable, "-c", BLOCKED_RUN, "--tiny", "--compile_threads", "2",
                         "--profile", "--out", str(out)],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  results = json.loads(out.read_text())
  rows = {(r["size"], r["dtype"], r["mode"]): r for r in results["steps"]}
  assert set(rows) == {("tiny", dtype, mode) for dtype in ("float32", "bfloat16")
                       for mode in ("vanilla", "CT-F", "CT-D")}
  for row in rows.values():
    assert row["compile_s"] > 0 and row["step_s"] > 0 and row["tflops"] > 0
    assert 0 < row["mfu"] < 1  # against this CPU's estimated peak
    assert 0 < row["loss"] < 5  # two classes: about log 2 at random init
    assert row["ratio_range"][0] <= row["ratio"] <= row["ratio_range"][1]
  assert rows["tiny", "float32", "vanilla"]["ratio"] == 1.0
  assert results["fisher"]["per_example_fisher_s"] > 0 and results["fisher"]["ratio"] > 0
  assert results["machine"]["backend"] == "cpu" and not results["left_out"]
  assert "| tiny | bfloat16 | CT-F |" in done.stdout and "Per-example Fisher" in done.stdout
  assert results["compile_threads"] == 2 and "compiled 2 at a time" in done.stdout
  for row in rows.values():  # --profile: the device time of each step, by kind of kernel
    assert row["profile"]["total_s"] > 0 and row["profile"]["by_kind"]["matmul"] > 0
  assert "Device time per step by kind of kernel" in done.stdout
  for row in rows.values():  # and what the host did while the device ran nothing
    profile = row["profile"]
    assert profile["idle_s"] >= 0 and all(0 < in_gaps <= total + 1e-9
                                          for _, in_gaps, total in profile["host_while_idle"])
    assert 0 < row["call_s"] <= max(row["round_step_s"])  # the call is part of the step
  assert "Where the device waited" in done.stdout
  # --render prints the same table from the JSON alone, running nothing.
  rendered = subprocess.run([sys.executable, "-c", BLOCKED_RUN, "--render", str(out)],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
  assert rendered.returncode == 0, rendered.stderr[-3000:]
  table = rendered.stdout.strip()
  assert table.startswith("Device: CPU") and table in done.stdout


def test_flops_count_and_peaks():
  sys.path.insert(0, str(ROOT / "bench"))
  import bench_accelerator as bench

  base = bench.SIZES["bert-base"]
  # 6 × (85M encoder matmul parameters + pooler + head) per token, plus attention.
  matmul = 12 * (4 * 768 * 768 + 2 * 768 * 3072) + 768 * 768 + 768 * 2
  assert bench.step_flops(base, 1, 128) == 6 * 128 * (matmul + 12 * 2 * 128 * 768)

  class Device:
    platform, device_kind = "gpu", "NVIDIA H100 PCIe"
  assert bench.chip_peak(Device())[1] == bench.PEAK_TFLOPS["H100 PCIe"]
  Device.device_kind = "NVIDIA H100 80GB HBM3"
  assert bench.chip_peak(Device())[1] == bench.PEAK_TFLOPS["H100"]
  Device.platform, Device.device_kind = "tpu", "TPU v5 lite"
  assert bench.chip_peak(Device())[1] == bench.PEAK_TFLOPS["TPU v5 lite"]
  Device.device_kind = "some future chip"
  assert bench.chip_peak(Device())[1] is None


def test_interleaved_rounds_take_each_ratio_within_its_round():
  """The machine slows down 3x from one round to the next; each mode's ratio to vanilla
  is still its own (taken within rounds), and each round starts with another mode."""
  sys.path.insert(0, str(ROOT / "bench"))
  import bench_accelerator as bench

  calls = []
  cost = {"vanilla": 1.0, "CT-F": 1.25, "CT-D": 0.9}

  def fake(mode):
    def run(steps):
      drift = 3.0 ** (len(calls) // len(cost))  # the round this call belongs to
      calls.append(mode)
      return cost[mode] * drift, 0.5, 0.1 * cost[mode] * drift  # step, loss, time in the call
    return run

  class Args:
    rounds, steps = 3, 10
  timed = bench.time_interleaved({mode: fake(mode) for mode in cost}, Args)
  assert calls == ["vanilla", "CT-F", "CT-D", "CT-F", "CT-D", "vanilla", "CT-D", "vanilla", "CT-F"]
  for mode, factor in cost.items():
    assert timed[mode]["ratio"] == pytest.approx(factor)
    assert timed[mode]["ratio_range"] == pytest.approx([factor, factor])
    assert timed[mode]["step_s"] == pytest.approx(factor * 3.0)  # the median round
    assert timed[mode]["round_step_s"] == pytest.approx([factor, factor * 3, factor * 9])
    assert timed[mode]["call_s"] == pytest.approx(0.1 * factor * 3.0)  # also the median round


def test_ctf_trip_per_leaf_mode_is_the_same_training_with_the_old_mask_loop():
  """--modes CT-F-trip-per-leaf: CT-F traced with a mask-loop trip per leaf (as it drew its
  masks before), the same masks, so the same losses as CT-F; its loops make more trips."""
  import argparse
  import re

  sys.path.insert(0, str(ROOT / "bench"))
  import bench_accelerator as bench

  args = argparse.Namespace(batch_size=4, seq_len=32, reserve_p=0.3, compile_only=False,
                            profile=True)
  losses, trips = {}, {}
  for mode in ("CT-F", bench.CTF_PER_LEAF, "vanilla"):
    _, run = bench.prepare("tiny", "float32", mode, args)
    losses[mode] = run(3)[1]
    loops = [line for line in run.hlo_text.splitlines() if " while(" in line and "pred[" in line]
    trips[mode] = sorted(int(n) for line in loops
                         for n in re.findall(r'known_trip_count":\{"n":"(\d+)"', line))
  assert losses["CT-F"] == losses[bench.CTF_PER_LEAF] != losses["vanilla"]
  assert trips["CT-F"] and set(trips["CT-F"]) == {2}  # the masks' loops: two trips each
  assert max(trips[bench.CTF_PER_LEAF]) > 2 and not trips["vanilla"]


def test_compile_only_reports_memory_per_device_with_and_without_gradient_checkpointing(tmp_path):
  """--compile_only --gradient_checkpointing off,on: each step compiled from shapes both ways,
  labelled, with its memory per device (arguments, outputs not aliased, temporaries);
  --compile_reps 2: each compiled twice, the modes in turn, the median and its ratio."""
  out = tmp_path / "compile.json"
  env = {**os.environ, "PYTHONPATH": str(ROOT)}
  env.pop("XLA_FLAGS", None)
  done = subprocess.run([sys.executable, "-c", BLOCKED_RUN, "--tiny", "--compile_only",
                         "--dtypes", "float32", "--modes", "vanilla,CT-D",
                         "--gradient_checkpointing", "off,on", "--compile_reps", "2",
                         "--out", str(out)],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  results = json.loads(out.read_text())
  rows = {(r["mode"], r["gradient_checkpointing"]): r for r in results["steps"]}
  assert set(rows) == {(mode, on) for mode in ("vanilla", "CT-D") for on in (False, True)}
  for row in rows.values():
    assert row["argument_mib"] > 0 and row["temp_mib"] > 0 and row["output_mib"] >= 0
  # CT-D's arguments hold its mask too; the state is donated, so no output is new.
  assert rows["CT-D", False]["argument_mib"] > rows["vanilla", False]["argument_mib"]
  assert rows["vanilla", False]["output_mib"] < rows["vanilla", False]["argument_mib"] / 10
  assert "| tiny | float32 | CT-D, gradient checkpointing |" in done.stdout
  assert "memory per device: arguments + outputs + temporaries" in done.stdout
  for (mode, _), row in rows.items():
    first, second = row["round_compile_s"]
    assert row["compile_s"] == pytest.approx((first + second) / 2)  # the median of two
    low, high = row["compile_ratio_range"]
    assert low <= row["compile_ratio"] <= high and (mode != "vanilla" or low == high == 1.0)
  assert "each compile time the median of 2" in done.stdout


def test_a_step_compiled_for_a_tpu_slice_renders_what_ran_and_what_did_not_fit():
  """A run of --topology (compiled by libtpu's compiler on a CPU host) says so; a step too
  large for the chip's memory reads 'does not fit' with the compiler's reason, and no
  compile ratio is taken against a compile that failed."""
  sys.path.insert(0, str(ROOT / "bench"))
  import bench_accelerator as bench

  memory = {"argument_mib": 1000.0, "output_mib": 0.0, "temp_mib": 500.0}
  results = {
      "machine": {"backend": "tpu", "device": "TPU v5 lite", "devices": 1, "memory_gib": 16,
                  "topology": "v5e:1x1", "compiled_on": "x86_64", "libtpu": "0.0.42.1",
                  "jax": "0.10.2", "peak_tflops": {"float32": 197.0, "bfloat16": 197.0},
                  "matmul_tflops": None},
      "batch_size": 128, "seq_len": 128, "compile_only": True, "compile_threads": 1,
      "command": "python3 bench/bench_accelerator.py --topology v5e:1x1", "wall_s": 60.0,
      "left_out": [],
      "steps": [
          {"size": "bert-large", "dtype": "bfloat16", "mode": "vanilla",
           "gradient_checkpointing": False, "compile_s": 10.0,
           "out_of_memory": "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory "
                            "required for HLO temporaries (20.10G) exceeds available HBM "
                            "(15.75G)."},
          {"size": "bert-large", "dtype": "bfloat16", "mode": "CT-F",
           "gradient_checkpointing": False, "compile_s": 12.0,
           "out_of_memory": "RESOURCE_EXHAUSTED: Ran out of memory on HBM."},
          {"size": "bert-large", "dtype": "bfloat16", "mode": "vanilla",
           "gradient_checkpointing": True, "compile_s": 20.0, **memory},
          {"size": "bert-large", "dtype": "bfloat16", "mode": "CT-F",
           "gradient_checkpointing": True, "compile_s": 25.0, **memory}]}
  table = bench.render(results)
  assert table.startswith("Compiled for 1 × TPU v5 lite (TPU slice v5e:1x1, 16 GiB each)")
  assert "no chip ran" in table and "(128 per chip)" in table
  assert ("| bert-large | bfloat16 | vanilla | 10.0 s | – | does not fit: Ran out of memory on "
          "HBM, the total memory required for HLO temporaries (20.10G) exceeds available HBM "
          "(15.75G). |") in table
  assert "| bert-large | bfloat16 | CT-F | 12.0 s | – | does not fit: " in table
  assert ("| bert-large | bfloat16 | CT-F, gradient checkpointing | 25.0 s | 1.25× | "
          "1,000 + 0 + 500 = 1,500 MiB |") in table
  assert bench.is_out_of_memory(RuntimeError(results["steps"][0]["out_of_memory"]))
  assert not bench.is_out_of_memory(RuntimeError("INVALID_ARGUMENT: something else"))
