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
