# Fresh machine → everything: `make demo` (the main job) and `make test` (the tests).
# Both create .venv if it is missing and install regionmed into it.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch/torchvision are pinned here (not in pyproject) to the builds this project's
# machines install from local disk; override for another platform, e.g.
#   make test TORCH_SPEC="torch torchvision"
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
REGIONMED_DATA ?= $(abspath ../shared/data)
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export REGIONMED_DATA

.PHONY: install system-deps demo test lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q $(TORCH_SPEC)
	$(BIN)/pip install -q -e '.[test,build,dev]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/regionmed demo --out runs/demo

# The browser test of the web demo drives a real headless Chromium (apt: chromium, chromium-driver).
system-deps:
	bash scripts/system-deps.sh

test: install system-deps
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check src tests benchmarks

bench: install
	$(BIN)/python benchmarks/bench_step.py

clean:
	rm -rf runs .pytest_cache
