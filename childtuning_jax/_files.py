"""Writing files so that a crash leaves the old file or the new one, never half of one."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable


def write_atomically(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
  """``write(partial)`` to a file beside ``path``, then renames it to ``path``."""
  path = Path(path)
  partial = path.with_name(path.name + ".partial")
  write(partial)
  os.replace(partial, path)
