# sftkit — two commands on a fresh machine: `make demo` and `make test`.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
TORCH   := torch==2.13.0
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo evidence test test-slow bench clean

setup: $(STAMP)

# torch first, pinned: with nothing installed an unpinned torch would pull a newer CUDA build.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e '.[dev,lora,bench,serve,trackers,gguf]'
	touch $(STAMP)

# base model vs SFT on held-out facts, offline, under 5 minutes on 2 CPU cores -> runs/demo/ (see README)
demo: setup
	$(BIN)/sftkit demo

# the claims about SFT, each a controlled run on the demo base model -> reports/evidence.md (~20 min on 2 CPU cores)
evidence: setup
	$(BIN)/python -m sftkit_demo.evidence

test: setup
	$(BIN)/python -m pytest -q

test-slow: setup
	$(BIN)/python -m pytest -q -m slow

bench: setup
	$(BIN)/python bench/preprocess.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
