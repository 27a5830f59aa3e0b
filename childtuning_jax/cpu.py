"""glibc malloc settings for training on CPU (Linux): a fast step and a steady peak.

XLA's CPU runtime allocates the temporaries of each execution as one block,
more than a gigabyte for a MiniLM-L6 training step on a batch of 32 × 128
tokens. With glibc's defaults that block is mapped with ``mmap`` and unmapped
on ``free``, so every step maps it again and the kernel page-faults and
zero-fills all of it in 4 KiB pages (BENCHMARKS.md, *Host memory*, counts the
faults and measures what they cost).

:data:`MALLOC_ENV` serves every thread from one heap that keeps the memory
freed into it, and maps the blocks of 32 MiB or more (a step's temporaries)
with transparent huge pages (glibc 2.35+): such a block is still returned to
the system when freed, so the process's peak stays at one block, and it is
faulted in 2 MiB at a time, which costs a fraction of the 4 KiB faults.
:data:`MALLOC_ENV_NO_MMAP` maps nothing, so the block is reused from the heap
without any fault: the faster step where measured, but the peak is not
steady (between steps glibc can split the freed block for smaller requests,
and the next step then allocates a second one; BENCHMARKS.md, *Trainer:
throughput and peak host memory per glibc malloc setting*, compares the two).
It is also what :func:`malloc_env` falls back to where huge pages are not
available (an older glibc, or transparent huge pages off).

glibc reads these variables when a process starts (``mallopt`` later in the
process does not reach XLA's threads reliably), so a shell sets them::

    MALLOC_ARENA_MAX=1 MALLOC_TRIM_THRESHOLD_=1099511627776 MALLOC_MMAP_THRESHOLD_=33554432 \
        GLIBC_TUNABLES=glibc.malloc.hugetlb=1 python train.py

or a script calls :func:`restart_keeping_freed_memory` first thing.
"""

import ctypes
import importlib.util
import os
import sys
from pathlib import Path

MALLOC_ENV = {"MALLOC_ARENA_MAX": "1", "MALLOC_TRIM_THRESHOLD_": str(2**40),
              "MALLOC_MMAP_THRESHOLD_": str(32 << 20), "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
MALLOC_ENV_NO_MMAP = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_MAX_": "0",
                      "MALLOC_TRIM_THRESHOLD_": str(2**40)}
# Any of these set by the user turns the restart off.
MALLOC_VARIABLES = frozenset(MALLOC_ENV) | frozenset(MALLOC_ENV_NO_MMAP)
TRANSPARENT_HUGEPAGE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def huge_pages_on_request(glibc_version: str | None = None,
                          thp_setting: str | None = None) -> bool:
  """Whether glibc can ask for transparent huge pages: glibc 2.35 or later (its
  ``glibc.malloc.hugetlb`` tunable) and the kernel's setting ``always`` or ``madvise``
  (``/sys/kernel/mm/transparent_hugepage/enabled``; the selected one is in brackets).

  Examples:
    >>> from childtuning_jax.cpu import huge_pages_on_request
    >>> huge_pages_on_request("2.36", "always [madvise] never")
    True
    >>> huge_pages_on_request("2.31", "always [madvise] never")
    False
    >>> huge_pages_on_request("2.36", "always madvise [never]")
    False
  """
  if glibc_version is None:
    libc = ctypes.CDLL(None)
    if not hasattr(libc, "gnu_get_libc_version"):
      return False
    libc.gnu_get_libc_version.restype = ctypes.c_char_p
    glibc_version = libc.gnu_get_libc_version().decode()
  if thp_setting is None:
    try:
      thp_setting = TRANSPARENT_HUGEPAGE.read_text()
    except OSError:
      return False
  major, minor = (int(part) for part in glibc_version.split(".")[:2])
  selected = thp_setting[thp_setting.find("[") + 1:thp_setting.find("]")] if "[" in thp_setting else ""
  return (major, minor) >= (2, 35) and selected in ("always", "madvise")


def malloc_env() -> dict:
  """:data:`MALLOC_ENV` where huge pages can be had on request (:func:`huge_pages_on_request`),
  :data:`MALLOC_ENV_NO_MMAP` otherwise."""
  return MALLOC_ENV if huge_pages_on_request() else MALLOC_ENV_NO_MMAP


def restart_keeping_freed_memory() -> None:
  """Runs the current command again, in place, with :func:`malloc_env`'s settings.

  For the ``if __name__ == "__main__":`` block of a script, before anything
  else runs (the process is replaced: ``os.execve`` of ``sys.orig_argv``).
  Does nothing when any of :data:`MALLOC_VARIABLES` is already set (the user's
  own choice, or the restarted process), off Linux, where the C library is not
  glibc, or when JAX will run on an accelerator (:func:`accelerator_expected`):
  the settings were measured for XLA's CPU runtime only.

  Examples:
    >>> from childtuning_jax.cpu import MALLOC_ENV, restart_keeping_freed_memory
    >>> sorted(MALLOC_ENV)
    ['GLIBC_TUNABLES', 'MALLOC_ARENA_MAX', 'MALLOC_MMAP_THRESHOLD_', 'MALLOC_TRIM_THRESHOLD_']
  """
  if not sys.platform.startswith("linux") or any(name in os.environ for name in MALLOC_VARIABLES):
    return
  if accelerator_expected():
    return
  if not hasattr(ctypes.CDLL(None), "gnu_get_libc_version"):  # musl and others
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], {**os.environ, **malloc_env()})


def peak_rss_mib() -> float:
  """This process's peak resident set (host memory), MiB: ``VmHWM`` on Linux (not
  ``ru_maxrss``, which keeps the parent's high-water mark across fork and exec),
  ``ru_maxrss`` elsewhere."""
  try:
    status = Path("/proc/self/status").read_text()
    return int(next(l.split()[1] for l in status.splitlines() if l.startswith("VmHWM"))) / 1024
  except (OSError, StopIteration):
    import resource  # POSIX only; kilobytes on Linux, bytes on macOS

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


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
