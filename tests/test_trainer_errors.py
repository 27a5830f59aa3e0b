"""What a user of train/run_glue.py sees when a run cannot give a meaningful result.

Each case of the reliability issue: refused before training with a message that names the
file, row, column or flag and the fix, or (a diverging run) stopped with a non-zero exit,
keeping only checkpoints of finite states. Runs go through ``run_glue.cli``, the command's
own entry point, so the exit status is the command's.
"""

import errno
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("transformers")
pytest.importorskip("torch")

import tiny_run  # noqa: E402
from train import checkpoints, run_glue, trainer  # noqa: E402


def command(tiny, output_dir, *flags) -> int:
  """The exit status of ``python -m train.run_glue`` with these flags (argparse's exits too)."""
  try:
    return run_glue.cli(tiny_run.trainer_argv(tiny, output_dir, *flags))
  except SystemExit as exit:
    return exit.code


def refused(capsys, tiny, output_dir, *flags) -> str:
  """Runs a command that must fail before training; returns what it printed."""
  log = output_dir / "metrics.jsonl"
  before = log.read_text() if log.exists() else None
  capsys.readouterr()
  assert command(tiny, output_dir, *flags) != 0
  printed = capsys.readouterr().err
  assert (log.read_text() if log.exists() else None) == before, "it trained"
  return printed


@pytest.mark.parametrize("flags, message", [
    (["--per_device_train_batch_size", "0"], "--per_device_train_batch_size must be at least 1, got 0"),
    (["--per_device_train_batch_size", "-2"], "--per_device_train_batch_size must be at least 1, got -2"),
    (["--per_device_eval_batch_size", "0"], "--per_device_eval_batch_size must be at least 1"),
    (["--fisher_num_examples", "-5"], "--fisher_num_examples must be at least 1, got -5"),
    (["--learning_rate", "nan"], "--learning_rate must be a finite number"),
    (["--reserve_p", "0"], "--reserve_p must be greater than 0.0"),
    (["--always_trainable", "(["], "--always_trainable '([' is not a regular expression"),
    (["--always_trainable", "^clasifier/"], "--always_trainable '^clasifier/' matches no parameter"),
    (["--always_trainable", "."], "matches every parameter"),
    (["--max_seq_length", "600"], "--max_seq_length 600 is longer than the model's 64 positions"),
    (["--max_seq_length", "100000"], "use at most 64"),
    (["--num_processes", "2"], "add --jax_distributed"),
])
def test_flags_no_run_can_use_are_refused_naming_the_flag(capsys, tiny, tmp_path, flags, message):
  printed = refused(capsys, tiny, tmp_path, "--mode", "ChildTuning-D", *flags)
  assert message in printed


def write(path: Path, text: str, encoding="utf-8") -> Path:
  path.write_bytes(text.encode(encoding))
  return path


@pytest.mark.parametrize("which, content, message", [
    ("train", "sentence,label\ngood film,0.5\nbad film,nan\n",
     "train.csv, row 3: label 'nan' is not a usable label"),
    ("validation", "sentence,label\ngood film,0.5\nbad film,inf\n",
     "validation.csv, row 3: label 'inf' is not a usable label"),
    ("train", "sentence,label\ngood film,positive\nbad film,0\n",
     "train.csv: the labels mix two kinds: a name in row 2 ('positive'), a number in row 3 ('0')"),
    ("train", "sentence,label\ngood film,1\nbad film,0\nfine,1.0\n",
     "train.csv: row 4 ('1.0') writes a label as a float, row 2 ('1') as a whole number"),
    ("train", "sentence,label\ngood film,positive\n,negative\n",
     "train.csv, row 3: column 'sentence' is empty"),
    ("validation", "sentence,label\ngood film,positive\n   ,negative\n",
     "validation.csv, row 3: column 'sentence' is empty"),
])
def test_data_that_cannot_train_is_refused_naming_file_row_and_column(capsys, tiny, tmp_path,
                                                                      which, content, message):
  regression = "0.5" in content
  train = (write(tmp_path / "train.csv", content) if which == "train" else
           write(tmp_path / "train.csv", "sentence,label\ngood,0.5\nbad,-0.5\n") if regression
           else tiny["train"])
  validation = (write(tmp_path / "validation.csv", content) if which == "validation"
                else tiny["validation"])
  printed = refused(capsys, tiny, tmp_path / "out", "--train_file", train,
                    "--validation_file", validation)
  assert message in printed


def test_a_byte_that_is_not_utf8_is_named_with_file_and_line(capsys, tiny, tmp_path):
  bad = tmp_path / "latin1.csv"
  bad.write_bytes("sentence,label\ngood film,positive\nun film très bon,positive\n".encode("latin-1"))
  printed = refused(capsys, tiny, tmp_path / "out", "--validation_file", bad)
  assert "latin1.csv, line 3, byte 11 of the line: byte 0xe8 is not UTF-8" in printed


def test_the_log_states_task_type_labels_and_sizes(capsys, tiny, tmp_path):
  command(tiny, tmp_path, "--mode", "vanilla", "--max_steps", "1")
  printed = capsys.readouterr().err
  counts = np.bincount([label for _, label in tiny_run.sentences(256, seed=1)])
  assert (f"classification into 2 labels ['negative', 'positive']; train train.csv: 256 examples "
          f"({counts[0]}, {counts[1]} per label); validation validation.csv: 100 examples") in printed


def checkpoint_copy(tiny, directory: Path, keep=("config.json", "model.safetensors")) -> Path:
  directory.mkdir()
  for name in keep:
    shutil.copy(Path(tiny["model"]) / name, directory / name)
  return directory


def test_model_directories_that_cannot_work_are_refused_naming_what_is_missing(capsys, tiny, tmp_path):
  no_tokenizer = checkpoint_copy(tiny, tmp_path / "no_tokenizer")
  printed = refused(capsys, tiny, tmp_path / "a", "--model_name_or_path", no_tokenizer)
  assert f"{no_tokenizer} has no tokenizer files" in printed

  empty = tmp_path / "empty"
  empty.mkdir()
  printed = refused(capsys, tiny, tmp_path / "b", "--model_name_or_path", empty)
  assert f"{empty} has no config.json (it holds nothing)" in printed

  truncated = checkpoint_copy(tiny, tmp_path / "truncated",
                              keep=("config.json", "model.safetensors", "vocab.txt",
                                    "tokenizer_config.json"))
  weights = truncated / "model.safetensors"
  weights.write_bytes(weights.read_bytes()[:weights.stat().st_size // 2])
  printed = refused(capsys, tiny, tmp_path / "c", "--model_name_or_path", truncated)
  assert f"{weights} could not be read" in printed and "truncated or corrupt" in printed


def test_a_diverging_run_stops_with_an_error_and_keeps_only_finite_checkpoints(capsys, tiny, tmp_path):
  code = command(tiny, tmp_path, "--mode", "vanilla", "--learning_rate", "1e9", "--max_steps", "8",
                 "--save_steps", "1", "--save_total_limit", "10")
  printed = capsys.readouterr().err
  assert code == 1
  assert "training diverged" in printed and "Try a lower --learning_rate (now 1e+09)" in printed
  steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir())
  assert steps and steps[-1] < 8
  assert f"The last checkpoint, of step {steps[-1]}, is kept." in printed
  params = checkpoints.latest_params(tmp_path / "checkpoints")
  assert all(np.isfinite(leaf).all() for leaf in __import__("jax").tree.leaves(params))
  assert not (tmp_path / "all_results.json").exists()
  logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert all(np.isfinite(record["loss"]) for record in logged)


def resume_flags(mode):
  return ["--mode", mode, "--max_steps", "4", "--save_steps", "2", "--fisher_num_examples", "32"]


def test_resume_with_another_method_or_model_is_refused_clearly(capsys, tiny, tmp_path):
  assert command(tiny, tmp_path, *resume_flags("ChildTuning-F")) == 0
  printed = refused(capsys, tiny, tmp_path, *resume_flags("vanilla"), "--resume")
  assert "was written by a run with other flags: --mode 'ChildTuning-F' -> 'vanilla'" in printed
  assert "orbax" not in printed.lower()

  other = tiny_run.write_checkpoint(tmp_path / "other_model", seed=1)
  printed = refused(capsys, tiny, tmp_path, *resume_flags("ChildTuning-F"), "--resume",
                    "--model_name_or_path", other)
  assert "--model_name_or_path" in printed and "--overwrite_output_dir" in printed

  # The same files spelled another way are the same run: it resumes without a warning.
  spelled = Path(tiny["model"]).parent / ".." / Path(tiny["model"]).parent.name / "model"
  assert command(tiny, tmp_path, *resume_flags("ChildTuning-F"), "--resume",
                 "--model_name_or_path", spelled) == 0
  assert "differ from the checkpoint's run" not in capsys.readouterr().err


def test_a_crash_before_the_first_checkpoint_does_not_block_the_same_command(tiny, tmp_path,
                                                                            monkeypatch):
  flags = ["--mode", "ChildTuning-D", "--max_steps", "2", "--fisher_num_examples", "16"]

  def crash(*args, **kwargs):
    raise MemoryError("out of memory in the Fisher pass")

  monkeypatch.setattr(trainer, "estimate_child_network", crash)
  assert command(tiny, tmp_path, *flags) == 1
  assert (tmp_path / "checkpoints").is_dir()  # created, but holds no checkpoint
  monkeypatch.undo()
  assert command(tiny, tmp_path, *flags) == 0  # the same command, no --overwrite_output_dir


def test_a_full_disk_is_reported_in_one_clear_line(capsys, tiny, tmp_path, monkeypatch):
  monkeypatch.setattr(checkpoints, "free_bytes", lambda directory: 10_000)
  code = command(tiny, tmp_path, "--mode", "vanilla", "--max_steps", "4", "--save_steps", "2")
  last = capsys.readouterr().err.strip().splitlines()[-1]
  assert code == 1
  assert last.startswith(f"OSError: [Errno {errno.ENOSPC}] the checkpoint of step 2 needs about")
  assert "No checkpoint was written" in last and "--resume" in last


@pytest.fixture
def small_filesystem(tmp_path):
  """A 3 MiB tmpfs (root only; skipped elsewhere)."""
  mount = tmp_path / "small"
  mount.mkdir()
  if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)],
                    capture_output=True).returncode != 0:
    pytest.skip("mounting a tmpfs needs root")
  yield mount
  subprocess.run(["umount", str(mount)], check=True)


def test_a_disk_that_fills_during_a_save_is_reported_with_its_cause(capsys, tiny, small_filesystem,
                                                                    monkeypatch):
  monkeypatch.setattr(checkpoints, "free_bytes", lambda directory: 2**40)  # past the check before a save
  code = command(tiny, small_filesystem / "out", "--mode", "vanilla", "--max_steps", "40",
                 "--save_steps", "2", "--save_total_limit", "100")
  last = capsys.readouterr().err.strip().splitlines()[-1]
  assert code == 1
  assert last.startswith("OSError: could not write the checkpoint of step")
  assert "No space left on device" in last and "--resume" in last


def test_a_failed_background_write_still_releases_the_checkpoint_manager():
  """Closing after orbax's background write failed reports that write's error and still
  closes the manager, whose writer threads would otherwise outlive the run."""
  class Manager:
    directory, closed = Path("/checkpoints"), False

    def latest_step(self):
      return 4

    def wait_until_finished(self):
      raise RuntimeError("write failed") from OSError(errno.ENOSPC, "No space left on device")

    def close(self):
      self.closed = True
      raise RuntimeError("closing after a failed write")  # must not hide the write's error

  manager = Manager()
  saver = checkpoints.Saver(manager, {}, batch_size=8)
  with pytest.raises(OSError, match="could not write the checkpoint of step 4.*No space left"):
    saver.close()
  assert manager.closed
