"""Cross-field checks of a :class:`~erpd_megatron.config.schema.Config`.

Field types are checked by the loader; here live the constraints that involve several
fields: the parallel layout against the architecture, vocabulary padding, FP8 needing
Transformer Engine, and references between components.
"""

from __future__ import annotations

import importlib.util
from typing import Optional

from erpd_megatron.config.loader import ConfigError
from erpd_megatron.config.schema import Config, ModelConfig, ParallelConfig


def padded_vocab_size(model: ModelConfig, tp: int) -> int:
    """Megatron's padded vocabulary: the real size rounded up to a multiple of
    ``make_vocab_size_divisible_by * tp`` so every TP rank holds an equal slice."""
    multiple = model.make_vocab_size_divisible_by * tp
    if multiple <= 0:
        raise ConfigError("model.make_vocab_size_divisible_by must be >= 1")
    return -(-model.vocab_size // multiple) * multiple


def head_dim(model: ModelConfig) -> int:
    """The attention head dimension (kv_channels, or hidden / heads)."""
    return model.kv_channels or model.hidden_size // model.num_attention_heads


def validate_model(model: ModelConfig) -> None:
    """Architecture-only checks."""
    if model.num_attention_heads % model.num_query_groups:
        raise ConfigError(
            f"model.num_query_groups={model.num_query_groups} must divide "
            f"model.num_attention_heads={model.num_attention_heads}"
        )
    if model.kv_channels is None and model.hidden_size % model.num_attention_heads:
        raise ConfigError(
            f"model.hidden_size={model.hidden_size} is not divisible by num_attention_heads="
            f"{model.num_attention_heads}; set model.kv_channels (head_dim) explicitly"
        )
    for name in ("num_layers", "hidden_size", "ffn_hidden_size", "vocab_size", "max_position_embeddings"):
        if getattr(model, name) <= 0:
            raise ConfigError(f"model.{name} must be positive, got {getattr(model, name)}")
    if model.num_experts is not None:
        raise ConfigError("model.num_experts: MoE models are not supported yet; use a dense model")


def validate_layout(model: ModelConfig, par: ParallelConfig, world_size: Optional[int] = None) -> int:
    """Check the parallel layout against the model; return the data-parallel size.

    ``world_size`` defaults to the target cluster (num_nodes * gpus_per_node).
    """
    tp, pp = par.tensor_model_parallel_size, par.pipeline_model_parallel_size
    if tp < 1 or pp < 1 or par.expert_model_parallel_size < 1:
        raise ConfigError("parallel sizes must be >= 1")
    if model.num_attention_heads % tp:
        raise ConfigError(
            f"parallel.tensor_model_parallel_size={tp} must divide model.num_attention_heads="
            f"{model.num_attention_heads}"
        )
    if model.num_query_groups % tp:
        raise ConfigError(
            f"parallel.tensor_model_parallel_size={tp} must divide model.num_query_groups="
            f"{model.num_query_groups} (KV heads are not replicated)"
        )
    if model.ffn_hidden_size % tp:
        raise ConfigError(
            f"parallel.tensor_model_parallel_size={tp} must divide model.ffn_hidden_size={model.ffn_hidden_size}"
        )
    if model.num_layers % pp:
        raise ConfigError(
            f"parallel.pipeline_model_parallel_size={pp} must divide model.num_layers={model.num_layers}"
        )
    padded = padded_vocab_size(model, tp)
    if padded % tp:
        raise ConfigError(f"padded vocabulary {padded} is not divisible by TP={tp}")
    if par.sequence_parallel and tp == 1:
        raise ConfigError("parallel.sequence_parallel needs tensor_model_parallel_size > 1")
    if world_size is None:
        world_size = par.num_nodes * par.gpus_per_node
    if world_size % (tp * pp):
        raise ConfigError(
            f"world size {world_size} is not divisible by TP*PP = {tp}*{pp}; "
            "change parallel.num_nodes/gpus_per_node or the layout"
        )
    return world_size // (tp * pp)


def transformer_engine_available() -> bool:
    """Whether transformer_engine can be imported (without importing it)."""
    return importlib.util.find_spec("transformer_engine") is not None


def check_stage2_teachers(cfg: Config, cached: list[str], where: str = "stage2.teachers") -> None:
    """Every model a Stage-2 signal names must be among ``cached`` (``base`` always is)."""
    known = set(cached) | {"base"}
    for i, t in enumerate(cfg.stage2.teachers):
        if t.model not in known:
            raise ConfigError(f"{where}.{i}.model='{t.model}' is not a cached model; the cache has {sorted(known)}")
        if t.signal == "contrast" and t.contrast_model not in known:
            raise ConfigError(
                f"{where}.{i}.contrast_model='{t.contrast_model}' is not a cached model; the cache has {sorted(known)}")


def validate_config(cfg: Config, *, world_size: Optional[int] = None, check_runtime: bool = False) -> None:
    """All cross-field checks. ``check_runtime`` also checks what this machine must have
    (Transformer Engine when FP8 is asked for); training entry points pass True."""
    validate_model(cfg.model)
    if world_size is not None:
        validate_layout(cfg.model, cfg.parallel, world_size)
    else:
        tp, pp = cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size
        validate_layout(cfg.model, cfg.parallel, tp * pp)
    if cfg.precision.fp8 is not None:
        if cfg.precision.transformer_impl == "local":
            raise ConfigError("precision.fp8 needs precision.transformer_impl=transformer_engine (or auto)")
        if check_runtime and not transformer_engine_available():
            raise ConfigError(
                f"precision.fp8={cfg.precision.fp8!r} needs Transformer Engine, which is not installed; "
                "install the [gpu] extra (pip install 'erpd_megatron[gpu]') or set precision.fp8=null"
            )
    if cfg.data.global_batch_size < 1 or cfg.data.max_tokens_per_microbatch < 1:
        raise ConfigError("data.global_batch_size and data.max_tokens_per_microbatch must be >= 1")
    if cfg.data.max_seq_length is not None and cfg.data.max_seq_length > cfg.model.max_position_embeddings:
        raise ConfigError(
            f"data.max_seq_length={cfg.data.max_seq_length} exceeds model.max_position_embeddings="
            f"{cfg.model.max_position_embeddings}"
        )
    names = [m.name for m in cfg.cache.models]
    if len(set(names)) != len(names):
        raise ConfigError(f"cache.models: duplicate names in {names}")
    if cfg.stage1.epochs < 1 or cfg.stage2.epochs < 1:
        raise ConfigError("stage1.epochs and stage2.epochs must be >= 1")
    if cfg.stage1.eval_every_epochs < 0:
        raise ConfigError(f"stage1.eval_every_epochs must be >= 0 (got {cfg.stage1.eval_every_epochs})")
    if cfg.stage1.eval_every_epochs and not cfg.eval.datasets:
        raise ConfigError("stage1.eval_every_epochs is set but eval.datasets is empty: give the held-out "
                          "prompt sets (files or hub names), or set stage1.eval_every_epochs=0")
    if not (0 < cfg.rollout.top_p <= 1.0) or cfg.rollout.temperature <= 0:
        raise ConfigError("rollout.top_p must be in (0, 1] and rollout.temperature > 0")
