"""One place that writes a benchmark script's own section of BENCHMARKS.md (stdlib only:
bench_accelerator.py runs where the trainer's packages are not installed)."""

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def update_benchmarks_md(section, backend, name="bench_core", title="Core library"):
  """Replaces the script's own marked section of BENCHMARKS.md (appends it the first time)."""
  path = ROOT / "BENCHMARKS.md"
  start, end = f"<!-- {name}:{backend}:start -->", f"<!-- {name}:{backend}:end -->"
  text = path.read_text() if path.exists() else "# Benchmarks\n"
  block = f"{start}\n{section}{end}"
  if start in text:
    text = text[:text.index(start)] + block + text[text.index(end) + len(end):]
  else:
    text = text.rstrip("\n") + f"\n\n## {title} ({backend})\n\n{block}\n"
  path.write_text(text)
