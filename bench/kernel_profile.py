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

import bisect
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


def _trace(trace_dir: str):
  files = sorted(Path(trace_dir).rglob("*.xplane.pb"))
  if not files:
    raise RuntimeError(f"the profiler wrote no trace under {trace_dir}")
  return jax.profiler.ProfileData.from_file(str(files[-1]))


def _device_and_host_events(data) -> tuple[list, list, list[str]]:
  """The trace's XLA operations on the device, ``[(start_ns, end_ns, op)]``: on a device
  plane (GPU/TPU) its stream lines' kernels (or, without stream lines, its events that name
  an ``hlo_op``), and without device planes (CPU) the events of the host's threads that
  name an ``hlo_op`` (the runtime's operations); everything else the host's threads did,
  per thread ``[(start_ns, end_ns, name)]``; and the names of the device lines read."""
  has_devices = any(p.name.startswith("/device:") for p in data.planes)
  device, host, read = [], [], []
  for plane in data.planes:
    on_device = plane.name.startswith("/device:")
    lines = list(plane.lines)
    streams = on_device and any(line.name.startswith("Stream") for line in lines)
    for line in lines:
      if streams and not line.name.startswith("Stream"):
        continue  # a device's derived summary lines, which count its kernels again
      thread = []
      end = -1.0  # of the last operation counted on this line: one inside it is not counted
      for event in sorted(line.events, key=lambda e: e.start_ns):
        op = _stat(event, "hlo_op") if on_device or not has_devices else None
        if streams or op is not None:
          if event.start_ns < end:
            continue  # nested in a while loop's operation, already counted
          end = event.start_ns + event.duration_ns
          device.append((event.start_ns, end, str(op if op is not None else event.name)))
          if not read or read[-1] != f"{plane.name} {line.name}":
            read.append(f"{plane.name} {line.name}")
        elif not on_device and event.duration_ns > 0:
          thread.append((event.start_ns, event.start_ns + event.duration_ns, str(event.name)))
      if thread:
        host.append(thread)
  return device, host, read


def traced_op_times(trace_dir: str) -> tuple[dict[str, float], list[str]]:
  """Seconds per XLA operation in the trace written to ``trace_dir`` (the device's
  operations of :func:`_device_and_host_events`), and the names of the lines read."""
  device, _, read = _device_and_host_events(_trace(trace_dir))
  return _seconds_per_op(device), read


def _seconds_per_op(device: list) -> dict[str, float]:
  times: dict[str, float] = collections.defaultdict(float)
  for start, end, op in device:
    times[op] += (end - start) * 1e-9
  return dict(times)


def _self_times(events: list) -> list:
  """One thread's events, ``[(start, end, name)]``, nested as a call stack, cut into the
  spans in which each is the innermost: ``[(start, end, name)]`` (an event's self time)."""
  spans, stack = [], []  # stack: [end, name, start of its current span]

  def close(until):
    while stack and stack[-1][0] <= until:
      end, name, since = stack.pop()
      spans.append((since, end, name))
      if stack:
        stack[-1][2] = end  # the caller is innermost again

  for start, end, name in sorted(events, key=lambda e: (e[0], -e[1])):
    close(start)
    if stack:
      spans.append((stack[-1][2], start, stack[-1][1]))
      end = min(end, stack[-1][0])  # a callee ends with its caller
    stack.append([end, name, start])
  close(float("inf"))
  return [span for span in spans if span[1] > span[0]]


def host_while_idle(device: list, host: list) -> tuple[float, dict[str, tuple[float, float]]]:
  """Where the device waits: the seconds within the traced span of ``device``'s operations
  (first start to last end) in which none ran, and per name of a host event (``host``: per
  thread, its events), the seconds of its self time (not inside a nested event) that fall
  in those gaps, and its self time in all."""
  busy: list[list[float]] = []  # merged, sorted intervals in which some operation ran
  for start, end, _ in sorted(device):
    if busy and start <= busy[-1][1]:
      busy[-1][1] = max(busy[-1][1], end)
    else:
      busy.append([start, end])
  if not busy:
    return 0.0, {}
  first, last = busy[0][0], busy[-1][1]
  starts = [b[0] for b in busy]
  before = [0.0]  # busy time before each interval
  for b in busy:
    before.append(before[-1] + b[1] - b[0])

  def busy_until(t: float) -> float:  # busy time in [first, t)
    i = bisect.bisect_right(starts, t) - 1
    return 0.0 if i < 0 else before[i] + min(t, busy[i][1]) - busy[i][0]

  names: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0.0])
  for thread in host:
    for start, end, name in _self_times(thread):
      s, e = max(start, first), min(end, last)
      names[name][0] += 0.0 if e <= s else ((e - s) - (busy_until(e) - busy_until(s))) * 1e-9
      names[name][1] += (end - start) * 1e-9
  idle_total = (last - first - before[-1]) * 1e-9
  return idle_total, {name: (idle, total) for name, (idle, total) in names.items()}


def kind_of(op: str, kinds: dict[str, str]) -> str:
  """The kind of a traced operation: by its HLO name, or a library GEMM's kernel."""
  if op in kinds:
    return kinds[op]
  return "matmul" if re.search(r"gemm|xmma|cutlass|matmul", op, re.IGNORECASE) else "other"


def profile_kernels(run, hlo_text: str, steps: int, top: int = 8) -> dict:
  """Traces ``run()`` (which runs ``steps`` steps and waits for them) and returns, per step,
  the device's busy seconds, ``{"total_s", "by_kind": {kind: s}, "top": [(op, kind, s)]}``,
  the wall seconds of the traced steps (``wall_s``), the seconds in which the device ran
  nothing between its first and last operation (``idle_s``), and the host's events that
  overlap those gaps most (``host_while_idle``: ``[(name, self seconds in the gaps, self
  seconds)]``: what the device waited for, e.g. the Python dispatch of the next step)."""
  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir):
      start = time.perf_counter()
      run()
      wall = time.perf_counter() - start
    device, host, lines = _device_and_host_events(_trace(trace_dir))
  times = _seconds_per_op(device)
  kinds = kernel_kinds(hlo_text)
  by_kind = dict.fromkeys(KINDS, 0.0)
  for op, seconds in times.items():
    by_kind[kind_of(op, kinds)] += seconds / steps
  ranked = sorted(times.items(), key=lambda item: -item[1])[:top]
  idle, waits = host_while_idle(device, host)
  waiting = sorted(waits.items(), key=lambda item: -item[1][0])[:top]
  return {"total_s": sum(times.values()) / steps, "wall_s": wall / steps, "by_kind": by_kind,
          "ops": len(times), "lines": lines,
          "top": [(op, kind_of(op, kinds), seconds / steps) for op, seconds in ranked],
          "idle_s": idle / steps,
          "host_while_idle": [(name, in_gaps / steps, total / steps)
                              for name, (in_gaps, total) in waiting if in_gaps > 0]}
