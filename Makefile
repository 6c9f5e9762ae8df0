# Set-up is part of every target: the virtual environment is created and filled when missing.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

# The oldest transformers gere supports; `make test-compat` runs the trainer tests against it.
COMPAT_VENV ?= .venv-compat
COMPAT_TRANSFORMERS ?= 5.0.0

# LLaMA-Factory pins its own transformers / peft / trl / datasets; `make test-lf` tests gere-lf beside them.
LF_VENV ?= .venv-lf
LF_VERSION ?= 0.9.5

.PHONY: install demo test test-compat test-lf lint bench

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
	$(COMPAT_VENV)/bin/python -m pytest -q tests/test_trainer.py tests/test_trl_trainer.py tests/test_runner.py

# LLaMA-Factory's requirements without torch / torchaudio / torchvision (tests_lf/requirements.txt): the
# CPU torch pin stays, and tests_lf/stubs stands in for torchaudio, which PyPI has for no CPU torch 2.13.
$(LF_VENV)/.installed: pyproject.toml tests_lf/requirements.txt
	$(PYTHON) -m venv $(LF_VENV)
	$(LF_VENV)/bin/pip install -q --upgrade pip
	$(LF_VENV)/bin/pip install -q torch==2.13.0
	$(LF_VENV)/bin/pip install -q --no-deps 'llamafactory==$(LF_VERSION)'
	$(LF_VENV)/bin/pip install -q -r tests_lf/requirements.txt 'torch==2.13.0'
	$(LF_VENV)/bin/pip install -q --no-deps -e .
	touch $@

test-lf: $(LF_VENV)/.installed
	PYTHONPATH=tests_lf/stubs $(LF_VENV)/bin/python -m pytest -q -p no:cacheprovider tests_lf

lint: install
	$(BIN)/ruff check src tests benchmarks

bench: install
	$(BIN)/python benchmarks/bench_engine.py
	# fp32 against bf16 autocast training steps and one evaluation, on the demo's model (needs its assets: make demo)
	$(BIN)/python benchmarks/bench_precision.py
	$(BIN)/python benchmarks/bench_eval.py
	$(BIN)/python benchmarks/bench_weights.py
