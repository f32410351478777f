"""Cross-field checks of a :class:`~erpd_megatron.config.schema.Config`.

Field types are checked by the loader; here live the constraints that involve several
fields: the parallel layout against the architecture, vocabulary padding, FP8 needing
Transformer Engine, and references between components.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import math
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
    for name in (
        "num_layers",
        "hidden_size",
        "ffn_hidden_size",
        "vocab_size",
        "max_position_embeddings",
    ):
        if getattr(model, name) <= 0:
            raise ConfigError(f"model.{name} must be positive, got {getattr(model, name)}")
    from erpd_megatron.config.moe import validate_moe_model

    validate_moe_model(model)


def _validate_recompute(model: ModelConfig, par: ParallelConfig) -> None:
    """megatron's rules for the recompute fields (core_v0.16.1 ``transformer_config.py``
    ``__post_init__``), reported with the recipe's field names."""
    g, method, n = par.recompute_granularity, par.recompute_method, par.recompute_num_layers
    if g is None:
        if method is not None or n is not None:
            raise ConfigError(
                "parallel.recompute_method/recompute_num_layers are set but "
                "parallel.recompute_granularity is null; set it to full"
            )
        return
    if g == "selective":
        if method is not None or n is not None:
            raise ConfigError(
                "parallel.recompute_granularity=selective takes no recompute_method "
                "or recompute_num_layers (they are for full)"
            )
        return
    if method is None or n is None:
        raise ConfigError(
            "parallel.recompute_granularity=full needs parallel.recompute_method "
            "(uniform|block) and parallel.recompute_num_layers"
        )
    per_stage = model.num_layers // max(1, par.pipeline_model_parallel_size)
    if not 1 <= n <= per_stage:
        raise ConfigError(
            f"parallel.recompute_num_layers={n} must be between 1 and the layers "
            f"per pipeline stage ({per_stage})"
        )


def validate_layout(
    model: ModelConfig, par: ParallelConfig, world_size: Optional[int] = None
) -> int:
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
            f"parallel.tensor_model_parallel_size={tp} must divide "
            f"model.ffn_hidden_size={model.ffn_hidden_size}"
        )
    if model.num_layers % pp:
        raise ConfigError(
            f"parallel.pipeline_model_parallel_size={pp} must divide "
            f"model.num_layers={model.num_layers}"
        )
    padded = padded_vocab_size(model, tp)
    if padded % tp:
        raise ConfigError(f"padded vocabulary {padded} is not divisible by TP={tp}")
    if par.sequence_parallel and tp == 1:
        raise ConfigError("parallel.sequence_parallel needs tensor_model_parallel_size > 1")
    _validate_recompute(model, par)
    vpp = par.virtual_pipeline_model_parallel_size
    if vpp is not None:
        if pp < 2 or vpp < 1:
            raise ConfigError(
                "parallel.virtual_pipeline_model_parallel_size needs "
                "pipeline_model_parallel_size >= 2 (and is >= 1); null turns it off"
            )
        if model.num_layers % (pp * vpp):
            raise ConfigError(
                f"model.num_layers={model.num_layers} must divide by "
                f"pipeline_model_parallel_size x virtual_pipeline_model_parallel_size"
                f" = {pp}x{vpp}"
            )
    if world_size is None:
        world_size = par.num_nodes * par.gpus_per_node
    cp = int(getattr(par, "context_parallel_size", 1) or 1)
    if cp < 1:
        raise ConfigError("parallel.context_parallel_size must be >= 1")
    if world_size % (tp * pp * cp):
        raise ConfigError(
            f"world size {world_size} is not divisible by TP*PP*CP = {tp}*{pp}*{cp}; "
            "change parallel.num_nodes/gpus_per_node or the layout"
        )
    from erpd_megatron.config.moe import validate_moe_layout

    validate_moe_layout(model, par, world_size)
    return world_size // (tp * pp * cp)


# How to repair a missing or broken Transformer Engine (the Makefile's GPU install; README).
TE_REPAIR_HINT = (
    "repair it in this venv: `pip uninstall -y transformer_engine transformer_engine_torch "
    "transformer_engine_cu12 transformer_engine_cu13`, then `make install` on the GPU node, which "
    "builds it against this venv's torch (`pip install --no-build-isolation "
    "'transformer_engine[pytorch]>=2.9.0a0,<2.12.0'` for megatron-core 0.16.x); or set "
    "precision.fp8=null and precision.transformer_impl=local"
)


@functools.lru_cache(maxsize=1)
def transformer_engine_import_error() -> Optional[str]:
    """None when ``import transformer_engine.pytorch`` works here, else the error as text.

    Imported for real: ``find_spec`` passes for a broken install (a TE torch extension built
    against another torch fails with ``ImportError: undefined symbol``; a missing CUDA library
    with ``OSError``)."""
    if importlib.util.find_spec("transformer_engine") is None:
        return "transformer_engine is not installed"
    try:
        importlib.import_module("transformer_engine.pytorch")
    except Exception as e:  # ImportError, OSError (shared libraries), RuntimeError (CUDA)
        return f"import transformer_engine.pytorch failed: {type(e).__name__}: {e}"
    return None


def transformer_engine_available() -> bool:
    """Whether ``transformer_engine.pytorch`` imports (megatron's own view: models/builder.py)."""
    return transformer_engine_import_error() is None


def check_transformer_engine_importable() -> None:
    """Raise :class:`ConfigError` with the repair when TE is installed but does not import.

    Call it before the first ``import megatron.core``: a broken TE makes that import itself
    fail with TE's raw error, because ``megatron/core/tensor_parallel/random.py`` (core_v0.16.1)
    guards ``from transformer_engine.pytorch.distributed import ...`` with ``except
    ModuleNotFoundError`` only, not ``ImportError``. Free when TE is absent (``find_spec``)."""
    if importlib.util.find_spec("transformer_engine") is None:
        return
    err = transformer_engine_import_error()
    if err is not None:
        raise ConfigError(f"Transformer Engine is installed but unusable ({err}); {TE_REPAIR_HINT}")


def fp8_recipe_problem(recipe: str, capability: Optional[tuple[int, int]]) -> Optional[str]:
    """Why ``precision.fp8_recipe=recipe`` cannot run on a GPU of compute ``capability``
    (None when it can, or when the GPU is unknown: ``capability=None``).

    The limits are Transformer Engine's own checks (TE v2.11
    ``transformer_engine/pytorch/quantization.py``): ``check_fp8_support`` needs 8.9+ for any
    FP8; ``check_mxfp8_support`` needs 10.x/11.x (Blackwell; "not supported on 12.0+ yet");
    ``check_fp8_block_scaling_support`` needs 9.0+ (and CUDA >= 12.9, checked by TE at run time).
    """
    if capability is None:
        return None
    major, minor = capability
    cc = f"{major}.{minor}"
    if (major, minor) < (8, 9):
        return (
            f"precision.fp8 needs compute capability 8.9 or higher (Ada, Hopper, Blackwell); "
            f"this GPU is {cc}: set precision.fp8=null (bf16)"
        )
    if recipe == "mxfp8" and not 10 <= major < 12:
        kind = "Hopper-class " if major == 9 else ""
        return (
            f"precision.fp8_recipe=mxfp8 needs a Blackwell GPU (compute capability 10.x); this "
            f"{kind}GPU is {cc} (Transformer Engine: 'Device compute capability 10.0 or higher "
            "required for MXFP8 execution'): use precision.fp8_recipe=delayed or tensorwise "
            "(or blockwise on Hopper with CUDA >= 12.9)"
        )
    if recipe == "blockwise" and major < 9:
        return (
            "precision.fp8_recipe=blockwise needs compute capability 9.0 or higher; this GPU is "
            f"{cc}: use precision.fp8_recipe=delayed or tensorwise"
        )
    return None


def cuda_capability() -> Optional[tuple[int, int]]:
    """Compute capability of the current CUDA device, or None without one."""
    import torch

    if not torch.cuda.is_available():
        return None
    return tuple(torch.cuda.get_device_capability())  # type: ignore[return-value]


def check_stage2_teachers(cfg: Config, cached: list[str], where: str = "stage2.teachers") -> None:
    """Every model a Stage-2 signal names must be among ``cached`` (``base`` always is)."""
    known = set(cached) | {"base"}
    for i, t in enumerate(cfg.stage2.teachers):
        if t.model not in known:
            raise ConfigError(
                f"{where}.{i}.model='{t.model}' is not a cached model; the cache has "
                f"{sorted(known)}"
            )
        if t.signal == "contrast" and t.contrast_model not in known:
            raise ConfigError(
                f"{where}.{i}.contrast_model='{t.contrast_model}' is not a cached model; the "
                f"cache has {sorted(known)}"
            )


def _validate_context_parallel(cfg: Config, check_runtime: bool) -> None:
    """CP runs the Transformer Engine attention with the CP group (the local spec's
    DotProductAttention has no CP path), and Stage 1's ``mse`` is refused: its per-sequence
    square needs the full sequence sums, which the split positions only hold in part."""
    cp = cfg.parallel.context_parallel_size
    if cp == 1:
        return
    if cfg.precision.transformer_impl == "local":
        raise ConfigError(
            f"parallel.context_parallel_size={cp} needs Transformer Engine: set "
            "precision.transformer_impl=transformer_engine (or auto) on GPUs, or "
            "parallel.context_parallel_size=1"
        )
    if check_runtime and not transformer_engine_available():
        raise ConfigError(
            f"parallel.context_parallel_size={cp} needs Transformer Engine, which is not "
            f"usable here ({transformer_engine_import_error()}); {TE_REPAIR_HINT}"
        )
    s1 = cfg.stage1
    if s1.loss == "mse" or (s1.loss == "unlearned" and s1.unlearned_base == "mse"):
        raise ConfigError(
            f"stage1.loss=mse is not supported with parallel.context_parallel_size={cp} "
            "(a per-sequence loss over split sequences); use pg/sapo/ce or CP=1"
        )


def validate_config(
    cfg: Config, *, world_size: Optional[int] = None, check_runtime: bool = False
) -> None:
    """All cross-field checks. ``check_runtime`` also checks what this machine must have
    (Transformer Engine when FP8 is asked for); training entry points pass True."""
    validate_model(cfg.model)
    if world_size is not None:
        validate_layout(cfg.model, cfg.parallel, world_size)
    else:
        tp, pp = cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size
        # the smallest world the layout runs on: dense groups and megatron's expert groups
        par = cfg.parallel
        expert = par.expert_tensor_parallel_size * par.expert_model_parallel_size * pp
        world = math.lcm(tp * pp * max(1, par.context_parallel_size), max(1, expert))
        validate_layout(cfg.model, cfg.parallel, world)
    _validate_context_parallel(cfg, check_runtime)
    if cfg.precision.fp8 is not None:
        if cfg.precision.transformer_impl == "local":
            raise ConfigError(
                "precision.fp8 needs precision.transformer_impl=transformer_engine (or auto)"
            )
        if check_runtime and not transformer_engine_available():
            raise ConfigError(
                f"precision.fp8={cfg.precision.fp8!r} needs Transformer Engine, which is not "
                f"usable here ({transformer_engine_import_error()}); {TE_REPAIR_HINT}"
            )
        if check_runtime:
            problem = fp8_recipe_problem(cfg.precision.fp8_recipe, cuda_capability())
            if problem:
                raise ConfigError(problem)
    if cfg.data.global_batch_size < 1 or cfg.data.max_tokens_per_microbatch < 1:
        raise ConfigError("data.global_batch_size and data.max_tokens_per_microbatch must be >= 1")
    if (
        cfg.data.max_seq_length is not None
        and cfg.data.max_seq_length > cfg.model.max_position_embeddings
    ):
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
        raise ConfigError(
            f"stage1.eval_every_epochs must be >= 0 (got {cfg.stage1.eval_every_epochs})"
        )
    if cfg.eval.cpu_workers < 1:
        raise ConfigError(f"eval.cpu_workers must be >= 1 (got {cfg.eval.cpu_workers})")
    if cfg.stage1.eval_every_epochs and not cfg.eval.datasets:
        raise ConfigError(
            "stage1.eval_every_epochs is set but eval.datasets is empty: give the held-out "
            "prompt sets (files or hub names), or set stage1.eval_every_epochs=0"
        )
    if not (0 < cfg.rollout.top_p <= 1.0) or cfg.rollout.temperature <= 0:
        raise ConfigError("rollout.top_p must be in (0, 1] and rollout.temperature > 0")
