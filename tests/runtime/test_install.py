"""The Makefile's install recipe, expanded with `make -n` (nothing is installed).

A temporary VENV path makes make print the recipe instead of finding `.venv/.installed`
up to date; HAS_GPU is forced on and off from the command line.
"""

from __future__ import annotations

import importlib.metadata
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="GNU make is not installed")


def _dry_run(tmp_path: Path, has_gpu: str) -> list[str]:
    out = subprocess.run(
        [
            "make",
            "-n",
            "--no-print-directory",
            "-C",
            str(ROOT),
            f"VENV={tmp_path / 'venv'}",
            f"VLLM_VENV={tmp_path / 'venv-vllm'}",
            f"HAS_GPU={has_gpu}",
            f"PYTHON={sys.executable}",
            "install",
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    return [line.strip() for line in out.splitlines() if line.strip()]


def _megatron_te_range() -> str:
    """The Transformer Engine range that the installed megatron-core declares (its extras)."""
    reqs = importlib.metadata.requires("megatron-core") or []
    te = [r for r in reqs if r.lower().replace("_", "-").startswith("transformer-engine")]
    assert te, f"megatron-core declares no transformer-engine requirement: {reqs}"
    spec = te[0].split(";")[0]
    return (
        spec[spec.index("]") + 1 :].strip() if "]" in spec else spec.split("transformer-engine")[1]
    )


def test_gpu_install_recipe(tmp_path):
    lines = _dry_run(tmp_path, "1")
    project = [line for line in lines if "-e " in line and "--no-deps" not in line]
    assert len(project) == 1 and '".[dev,gpu]"' in project[0], lines  # not ".[devgpu]"
    te = [line for line in lines if "transformer_engine[pytorch]" in line]
    assert len(te) == 1 and "--no-build-isolation" in te[0], lines
    # the pin is the range of the installed megatron-core (0.16.1: >=2.9.0a0,<2.12.0)
    pin = re.search(r'transformer_engine\[pytorch\]([^"]*)"', te[0]).group(1)
    assert sorted(pin.split(",")) == sorted(_megatron_te_range().split(",")), (
        pin,
        _megatron_te_range(),
    )
    # torch and TE's build tools first, then TE against that torch, then the project
    torch_i = next(i for i, line in enumerate(lines) if '"torch"' in line and "ninja" in line)
    assert torch_i < lines.index(te[0]) < lines.index(project[0])
    assert not any("torch==2.13.0" in line for line in lines)
    # vLLM only in its own venv, with the project but without its dependencies
    vllm = [line for line in lines if '"vllm"' in line]
    assert vllm and all("venv-vllm/bin/python" in line for line in vllm), lines
    assert any("venv-vllm/bin/python -m pip install -q --no-deps -e ." in line for line in lines)


def test_cpu_install_recipe(tmp_path):
    lines = _dry_run(tmp_path, "")
    assert any('"torch==2.13.0"' in line for line in lines), lines
    assert any('-e ".[dev]"' in line for line in lines), lines
    assert not any("transformer_engine" in line or "vllm" in line for line in lines), lines
