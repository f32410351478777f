"""Stage 1's in-training held-out eval refuses to start vLLM next to the trainer on a GPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from erpd_megatron.config import load_config
from erpd_megatron.config.loader import ConfigError
from erpd_megatron.train import heldout
from erpd_megatron.train.heldout import heldout_engine_problem, run_heldout_child

ROOT = Path(__file__).resolve().parents[2]


def test_heldout_engine_problem():
    msg = heldout_engine_problem("vllm", 2, True)
    assert (
        msg
        and "erpd evaluate" in msg
        and "stage1.eval_every_epochs=0" in msg
        and "rollout.engine=hf" in msg
    )
    assert heldout_engine_problem("hf", 2, True) is None
    assert heldout_engine_problem("vllm", 2, False) is None  # no GPU: no vLLM anyway
    assert heldout_engine_problem("vllm", 0, True) is None


def test_run_heldout_child_refuses_vllm_on_gpu_before_starting_it(tmp_path, monkeypatch):
    cfg = load_config(
        ROOT / "configs/recipes/tiny-cpu.yaml",
        ["rollout.engine=vllm", "stage1.eval_every_epochs=2"],
        validate=False,
    )
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    started = []
    monkeypatch.setattr(heldout.subprocess, "call", lambda *a, **k: started.append(a) or 1)
    with pytest.raises(ConfigError, match="memory the trainer holds"):
        run_heldout_child(cfg, tmp_path / "ckpt", tmp_path / "work")
    assert not started
