"""HF <-> Megatron tensor and config maps, without building a model (pure tensors)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from erpd_megatron.config.loader import ConfigError, load_model_config
from erpd_megatron.config.schema import ModelConfig
from erpd_megatron.config.validate import padded_vocab_size
from erpd_megatron.models import hf_maps
from erpd_megatron.models.hf_config import hf_to_model_config, model_config_to_hf
from tests.models.hf_fixtures import EXPERTS, FAMILIES, MOE_FAMILIES, VOCAB, make_hf_model

MODELS = Path(__file__).resolve().parents[2] / "configs" / "models"


@pytest.fixture(scope="module")
def hf_models() -> dict:
    return {fam: make_hf_model(fam) for fam in FAMILIES}


def test_qkv_layout_per_query_group():
    mc = ModelConfig(num_attention_heads=4, num_query_groups=2, hidden_size=8, kv_channels=2)
    d, h = 2, 2  # head dim, query heads per group
    q = torch.arange(4 * d).float().unsqueeze(1)  # row r = value r
    k = 100 + torch.arange(2 * d).float().unsqueeze(1)
    v = 200 + torch.arange(2 * d).float().unsqueeze(1)
    fused = hf_maps.fuse_qkv(q, k, v, mc).squeeze(1).tolist()
    # group 0: q heads 0,1 | k head 0 | v head 0; group 1: q heads 2,3 | k head 1 | v head 1
    assert fused == [0, 1, 2, 3, 100, 101, 200, 201, 4, 5, 6, 7, 102, 103, 202, 203]
    assert len(fused) == (h + 2) * d * 2
    for a, b in zip(hf_maps.split_qkv(torch.tensor(fused).unsqueeze(1), mc), (q, k, v)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("family", FAMILIES)
def test_hf_megatron_round_trip_bit_exact(hf_models, family):
    model = hf_models[family]
    mc = hf_to_model_config(model.config.to_dict())
    hf = {
        k: v
        for k, v in model.state_dict().items()
        if not (mc.tie_word_embeddings and k == "lm_head.weight")
    }
    full = hf_maps.hf_to_megatron(hf, mc, padded_vocab_size(mc, 2))
    assert full["embedding.word_embeddings.weight"].shape[0] == 512
    assert torch.count_nonzero(full["embedding.word_embeddings.weight"][VOCAB:]) == 0
    assert ("output_layer.weight" in full) == (not mc.tie_word_embeddings)
    back = hf_maps.megatron_to_hf(full, mc)
    assert set(back) == set(hf)
    for k in hf:
        assert torch.equal(back[k], hf[k]), k
    # TE-spec names are accepted on the way back.
    te = hf_maps.to_te_names(full)
    assert "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight" in te
    assert "decoder.layers.0.mlp.linear_fc1.layer_norm_weight" in te
    assert all(torch.equal(hf_maps.megatron_to_hf(te, mc)[k], hf[k]) for k in hf)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("tp,pp", [(1, 2), (2, 1), (2, 2)])
def test_shard_and_merge_ranks(hf_models, family, tp, pp):
    model = hf_models[family]
    mc = hf_to_model_config(model.config.to_dict())
    full = hf_maps.hf_to_megatron(model.state_dict(), mc, padded_vocab_size(mc, tp))
    shards = {
        (t, p): hf_maps.shard_for_rank(full, mc, tp=tp, tp_rank=t, pp=pp, pp_rank=p)
        for t in range(tp)
        for p in range(pp)
    }
    per = mc.num_layers // pp
    last = shards[(0, pp - 1)]
    assert f"decoder.layers.{per}.input_layernorm.weight" not in last  # renumbered from 0
    assert ("output_layer.weight" in last) == (not mc.tie_word_embeddings or pp > 1)
    assert ("embedding.word_embeddings.weight" in last) == (pp == 1)
    if tp == 2:
        fc1 = shards[(1, 0)]["decoder.layers.0.mlp.linear_fc1.weight"]
        gate, up = full["decoder.layers.0.mlp.linear_fc1.weight"].chunk(2)
        assert torch.equal(fc1, torch.cat([gate.chunk(2)[1], up.chunk(2)[1]]))
        proj = shards[(1, 0)]["decoder.layers.0.self_attention.linear_proj.weight"]
        assert torch.equal(
            proj, full["decoder.layers.0.self_attention.linear_proj.weight"].chunk(2, dim=1)[1]
        )
    merged = hf_maps.merge_ranks(shards, mc, tp=tp, pp=pp)
    assert set(merged) == set(full)
    assert all(torch.equal(merged[k], full[k]) for k in full)
    te = hf_maps.shard_for_rank(full, mc, tp=tp, tp_rank=0, pp=pp, pp_rank=0, te=True)
    assert "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight" in te


@pytest.mark.parametrize("family", FAMILIES)
def test_hf_config_both_ways(hf_models, family):
    from transformers import AutoConfig

    hf = hf_models[family].config.to_dict()
    mc = hf_to_model_config(hf)
    assert mc.family == family and mc.vocab_size == VOCAB
    assert mc.add_qkv_bias == (family == "qwen2") and mc.qk_layernorm == (family == "qwen3")
    assert mc.kv_channels == {"llama": 16, "qwen2": None, "qwen3": 32}[family]
    assert mc.rope_scaling == ("llama3" if family == "llama" else None)
    out = model_config_to_hf(mc, dtype="float32", base=hf)
    assert hf_to_model_config(out) == mc
    again = AutoConfig.for_model(
        **{k: v for k, v in out.items() if k != "model_type"}, model_type=family
    )
    assert again.num_key_value_heads == mc.num_query_groups
    assert getattr(again, "head_dim", 16) == (mc.kv_channels or 16)
    assert hf_to_model_config(again.to_dict()) == mc
    legacy = dict(out)
    legacy.pop("rope_parameters")  # transformers 4.x style: rope_theta / rope_scaling only
    assert hf_to_model_config(legacy) == mc


@pytest.mark.parametrize(
    "name",
    [
        "llama3-8b",
        "llama3-1b",
        "qwen2.5-7b",
        "qwen3-8b",
        "qwen3-4b",
        "qwen3-tiny",
        "qwen3-30b-a3b",
        "qwen3-235b-a22b",
        "qwen3-moe-tiny",
    ],
)
def test_repo_model_configs_map_to_hf(name):
    mc = load_model_config(MODELS / f"{name}.yaml")
    assert hf_to_model_config(model_config_to_hf(mc)) == mc


def test_unsupported_hf_configs_are_errors(hf_models):
    base = hf_models["qwen2"].config.to_dict()
    with pytest.raises(ConfigError, match="sliding"):
        hf_to_model_config({**base, "use_sliding_window": True})
    with pytest.raises(ConfigError, match="model_type"):
        hf_to_model_config({**base, "model_type": "mistral"})
    llama = hf_models["llama"].config.to_dict()
    scaled = {**llama, "rope_parameters": {**llama["rope_parameters"], "high_freq_factor": 2.0}}
    with pytest.raises(ConfigError, match="high_freq_factor"):
        hf_to_model_config(scaled)


def test_mask_padded_vocab():
    from erpd_megatron.config.validate import padded_vocab_size
    from erpd_megatron.models.builder import mask_padded_vocab

    mc = ModelConfig(vocab_size=VOCAB)
    local = padded_vocab_size(mc, 2) // 2  # TP rank 1 of 2, as Engine.vocab_shard
    start, end = local, 2 * local
    assert (start, end) == (256, 512)
    logits = torch.zeros(2, 3, end - start)
    mask_padded_vocab(logits, start, VOCAB)
    assert (
        torch.isfinite(logits[..., : VOCAB - start]).all()
        and torch.isinf(logits[..., VOCAB - start :]).all()
    )
    first = torch.zeros(1, 256)
    assert torch.isfinite(mask_padded_vocab(first, 0, VOCAB)).all()


@pytest.fixture(scope="module")
def moe_disk(tmp_path_factory) -> dict:
    """The MoE fixtures as saved on disk (per-expert names; transformers 5 fuses them in memory)."""
    from erpd_megatron.models.convert import LazySafetensors

    out = {}
    for fam in MOE_FAMILIES:
        model = make_hf_model(fam)
        d = tmp_path_factory.mktemp(fam)
        model.save_pretrained(d)
        out[fam] = (model.config.to_dict(), dict(LazySafetensors(d)))
    return out


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_moe_maps_round_trip_and_ep_sharding(moe_disk, family):
    cfg, hf = moe_disk[family]
    mc = hf_to_model_config(cfg)
    assert (mc.family, mc.num_experts, mc.norm_topk_prob) == (
        family,
        EXPERTS,
        family == "qwen3_moe",
    )
    assert set(hf) == set(hf_maps.expected_hf_keys(mc))
    full = hf_maps.hf_to_megatron(hf, mc, padded_vocab_size(mc, 2))
    if family == "qwen3_moe":  # mlp_only_layers=[1]: layer 1 keeps the dense names
        assert (
            "decoder.layers.1.mlp.linear_fc1.weight" in full
            and "decoder.layers.1.mlp.router.weight" not in full
        )
        te = hf_maps.to_te_names(full)
        assert "decoder.layers.1.mlp.linear_fc1.layer_norm_weight" in te
        assert "decoder.layers.0.pre_mlp_layernorm.weight" in te  # MoE layers keep it unfused
    gate, up = full["decoder.layers.0.mlp.experts.local_experts.3.linear_fc1.weight"].chunk(2)
    assert torch.equal(gate, hf["model.layers.0.mlp.experts.3.gate_proj.weight"])
    assert torch.equal(up, hf["model.layers.0.mlp.experts.3.up_proj.weight"])
    back = hf_maps.megatron_to_hf(full, mc)
    assert set(back) == set(hf) and all(torch.equal(back[k], hf[k]) for k in hf)
    for tp, ep, etp, pp in ((2, 2, 1, 1), (1, 4, 1, 1), (2, 2, 2, 1), (1, 2, 1, mc.num_layers)):
        shards = {
            (t, p, e): hf_maps.shard_for_rank(
                full, mc, tp=tp, tp_rank=t, pp=pp, pp_rank=p, ep=ep, ep_rank=e, etp=etp
            )
            for t in range(tp)
            for p in range(pp)
            for e in range(ep)
        }
        last = shards[(tp - 1, 0, ep - 1)]
        local = sorted(k for k in last if k.startswith("decoder.layers.0.mlp.experts."))
        assert len(local) == 2 * EXPERTS // ep  # renumbered from 0
        fc1 = last["decoder.layers.0.mlp.experts.local_experts.0.linear_fc1.weight"]
        g, u = full[
            "decoder.layers.0.mlp.experts.local_experts."
            f"{EXPERTS - EXPERTS // ep}.linear_fc1.weight"
        ].chunk(2)
        assert torch.equal(fc1, torch.cat([g.chunk(etp)[-1], u.chunk(etp)[-1]]))
        merged = hf_maps.merge_ranks(shards, mc, tp=tp, pp=pp, ep=ep, etp=etp)
        assert set(merged) == set(full) and all(torch.equal(merged[k], full[k]) for k in full), (
            tp,
            ep,
            etp,
            pp,
        )


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_moe_hf_config_both_ways(moe_disk, family):
    from transformers import AutoConfig

    cfg, _ = moe_disk[family]
    mc = hf_to_model_config(cfg)
    out = model_config_to_hf(mc, dtype="float32", base=cfg)
    assert hf_to_model_config(out) == mc
    again = AutoConfig.for_model(
        **{k: v for k, v in out.items() if k != "model_type"}, model_type=family
    )
    assert hf_to_model_config(again.to_dict()) == mc
    assert out["num_experts"] == EXPERTS and out["architectures"][0].endswith("MoeForCausalLM")


def test_moe_validation_errors():
    import dataclasses

    from erpd_megatron.config.moe import moe_layer_pattern
    from erpd_megatron.config.schema import ParallelConfig
    from erpd_megatron.config.validate import validate_layout, validate_model

    mc = load_model_config(MODELS / "qwen3-moe-tiny.yaml")
    validate_model(mc)
    assert moe_layer_pattern(dataclasses.replace(mc, num_layers=4, decoder_sparse_step=2)) == [
        0,
        1,
        0,
        1,
    ]
    assert moe_layer_pattern(dataclasses.replace(mc, mlp_only_layers=[0])) == [0, 1]
    assert validate_layout(mc, ParallelConfig(expert_model_parallel_size=2), 2) == 2
    with pytest.raises(ConfigError, match="num_experts=4 is not divisible"):
        validate_layout(mc, ParallelConfig(expert_model_parallel_size=3), 3)
    with pytest.raises(
        ConfigError, match="world size 2 is not divisible by expert_tensor_parallel_size"
    ):
        validate_layout(
            mc, ParallelConfig(expert_model_parallel_size=2, expert_tensor_parallel_size=2), 2
        )
    with pytest.raises(ConfigError, match="allgather cannot run"):
        validate_layout(
            mc,
            ParallelConfig(expert_model_parallel_size=2, moe_token_dispatcher_type="allgather"),
            2,
        )
    with pytest.raises(ConfigError, match="need an MoE model"):
        validate_layout(
            load_model_config(MODELS / "qwen3-tiny.yaml"),
            ParallelConfig(expert_model_parallel_size=2),
            2,
        )
    with pytest.raises(ConfigError, match="is dense"):
        validate_model(dataclasses.replace(mc, family="qwen3"))
    with pytest.raises(ConfigError, match="moe_router_topk"):
        validate_model(dataclasses.replace(mc, moe_router_topk=5))
    with pytest.raises(ConfigError, match="no layer is sparse"):
        validate_model(dataclasses.replace(mc, mlp_only_layers=[0, 1]))
