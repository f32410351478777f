"""A tiny Qwen3-MoE ``erpd round`` end to end at EP=2 (2 processes per training launch):
conversion, rollouts with the HF engine on the MoE, Stage 1, the teacher cache, Stage 2, the
HF export and the evaluation all finish; then the cache tool is run once more in one process
(EP=1) on the round's own pi_r, teacher and rollouts, and its cache equals the round's EP=2
cache (same top-k ids, log-probs within 1e-5).

92-110 s here at load 4-7 on the shared 2-core machine (the round 75-95 s: 7 steps, 14
processes, most of it imports; the EP=1 cache 6-12 s); the module's two tests share one round."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.pipeline.readme_fixtures import save_tiny_qwen3_moe, write_prompts
from tests.train.fixtures import ROOT, env, run_module

TOL = 1e-5


def _recipe(tmp: Path) -> Path:
    """The tiny-cpu recipe with the tiny MoE model (configs/models/qwen3-moe-tiny.yaml)."""
    p = tmp / "moe-round.yaml"
    p.write_text(
        f"defaults:\n  - {ROOT / 'configs/recipes/tiny-cpu.yaml'}\n  - {{model: qwen3-moe-tiny}}\n"
        f"name: tiny-moe\noutput_dir: {tmp / 'run'}\n"
    )
    return p


@pytest.fixture(scope="module")
def moe_round(tmp_path_factory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("moe_round")
    save_tiny_qwen3_moe(tmp / "base")
    write_prompts(tmp / "train.parquet", 4)
    write_prompts(tmp / "heldout.parquet", 2, offset=3)
    recipe = _recipe(tmp)
    ov = [
        f"round.base_hf={tmp / 'base'}",
        f"rollout.dataset={tmp / 'train.parquet'}",
        f"eval.datasets=[{tmp / 'heldout.parquet'}]",
        "rollout.num_prompts=4",
        "rollout.samples_per_prompt=2",
        "rollout.max_new_tokens=6",
        "eval.num_prompts=2",
        "eval.n=1",
        "eval.pass_k=[1]",
        "eval.max_new_tokens=4",
        "stage1.epochs=1",
        "stage2.epochs=1",
        "stage1.force=true",
        "data.global_batch_size=8",
        "cache.dtype=fp32",
        "logging.progress_bar=false",
    ]
    ep2 = ["round.nproc_per_node=2", "parallel.expert_model_parallel_size=2"]
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "erpd_megatron.cli", "round", "--config", str(recipe), *ov, *ep2]
    p = subprocess.run(cmd, env=env(), cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, f"{p.stdout[-3000:]}\n{p.stderr[-8000:]}"
    print(f"MoE round at EP=2: {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    r0 = tmp / "run/round_0"
    teacher = r0 / "s1_teacher/stage1/checkpoints/final"
    t0 = time.perf_counter()
    run_module(
        "erpd_megatron.train.cache_pass",
        recipe,
        ov
        + [
            f"checkpoint.load={r0 / 'policy_mcore'}",
            f"data.rollout_dir={r0 / 'rollouts'}",
            f"cache.models=[{{name: teacher0, checkpoint: {teacher}, topk: true}}]",
            f"cache.dir={tmp / 'cache_ep1'}",
            f"output_dir={tmp / 'ep1'}",
        ],
    )
    print(f"cache at EP=1: {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    return r0, tmp / "cache_ep1"


@pytest.mark.slow
def test_moe_round_at_ep2_finishes(moe_round):
    r0, _ = moe_round
    assert json.loads((r0 / "rollouts/manifest.json").read_text())["num_samples"] == 8
    for stage, ckpt in (("stage1", r0 / "s1_teacher"), ("stage2", r0 / "s2_student")):
        final = ckpt / stage / "checkpoints/final/checkpoint.json"
        layout = json.loads(final.read_text())["saved_layout"]
        assert layout == {"tp": 1, "pp": 1, "dp": 2, "ep": 2}, (stage, layout)  # really EP=2
    cache = json.loads((r0 / "cache/manifest.json").read_text())
    assert cache["world_size"] == 2 and cache["value_dtype"] == "fp32", cache["world_size"]
    for name in ("teacher0", "student"):
        hf = json.loads((r0 / "hf" / name / "config.json").read_text())
        assert hf["model_type"] == "qwen3_moe" and hf["num_experts"] == 4, hf
    rows = json.loads((r0 / "eval/results.json").read_text())["rows"]
    assert [r["model"] for r in rows] == ["base", "teacher0", "student"], rows


@pytest.mark.slow
def test_moe_cache_at_ep2_equals_ep1(moe_round):
    from erpd_megatron.cache.reader import TeacherCache

    r0, ep1 = moe_round
    a, b = TeacherCache.open(ep1), TeacherCache.open(r0 / "cache")
    assert sorted(a.sample_ids) == sorted(b.sample_ids) and len(a.sample_ids) == 8
    for sid in a.sample_ids:
        ra, rb = a.get(sid), b.get(sid)
        np.testing.assert_array_equal(ra.topk_ids["teacher0"], rb.topk_ids["teacher0"])
        for x, y in (
            (ra.topk_logprobs["teacher0"], rb.topk_logprobs["teacher0"]),
            (ra.sampled["base"], rb.sampled["base"]),
            (ra.sampled["teacher0"], rb.sampled["teacher0"]),
            (ra.ref_topk_logprobs["teacher0"], rb.ref_topk_logprobs["teacher0"]),
        ):
            np.testing.assert_allclose(x, y, rtol=TOL, atol=TOL)
