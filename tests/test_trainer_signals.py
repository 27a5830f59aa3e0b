"""SIGTERM and Ctrl-C at deterministic points of a run: inside a training step (after the step
has donated the state's buffers), between steps, during a save, before training.

Inside the loop the run finishes the step it is in, saves a checkpoint of it and stops; the
resumed run then ends with the uninterrupted run's metrics.jsonl, train_results.json and
eval_results.json (timings aside). Before training the run stops at once and leaves nothing
that blocks the same command.
"""

import json
import os
import signal
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("torch")

import tiny_run  # noqa: E402
from train import checkpoints, input_pipeline, loop, run_glue, trainer  # noqa: E402

FLAGS = ["--mode", "ChildTuning-F", "--learning_rate", "1e-3", "--max_steps", "8",
         "--save_steps", "3", "--warmup_steps", "2", "--seed", "7"]
TIMINGS = ("examples_per_second", "train_runtime", "train_samples_per_second",
           "peak_host_memory_mib")


def run(tiny, output_dir, *flags):
  return run_glue.main(tiny_run.trainer_argv(tiny, output_dir, *FLAGS, *flags))


def outputs(output_dir: Path) -> dict:
  """What a run leaves that must not depend on an interruption (timings removed)."""
  untimed = lambda record: {k: v for k, v in record.items() if k not in TIMINGS}
  lines = (output_dir / "metrics.jsonl").read_text().splitlines()
  return {"metrics.jsonl": [untimed(json.loads(line)) for line in lines],
          **{name: untimed(json.loads((output_dir / name).read_text()))
             for name in ("train_results.json", "eval_results.json")}}


@pytest.fixture(scope="module")
def uninterrupted(tiny, tmp_path_factory):
  output_dir = tmp_path_factory.mktemp("uninterrupted")
  run(tiny, output_dir)
  return outputs(output_dir)


def signal_on_call(number, signum):
  """A function that sends ``signum`` to this process on its ``number``-th call."""
  calls = []

  def maybe_signal():
    calls.append(1)
    if len(calls) == number:
      os.kill(os.getpid(), signum)
  return maybe_signal


def inside_the_step(monkeypatch, signum):
  # After the compiled step has returned (the old state's buffers are donated and deleted),
  # before the loop has the new state: where a handler that raised lost the state.
  compile_train_step, maybe_signal = trainer.compile_train_step, signal_on_call(5, signum)

  def compile_then_signal(step_fn, run, state):
    compiled = compile_train_step(step_fn, run, state)

    def step(state, batch):
      result = compiled(state, batch)
      maybe_signal()
      sum(range(1000))  # Python bytecode after the signal: where its handler runs
      return result
    return step
  monkeypatch.setattr(trainer, "compile_train_step", compile_then_signal)


def between_steps(monkeypatch, signum):
  place, maybe_signal = input_pipeline.place, signal_on_call(5, signum)

  def place_then_signal(batch, sharding):
    maybe_signal()
    return place(batch, sharding)
  monkeypatch.setattr(input_pipeline, "place", place_then_signal)


def during_a_save(monkeypatch, signum):
  save, maybe_signal = checkpoints.save, signal_on_call(1, signum)

  def save_while_signalled(manager, step, state, metadata):
    save(manager, step, state, metadata)  # returns while orbax still writes in the background
    maybe_signal()
  monkeypatch.setattr(checkpoints, "save", save_while_signalled)


@pytest.mark.parametrize("point, signum", [
    (inside_the_step, signal.SIGTERM), (between_steps, signal.SIGINT),
    (during_a_save, signal.SIGTERM)], ids=["inside_the_step", "between_steps", "during_a_save"])
def test_a_signal_in_the_loop_saves_the_last_step_and_resume_gives_the_same_run(
    tiny, tmp_path, monkeypatch, uninterrupted, point, signum):
  point(monkeypatch, signum)
  with pytest.raises(loop.Stopped) as stopped:
    run(tiny, tmp_path)
  monkeypatch.undo()
  assert stopped.value.signum == signum and stopped.value.agreed
  saved = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir())
  assert 0 < saved[-1] < 8
  assert f"after step {saved[-1]}, with a checkpoint" in str(stopped.value)
  logged = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert logged == list(range(1, saved[-1] + 1))  # every step up to the checkpoint, once
  assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handlers are removed again
  assert signal.getsignal(signal.SIGINT) is signal.default_int_handler

  run(tiny, tmp_path, "--resume")
  assert outputs(tmp_path) == uninterrupted


def test_the_command_exits_with_the_signal_status(tiny, tmp_path, monkeypatch):
  between_steps(monkeypatch, signal.SIGTERM)
  assert run_glue.cli(tiny_run.trainer_argv(tiny, tmp_path, *FLAGS)) == 128 + signal.SIGTERM


def test_a_signal_before_training_stops_at_once_and_blocks_nothing(tiny, tmp_path, monkeypatch):
  flags = ["--mode", "ChildTuning-D", "--fisher_num_examples", "32"]

  def signalled_fisher_pass(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGTERM)
    raise AssertionError("the signal should have stopped the run")
  monkeypatch.setattr(trainer, "estimate_child_network", signalled_fisher_pass)
  with pytest.raises(loop.Stopped) as stopped:
    run(tiny, tmp_path, *flags)
  assert not stopped.value.agreed and "stopped by SIGTERM" in str(stopped.value)
  monkeypatch.undo()
  results = run(tiny, tmp_path, *flags)  # the same command: nothing to resume, nothing in the way
  assert results["train_steps"] == 8


def test_the_metrics_log_keeps_what_the_checkpoint_saw_and_drops_a_torn_line(tmp_path):
  path = tmp_path / "metrics.jsonl"
  records = [{"step": 1, "loss": 0.7}, {"step": 2, "loss": 0.6}, {"step": 2, "eval_loss": 0.5},
             {"step": 3, "loss": 0.5}]
  path.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 4, "lo')  # kill -9
  loop.MetricsLog(path, keep_until_step=2, final_step=8, enabled=True)
  assert [json.loads(line) for line in path.read_text().splitlines()] == records[:3]
  loop.MetricsLog(path, keep_until_step=2, final_step=2, enabled=True)  # the final evaluation
  assert [json.loads(line) for line in path.read_text().splitlines()] == records[:2]
