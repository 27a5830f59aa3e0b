"""The README's Python examples run as written, in order, in one namespace."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def python_blocks() -> list[str]:
  return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def _needs_newer_flax(block: str) -> bool:
  """A block whose first line reads ``# flax >= X.Y`` needs that Flax (its NNX API changed)."""
  import flax

  needed = re.match(r"# flax >= (\d+)\.(\d+)", block)
  have = tuple(int(part) for part in flax.__version__.split(".")[:2])
  return bool(needed) and have < (int(needed.group(1)), int(needed.group(2)))


def test_readme_python_examples_run():
  pytest.importorskip("transformers")
  blocks = python_blocks()
  assert len(blocks) >= 6
  namespace = {}
  for number, block in enumerate(blocks, 1):
    if _needs_newer_flax(block):
      continue
    try:
      exec(compile(block, f"README.md python block {number}", "exec"), namespace)
    except Exception as error:
      raise AssertionError(f"README python block {number} fails:\n{block}") from error
