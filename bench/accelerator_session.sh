#!/usr/bin/env bash
# The prepared command for a lent GPU (one `run` of the device tool, about 6 minutes on an
# H100 after start-up): BERT-large's bfloat16 step (vanilla, CT-F, CT-D) with --profile,
# first with XLA's default CUDA graphs, then with while loops and conditionals captured in
# them too (CT-F's per-shape mask loops are while loops, which split its step into about
# twenty graphs: BENCHMARKS.md, the H100 runs; they had a trip per leaf then, two now:
# _random.MASK_LOOP_TRIPS). Each run's table, JSON and log go to $OUT;
# the profile's "Where the device waited" table names the host's work while the GPU idles.
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

run() {  # run NAME [VAR=value ...]: the benchmark under those environment variables
  local name=$1
  shift
  echo "== $name: ${*:-the defaults of XLA}"
  # shellcheck disable=SC2086  # BENCH_ARGS is a list of arguments
  env "$@" PYTHONPATH=. timeout 280 "$PYTHON" bench/bench_accelerator.py $BENCH_ARGS \
    --out "$OUT/$name.json" > "$OUT/$name.log" 2>&1
  echo "exit status $?"
  sed -n '/^Device: /,$p' "$OUT/$name.log"
}

run default_graphs
run while_in_graphs \
  XLA_FLAGS=--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL
