"""childtuning_jax.cpu: with MALLOC_ENV, XLA's temporaries are reused instead of being
page-faulted in afresh on every call."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from childtuning_jax.cpu import MALLOC_ENV

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")

# A script that restarts itself with MALLOC_ENV when asked, then times a jitted function
# with one 64 MiB temporary (x @ w1) and a 4 MiB output; it prints its MALLOC_ variables
# and the minor page faults of each of 20 calls.
SCRIPT = textwrap.dedent("""
    import json, os, resource, sys
    if __name__ == "__main__" and sys.argv[1] == "restart":
      from childtuning_jax.cpu import restart_keeping_freed_memory
      restart_keeping_freed_memory()
    import jax, jax.numpy as jnp, numpy as np
    f = jax.jit(lambda x, w1, w2: (x @ w1) @ w2)
    x, w1, w2 = jnp.ones((4096, 256)), jnp.ones((256, 4096)) / 256, jnp.ones((4096, 256)) / 4096
    faults = []
    for i in range(20):
      before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
      jax.block_until_ready(f(x, w1, w2))
      faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(json.dumps({"env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")},
                      "faults": faults}))
""")
TEMPORARY_PAGES = 4096 * 4096 * 4 // 4096


def _run(tmp_path, mode, **env):
  script = tmp_path / "script.py"
  script.write_text(SCRIPT)
  env = {**{k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}, **env,
         "XLA_FLAGS": ""}
  out = subprocess.run([sys.executable, str(script), mode], env=env, check=True,
                       capture_output=True, text=True).stdout
  return json.loads(out.strip().splitlines()[-1])


def test_restarted_with_malloc_env_temporaries_are_reused(tmp_path):
  default, restarted = _run(tmp_path, "plain"), _run(tmp_path, "restart")
  assert default["env"] == {} and restarted["env"] == MALLOC_ENV
  # After two warm-up calls. glibc's defaults: the 64 MiB temporary is mapped afresh on
  # every call...
  default_faults, restarted_faults = sum(default["faults"][2:]), sum(restarted["faults"][2:])
  assert default_faults > 18 * TEMPORARY_PAGES * 0.9, default
  # ...under MALLOC_ENV it is reused, once the heap has found its layout (a few calls).
  assert restarted_faults < default_faults / 2, restarted


def test_a_malloc_setting_of_the_user_is_kept(tmp_path):
  result = _run(tmp_path, "restart", MALLOC_ARENA_MAX="4")
  assert result["env"] == {"MALLOC_ARENA_MAX": "4"}


def test_an_accelerator_is_expected_from_jax_platforms_or_an_installed_plugin(monkeypatch):
  from childtuning_jax import cpu

  monkeypatch.setattr(cpu.importlib.util, "find_spec", lambda name: None)
  for platforms, expected in (("cpu", False), ("cuda", True), ("tpu,cpu", True), ("cpu,cuda", False),
                              ("", False)):
    monkeypatch.setenv("JAX_PLATFORMS", platforms)
    assert cpu.accelerator_expected() is expected, platforms
  monkeypatch.setattr(cpu.importlib.util, "find_spec",
                      lambda name: object() if name == "jax_cuda12_plugin" else None)
  assert cpu.accelerator_expected()  # JAX_PLATFORMS "" (unset): the plugin decides
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  assert not cpu.accelerator_expected()


def test_no_restart_where_jax_runs_on_an_accelerator(tmp_path):
  restarted = _run(tmp_path, "restart", JAX_PLATFORMS="cpu")
  assert restarted["env"] == MALLOC_ENV
  script = tmp_path / "check.py"
  script.write_text("import os\nfrom childtuning_jax import cpu\n"
                    "cpu.accelerator_expected = lambda: True\n"
                    "cpu.restart_keeping_freed_memory()\n"
                    "print(sorted(k for k in os.environ if k.startswith('MALLOC_')))\n")
  env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
  out = subprocess.run([sys.executable, str(script)], env=env, check=True, capture_output=True,
                       text=True).stdout
  assert out.strip() == "[]"  # not restarted: the process ran on with glibc's defaults
