# mixstack: the two commands of the README (make demo, make test) and their helpers.
# The virtual environment is made once and refreshed when pyproject.toml changes.

PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
# Pinned and installed FIRST: an unpinned torch from the index pulls a multi-GB CUDA build.
TORCH_VERSION := 2.13.0
STAMP := $(VENV)/.mixstack-installed
PYTEST_ARGS ?=

.PHONY: venv demo test lint clean-venv

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install "torch==$(TORCH_VERSION)"
	$(BIN)/python -m pip install -e '.[dev]'
	touch $(STAMP)

demo: venv
	$(BIN)/mixstack info zoo:transformer-tiny

test: venv
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean-venv:
	rm -rf $(VENV)
