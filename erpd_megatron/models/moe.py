"""Mixture-of-experts pieces of the model builder: TransformerConfig fields and the block spec.

* :func:`moe_config_kwargs` maps the MoE fields of ``cfg.model`` / ``cfg.parallel`` onto
  megatron-core 0.16.1 ``TransformerConfig`` fields (``transformer/transformer_config.py``).
  Routing: HF Qwen2/3-MoE take a softmax over all experts, then the top-k, then (with
  ``norm_topk_prob``) divide by their sum, which equals a softmax over the top-k logits:
  megatron's default ``moe_router_pre_softmax=False``
  (``moe_utils.topk_routing_with_score_function``: top-k of the logits, then softmax).
  Without ``norm_topk_prob`` the probabilities stay the full softmax's:
  ``moe_router_pre_softmax=True``. The logits-parity test checks both (tests/models/
  test_moe_convert.py: Qwen3-MoE with norm_topk_prob=true, Qwen2-MoE with false).
* :func:`moe_block_spec`: ``gpt_layer_specs.get_gpt_decoder_block_spec`` (0.16.1), which picks
  per layer the MoE or the dense layer spec from ``config.moe_layer_freq`` (always passed as
  an explicit list, HF's sparse-layer rule) and slices the stage's layers for PP. Local spec
  on CPU (``SequentialMLP`` experts); TE spec with ``TEGroupedMLP`` when
  ``config.moe_grouped_gemm`` (``get_moe_module_spec_for_backend``).
"""

from __future__ import annotations

from typing import Any

from erpd_megatron.config.moe import dispatcher, expert_ffn_size, grouped_gemm, moe_layer_pattern
from erpd_megatron.config.schema import Config


def moe_config_kwargs(
    cfg: Config, *, te: bool, on_gpu: bool, variable_seq_lengths: Any = None
) -> dict[str, Any]:
    """TransformerConfig keyword arguments for an MoE ``cfg.model`` (empty for a dense model)."""
    m, par = cfg.model, cfg.parallel
    if m.num_experts is None:
        return {}
    aux = m.moe_aux_loss_coeff
    out: dict[str, Any] = dict(
        num_moe_experts=m.num_experts,
        moe_router_topk=m.moe_router_topk,
        moe_ffn_hidden_size=expert_ffn_size(m),
        moe_layer_freq=moe_layer_pattern(m),
        moe_router_pre_softmax=not m.norm_topk_prob,
        moe_router_score_function="softmax",
        moe_router_load_balancing_type="aux_loss" if aux > 0 else "none",
        moe_aux_loss_coeff=aux,
        moe_z_loss_coeff=m.moe_z_loss_coeff,
        # HF computes the routing softmax in fp32 (Qwen3MoeTopKRouter); megatron's router GEMM
        # then returns fp32 logits (router.py gating -> router_gating_linear(router_dtype)).
        moe_router_dtype="fp32",
        moe_token_dispatcher_type=dispatcher(par, variable_seq_lengths),
        moe_grouped_gemm=grouped_gemm(par, te, on_gpu),
        expert_model_parallel_size=par.expert_model_parallel_size,
        expert_tensor_parallel_size=par.expert_tensor_parallel_size,
    )
    if m.moe_router_replay is not None:
        # core_v0.16.1 router.py TopKRouter.__init__: a RouterReplay per router
        out["moe_enable_routing_replay"] = True
    if m.moe_expert_capacity_factor is not None:
        out.update(
            moe_expert_capacity_factor=m.moe_expert_capacity_factor,
            moe_token_drop_policy="probs",
            moe_pad_expert_input_to_capacity=False,
        )
    if m.shared_expert_intermediate_size is not None:
        out.update(
            moe_shared_expert_intermediate_size=m.shared_expert_intermediate_size,
            moe_shared_expert_gate=m.shared_expert_gate,
        )
    return out


def moe_block_spec(config: Any) -> Any:
    """The decoder block spec of an MoE model (dense/MoE layers as ``config.moe_layer_freq``)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    return get_gpt_decoder_block_spec(
        config,
        use_transformer_engine=config.transformer_impl == "transformer_engine",
        normalization="RMSNorm",
    )
