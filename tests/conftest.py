"""Fixtures shared by the trainer's tests."""

import pytest


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
  """A tiny random BERT checkpoint and tiny sentiment files (tests/tiny_run.py)."""
  pytest.importorskip("torch")
  pytest.importorskip("transformers")
  import tiny_run

  root = tmp_path_factory.mktemp("tiny")
  return {
      "model": tiny_run.write_checkpoint(root / "model"),
      "train": tiny_run.write_csv(root / "train.csv", 256, seed=1),
      "validation": tiny_run.write_csv(root / "validation.csv", 100, seed=2),
      "extra": tiny_run.write_csv(root / "shifted.csv", 40, seed=3),
  }
