"""The project's boundary: the library imports only jax, flax, optax and numpy (the trainer's
packages stay out of it), and imports run one way: childtuning_jax <- train/ <- bench/ and the
experiments."""

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_importing_the_whole_library_loads_none_of_the_trainers_packages():
  code = ("import sys, pkgutil, importlib, childtuning_jax\n"
          "for module in pkgutil.walk_packages(childtuning_jax.__path__, 'childtuning_jax.'):\n"
          "  importlib.import_module(module.name)\n"
          "print(' '.join(sorted({m.split('.')[0] for m in sys.modules})))")
  loaded = set(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              check=True, cwd=REPO).stdout.split())
  assert {"jax", "flax", "optax", "numpy"} <= loaded
  assert not loaded & {"orbax", "transformers", "datasets", "tqdm", "torch", "safetensors",
                       "huggingface_hub", "matplotlib", "train", "bench"}


def _imported_packages(path: Path) -> set[str]:
  names = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      names |= {alias.name for alias in node.names}
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      names |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
  return names


def test_imports_run_one_way():
  for path in (REPO / "childtuning_jax").rglob("*.py"):
    assert not {n for n in _imported_packages(path) if n.split(".")[0] in ("train", "bench")}, path
  for path in (REPO / "train").glob("*.py"):
    if path.stem == "experiments":
      continue
    imported = _imported_packages(path)
    assert not {n for n in imported if n.split(".")[0] == "bench" or "experiments" in n}, path
