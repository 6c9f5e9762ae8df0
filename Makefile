# Set-up is part of every target: the virtual environment is created and filled when missing.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

# The oldest transformers gere supports; `make test-compat` runs the trainer tests against it.
COMPAT_VENV ?= .venv-compat
COMPAT_TRANSFORMERS ?= 5.0.0

.PHONY: install demo test test-compat lint bench

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# CPU build of torch for this machine; users elsewhere may install any supported torch (>=2.4).
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev,demo]'
	touch $@

install: $(BIN)/.installed

demo: install
	$(BIN)/gere demo

test: install
	$(BIN)/python -m pytest -q

$(COMPAT_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(COMPAT_VENV)
	$(COMPAT_VENV)/bin/pip install -q --upgrade pip
	$(COMPAT_VENV)/bin/pip install -q torch==2.13.0
	$(COMPAT_VENV)/bin/pip install -q -e '.[dev]' 'transformers==$(COMPAT_TRANSFORMERS)'
	touch $@

test-compat: $(COMPAT_VENV)/.installed
	$(COMPAT_VENV)/bin/python -m pytest -q tests/test_gere_trainer.py tests/test_trl.py tests/test_runner.py

lint: install
	$(BIN)/ruff check src tests benchmarks

bench: install
	$(BIN)/python benchmarks/bench_engine.py
