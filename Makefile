# mixstack: the two commands of the README (make demo, make test) and their helpers.
# The virtual environment is made once and refreshed when pyproject.toml changes.

PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
# Pinned and installed FIRST: an unpinned torch from the index pulls a multi-GB CUDA build.
TORCH_VERSION := 2.13.0
STAMP := $(VENV)/.mixstack-installed
PYTEST_ARGS ?=
# Test processes (pytest-xdist): one per core; `make test PYTEST_WORKERS=0` runs in-process.
PYTEST_WORKERS ?= auto
# What `make test` adds: every optional integration (not `cuda`, which builds CUDA
# sources), so that no test is skipped for a missing package. `make demo` does without.
EXTRAS := dev,interop,data,eval,cluster
EXTRAS_STAMP := $(VENV)/.mixstack-extras-installed

.PHONY: venv demo test lint clean-venv

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install "torch==$(TORCH_VERSION)"
	$(BIN)/python -m pip install -e '.[dev]'
	touch $(STAMP)

$(EXTRAS_STAMP): $(STAMP)
	$(BIN)/python -m pip install -e '.[$(EXTRAS)]'
	touch $(EXTRAS_STAMP)

# Trains the zoo's MQAR hybrid on the CPU (about a minute, no network), shows progress,
# ends with the accuracy and where the model was saved (runs/demo/model).
demo: venv
	$(BIN)/mixstack train zoo:mqar-tiny --out runs/demo --overwrite

test: $(EXTRAS_STAMP)
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) $(PYTEST_ARGS)

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean-venv:
	rm -rf $(VENV)
