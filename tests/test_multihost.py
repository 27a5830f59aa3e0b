"""Several hosts, simulated: 2 trainer processes on 127.0.0.1 with 2 CPU devices each.

They reach the evaluation loss of 1 process with 4 devices (vanilla, CT-F with gradient
accumulation, CT-D), write the outputs once, stop together on a signal to one of them and
resume across both; when one is killed, the other stops within seconds, saying which
process is gone.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("torch")

import tiny_run  # noqa: E402
from train import run_glue  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
COMMON = ["--learning_rate", "1e-3", "--fisher_num_examples", "64", "--seed", "3"]


def free_port() -> int:
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    return sock.getsockname()[1]


def start(tiny, output_dir: Path, *flags, heartbeat: int = 30) -> list[subprocess.Popen]:
  """The same command as 2 processes of one run, each with 2 CPU devices."""
  port = free_port()
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
         "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  output_dir.mkdir(parents=True, exist_ok=True)
  processes = []
  for index in range(2):
    argv = tiny_run.trainer_argv(
        tiny, output_dir, *flags, "--jax_distributed", "--coordinator_address",
        f"127.0.0.1:{port}", "--num_processes", "2", "--process_id", index,
        "--heartbeat_timeout_seconds", heartbeat)
    with open(output_dir / f"process_{index}.log", "w") as log:
      processes.append(subprocess.Popen([sys.executable, "-m", "train.run_glue", *argv], cwd=REPO,
                                        env=env, stdout=log, stderr=subprocess.STDOUT))
  return processes


def wait(processes, timeout=240) -> list[int]:
  try:
    return [process.wait(timeout=timeout) for process in processes]
  finally:
    for process in processes:
      process.kill()


def log_of(output_dir: Path, index: int) -> str:
  return (output_dir / f"process_{index}.log").read_text()


def steps_logged(output_dir: Path) -> list[int]:
  records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
  return [record["step"] for record in records if "loss" in record]


def one_process_four_devices(tiny, output_dir, *flags) -> dict:
  return run_glue.main(tiny_run.trainer_argv(tiny, output_dir, *flags, "--num_devices", "4"))


# CT-F's run accumulates two micro-batches per step: each process feeds its block of each.
@pytest.mark.parametrize("mode, extra", [("vanilla", ()),
                                         ("ChildTuning-F", ("--gradient_accumulation_steps", 2)),
                                         ("ChildTuning-D", ())])
def test_two_processes_reach_the_one_process_result_and_write_outputs_once(tiny, tmp_path, mode,
                                                                           extra):
  flags = ["--mode", mode, "--max_steps", "6", "--save_steps", "4", *COMMON, *extra]
  two = tmp_path / "two"
  assert wait(start(tiny, two, *flags)) == [0, 0], log_of(two, 1)[-3000:]
  reference = one_process_four_devices(tiny, tmp_path / "one", *flags)
  results = json.loads((two / "all_results.json").read_text())
  assert results["eval_loss"] == pytest.approx(reference["eval_loss"], abs=1e-5)
  assert steps_logged(two) == list(range(1, 7))  # one writer: each step once
  assert sorted(p.name for p in (two / "checkpoints").iterdir()) == ["4", "6"]
  if mode == "ChildTuning-D":
    assert json.loads((two / "mask_keep_fractions.json").read_text()) == json.loads(
        (tmp_path / "one" / "mask_keep_fractions.json").read_text())


def wait_for_steps(output_dir: Path, count: int, processes, timeout=120) -> None:
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    metrics = output_dir / "metrics.jsonl"
    if metrics.exists() and len(metrics.read_text().splitlines()) >= count:
      return
    assert all(process.poll() is None for process in processes), "a process ended early"
    time.sleep(0.2)
  raise TimeoutError(f"{output_dir}: fewer than {count} steps in {timeout} s")


def test_a_signal_to_one_process_stops_both_with_a_checkpoint_and_both_resume(tiny, tmp_path):
  flags = ["--mode", "ChildTuning-F", "--max_steps", "60", "--save_steps", "1000", *COMMON]
  processes = start(tiny, tmp_path, *flags)
  wait_for_steps(tmp_path, 3, processes)
  processes[1].send_signal(signal.SIGTERM)
  signalled = time.monotonic()
  assert wait(processes, timeout=60) == [128 + signal.SIGTERM] * 2
  assert time.monotonic() - signalled < 30
  assert "stopped by a signal to another process after step" in log_of(tmp_path, 0)
  assert "stopped by SIGTERM after step" in log_of(tmp_path, 1)
  saved = [int(p.name) for p in (tmp_path / "checkpoints").iterdir()]
  assert len(saved) == 1 and 3 <= saved[0] < 60

  assert wait(start(tiny, tmp_path, *flags, "--resume")) == [0, 0], log_of(tmp_path, 0)[-3000:]
  reference = one_process_four_devices(tiny, tmp_path / "one", *flags)
  results = json.loads((tmp_path / "all_results.json").read_text())
  assert results["eval_loss"] == pytest.approx(reference["eval_loss"], abs=1e-5)
  assert steps_logged(tmp_path) == list(range(1, 61))


def test_when_one_process_is_killed_the_other_stops_within_seconds(tiny, tmp_path):
  flags = ["--mode", "vanilla", "--max_steps", "100000", "--save_steps", "100000", *COMMON]
  processes = start(tiny, tmp_path, *flags, heartbeat=5)
  wait_for_steps(tmp_path, 3, processes)
  processes[1].kill()
  killed = time.monotonic()
  assert processes[0].wait(timeout=60) == 1
  assert time.monotonic() - killed < 20
  assert "process 1 has sent no heartbeat for 5 s" in log_of(tmp_path, 0)
