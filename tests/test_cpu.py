"""childtuning_jax.cpu: the restart sets malloc_env(); under MALLOC_ENV_NO_MMAP XLA's
temporaries are reused instead of being page-faulted in afresh on every call, under
MALLOC_ENV the peak stays at one block."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from childtuning_jax.cpu import (MALLOC_ENV, MALLOC_ENV_NO_MMAP, MALLOC_VARIABLES,
                                 huge_pages_on_request, malloc_env)

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")

# A script that restarts itself with malloc_env() when asked, then times a jitted function
# with one 64 MiB temporary (x @ w1) and a 4 MiB output; it prints its MALLOC_ variables
# and GLIBC_TUNABLES, the minor page faults of each of 20 calls and the peak resident set
# after each.
SCRIPT = textwrap.dedent("""
    import json, os, resource, sys
    if __name__ == "__main__" and sys.argv[1] == "restart":
      from childtuning_jax.cpu import restart_keeping_freed_memory
      restart_keeping_freed_memory()
    import jax, jax.numpy as jnp, numpy as np
    from childtuning_jax.cpu import peak_rss_mib
    f = jax.jit(lambda x, w1, w2: (x @ w1) @ w2)
    if sys.argv[2:] == ["big"]:  # a 512 MiB temporary, a 512 KiB output
      x, w1, w2 = jnp.ones((16384, 8)), jnp.ones((8, 8192)) / 8, jnp.ones((8192, 8)) / 8192
    else:
      x, w1, w2 = jnp.ones((4096, 256)), jnp.ones((256, 4096)) / 256, jnp.ones((4096, 256)) / 4096
    faults, peaks = [], []
    for i in range(20):
      before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
      jax.block_until_ready(f(x, w1, w2))
      faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
      junk = [bytearray(1000) for _ in range(2000)]  # small requests between calls
      peaks.append(peak_rss_mib())
    print(json.dumps({"env": {k: v for k, v in os.environ.items()
                              if k.startswith("MALLOC_") or k == "GLIBC_TUNABLES"},
                      "faults": faults, "peak_mib": peaks}))
""")
TEMPORARY_PAGES = 4096 * 4096 * 4 // 4096


def _run(tmp_path, mode, *args, **env):
  script = tmp_path / "script.py"
  script.write_text(SCRIPT)
  env = {**{k: v for k, v in os.environ.items() if k not in MALLOC_VARIABLES}, **env,
         "XLA_FLAGS": ""}
  out = subprocess.run([sys.executable, str(script), mode, *args], env=env, check=True,
                       capture_output=True, text=True).stdout
  return json.loads(out.strip().splitlines()[-1])


def test_restart_sets_malloc_env_and_it_keeps_one_block_at_the_peak(tmp_path):
  default, restarted = _run(tmp_path, "plain"), _run(tmp_path, "restart")
  assert default["env"] == {} and restarted["env"] == malloc_env()
  steady = _run(tmp_path, "plain", "big", **MALLOC_ENV)
  assert steady["env"] == MALLOC_ENV
  # The 512 MiB temporary is mapped and returned at every call: after the third call the
  # peak grows by less than half of it (a second block would add all of it).
  assert steady["peak_mib"][-1] - steady["peak_mib"][2] < 256, steady


def test_without_mapping_the_temporaries_are_reused(tmp_path):
  default = _run(tmp_path, "plain")
  reused = _run(tmp_path, "plain", **MALLOC_ENV_NO_MMAP)
  # After two warm-up calls. glibc's defaults: the 64 MiB temporary is mapped afresh on
  # every call...
  default_faults, reused_faults = sum(default["faults"][2:]), sum(reused["faults"][2:])
  assert default_faults > 18 * TEMPORARY_PAGES * 0.9, default
  # ...without mmap it is reused, once the heap has found its layout (a few calls).
  assert reused_faults < default_faults / 2, reused


def test_malloc_env_asks_for_huge_pages_only_where_glibc_and_the_kernel_give_them(monkeypatch):
  from childtuning_jax import cpu

  assert huge_pages_on_request("2.35", "[always] madvise never")
  assert huge_pages_on_request("2.40", "always [madvise] never")
  assert not huge_pages_on_request("2.34", "[always] madvise never")
  assert not huge_pages_on_request("2.36", "always madvise [never]")
  assert not huge_pages_on_request("1.99", "[always] madvise never")
  monkeypatch.setattr(cpu, "huge_pages_on_request", lambda: True)
  assert cpu.malloc_env() is MALLOC_ENV
  monkeypatch.setattr(cpu, "huge_pages_on_request", lambda: False)
  assert cpu.malloc_env() is MALLOC_ENV_NO_MMAP
  monkeypatch.undo()
  monkeypatch.setattr(cpu, "TRANSPARENT_HUGEPAGE", cpu.Path("/nonexistent/enabled"))
  assert not cpu.huge_pages_on_request("2.36")  # no such setting: no huge pages


def test_a_malloc_setting_of_the_user_is_kept(tmp_path):
  result = _run(tmp_path, "restart", MALLOC_ARENA_MAX="4")
  assert result["env"] == {"MALLOC_ARENA_MAX": "4"}
  result = _run(tmp_path, "restart", GLIBC_TUNABLES="glibc.malloc.tcache_count=0")
  assert result["env"] == {"GLIBC_TUNABLES": "glibc.malloc.tcache_count=0"}


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
  assert restarted["env"] == malloc_env()
  script = tmp_path / "check.py"
  script.write_text("import os\nfrom childtuning_jax import cpu\n"
                    "cpu.accelerator_expected = lambda: True\n"
                    "cpu.restart_keeping_freed_memory()\n"
                    "print(sorted(k for k in os.environ if k in cpu.MALLOC_VARIABLES))\n")
  env = {k: v for k, v in os.environ.items() if k not in MALLOC_VARIABLES}
  out = subprocess.run([sys.executable, str(script)], env=env, check=True, capture_output=True,
                       text=True).stdout
  assert out.strip() == "[]"  # not restarted: the process ran on with glibc's defaults
