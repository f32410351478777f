"""Worker functions for the expert-parallel CPU tests (importable by spawned gloo processes).

A tiny megatron-core MoE GPT (4 experts, top-2, local spec, fp32) is built at EP=2 with a
given token dispatcher; its forward output and its gradients are compared with the same
weights at EP=1 in the same processes (the expert weights gathered over EP first).
"""

from __future__ import annotations

from typing import Any

import torch

EXPERTS = 4
VOCAB = 64
SEQ = 16


def _build(ep: int, dispatcher: str) -> Any:
    import torch.nn.functional as F
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
    from megatron.core.transformer.transformer_config import TransformerConfig

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(
        tensor_model_parallel_size=1, pipeline_model_parallel_size=1, expert_model_parallel_size=ep
    )
    torch.manual_seed(1234)
    model_parallel_cuda_manual_seed(1234)
    cfg = TransformerConfig(
        num_layers=2,
        hidden_size=32,
        ffn_hidden_size=64,
        num_attention_heads=4,
        num_moe_experts=EXPERTS,
        moe_router_topk=2,
        moe_ffn_hidden_size=16,
        moe_token_dispatcher_type=dispatcher,
        moe_router_load_balancing_type="aux_loss",
        moe_aux_loss_coeff=0.01,
        expert_model_parallel_size=ep,
        normalization="RMSNorm",
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
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
        # megatron rejects variable_seq_lengths with the allgather dispatcher
        variable_seq_lengths=dispatcher == "alltoall",
    )
    spec = get_gpt_layer_local_spec(
        num_experts=EXPERTS, moe_grouped_gemm=False, normalization="RMSNorm"
    )
    return GPTModel(
        cfg, spec, vocab_size=VOCAB, max_sequence_length=SEQ, position_embedding_type="rope"
    )


def _global_name(name: str, ep_rank: int, local: int) -> str:
    """``...local_experts.j...`` of EP rank r -> the global expert index ``r*local + j``."""
    head, sep, tail = name.partition("local_experts.")
    if not sep:
        return name
    j, _, rest = tail.partition(".")
    return f"{head}local_experts.{ep_rank * local + int(j)}.{rest}"


def _full_state(model: Any, ep: int) -> dict[str, torch.Tensor]:
    """Every parameter under its EP=1 name, expert weights gathered over the EP group."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    local = EXPERTS // ep
    out: dict[str, torch.Tensor] = {}
    group = ps.get_expert_model_parallel_group()
    for name, p in model.named_parameters():
        if "local_experts." not in name:
            out[name] = p.detach().clone()
            continue
        parts = [torch.empty_like(p) for _ in range(ep)]
        dist.all_gather(parts, p.detach().contiguous(), group=group)
        for r, t in enumerate(parts):
            out[_global_name(name, r, local)] = t.clone()
    return out


def _run(model: Any, rank: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(100 + rank)
    ids = torch.randint(0, VOCAB, (2, SEQ), generator=g)
    pos = torch.arange(SEQ).expand(2, SEQ)
    logits = model(ids, pos, None)
    logits.float().square().mean().backward()
    return logits.detach().clone(), {
        n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None
    }


def ep2_matches_ep1(rank: int, world: int, dispatchers: list[str]) -> dict[str, dict[str, float]]:
    """:func:`_compare` for each dispatcher, in one process pair (one megatron import)."""
    from erpd_megatron.runtime.cpu_harness import install_cpu_harness

    install_cpu_harness()
    return {d: _compare(rank, world, d) for d in dispatchers}


def _compare(rank: int, world: int, dispatcher: str) -> dict[str, float]:
    """Forward at EP=2, then EP=1 (DP=2) with the gathered weights on the same inputs.

    Returns the largest absolute differences of the logits and of the gradients (expert
    gradients compared under their global names)."""
    m2 = _build(world, dispatcher)
    full = _full_state(m2, world)
    out2, grads2 = _run(m2, rank)
    from megatron.core import parallel_state as ps

    ep_rank = ps.get_expert_model_parallel_rank()
    m1 = _build(1, dispatcher)
    with torch.no_grad():
        for name, p in m1.named_parameters():
            p.copy_(full[name])
    out1, grads1 = _run(m1, rank)
    # At EP=2 an expert's gradient collects the tokens routed to it from both ranks; at
    # EP=1 (DP=2) each rank sees only its own, so the reference is their sum over ranks.
    import torch.distributed as dist

    for name, g in grads1.items():
        if "local_experts." in name:
            dist.all_reduce(g)
    ps.destroy_model_parallel()
    grad_diff = 0.0
    local = EXPERTS // world
    for name, g in grads2.items():
        ref = grads1[_global_name(name, ep_rank, local)]
        grad_diff = max(grad_diff, float((g - ref).abs().max()))
    return {
        "logits": float((out2 - out1).abs().max()),
        "grads": grad_diff,
        "scale": float(out1.abs().max()),
    }
