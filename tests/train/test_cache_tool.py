"""The teacher-cache tool on a real model: exact against float64, independent of the layout."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from tests.train.fixtures import ROOT, env, make_tiny_round, run_module


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    root = tmp_path_factory.mktemp("cachetool")
    cfg, ov = make_tiny_round(root)
    models = f"cache.models=[{{name: teacher0, checkpoint: {root / 'base'}}}]"
    common = ov + [models, "cache.topk=8", "cache.dtype=fp32"]
    run_module("erpd_megatron.train.cache_pass", cfg, common + [f"cache.dir={root / 'tp1'}"])
    run_module(
        "erpd_megatron.train.cache_pass",
        cfg,
        common + [f"cache.dir={root / 'tp2'}", "parallel.tensor_model_parallel_size=2"],
        nproc=2,
    )
    subprocess.run(
        [sys.executable, "-m", "erpd_megatron.pipeline.export", f"{root / 'base'}={root / 'hf'}"],
        check=True,
        env=env(),
        cwd=ROOT,
        capture_output=True,
        timeout=600,
    )
    return root


def test_cache_written_at_tp2_equals_tp1(caches):
    from erpd_megatron.cache.reader import TeacherCache

    a, b = TeacherCache.open(caches / "tp1"), TeacherCache.open(caches / "tp2")
    assert sorted(a.sample_ids) == sorted(b.sample_ids)
    for sid in a.sample_ids:
        ra, rb = a.get(sid), b.get(sid)
        np.testing.assert_array_equal(ra.topk_ids["teacher0"], rb.topk_ids["teacher0"])
        np.testing.assert_allclose(
            ra.topk_logprobs["teacher0"], rb.topk_logprobs["teacher0"], rtol=1e-5, atol=1e-5
        )
        np.testing.assert_allclose(ra.sampled["base"], rb.sampled["base"], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(
            ra.ref_topk_logprobs["teacher0"], rb.ref_topk_logprobs["teacher0"], rtol=1e-5, atol=1e-5
        )


def test_cache_topk_equals_float64_full_vocab_reference(caches):
    import torch
    from transformers import AutoModelForCausalLM

    from erpd_megatron.cache.reader import TeacherCache
    from erpd_megatron.data.rollouts import RolloutSet

    cache = TeacherCache.open(caches / "tp1")
    model = AutoModelForCausalLM.from_pretrained(caches / "hf", torch_dtype=torch.float64).eval()
    cols = RolloutSet.open(caches / "rollouts").load(
        ["sample_id", "prompt_token_ids", "response_token_ids"]
    )
    for sid, p, r in zip(cols["sample_id"], cols["prompt_token_ids"], cols["response_token_ids"]):
        ids = torch.tensor(np.concatenate([p, r]), dtype=torch.long)[None]
        with torch.no_grad():
            logits = model(ids).logits[0].double()
        lp = torch.log_softmax(
            logits[len(p) - 1 : len(p) + len(r) - 1], dim=-1
        )  # positions predicting r
        ref_vals, ref_ids = lp.topk(8, dim=-1)
        rec = cache.get(int(sid))
        np.testing.assert_array_equal(rec.topk_ids["teacher0"], ref_ids.numpy())
        np.testing.assert_allclose(
            rec.topk_logprobs["teacher0"], ref_vals.numpy(), rtol=1e-5, atol=1e-5
        )
        sampled = lp.gather(1, torch.tensor(np.asarray(r), dtype=torch.long)[:, None])[:, 0].numpy()
        np.testing.assert_allclose(rec.sampled["base"], sampled, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(rec.sampled["teacher0"], sampled, rtol=1e-5, atol=1e-5)
