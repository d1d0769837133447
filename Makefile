# peftcli — the two commands a newcomer needs are `make demo` and `make test`.
PYTHON      ?= python3
VENV        ?= .venv
# A CPU wheel keeps setup fast here; on a GPU machine use e.g. `make setup TORCH_SPEC=torch`.
TORCH_SPEC  ?= torch==2.13.0
BIN         := $(VENV)/bin
STAMP       := $(VENV)/.peftcli-installed
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup demo test test-all bench lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[test]" "$(TORCH_SPEC)"
	touch $(STAMP)

demo: setup
	$(BIN)/peftcli train recipes/quickstart.yaml --overwrite
	$(BIN)/peftcli eval runs/quickstart --compare-base

test: setup
	$(BIN)/python -m pytest -q

test-all: setup
	$(BIN)/python -m pytest -q -m ""

# Training benchmark: peftcli vs TRL SFTTrainer vs a plain transformers Trainer (bench/results/).
# `make bench BENCH_ARGS=--gpu` for the GPU variant; `BENCH_ARGS=--quick` for a smoke run.
BENCH_STAMP := $(VENV)/.peftcli-bench-installed
$(BENCH_STAMP): $(STAMP)
	$(BIN)/pip install --quiet -e ".[bench]" "$(TORCH_SPEC)"
	touch $(BENCH_STAMP)

bench: setup $(BENCH_STAMP)
	$(BIN)/python bench/bench_train.py $(BENCH_ARGS)

lint: setup
	$(BIN)/ruff check peftcli tests
	$(BIN)/ruff format --check peftcli tests

clean:
	rm -rf runs build *.egg-info
