"""The local spec's varlen core attention (erpd_megatron/models/local_varlen_attention.py):
a packed row run as batches of its segments (one call per segment, mixed groups, one padded
group) equals megatron's ``DotProductAttention`` with the block-diagonal causal mask, forward
and backward, to 1e-6, at a TP=2 head split (two gloo ranks, 4 heads / 2 query groups: 2
heads and 1 group per rank, so GQA repeats too); another mask takes megatron's path
unchanged; the local layer specs (dense and MoE) name the varlen class. ~10 s at load 1
(one 2-rank spawn)."""

from __future__ import annotations

from typing import Any

import torch

from tests.dist import run_gloo

LENGTHS = ([7, 1, 12, 4, 3], [9, 5, 2, 6, 8], [16])  # the second ends in a "padding" segment
# per-call costs: a call per segment, mixed groups (2-3 calls at 2 heads x 8), one group
CALL_COSTS = (0.0, 800.0, None)


def _core(cls: Any, heads: int, groups: int, d: int, tp: int) -> Any:
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    cfg = TransformerConfig(
        num_layers=1,
        hidden_size=heads * d,
        kv_channels=d,
        num_attention_heads=heads,
        num_query_groups=groups,
        tensor_model_parallel_size=tp,
        use_cpu_initialization=True,
        masked_softmax_fusion=False,
        attention_dropout=0.0,
        params_dtype=torch.float32,
    )
    return cls(cfg, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self")


def worker(rank: int, world: int) -> dict:
    """Per rank: the largest differences (forward, q/k/v gradients) over ``LENGTHS`` and
    ``CALL_COSTS``, and the attention calls each cost makes."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from erpd_megatron.models.local_varlen_attention import (
        VarlenDotProductAttention,
        block_causal_mask,
        packed_segment_lengths,
        segment_buckets,
    )
    from erpd_megatron.runtime.cpu_harness import install_cpu_harness

    install_cpu_harness()
    ps.initialize_model_parallel(tensor_model_parallel_size=world)
    model_parallel_cuda_manual_seed(7)  # the dropout RNG tracker megatron forks (p = 0 here)
    heads, groups, d = 4, 2, 8
    ref, var = (
        _core(c, heads, groups, d, world) for c in (DotProductAttention, VarlenDotProductAttention)
    )
    hp, gp = heads // world, groups // world
    out: dict = {"heads_per_rank": var.num_attention_heads_per_partition, "fwd": 0.0, "grad": 0.0}
    out["calls"] = [
        [
            len(segment_buckets(tuple(n), hp * d, var.call_cost if c is None else c))
            for c in CALL_COSTS
        ]
        for n in LENGTHS
    ]
    g = torch.Generator().manual_seed(rank)
    for lengths in LENGTHS:
        t = sum(lengths)
        mask = block_causal_mask(lengths)
        assert packed_segment_lengths(mask) == lengths
        q, k, v = (torch.randn(t, 1, n, d, generator=g).requires_grad_() for n in (hp, gp, gp))
        grad_out = torch.randn(t, 1, hp * d, generator=g)
        y0 = ref(q, k, v, mask)
        g0 = torch.autograd.grad(y0, (q, k, v), grad_out)
        for cost in CALL_COSTS:
            var.call_cost = cost if cost is not None else type(var).call_cost
            y1 = var(q, k, v, mask)
            g1 = torch.autograd.grad(y1, (q, k, v), grad_out)
            out["fwd"] = max(out["fwd"], float((y0 - y1).detach().abs().max()))
            diff = max(float((a - b).abs().max()) for a, b in zip(g0, g1))
            out["grad"] = max(out["grad"], diff)
    # not block-diagonal causal (one position also sees an earlier segment): megatron's path
    mask = block_causal_mask([5, 6])
    mask[0, 0, 7, 2] = False
    q, k, v = (torch.randn(11, 1, n, d, generator=g) for n in (hp, gp, gp))
    out["other_mask_none"] = packed_segment_lengths(mask) is None
    out["other_mask_same"] = torch.equal(ref(q, k, v, mask), var(q, k, v, mask))
    out["no_mask_same"] = torch.equal(ref(q, k, v, None), var(q, k, v, None))
    return out


def test_varlen_equals_block_diagonal_masked_attention_tp2():
    for r in run_gloo(worker, 2, timeout=300):
        assert r["heads_per_rank"] == 2, r
        assert r["calls"] == [[5, 3, 1], [5, 2, 1], [1, 1, 1]], r
        assert r["fwd"] <= 1e-6 and r["grad"] <= 1e-6, r
        assert r["other_mask_none"] and r["other_mask_same"] and r["no_mask_same"], r


def test_local_specs_use_varlen_core_attention():
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_decoder_block_spec,
        get_gpt_layer_local_spec,
    )
    from megatron.core.transformer.transformer_config import TransformerConfig

    from erpd_megatron.models.local_varlen_attention import (
        VarlenDotProductAttention,
        with_varlen_core_attention,
    )

    dense = with_varlen_core_attention(get_gpt_layer_local_spec(normalization="RMSNorm"))
    assert dense.submodules.self_attention.submodules.core_attention is VarlenDotProductAttention
    cfg = TransformerConfig(
        num_layers=2,
        hidden_size=16,
        num_attention_heads=2,
        num_moe_experts=2,
        moe_layer_freq=[0, 1],
        use_cpu_initialization=True,
    )
    block = with_varlen_core_attention(
        get_gpt_decoder_block_spec(
            cfg, use_transformer_engine=False, normalization="RMSNorm", pp_rank=0
        )
    )
    cores = [s.submodules.self_attention.submodules.core_attention for s in block.layer_specs]
    assert cores == [VarlenDotProductAttention] * 2
