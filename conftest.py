"""Test set-up: 8 CPU devices, so data-parallel and sharded code paths run on one machine."""

import os

# Must happen before JAX initialises its backends.
_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()
