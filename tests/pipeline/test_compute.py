"""Compute records of the rollout and evaluation steps (issue 20: every step accounts)."""

from __future__ import annotations

import pytest

from erpd_megatron.config import load_config
from erpd_megatron.config.compute import eval_compute, gpu_hours, param_counts, tflops_per_gpu
from erpd_megatron.rollout.generate import rollout_compute


@pytest.fixture(scope="module")
def cfg():
    return load_config("configs/recipes/tiny-cpu.yaml", [])


def test_rollout_compute_sums_shards_and_counts_prefill_once(cfg):
    _, n = param_counts(cfg)
    timing = [
        {"generation_seconds": 10.0, "generated_tokens": 300, "prompt_tokens": 40, "gpus": 2},
        {"generation_seconds": 30.0, "generated_tokens": 100, "prompt_tokens": 20, "gpus": 2},
    ]
    rec = rollout_compute(cfg, timing)
    assert rec["scored_tokens"] == 460 and rec["generated_tokens"] == 400
    assert rec["model_flops"] == pytest.approx(2.0 * n * 460)
    assert rec["wall_s"] == 40.0 and rec["gpus"] == 2 and rec["step"] == "rollout"
    assert gpu_hours(rec) == pytest.approx(2 * 40 / 3600)
    assert tflops_per_gpu(rec) == pytest.approx(2.0 * n * 460 / 80 / 1e12)
    assert rollout_compute(None, timing) is None and rollout_compute(cfg, []) is None


def test_eval_compute_counts_generation_and_kl_scoring(cfg):
    _, n = param_counts(cfg)
    rows = [
        {"is_base": True, "prompts": 10, "n": 4, "response_tokens_mean": 5.0},
        {"is_base": False, "prompts": 10, "n": 4, "response_tokens_mean": 7.5},
    ]
    rec = eval_compute(cfg, rows, wall_s=12.0, gpus=1)
    gen = 10 * 4 * 5.0 + 10 * 4 * 7.5
    assert rec["generated_tokens"] == int(gen)
    # the non-base model's samples are scored under the base once (engine log-probs)
    assert rec["scored_tokens"] == int(gen + 300)
    assert rec["model_flops"] == pytest.approx(2.0 * n * (gen + 300))
    cfg.eval.kl_logprobs = "teacher_forced"
    try:
        assert eval_compute(cfg, rows, wall_s=12.0, gpus=1)["scored_tokens"] == int(gen + 600)
    finally:
        cfg.eval.kl_logprobs = "engine"
