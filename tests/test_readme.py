"""The README's Python examples run as written, in order, in one namespace."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def python_blocks() -> list[str]:
  return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_python_examples_run():
  pytest.importorskip("transformers")
  blocks = python_blocks()
  assert len(blocks) >= 6
  namespace = {}
  for number, block in enumerate(blocks, 1):
    try:
      exec(compile(block, f"README.md python block {number}", "exec"), namespace)
    except Exception as error:
      raise AssertionError(f"README python block {number} fails:\n{block}") from error
