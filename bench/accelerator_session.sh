#!/usr/bin/env bash
# The prepared command for a lent GPU (one `run` of the device tool, about 9 minutes on an
# H100 after start-up): BERT-large's bfloat16 step with --profile, in three runs:
# - batch 32, XLA's default CUDA graphs;
# - batch 32, while loops and conditionals captured in the graphs too (CT-F's per-shape
#   mask loops are while loops, which split its step into about twenty graphs:
#   BENCHMARKS.md, the H100 runs);
# - batch 128 (where the H100's busy time came closest to the issue's 45% MFU, and its
#   idle time was larger).
# The batch-32 runs also time CT-F with its mask loop as it was in the H100 runs (a trip
# per leaf, two per shape now: _random.MASK_LOOP_TRIPS). Each run's table, JSON and log go
# to $OUT; the profile's "Where the device waited" table names the host's work while the
# GPU idles.
#
#   bash bench/accelerator_session.sh                      (on the device: $OUT is set)
#   OUT=/tmp/s PYTHON=.venv/bin/python BENCH_ARGS="--tiny --profile --fisher_size none" \
#     bash bench/accelerator_session.sh                    (a smoke run on the CPU)
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/accelerator_session}
PYTHON=${PYTHON:-python3}
BENCH_ARGS=${BENCH_ARGS:---sizes bert-large --dtypes bfloat16 --profile --fisher_size none}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit,driver_version --format=csv 2>/dev/null

run() {  # run NAME SECONDS "ARGUMENTS" [VAR=value ...]: the benchmark with BENCH_ARGS and
  local name=$1 seconds=$2 arguments=$3  # ARGUMENTS, under those environment variables,
  shift 3                                # stopped after SECONDS (the three fit in 10 min)
  echo "== $name: ${arguments:-no more arguments}; ${*:-the defaults of XLA}"
  # shellcheck disable=SC2086  # BENCH_ARGS and ARGUMENTS are lists of arguments
  env "$@" PYTHONPATH=. timeout "$seconds" "$PYTHON" bench/bench_accelerator.py $BENCH_ARGS \
    $arguments --out "$OUT/$name.json" > "$OUT/$name.log" 2>&1
  echo "exit status $?"
  sed -n '/^Device: /,$p' "$OUT/$name.log"
}

BEFORE="--modes vanilla,CT-F,CT-D,CT-F-trip-per-leaf"
run default_graphs 210 "$BEFORE"
run while_in_graphs 210 "$BEFORE" \
  XLA_FLAGS=--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL
run batch128 170 "--batch_size 128"
