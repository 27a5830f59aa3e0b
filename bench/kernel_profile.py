"""Where a compiled step spends its device time, by kind of kernel, from a JAX profiler trace.

``profile_kernels(run, hlo_text)`` traces ``run()`` (some steps of one compiled function),
reads the trace back with ``jax.profiler.ProfileData`` and sums the time of every XLA
operation it executed (GPU/TPU: the kernels on the device's streams; CPU: the operations
the runtime's threads ran), per operation and per kind:

* ``matmul``: a dot or convolution, a library GEMM (cuBLAS custom call) or a fusion holding one;
* ``random bits``: a fusion of integer mixing (xor and logical shifts: a counter-based
  generator such as threefry or CT-F's mask hash; dropout's random numbers fall here too);
* ``other``: everything else (element-wise, reductions, copies, the optimizer's update).

The kinds come from the optimized HLO (``compiled.as_text()``): what each operation, and
the computations it calls, contain. It needs only jax.
"""

from __future__ import annotations

import collections
import re
import tempfile
import time
from pathlib import Path

import jax

KINDS = ("matmul", "random bits", "other")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*.*?\s([a-z][\w\-]*)\(")
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")  # unindented, opens a body
_CALLS = re.compile(r"\b(?:calls|to_apply|body|condition|branch_computations|called_computations)"
                    r"=(\{[^}]*\}|%?[\w.\-]+)")
_GEMM_TARGET = re.compile(r'custom_call_target="[^"]*(gemm|cublas|matmul)[^"]*"', re.IGNORECASE)


def kernel_kinds(hlo_text: str) -> dict[str, str]:
  """``{instruction name: kind}`` for every instruction of an optimized HLO module (each
  name also spelled as a GPU kernel is, with underscores for dots and dashes)."""
  opcodes: dict[str, set] = collections.defaultdict(set)  # computation -> opcodes inside
  calls: dict[str, set] = collections.defaultdict(set)    # computation -> computations called
  instructions: dict[str, tuple[str, set, bool]] = {}     # name -> (opcode, called, gemm target)
  computation = None
  for line in hlo_text.splitlines():
    if match := _COMPUTATION.match(line):
      computation = match.group(1)
      continue
    if not (match := _INSTRUCTION.match(line)):
      continue
    name, opcode = match.groups()
    called = {c.strip(" {}%") for group in _CALLS.findall(line) for c in group.split(",")}
    called.discard("")
    instructions[name] = (opcode, called, bool(_GEMM_TARGET.search(line)))
    if computation is not None:
      opcodes[computation].add(opcode)
      calls[computation] |= called

  def inside(computations: set, seen: set | None = None) -> set:
    seen = set() if seen is None else seen
    found = set()
    for c in computations - seen:
      seen.add(c)
      found |= opcodes[c] | inside(calls[c], seen)
    return found

  kinds = {}
  for name, (opcode, called, gemm) in instructions.items():
    ops = {opcode} | inside(called)
    if gemm or ops & {"dot", "convolution"}:
      kinds[name] = "matmul"
    elif "xor" in ops and "shift-right-logical" in ops:
      kinds[name] = "random bits"
    else:
      kinds[name] = "other"
  for name, kind in list(kinds.items()):  # a GPU kernel spells loop_add_fusion.2 loop_add_fusion_2
    kinds.setdefault(name.replace(".", "_").replace("-", "_"), kind)
  return kinds


def _stat(event, name: str):
  for key, value in event.stats:
    if key == name:
      return value
  return None


def traced_op_times(trace_dir: str) -> tuple[dict[str, float], list[str]]:
  """Seconds per XLA operation in the trace written to ``trace_dir``: on a device plane
  (GPU/TPU) its stream lines' kernels, otherwise the host threads' events that name an
  ``hlo_op`` (the CPU runtime's operations); and the names of the lines read."""
  files = sorted(Path(trace_dir).rglob("*.xplane.pb"))
  if not files:
    raise RuntimeError(f"the profiler wrote no trace under {trace_dir}")
  data = jax.profiler.ProfileData.from_file(str(files[-1]))
  planes = [p for p in data.planes if p.name.startswith("/device:")] or list(data.planes)
  times: dict[str, float] = collections.defaultdict(float)
  read = []
  for plane in planes:
    lines = list(plane.lines)
    streams = [line for line in lines if line.name.startswith("Stream")]
    for line in streams or lines:  # not the derived summary lines, which count again
      end = -1.0  # of the last operation counted on this line: one inside it is not counted
      for event in sorted(line.events, key=lambda e: e.start_ns):
        op = _stat(event, "hlo_op")
        if (op is None and not streams) or event.start_ns < end:
          continue  # a host event that is no XLA operation, or one nested in a while loop's
        end = event.start_ns + event.duration_ns
        if not read or read[-1] != f"{plane.name} {line.name}":
          read.append(f"{plane.name} {line.name}")
        times[str(op if op is not None else event.name)] += event.duration_ns * 1e-9
  return dict(times), read


def kind_of(op: str, kinds: dict[str, str]) -> str:
  """The kind of a traced operation: by its HLO name, or a library GEMM's kernel."""
  if op in kinds:
    return kinds[op]
  return "matmul" if re.search(r"gemm|xmma|cutlass|matmul", op, re.IGNORECASE) else "other"


def profile_kernels(run, hlo_text: str, steps: int, top: int = 8) -> dict:
  """Traces ``run()`` (which runs ``steps`` steps and waits for them) and returns, per step,
  the device's busy seconds, ``{"total_s", "by_kind": {kind: s}, "top": [(op, kind, s)]}``,
  and the wall seconds of the traced steps (``wall_s``)."""
  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir):
      start = time.perf_counter()
      run()
      wall = time.perf_counter() - start
    times, lines = traced_op_times(trace_dir)
  kinds = kernel_kinds(hlo_text)
  by_kind = dict.fromkeys(KINDS, 0.0)
  for op, seconds in times.items():
    by_kind[kind_of(op, kinds)] += seconds / steps
  ranked = sorted(times.items(), key=lambda item: -item[1])[:top]
  return {"total_s": sum(times.values()) / steps, "wall_s": wall / steps, "by_kind": by_kind,
          "ops": len(times), "lines": lines,
          "top": [(op, kind_of(op, kinds), seconds / steps) for op, seconds in ranked]}
