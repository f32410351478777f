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
# COMMA before EXTRAS: `:=` expands at once, so a COMMA defined later is empty ("devgpu").
COMMA := ,
EXTRAS := dev$(if $(HAS_GPU),$(COMMA)gpu)
PYTEST_ARGS ?=
# --- GPU machines -------------------------------------------------------------------------
# torch with CUDA (PyPI's default build); Transformer Engine is then built against it.
GPU_TORCH_SPEC ?= torch
# Transformer Engine, installed the way its README says (TransformerEngine v2.11 README.rst,
# "pip Installation": `pip install --no-build-isolation transformer_engine[pytorch]`), pinned to
# the range of the megatron-core that pip picks for this Python:
# - Python 3.10/3.11 -> megatron-core 0.16.x (0.17+ need Python >= 3.12); its pyproject
#   `dev` extra pins transformer-engine[pytorch,core_cu13]>=2.9.0a0,<2.12.0 (core_v0.16.1).
# - Python >= 3.12 -> megatron-core 0.19; its `te` extra is unpinned and its uv source pins
#   TE commit 4329ff84 (= v2.17.1, core_v0.19.0 pyproject.toml): below 2.18.
PY_VERSION := $(shell $(PYTHON) -c 'import sys; print("%d%02d" % sys.version_info[:2])' 2>/dev/null)
TE_RANGE ?= $(if $(filter 310 311,$(PY_VERSION)),>=2.9.0a0$(COMMA)<2.12.0,>=2.9.0a0$(COMMA)<2.18)
TE_SPEC := transformer_engine[pytorch]$(TE_RANGE)
# TE builds its torch extension against the torch already in the venv (hence no isolation):
# the build tools have to be there first.
TE_BUILD_DEPS := setuptools wheel ninja pybind11 packaging
# vLLM pins an exact torch and would replace the torch TE was built against: it gets its own
# venv, and the vllm rollout engine runs in a child process on that venv's python
# (erpd_megatron/rollout/vllm_engine.py; ERPD_VLLM_PYTHON overrides the path).
VLLM_VENV ?= .venv-vllm
VLLM_SPEC ?= vllm
VLLM_PY := $(VLLM_VENV)/bin/python

.PHONY: install install-vllm gpu-check test lint demo claims bench clean-venv

$(VENV)/.installed: setup.py pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(if $(HAS_GPU),$(PY) -m pip install -q "$(GPU_TORCH_SPEC)" $(TE_BUILD_DEPS),$(PY) -m pip install -q $(TORCH_PIP_ARGS) "$(TORCH_SPEC)")
	$(if $(HAS_GPU),$(PY) -m pip install -q --no-build-isolation "$(TE_SPEC)")
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	$(if $(HAS_GPU),$(MAKE) install-vllm)
	touch $@

install: $(VENV)/.installed

# vLLM in its own venv (see VLLM_VENV above); the project without its dependencies, so that
# the rollout child imports erpd_megatron and vLLM keeps the torch it pinned.
install-vllm: $(VLLM_VENV)/.installed

$(VLLM_VENV)/.installed: setup.py
	test -x $(VLLM_PY) || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install -q --upgrade pip
	$(VLLM_PY) -m pip install -q "$(VLLM_SPEC)" pyyaml
	$(VLLM_PY) -m pip install -q --no-deps -e .
	touch $@

# One Hopper GPU, under 8 minutes: PASS/FAIL per step and a JSON summary (scripts/gpu_check.sh).
gpu-check: install
	bash scripts/gpu_check.sh $(GPU_CHECK_ARGS)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/pytest -q -p no:cacheprovider $(PYTEST_ARGS)

demo: install
	$(VENV)/bin/erpd demo $(DEMO_ARGS)

# The claims over 3 independent seeds (docs/demo_protocol.md): runs/claims/claims.md and
# claims.json, the figures, and the README's results table written from that run.
claims: install
	$(VENV)/bin/erpd demo --seeds 3 output_dir=runs/claims $(CLAIMS_ARGS)
	$(PY) -m erpd_megatron.pipeline.claims runs/claims --readme README.md

bench: install
	$(PY) benchmarks/bench_token_ops.py
	$(PY) benchmarks/bench_cache.py
	$(PY) benchmarks/bench_packing.py
	$(if $(wildcard benchmarks/bench_train_step.py),$(PY) benchmarks/bench_train_step.py)

clean-venv:
	rm -rf $(VENV) $(VLLM_VENV)
