"""HF ``config.json`` <-> ModelConfig.

Families: Llama, Qwen2, Qwen3, Qwen3-MoE and Qwen2-MoE ``*ForCausalLM``.

Reading accepts both the transformers 4.x keys (``rope_theta``, ``rope_scaling``,
``torch_dtype``) and the 5.x ones (``rope_parameters``, ``dtype``); writing emits both so
that transformers 4.x/5.x and vLLM read the result.
"""

from __future__ import annotations

from typing import Any, Optional

from erpd_megatron.config.loader import ConfigError
from erpd_megatron.config.schema import ModelConfig
from erpd_megatron.config.validate import head_dim

ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
}
_FAMILY_OF_MODEL_TYPE = {f: f for f in ARCHITECTURES}
_QKV_BIAS = ("qwen2", "qwen2_moe")
_QK_NORM = ("qwen3", "qwen3_moe")
_MOE = ("qwen3_moe", "qwen2_moe")
# megatron-core's llama3 RoPE scaling has these constants built in.
_LLAMA3_FIXED = {
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


def _rope(hf: dict) -> tuple[float, Optional[dict]]:
    params = hf.get("rope_parameters") or {}
    theta = hf.get("rope_theta", params.get("rope_theta", 10000.0))
    scaling = hf.get("rope_scaling")
    if scaling is None and params.get("rope_type", "default") != "default":
        scaling = params
    if scaling is not None and (scaling.get("rope_type") or scaling.get("type")) in (
        None,
        "default",
    ):
        scaling = None
    return float(theta), scaling


def hf_to_model_config(hf: dict, *, make_vocab_size_divisible_by: int = 128) -> ModelConfig:
    """ModelConfig from an HF ``config.json`` mapping; unsupported features are a ConfigError."""
    model_type = hf.get("model_type")
    family = _FAMILY_OF_MODEL_TYPE.get(str(model_type))
    if family is None:
        raise ConfigError(
            f"HF model_type={model_type!r} is not supported; expected one of "
            f"{sorted(ARCHITECTURES)}"
        )
    if hf.get("hidden_act", "silu") != "silu":
        raise ConfigError(
            f"hidden_act={hf.get('hidden_act')!r}: only SwiGLU (silu) models are supported"
        )
    if hf.get("mlp_bias"):
        raise ConfigError("mlp_bias=true is not supported")
    if family in _QKV_BIAS and hf.get("use_sliding_window"):
        raise ConfigError("use_sliding_window=true is not supported (megatron runs full attention)")
    if family not in _QKV_BIAS and hf.get("attention_bias"):
        raise ConfigError("attention_bias=true (bias on o_proj too) is not supported")
    theta, scaling = _rope(hf)
    rope_scaling, factor = None, 8.0
    if scaling is not None:
        kind = scaling.get("rope_type") or scaling.get("type")
        if kind != "llama3":
            raise ConfigError(f"rope scaling {kind!r} is not supported (only llama3)")
        for k, v in _LLAMA3_FIXED.items():
            if float(scaling.get(k, v)) != v:
                raise ConfigError(
                    f"llama3 rope scaling with {k}={scaling[k]}: megatron-core fixes it to {v}"
                )
        rope_scaling, factor = "llama3", float(scaling.get("factor", 8.0))
    heads = int(hf["num_attention_heads"])
    hd = hf.get("head_dim")
    kv_channels = int(hd) if hd is not None else None
    return ModelConfig(
        family=family,  # type: ignore[arg-type]
        num_layers=int(hf["num_hidden_layers"]),
        hidden_size=int(hf["hidden_size"]),
        ffn_hidden_size=int(hf["intermediate_size"]),
        num_attention_heads=heads,
        num_query_groups=int(hf.get("num_key_value_heads") or heads),
        kv_channels=kv_channels,
        vocab_size=int(hf["vocab_size"]),
        make_vocab_size_divisible_by=make_vocab_size_divisible_by,
        max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
        rope_theta=theta,
        rope_scaling=rope_scaling,  # type: ignore[arg-type]
        rope_scaling_factor=factor,
        norm_epsilon=float(hf.get("rms_norm_eps", 1e-6)),
        add_qkv_bias=family in _QKV_BIAS,
        qk_layernorm=family in _QK_NORM,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        init_method_std=float(hf.get("initializer_range", 0.02)),
        **(_moe_fields(hf, family) if family in _MOE else {}),
    )


def _moe_fields(hf: dict, family: str) -> dict[str, Any]:
    """ModelConfig MoE fields of a Qwen3-MoE / Qwen2-MoE config.json (transformers 4.x writes
    ``num_experts``, 5.x also ``num_local_experts``)."""
    experts = hf.get("num_experts", hf.get("num_local_experts"))
    if not experts:
        raise ConfigError(f"HF {family} config has no num_experts")
    out: dict[str, Any] = dict(
        num_experts=int(experts),
        moe_router_topk=int(hf.get("num_experts_per_tok", 2)),
        moe_ffn_hidden_size=int(hf["moe_intermediate_size"]),
        norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
        decoder_sparse_step=int(hf.get("decoder_sparse_step", 1)),
        mlp_only_layers=[int(i) for i in hf.get("mlp_only_layers") or []],
        moe_aux_loss_coeff=float(hf.get("router_aux_loss_coef", 0.001)),
    )
    if family == "qwen2_moe":
        out.update(
            shared_expert_intermediate_size=int(hf["shared_expert_intermediate_size"]),
            shared_expert_gate=True,
        )
    return out


def model_config_to_hf(
    mc: ModelConfig, *, dtype: str = "bfloat16", base: Optional[dict] = None
) -> dict:
    """An HF ``config.json`` mapping for ``mc``.

    ``base`` (the original HF config, kept beside a converted checkpoint) supplies the
    fields ModelConfig does not know (token ids, ...); architecture fields are overwritten.
    """
    if mc.family in _QKV_BIAS and not mc.add_qkv_bias:
        raise ConfigError(
            f"family {mc.family} needs add_qkv_bias=true (Qwen2 always has q/k/v biases)"
        )
    if mc.family in _QK_NORM and not mc.qk_layernorm:
        raise ConfigError(f"family {mc.family} needs qk_layernorm=true")
    if mc.family not in _QKV_BIAS and mc.add_qkv_bias:
        raise ConfigError(
            f"family {mc.family} has no q/k/v bias in HF; use family qwen2 / qwen2_moe"
        )
    if mc.family not in _QK_NORM and mc.qk_layernorm:
        raise ConfigError(f"family {mc.family} has no qk-norm in HF; use family qwen3 / qwen3_moe")
    if mc.family == "qwen2_moe" and not mc.shared_expert_gate:
        raise ConfigError(
            "family qwen2_moe always gates its shared expert: set shared_expert_gate=true"
        )
    out: dict[str, Any] = dict(base or {})
    for stale in ("rope_parameters", "rope_scaling", "torch_dtype", "dtype", "_name_or_path"):
        out.pop(stale, None)
    rope_params: dict[str, Any] = {"rope_type": "default", "rope_theta": mc.rope_theta}
    rope_scaling = None
    if mc.rope_scaling == "llama3":
        rope_scaling = {"rope_type": "llama3", "factor": mc.rope_scaling_factor, **_LLAMA3_FIXED}
        rope_params = {**rope_scaling, "rope_theta": mc.rope_theta}
    out.update(
        architectures=[ARCHITECTURES[mc.family]],
        model_type=mc.family,
        hidden_size=mc.hidden_size,
        intermediate_size=mc.ffn_hidden_size,
        num_hidden_layers=mc.num_layers,
        num_attention_heads=mc.num_attention_heads,
        num_key_value_heads=mc.num_query_groups,
        vocab_size=mc.vocab_size,
        max_position_embeddings=mc.max_position_embeddings,
        rms_norm_eps=mc.norm_epsilon,
        hidden_act="silu",
        tie_word_embeddings=mc.tie_word_embeddings,
        initializer_range=mc.init_method_std,
        rope_theta=mc.rope_theta,
        rope_scaling=rope_scaling,
        rope_parameters=rope_params,
        torch_dtype=dtype,
        dtype=dtype,
        attention_dropout=0.0,
        use_cache=True,
    )
    if mc.family not in _QKV_BIAS or mc.kv_channels is not None:
        out["head_dim"] = head_dim(mc)  # Qwen2's HF config has no head_dim field by default
    else:
        out.pop("head_dim", None)
    if mc.family == "llama":
        out.update(attention_bias=False, mlp_bias=False)
    elif mc.family in _QK_NORM:
        out.update(attention_bias=False, use_sliding_window=False, sliding_window=None)
    else:
        out.update(use_sliding_window=False, sliding_window=None)
    if mc.family != "llama":
        out.pop("layer_types", None)
        out["max_window_layers"] = mc.num_layers
    if mc.family in _MOE:
        out.update(
            num_experts=mc.num_experts,
            num_local_experts=mc.num_experts,
            num_experts_per_tok=mc.moe_router_topk,
            moe_intermediate_size=mc.moe_ffn_hidden_size or mc.ffn_hidden_size,
            norm_topk_prob=mc.norm_topk_prob,
            decoder_sparse_step=mc.decoder_sparse_step,
            mlp_only_layers=list(mc.mlp_only_layers),
            router_aux_loss_coef=mc.moe_aux_loss_coeff,
            output_router_logits=False,
        )
        if mc.family == "qwen2_moe":
            out["shared_expert_intermediate_size"] = mc.shared_expert_intermediate_size
    return out
