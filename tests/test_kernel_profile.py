"""bench/kernel_profile.py: the kind of every operation of an optimized HLO module, and the
device time per kind read back from a JAX profiler trace."""

import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import kernel_profile  # noqa: E402

# The forms a GPU module has and a CPU one lacks: a cuBLAS custom call, a Triton GEMM
# fusion, a while loop whose body calls a hashing fusion, a tuple-typed computation header
# with an /*index=5*/ comment, and an element-wise fusion.
GPU_MODULE = """\
HloModule jit_step, is_scheduled=true

%fused_hash (param_0: u32[8], param_1: u32[]) -> u32[8] {
  %param_0 = u32[8]{0} parameter(0)
  %param_1 = u32[] parameter(1)
  %broadcast.1 = u32[8]{0} broadcast(%param_1), dimensions={}
  %shift-right-logical.1 = u32[8]{0} shift-right-logical(%param_0, %broadcast.1)
  ROOT %xor.1 = u32[8]{0} xor(%param_0, %shift-right-logical.1)
}

%body (arg_tuple.6: (s32[], u32[8], u32[], u32[], u32[], /*index=5*/u32[])) -> (s32[], u32[8], u32[], u32[], u32[], /*index=5*/u32[]) {
  %arg_tuple.6 = (s32[], u32[8], u32[], u32[], u32[], /*index=5*/u32[]) parameter(0)
  %gte.1 = u32[8]{0} get-tuple-element(%arg_tuple.6), index=1
  %gte.2 = u32[] get-tuple-element(%arg_tuple.6), index=2
  %loop_xor_fusion = u32[8]{0} fusion(%gte.1, %gte.2), kind=kLoop, calls=%fused_hash
  %wrapped_add = s32[] fusion(%gte.2), kind=kLoop, calls=%wrapped_add_computation
  ROOT %tuple.1 = (s32[], u32[8], u32[], u32[], u32[], /*index=5*/u32[]) tuple(%wrapped_add, %loop_xor_fusion, %gte.2, %gte.2, %gte.2, %gte.2)
}

%wrapped_add_computation (param_0.1: u32[]) -> s32[] {
  %param_0.1 = u32[] parameter(0)
  ROOT %convert.1 = s32[] convert(%param_0.1)
}

%condition (arg_tuple.7: (s32[], u32[8], u32[], u32[], u32[], /*index=5*/u32[])) -> pred[] {
  %arg_tuple.7 = (s32[], u32[8], u32[], u32[], u32[], /*index=5*/u32[]) parameter(0)
  ROOT %constant.1 = pred[] constant(false)
}

%gemm_fusion_dot.1_computation (p0: bf16[8,8], p1: bf16[8,8]) -> bf16[8,8] {
  %p0 = bf16[8,8]{1,0} parameter(0)
  %p1 = bf16[8,8]{1,0} parameter(1)
  ROOT %dot.1 = bf16[8,8]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%fused_gelu (p0.2: f32[8,8]) -> f32[8,8] {
  %p0.2 = f32[8,8]{1,0} parameter(0)
  ROOT %tanh.1 = f32[8,8]{1,0} tanh(%p0.2)
}

ENTRY %main (a: bf16[8,8], b: f32[8,8], t: (s32[], u32[8], u32[], u32[], u32[], /*index=5*/u32[])) -> f32[8,8] {
  %a = bf16[8,8]{1,0} parameter(0)
  %b = f32[8,8]{1,0} parameter(1)
  %t = (s32[], u32[8], u32[], u32[], u32[], /*index=5*/u32[]) parameter(2)
  %custom-call.3 = (f32[8,8]{1,0}, s8[1024]{0}) custom-call(%b, %b), custom_call_target="__cublas$gemm", backend_config={}
  %gemm_fusion_dot.1 = bf16[8,8]{1,0} fusion(%a, %a), kind=kCustom, calls=%gemm_fusion_dot.1_computation
  %while.24 = (s32[], u32[8], u32[], u32[], u32[], /*index=5*/u32[]) while(%t), condition=%condition, body=%body
  ROOT %loop_tanh_fusion = f32[8,8]{1,0} fusion(%b), kind=kLoop, calls=%fused_gelu
}
"""


def test_kinds_of_a_gpu_module():
  kinds = kernel_profile.kernel_kinds(GPU_MODULE)
  assert kinds["custom-call.3"] == "matmul"  # the cuBLAS call
  assert kinds["gemm_fusion_dot.1"] == "matmul"  # a fusion holding a dot
  assert kinds["loop_xor_fusion"] == "random bits"
  assert kinds["while.24"] == "random bits"  # through its body's fusion
  assert kinds["wrapped_add"] == "other"  # inside the loop's body, but no hash itself
  assert kinds["loop_tanh_fusion"] == "other"
  # A GPU trace names kernels with underscores, and cuBLAS's own kernels by their library.
  assert kernel_profile.kind_of("gemm_fusion_dot_1", kinds) == "matmul"
  assert kernel_profile.kind_of("custom_call_3", kinds) == "matmul"
  assert kernel_profile.kind_of("sm90_xmma_gemm_bf16bf16_bf16f32", kinds) == "matmul"
  assert kernel_profile.kind_of("MemcpyD2H", kinds) == "other"


def test_profile_of_a_compiled_function_on_this_backend():
  """A large matmul and a Bernoulli draw and a cheap element-wise op: the trace finds the
  operations, sorts them by kind, and the matmul's time is the largest."""
  def f(x, key):
    keep = jax.random.bernoulli(key, 0.3, x.shape[:1])  # one draw per row: cheap
    return jnp.where(keep[:, None], jnp.tanh(x @ x), 0.0)

  x, key = jnp.ones((768, 768)), jax.random.key(0)
  compiled = jax.jit(f).lower(x, key).compile()
  kinds = kernel_profile.kernel_kinds(compiled.as_text())
  assert {"matmul", "random bits", "other"} <= set(kinds.values())
  compiled(x, key).block_until_ready()

  def run():
    for _ in range(3):
      compiled(x, key).block_until_ready()

  profile = kernel_profile.profile_kernels(run, compiled.as_text(), steps=3)
  assert profile["by_kind"]["matmul"] > 0 and profile["by_kind"]["random bits"] > 0
  assert sum(profile["by_kind"].values()) == pytest.approx(profile["total_s"])
  assert profile["top"][0][1] == "matmul"  # 2·768³ multiply-adds outweigh the rest
  assert 0 < profile["total_s"] and 0 < profile["wall_s"]
  assert profile["ops"] >= 3 and profile["lines"]


def test_host_while_idle_counts_self_time_in_the_gaps_between_device_operations():
  """Device operations at [0, 10) and [5, 20) (overlapping: one busy span), [30, 40) and
  [50, 60): 20 ns idle between them. On one thread, "step" at [15, 58) calls "dispatch" at
  [22, 28), which calls "parse" at [25, 26): "step" is innermost in [15, 22) and [28, 58),
  14 ns of it in the gaps; "dispatch" 5 ns, "parse" 1 ns, both in a gap. An event on another
  thread before the first operation spends none of its time in the gaps."""
  device = [(0, 10, "a"), (5, 20, "b"), (30, 40, "c"), (50, 60, "d")]
  host = [[(15, 58, "step"), (22, 28, "dispatch"), (25, 26, "parse")], [(-30, -5, "before")]]
  idle, names = kernel_profile.host_while_idle(device, host)
  assert idle == pytest.approx(20e-9)
  assert names["step"] == pytest.approx((14e-9, 37e-9))
  assert names["dispatch"] == pytest.approx((5e-9, 5e-9))
  assert names["parse"] == pytest.approx((1e-9, 1e-9))
  assert names["before"] == pytest.approx((0.0, 25e-9))
  assert kernel_profile.host_while_idle([], host) == (0.0, {})


def test_profile_names_the_host_work_the_device_waits_for():
  """Between steps the host sleeps 30 ms inside a trace annotation: the device idles about
  that long per step, and the sleep is the host event whose self time overlaps the gaps
  most (the Python tracer's event for it, or the annotation where Python is not traced)."""
  x = jnp.ones((256, 256))
  compiled = jax.jit(lambda x: jnp.tanh(x @ x)).lower(x).compile()
  compiled(x).block_until_ready()

  def run():
    for _ in range(4):
      compiled(x).block_until_ready()
      with jax.profiler.TraceAnnotation("host work"):
        time.sleep(0.03)

  profile = kernel_profile.profile_kernels(run, compiled.as_text(), steps=4)
  name, in_gaps, total = profile["host_while_idle"][0]
  assert name in ("$time sleep", "host work")
  assert total == pytest.approx(0.03, rel=0.5)
  # 3 of the 4 sleeps lie between device operations (the last one after them all)
  assert 0.75 * 0.03 * 3 / 4 <= in_gaps <= total
  assert profile["idle_s"] >= in_gaps
