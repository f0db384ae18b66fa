# pykernels: `make test` runs the whole test suite, `make bench` the benchmark report. Both set up .venv first
# (idempotent: a second run only rebuilds what changed).

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# pytest workers: both cores of the reference machine
WORKERS ?= 2
PKGS   := torch torchvision triton timm transformers numpy ninja pybind11 setuptools \
          pytest pytest-xdist pytest-benchmark expecttest matplotlib ruff

.PHONY: all setup build test bench info lint clean

all: test

$(VENV)/.deps: constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --progress-bar off -c constraints.txt $(PKGS)
	touch $@

setup: $(VENV)/.deps

# Builds pykernels._C in place (ninja keeps it incremental). PYKERNELS_SKIP_BUILD / PYKERNELS_SKIP_CUDA_BUILD /
# PYKERNELS_CUDA_ARCHS / MAX_JOBS are passed through (see setup.py).
build: setup
	$(PIP) install --no-build-isolation --no-deps -e . 2>&1 | tail -n 3
	$(PY) -m pykernels info

test: build
	$(PY) -m pytest tests -n $(WORKERS) --dist loadgroup -q

bench: build
	$(PY) -m pytest bench --benchmark-only --benchmark-json=bench/results/latest.raw.json -q
	$(PY) bench/report.py bench/results/latest.raw.json

info: build
	$(PY) -m pykernels info

lint: setup
	$(PY) -m ruff check .

clean:
	rm -rf build *.egg-info pykernels/_C*.so .pytest_cache
