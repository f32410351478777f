"""Megatron GPTModel vs transformers: logits at TP=1, TP=2 and PP=2 (gloo), conversion
HF -> mcore -> HF bit-exact, checkpoints resharded across TP/PP with identical logits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.dist import run_gloo
from tests.models.hf_fixtures import FAMILIES, VOCAB, hf_logits, sample_ids, save_hf_model
from tests.models.workers import multi_layout_worker, single_process_worker

TOL = 1e-5


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> tuple[Path, dict]:
    """Save the tiny HF models, run the single-process and the 2-process workers once."""
    root = tmp_path_factory.mktemp("models")
    for fam in FAMILIES:
        # llama: sharded safetensors + index; qwen2: stored in bf16 (computed in fp32 on both sides)
        save_hf_model(
            fam,
            root / fam / "hf",
            shard=fam == "llama",
            dtype=torch.bfloat16 if fam == "qwen2" else torch.float32,
        )
    results = run_gloo(single_process_worker, 1, str(root))[0]
    for r in run_gloo(multi_layout_worker, 2, str(root)):
        results.update(r)
    return root, results


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers(converted, family):
    _, res = converted
    for key in ("tp1_err", "tp2_err", "pp2_err", "torchrun_conv_tp2_err"):
        assert res[f"{family}/{key}"] < TOL, (key, res[f"{family}/{key}"])
    # Padded vocabulary rows are zero in the embedding/output layer: their logits are 0.
    assert res[f"{family}/tp1_pad_max"] == 0.0
    assert res[f"{family}/inv_freq_err"] < 1e-6
    assert res[f"{family}/inv_freq_scaled"] == (
        family == "llama"
    )  # llama3 rope scaling in the fixture


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_tp2_checkpoint_reloads_at_pp2_and_tp1(converted, family):
    _, res = converted
    assert res[f"{family}/pp2_vs_tp2"] < TOL
    assert res[f"{family}/tp1_from_tp2_vs_tp2"] < TOL


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("exported", ["hf_back", "hf_from_tp2"])
def test_hf_mcore_hf_round_trip_is_bit_exact(converted, family, exported):
    """hf_back: single-process conversion and export; hf_from_tp2: a checkpoint saved by a
    TP=2 run, exported by 2 ranks."""
    from transformers import AutoModelForCausalLM

    from erpd_megatron.models.convert import LazySafetensors

    root, _ = converted
    src, back = LazySafetensors(root / family / "hf"), LazySafetensors(root / family / exported)
    assert sorted(src) == sorted(back)
    for k in src:
        assert src[k].dtype == back[k].dtype and torch.equal(src[k], back[k]), k
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (root / family / exported / name).read_bytes() == (
            root / family / "hf" / name
        ).read_bytes()
    assert LazySafetensors(root / family / exported)["model.norm.weight"].dtype == (
        torch.bfloat16 if family == "qwen2" else torch.float32
    )
    model = AutoModelForCausalLM.from_pretrained(
        root / family / exported, dtype=torch.float32
    ).eval()
    assert model.config.model_type == family
    with torch.no_grad():
        assert torch.equal(
            model(sample_ids()).logits, hf_logits(root / family / "hf", sample_ids())
        )


@pytest.mark.slow
def test_converted_checkpoint_layout(converted):
    import json

    from erpd_megatron.models.checkpoint import read_model_config

    root, res = converted
    d = root / "qwen3" / "mc"
    meta = json.loads((d / "checkpoint.json").read_text())
    assert meta["target_layout"] == {"tp": 2, "pp": 1} and meta["padded_vocab_size"] == 512
    mc = read_model_config(d)
    assert (mc.family, mc.kv_channels, mc.qk_layernorm, mc.vocab_size) == ("qwen3", 32, True, VOCAB)
    assert (d / "tokenizer.json").exists() and (d / "hf_config.json").exists()
    assert "vocabulary mismatch" in res["qwen2/vocab_error"]
    assert res["no_extra_state_err"] < TOL  # loads strictly without _extra_state objects
