"""Worker for the sequence-parallel CPU test (importable by spawned gloo processes).

A tiny dense megatron-core GPT (local spec, RMSNorm, qk-norm, fp32) runs forward and
backward at TP=2 with sequence parallelism; the same weights then run at TP=1 (DP=2) on the
same inputs. The logits (gathered over the vocabulary) and every gradient (merged over TP)
must agree.
"""

from __future__ import annotations

from typing import Any

import torch

VOCAB = 128
SEQ = 16


def _build(tp: int, sp: bool) -> Any:
    import torch.nn.functional as F
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
    from megatron.core.transformer.transformer_config import TransformerConfig

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=1)
    torch.manual_seed(7)
    model_parallel_cuda_manual_seed(7)
    cfg = TransformerConfig(
        num_layers=2,
        hidden_size=32,
        ffn_hidden_size=64,
        num_attention_heads=4,
        num_query_groups=2,
        normalization="RMSNorm",
        gated_linear_unit=True,
        qk_layernorm=True,
        activation_func=F.silu,
        add_bias_linear=False,
        tensor_model_parallel_size=tp,
        sequence_parallel=sp,
        use_cpu_initialization=True,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        params_dtype=torch.float32,
    )
    spec = get_gpt_layer_local_spec(qk_layernorm=True, normalization="RMSNorm")
    return GPTModel(
        cfg,
        spec,
        vocab_size=VOCAB,
        max_sequence_length=SEQ,
        position_embedding_type="rope",
        parallel_output=False,
    )


def _tp_kind(name: str) -> str:
    if name.endswith("linear_fc1.weight"):
        return "fc1"
    if name.endswith(("linear_proj.weight", "linear_fc2.weight")):
        return "row"
    if name.endswith(("word_embeddings.weight", "output_layer.weight", "linear_qkv.weight")):
        return "col"
    return "rep"


def _merge(name: str, parts: list[torch.Tensor]) -> torch.Tensor:
    kind = _tp_kind(name)
    if kind == "rep":
        return parts[0]
    if kind == "col":
        return torch.cat(parts, 0)
    if kind == "row":
        return torch.cat(parts, 1)
    halves = [p.chunk(2, 0) for p in parts]
    return torch.cat([h[0] for h in halves] + [h[1] for h in halves], 0)


def _gather(t: torch.Tensor, group: Any) -> list[torch.Tensor]:
    import torch.distributed as dist

    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return parts


def _finalize_grads(model: Any) -> None:
    """The rule of megatron's ``finalize_model_grads`` for these parameters (core_v0.16.1
    ``distributed/finalize_model_grads.py`` ``_allreduce_non_tensor_model_parallel_grads``):
    sum over TP the gradients of parameters marked ``sequence_parallel`` (under SP) and of
    the qk-norms. The trainer runs megatron's own function through DDP."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    for name, p in model.named_parameters():
        sp = getattr(p, "sequence_parallel", False) and model.config.sequence_parallel
        qk = "q_layernorm" in name or "k_layernorm" in name
        if p.grad is not None and (sp or qk) and ps.get_tensor_model_parallel_world_size() > 1:
            dist.all_reduce(p.grad, group=ps.get_tensor_model_parallel_group())


def _step(model: Any, rank: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(200 + rank)
    ids = torch.randint(0, VOCAB, (2, SEQ), generator=g)
    pos = torch.arange(SEQ).expand(2, SEQ)
    logits = model(ids, pos, None)
    logits.float().square().mean().backward()
    _finalize_grads(model)
    return logits.detach().clone()


def tp2_sp_matches_tp1(rank: int, world: int) -> dict[str, Any]:
    """Max abs differences of logits and gradients, TP=2+SP against TP=1 (same weights)."""
    from erpd_megatron.runtime.cpu_harness import install_cpu_harness

    install_cpu_harness()
    from megatron.core import parallel_state as ps

    m2 = _build(world, sp=True)
    group = ps.get_tensor_model_parallel_group()
    marked = sorted(n for n, p in m2.named_parameters() if getattr(p, "sequence_parallel", False))
    full = {n: _merge(n, _gather(p.detach(), group)) for n, p in m2.named_parameters()}
    out2 = _step(m2, 0)
    grads2 = {n: _merge(n, _gather(p.grad, group)) for n, p in m2.named_parameters()}
    m1 = _build(1, sp=False)
    with torch.no_grad():
        for n, p in m1.named_parameters():
            p.copy_(full[n])
    out1 = _step(m1, 0)
    ps.destroy_model_parallel()
    gdiff = max(float((grads2[n] - p.grad).abs().max()) for n, p in m1.named_parameters())
    return {
        "logits": float((out2 - out1).abs().max()),
        "grads": gdiff,
        "scale": float(out1.abs().max()),
        "marked": marked,
    }
