"""Test set-up: 8 CPU devices, so data-parallel and sharded code paths run on one machine;
no test reaches for the Hugging Face Hub."""

import os

# Must happen before JAX initialises its backends.
_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()

# Tests use local files only; offline, a Hub name fails at once instead of after retries.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

# Trainer tests compile the same step functions several times (a run, then its resume):
# a per-session persistent compilation cache turns the repeats into loads.
import tempfile  # noqa: E402

os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="jax-cache-"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
