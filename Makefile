# phenoscale — every target sets up what it needs; `make help` lists them.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
export PHENOSCALE_SHARED ?= $(abspath ../shared)
GRID   ?= configs/scaling/cpu.yaml

.PHONY: help install demo lint format test test-fast bench gpu-check scaling clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml tests/azurite/package-lock.json
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -U pip
	$(PY) -m pip install -q -e '.[test]'
	@# Azure's storage emulator (Node.js) for the az:// tests, which are skipped without it
	@if command -v npm >/dev/null; then \
		mkdir -p $(VENV)/azurite && cp tests/azurite/package.json tests/azurite/package-lock.json $(VENV)/azurite/ && \
		npm ci --prefix $(VENV)/azurite --no-audit --no-fund --loglevel=error || \
		{ rm -rf $(VENV)/azurite; echo "Azurite did not install: the az:// tests will be skipped"; }; \
	else echo "npm not found: the az:// tests will be skipped (they need Azurite, an npm package)"; fi
	@touch $(STAMP)

install: $(STAMP)  ## create .venv and install phenoscale with its test extras and Azurite (quick when nothing changed)

demo: install  ## synthesise the demo screen, train MAE / CA-MAE / WSL, evaluate, print the table (runs/demo/)
	$(VENV)/bin/phenoscale demo --out runs/demo

lint: install  ## ruff check and ruff format --check (settings in pyproject.toml); make test runs it first
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: install  ## sort imports and ruff format the tree (what lint's format check asks for)
	$(PY) -m ruff check --fix --select I .
	$(PY) -m ruff format .

test: lint  ## lint, then the whole test suite, slow and DDP tests included
	$(PY) -m pytest -q

test-fast: install  ## tests not marked slow or ddp
	$(PY) -m pytest -q -m "not slow and not ddp"

bench: install  ## CPU speed and memory benchmarks, precision chosen by the hardware -> benchmarks/results/*.json and README.md
	$(PY) -m benchmarks

gpu-check: install  ## on a CUDA machine: the GPU tests, then bf16-mixed speed and MFU of the paper models -> benchmarks/results/gpu.json
	$(PY) -m benchmarks.gpu_check

scaling: install  ## fit and evaluate a grid of model sizes x training crops (GRID=configs/scaling/cpu.yaml)
	$(VENV)/bin/phenoscale scaling $(GRID) --out runs/scaling

clean:  ## remove runs and caches (keeps .venv)
	rm -rf runs .pytest_cache
