"""Mixture-of-experts checks and derived facts of a ModelConfig / ParallelConfig.

Called from :mod:`erpd_megatron.config.validate`; used by the model builder and the HF maps.
Which layers are sparse follows HF's Qwen2-/Qwen3-MoE rule (``Qwen3MoeDecoderLayer``):
layer i is an MoE layer when ``i not in mlp_only_layers and (i + 1) % decoder_sparse_step == 0``.
megatron's integer ``moe_layer_freq=N`` means ``i % N == 0`` instead, so the builder always
passes the explicit per-layer list (:func:`moe_layer_pattern`).
"""

from __future__ import annotations

from typing import Optional

from erpd_megatron.config.loader import ConfigError
from erpd_megatron.config.schema import ModelConfig, ParallelConfig

MOE_FAMILIES = ("qwen3_moe", "qwen2_moe")


def is_moe(model: ModelConfig) -> bool:
    """Whether the model has routed experts."""
    return model.num_experts is not None


def moe_layer_pattern(model: ModelConfig) -> list[int]:
    """Per layer: 1 = MoE layer, 0 = dense MLP layer (HF's rule, see the module doc)."""
    if not is_moe(model):
        return [0] * model.num_layers
    skip = set(model.mlp_only_layers)
    step = model.decoder_sparse_step
    return [int(i not in skip and (i + 1) % step == 0) for i in range(model.num_layers)]


def expert_ffn_size(model: ModelConfig) -> int:
    """Inner width of one routed expert."""
    return model.moe_ffn_hidden_size or model.ffn_hidden_size


def validate_moe_model(model: ModelConfig) -> None:
    """Architecture checks of the MoE fields (dense families must not set them)."""
    if not is_moe(model):
        if model.moe_router_replay is not None or model.moe_expert_capacity_factor is not None:
            raise ConfigError(
                "model.moe_router_replay / moe_expert_capacity_factor need model.num_experts"
            )
        if model.family in MOE_FAMILIES:
            raise ConfigError(
                f"model.family={model.family} is a mixture-of-experts family: set model.num_experts"
            )
        if model.shared_expert_intermediate_size is not None:
            raise ConfigError(
                "model.shared_expert_intermediate_size needs model.num_experts (an MoE model)"
            )
        return
    if model.family not in MOE_FAMILIES:
        raise ConfigError(
            f"model.num_experts is set but model.family={model.family} is dense; use one of "
            f"{MOE_FAMILIES}"
        )
    e, k = model.num_experts, model.moe_router_topk
    if e < 2:  # type: ignore[operator]
        raise ConfigError(f"model.num_experts={e} must be >= 2 (null for a dense model)")
    if not 1 <= k <= e:  # type: ignore[operator]
        raise ConfigError(f"model.moe_router_topk={k} must be in [1, num_experts={e}]")
    if model.decoder_sparse_step < 1:
        raise ConfigError(f"model.decoder_sparse_step={model.decoder_sparse_step} must be >= 1")
    bad = [i for i in model.mlp_only_layers if not 0 <= i < model.num_layers]
    if bad:
        raise ConfigError(
            f"model.mlp_only_layers has {bad} outside [0, num_layers={model.num_layers})"
        )
    if not any(moe_layer_pattern(model)):
        raise ConfigError(
            "model: no layer is sparse (decoder_sparse_step / mlp_only_layers); "
            "set num_experts=null for a dense model"
        )
    if expert_ffn_size(model) <= 0:
        raise ConfigError("model.moe_ffn_hidden_size must be positive")
    if model.family == "qwen3_moe" and model.shared_expert_intermediate_size is not None:
        raise ConfigError("family qwen3_moe has no shared expert; use family qwen2_moe")
    if model.family == "qwen2_moe" and model.shared_expert_intermediate_size is None:
        raise ConfigError("family qwen2_moe needs model.shared_expert_intermediate_size")
    if model.shared_expert_gate and model.shared_expert_intermediate_size is None:
        raise ConfigError("model.shared_expert_gate needs model.shared_expert_intermediate_size")
    if model.moe_aux_loss_coeff < 0 or (model.moe_z_loss_coeff or 0.0) < 0:
        raise ConfigError("model.moe_aux_loss_coeff and moe_z_loss_coeff must be >= 0")
    if model.moe_expert_capacity_factor is not None and model.moe_expert_capacity_factor <= 0:
        raise ConfigError("model.moe_expert_capacity_factor must be > 0 (null: no capacity)")


def validate_moe_layout(model: ModelConfig, par: ParallelConfig, world_size: int) -> None:
    """Expert-parallel layout checks.

    megatron-core 0.16.1 ``parallel_state.initialize_model_parallel`` (lines 786-795) builds
    the expert groups from ``expert_tensor_parallel_size * expert_model_parallel_size *
    pipeline_model_parallel_size`` and raises unless the world size is divisible by it; the
    experts of a layer are split evenly over EP (``MoELayer``: ``num_moe_experts %
    expert_model_parallel_size == 0``), and an expert's inner width over ETP.
    """
    ep, etp, pp = (
        par.expert_model_parallel_size,
        par.expert_tensor_parallel_size,
        par.pipeline_model_parallel_size,
    )
    if etp < 1:
        raise ConfigError("parallel.expert_tensor_parallel_size must be >= 1")
    if not is_moe(model):
        if ep > 1 or etp > 1:
            raise ConfigError(
                "parallel.expert_model_parallel_size / expert_tensor_parallel_size > 1 need an "
                "MoE model (model.num_experts)"
            )
        return
    e = model.num_experts
    if e % ep:  # type: ignore[operator]
        raise ConfigError(
            f"model.num_experts={e} is not divisible by parallel.expert_model_parallel_size={ep}"
        )
    if expert_ffn_size(model) % etp:
        raise ConfigError(
            f"parallel.expert_tensor_parallel_size={etp} must divide the expert width "
            f"{expert_ffn_size(model)} (model.moe_ffn_hidden_size)"
        )
    if (
        model.shared_expert_intermediate_size
        and model.shared_expert_intermediate_size % par.tensor_model_parallel_size
    ):
        raise ConfigError(
            f"parallel.tensor_model_parallel_size={par.tensor_model_parallel_size} must divide "
            f"model.shared_expert_intermediate_size={model.shared_expert_intermediate_size}"
        )
    if par.moe_token_dispatcher_type == "allgather" and ep * par.tensor_model_parallel_size > 1:
        # The engines run each rank's own packed micro-batches (config.variable_seq_lengths=True
        # in train/engine.py), which megatron refuses for allgather (core_v0.16.1
        # transformer_config.py line 1827): its all-gather over TP x EP needs equal shapes.
        raise ConfigError(
            "parallel.moe_token_dispatcher_type=allgather cannot run the per-rank variable-length "
            "micro-batches of the trainers and the cache tool at EP or TP > 1; use alltoall"
        )
    if model.moe_router_replay is not None and (
        par.sequence_parallel or par.context_parallel_size > 1
    ):
        # the replayed routing is stored per sequence position; SP and CP give each rank a
        # slice of the positions (models/router_replay.py maps whole rows only)
        raise ConfigError(
            "model.moe_router_replay needs parallel.sequence_parallel=false and "
            "context_parallel_size=1"
        )
    if world_size % (etp * ep * pp):
        raise ConfigError(
            f"world size {world_size} is not divisible by expert_tensor_parallel_size * "
            f"expert_model_parallel_size * pipeline_model_parallel_size = {etp}*{ep}*{pp} "
            "(megatron's expert groups); change the EP/ETP sizes or "
            "parallel.num_nodes/gpus_per_node"
        )


def grouped_gemm(par: ParallelConfig, te: bool, on_gpu: bool) -> bool:
    """Resolve ``parallel.moe_grouped_gemm`` (null: on with Transformer Engine on a GPU)."""
    if par.moe_grouped_gemm is None:
        return te and on_gpu
    if par.moe_grouped_gemm and not te:
        raise ConfigError(
            "parallel.moe_grouped_gemm=true needs Transformer Engine (precision.transformer_impl "
            "transformer_engine or auto on a GPU); set it to null or false"
        )
    return bool(par.moe_grouped_gemm)


def dispatcher(par: ParallelConfig, variable_seq_lengths: Optional[bool]) -> str:
    """The token dispatcher; megatron's allgather + variable_seq_lengths refusal, clearly."""
    if par.moe_token_dispatcher_type == "allgather" and variable_seq_lengths:
        raise ConfigError(
            "parallel.moe_token_dispatcher_type=allgather cannot run variable-length (packed) "
            "micro-batches, megatron rejects it; use alltoall"
        )
    return par.moe_token_dispatcher_type
