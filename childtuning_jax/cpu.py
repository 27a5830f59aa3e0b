"""glibc malloc settings that make training on CPU (Linux) faster.

XLA's CPU runtime allocates the temporaries of each execution as one block,
more than a gigabyte for a MiniLM-L6 training step on a batch of 32 × 128
tokens. glibc serves a block that large with ``mmap`` and unmaps it on
``free``, so every step maps it again and the kernel page-faults and
zero-fills all of it (BENCHMARKS.md, *Host memory*, counts the faults and
measures what they cost).

:data:`MALLOC_ENV` tells glibc to serve every thread from one heap, never to
use ``mmap`` for large blocks and never to give freed memory back to the
operating system, so the block is reused from one step to the next. glibc
reads these variables when a process starts (``mallopt`` later in the
process does not reach XLA's threads reliably), so a shell sets them::

    MALLOC_ARENA_MAX=1 MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=1099511627776 python train.py

or a script calls :func:`restart_keeping_freed_memory` first thing. The cost:
the process keeps its peak heap until it exits.
"""

import ctypes
import importlib.util
import os
import sys

MALLOC_ENV = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_MAX_": "0",
              "MALLOC_TRIM_THRESHOLD_": str(2**40)}


def restart_keeping_freed_memory() -> None:
  """Runs the current command again, in place, with :data:`MALLOC_ENV` set.

  For the ``if __name__ == "__main__":`` block of a script, before anything
  else runs (the process is replaced: ``os.execve`` of ``sys.orig_argv``).
  Does nothing when any of the variables is already set (the user's own
  choice, or the restarted process), off Linux, where the C library is not
  glibc, or when JAX will run on an accelerator (:func:`accelerator_expected`):
  the settings were measured for XLA's CPU runtime only.

  Examples:
    >>> from childtuning_jax.cpu import MALLOC_ENV, restart_keeping_freed_memory
    >>> sorted(MALLOC_ENV)
    ['MALLOC_ARENA_MAX', 'MALLOC_MMAP_MAX_', 'MALLOC_TRIM_THRESHOLD_']
  """
  if not sys.platform.startswith("linux") or any(name in os.environ for name in MALLOC_ENV):
    return
  if accelerator_expected():
    return
  if not hasattr(ctypes.CDLL(None), "gnu_get_libc_version"):  # musl and others
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], {**os.environ, **MALLOC_ENV})


# Packages that give JAX a GPU or TPU backend.
ACCELERATOR_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm6_plugin",
                       "jax_rocm7_plugin", "libtpu")


def accelerator_expected() -> bool:
  """Whether JAX will pick a GPU or TPU, told without starting JAX: ``JAX_PLATFORMS`` when
  set (its first platform), otherwise whether a GPU or TPU plugin is installed.

  Examples:
    >>> import os
    >>> from childtuning_jax.cpu import accelerator_expected
    >>> os.environ.get("JAX_PLATFORMS", "") != "cpu" or not accelerator_expected()
    True
  """
  platforms = os.environ.get("JAX_PLATFORMS", "").strip()
  if platforms:
    return platforms.split(",")[0].strip() != "cpu"
  return any(importlib.util.find_spec(name) is not None for name in ACCELERATOR_PLUGINS)
