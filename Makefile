# Set-up and entry points. `make demo` and `make test` work on a fresh machine:
# they create .venv, install the project, and run.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch: on a machine without a GPU take the CPU build (2.13.0 is the CPU wheel on this
# machine's disk; elsewhere set TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu").
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
TORCH_SPEC ?= torch==2.13.0
TORCH_PIP_ARGS ?=
EXTRAS := dev$(if $(HAS_GPU),$(COMMA)gpu)
COMMA := ,
PYTEST_ARGS ?=

.PHONY: install test lint demo bench clean-venv

$(VENV)/.installed: setup.py pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(if $(HAS_GPU),,$(PY) -m pip install -q $(TORCH_PIP_ARGS) "$(TORCH_SPEC)")
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	touch $@

install: $(VENV)/.installed

lint: install
	$(VENV)/bin/ruff check .

test: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pytest -q -p no:cacheprovider $(PYTEST_ARGS)

demo: install
	$(VENV)/bin/erpd demo $(DEMO_ARGS)

bench: install
	$(PY) benchmarks/bench_token_ops.py
	$(PY) benchmarks/bench_cache.py
	$(if $(wildcard benchmarks/bench_train_step.py),$(PY) benchmarks/bench_train_step.py)

clean-venv:
	rm -rf $(VENV)
