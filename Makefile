# pykernels: `make test` runs the whole test suite, `make bench` the benchmark report. Both set up .venv first
# (idempotent: a second run only rebuilds what changed).

SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# pytest workers: both cores of the reference machine
WORKERS ?= 2
PKGS   := torch torchvision triton timm transformers numpy ninja pybind11 setuptools \
          pytest pytest-xdist pytest-benchmark expecttest matplotlib ruff

.PHONY: all setup build test unit gpu-check gpu-bench fuzz coverage bench info lint clean

all: test

$(VENV)/.deps: constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --progress-bar off -c constraints.txt $(PKGS)
	touch $@

setup: $(VENV)/.deps

# `pip install --no-build-isolation -e .` registers the package once (pure Python); the extension pykernels._C is
# then built in place by `setup.py build_ext --inplace`, whose ninja build in build/ is incremental (pip's editable
# build would recompile everything in a fresh temporary folder each time). PYKERNELS_SKIP_BUILD /
# PYKERNELS_SKIP_CUDA_BUILD / PYKERNELS_CUDA_ARCHS / MAX_JOBS are passed through (see setup.py).
$(VENV)/.installed: $(VENV)/.deps setup.py
	PYKERNELS_SKIP_BUILD=1 $(PIP) install --no-build-isolation --no-deps -e .
	touch $@

build: $(VENV)/.installed
	$(PY) setup.py build_ext --inplace
	$(PY) -m pykernels info

test: unit gpu-check

unit: build
	$(PY) -m pytest tests -n $(WORKERS) -q --ignore=tests/gpu_check

# Ahead-of-time compile of every Triton kernel for sm_80 / sm_90 (no GPU needed; fails on spills / shared memory)
gpu-check: build
	PYKERNELS_GPU_CHECK=1 $(PY) -m pytest tests/gpu_check -n $(WORKERS) -q

# Differential fuzzing, the long run (make test runs 6 cases per op and backend): seeded random configurations of every
# op and backend against float64 oracles, forward and every gradient
FUZZ_CASES ?= 400
fuzz: build
	PYKERNELS_FUZZ_CASES=$(FUZZ_CASES) $(PY) -m pytest tests/test_fuzz.py -n $(WORKERS) -q

# Hugging Face layer types vs swap (reads ../shared/seeds/000_5b8ca7d65ec66c80.txt) -> docs/coverage.md
coverage: build
	$(PY) -m pykernels coverage --out docs/coverage.md

# One progress line per case; bench/conftest.py runs bench/report.py at the end (same as `pytest --benchmark-only`)
bench: build
	$(PY) -m pytest bench --benchmark-only --benchmark-json=bench/results/latest.raw.json -q

# On a lent GPU machine (torch >= 2.11 + Triton >= 3.6 installed, no network, no venv): build for its arch, check every
# GPU kernel there, benchmark, write bench/results/<gpu>.{md,json,png} within 8 minutes (bench/gpu_bench.py)
GPU_PYTHON ?= python3
gpu-bench:
	$(GPU_PYTHON) bench/gpu_bench.py

info: build
	$(PY) -m pykernels info

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

clean:
	rm -rf build *.egg-info pykernels/_C*.so .pytest_cache
