"""ModelConfig -> megatron-core TransformerConfig + GPTModel chunks, and forward helpers.

* :func:`transformer_config` maps the recipe onto a ``TransformerConfig`` (RMSNorm, SwiGLU,
  GQA, QKV bias for Qwen2, qk-norm for Qwen3, FP8 fields). On a CPU: fp32 (``params_dtype:
  auto``), ``use_cpu_initialization`` and every fusion off.
* :func:`build_model` returns the model chunks of this rank (one, or one per virtual
  pipeline stage), with ``pre_process`` / ``post_process`` from the pipeline stage, the local spec
  on CPU and the Transformer Engine spec on GPU when it is installed
  (``precision.transformer_impl``), wrapped in ``Float16Module`` for bf16/fp16 and in
  megatron's DDP when asked.
* Padded vocabulary: the output layer has ``padded_vocab_size(model, tp)`` rows; rows at
  global ids ``>= model.vocab_size`` produce logit 0 (not -inf). **Convention**: every
  consumer masks them before a softmax / top-k; the token-math ops take ``vocab_size`` and
  mask themselves, :func:`mask_padded_vocab` does it for plain logits, and the HF exporter
  drops the rows.
* Transformer Engine: :func:`transformer_engine_status` imports ``transformer_engine.pytorch``
  and reads megatron's own ``HAVE_TE``; a broken install is an error with the repair, never a
  silent switch to megatron's MagicMock stand-in.
* Precision of the wrapped model (:func:`float16_module_class`): the logits come out in the
  model dtype (bf16), not as megatron's default fp32 copy, and forward passes without
  gradient (scoring, anchors, the cache tool, held-out eval) run without FP8 (see
  :func:`fp8_disabled_without_grad`).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F

from erpd_megatron.config.loader import ConfigError
from erpd_megatron.config.schema import Config
from erpd_megatron.config.validate import (
    TE_REPAIR_HINT,
    head_dim,
    padded_vocab_size,
    transformer_engine_import_error,
)
from erpd_megatron.utils.log import get_logger

log = get_logger(__name__)

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class TEStatus:
    """What this process can do with Transformer Engine."""

    installed: bool
    """A ``transformer_engine`` package is on the path (``find_spec``; says nothing about use)."""
    imports: bool
    """``import transformer_engine.pytorch`` succeeded here."""
    megatron_have_te: bool
    """megatron-core's own ``HAVE_TE`` (``megatron/core/extensions/transformer_engine.py``)."""
    version: Optional[str] = None
    """``transformer_engine.__version__`` when it imports."""
    error: Optional[str] = None
    """Why TE is unusable (the import error, or the disagreement with megatron)."""

    @property
    def usable(self) -> bool:
        """TE imports and megatron agrees: the TE spec and FP8 can be used."""
        return self.installed and self.imports and self.megatron_have_te


@functools.lru_cache(maxsize=1)
def transformer_engine_status() -> TEStatus:
    """Probe Transformer Engine for real (cached per process).

    ``find_spec`` alone passes for a broken install (e.g. TE's torch extension built against
    another torch: ``ImportError: undefined symbol``), and then megatron-core silently swaps TE
    for a ``MagicMock``: ``megatron/core/extensions/transformer_engine.py`` (core_v0.16.1 lines
    61-77, core_v0.19.0 lines 69-85) does ``try: import transformer_engine as te; from
    transformer_engine.pytorch.fp8 import FP8GlobalStateManager, fp8_autocast ... HAVE_TE = True``
    ``except ImportError: te = MagicMock(); HAVE_TE = False``. So this imports
    ``transformer_engine.pytorch`` itself and reads that module's ``HAVE_TE``; they must agree.
    """
    if importlib.util.find_spec("transformer_engine") is None:
        return TEStatus(
            installed=False, imports=False, megatron_have_te=False, error="not installed"
        )
    import_err = err = transformer_engine_import_error()
    version = None
    if err is None:
        import transformer_engine

        version = str(getattr(transformer_engine, "__version__", "unknown"))
    try:
        from megatron.core.extensions import transformer_engine as mte

        have_te = bool(mte.HAVE_TE)
    except Exception as e:  # a non-ImportError from TE escapes megatron's try and kills its import
        have_te = False
        err = (
            err
            or "megatron.core.extensions.transformer_engine does not import: "
            f"{type(e).__name__}: {e}"
        )
    if err is None and not have_te:
        err = (
            f"transformer_engine.pytorch {version} imports but megatron-core's HAVE_TE is False "
            "(it failed to import transformer_engine.pytorch.fp8: a TE version outside "
            "megatron-core's range)"
        )
    return TEStatus(
        installed=True,
        imports=import_err is None,
        megatron_have_te=have_te,
        version=version,
        error=err,
    )


def transformer_engine_available() -> bool:
    """Whether Transformer Engine is usable here (imports, and megatron's HAVE_TE agrees)."""
    return transformer_engine_status().usable


def require_transformer_engine(why: str) -> TEStatus:
    """The TE status, or a :class:`ConfigError` naming ``why`` TE is needed and how to repair it."""
    st = transformer_engine_status()
    if not st.usable:
        state = (
            "is not installed" if not st.installed else f"is installed but unusable ({st.error})"
        )
        raise ConfigError(f"{why} needs Transformer Engine, which {state}; {TE_REPAIR_HINT}")
    return st


def use_transformer_engine(cfg: Config) -> bool:
    """Resolve ``precision.transformer_impl``: auto = TE on a GPU when TE is installed.

    A TE that is installed but broken is an error (with the repair) for ``auto`` too, so a GPU
    job never falls back to the local spec without saying so."""
    impl, fp8 = cfg.precision.transformer_impl, cfg.precision.fp8
    if fp8 is not None:
        if impl == "local":
            raise ConfigError(
                f"precision.fp8={fp8!r} needs precision.transformer_impl=transformer_engine (or "
                "auto): the local spec silently runs FP8 layers in full precision"
            )
        require_transformer_engine(f"precision.fp8={fp8!r}")
        return True
    if impl == "local":
        return False
    if impl == "transformer_engine":
        require_transformer_engine("precision.transformer_impl=transformer_engine")
        return True
    if not torch.cuda.is_available():
        return False
    if importlib.util.find_spec("transformer_engine") is None:
        return False
    require_transformer_engine(
        "precision.transformer_impl=auto on a GPU with transformer_engine installed"
    )
    return True


def params_dtype(cfg: Config) -> torch.dtype:
    """Resolve ``precision.params_dtype``: auto = bf16 on GPU, fp32 on CPU."""
    name = cfg.precision.params_dtype
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return _DTYPES[name]


def transformer_config(cfg: Config, **overrides: Any) -> Any:
    """The megatron-core ``TransformerConfig`` of ``cfg`` (model + parallel + precision).

    ``overrides`` are set on the config last (e.g. ``variable_seq_lengths=True``,
    ``recompute_granularity="full"``), so the trainer can tune schedule fields without
    re-deriving the architecture.
    """
    # FP8 with the local spec would silently run in full precision: use_transformer_engine
    # raises (with the repair) when FP8 is asked for and TE is unusable.
    te = use_transformer_engine(cfg)
    from megatron.core.transformer.transformer_config import TransformerConfig

    m, par, prec = cfg.model, cfg.parallel, cfg.precision
    on_gpu = torch.cuda.is_available()
    dtype = params_dtype(cfg)
    fusions = on_gpu  # the jit-fused kernels are GPU-only; TE needed for the RoPE fusion
    kwargs: dict[str, Any] = dict(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        ffn_hidden_size=m.ffn_hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups,
        kv_channels=head_dim(m),
        normalization="RMSNorm",
        layernorm_epsilon=m.norm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=m.add_qkv_bias,
        qk_layernorm=m.qk_layernorm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=m.init_method_std,
        tensor_model_parallel_size=par.tensor_model_parallel_size,
        pipeline_model_parallel_size=par.pipeline_model_parallel_size,
        expert_model_parallel_size=par.expert_model_parallel_size,
        sequence_parallel=par.sequence_parallel,
        # CP: TE's attention exchanges K/V over the CP group megatron built
        # (initialize_model_parallel(context_parallel_size=) in runtime/distributed.py)
        context_parallel_size=par.context_parallel_size,
        virtual_pipeline_model_parallel_size=par.virtual_pipeline_model_parallel_size,
        # Interleaved at PP=2: a rank's previous and next stage are the same peer, and the
        # batched p2p call posts [send_prev, recv_prev, send_next, recv_next] on both ranks
        # (core_v0.16.1 pipeline_parallel/p2p_communication.py _batched_p2p_ops), so a
        # gradient is matched with the peer's activation receive (measured on gloo: wrong
        # activations, or a shape error with variable lengths). The unbatched path sends the
        # two directions over different groups when the PP group has 2 ranks (_p2p_ops).
        batch_p2p_comm=not (
            par.virtual_pipeline_model_parallel_size and par.pipeline_model_parallel_size == 2
        ),
        recompute_granularity=par.recompute_granularity,
        recompute_method=par.recompute_method,
        recompute_num_layers=par.recompute_num_layers,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu_initialization=not on_gpu,
        bias_activation_fusion=fusions,
        bias_dropout_fusion=fusions,
        masked_softmax_fusion=False,
        apply_rope_fusion=fusions and te,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        transformer_impl="transformer_engine" if te else "local",
        # Dense models never dispatch tokens, but megatron rejects variable_seq_lengths=True
        # with the default "allgather" dispatcher at construction.
        moe_token_dispatcher_type="alltoall",
    )
    if prec.fp8 is not None:
        kwargs.update(
            fp8=prec.fp8,
            fp8_recipe=prec.fp8_recipe,
            fp8_margin=prec.fp8_margin,
            fp8_amax_history_len=prec.fp8_amax_history_len,
            fp8_amax_compute_algo=prec.fp8_amax_compute_algo,
        )
    from erpd_megatron.models.moe import moe_config_kwargs

    kwargs.update(
        moe_config_kwargs(
            cfg, te=te, on_gpu=on_gpu, variable_seq_lengths=overrides.get("variable_seq_lengths")
        )
    )
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def layer_spec(cfg: Config, config: Any) -> Any:
    """The transformer layer spec: TE (lazy import) or local, with RMSNorm and qk-norm. The
    local spec's core attention runs a packed row per sequence, in length groups
    (:mod:`erpd_megatron.models.local_varlen_attention`); TE's takes THD as it is."""
    from megatron.core.models.gpt import gpt_layer_specs as specs

    from erpd_megatron.models.local_varlen_attention import with_varlen_core_attention

    te = config.transformer_impl == "transformer_engine"
    if cfg.model.num_experts is not None:  # dense and MoE layers: erpd_megatron/models/moe.py
        from erpd_megatron.models.moe import moe_block_spec

        block = moe_block_spec(config)
        return block if te else with_varlen_core_attention(block)
    if te:
        return specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=cfg.model.qk_layernorm)
    return with_varlen_core_attention(
        specs.get_gpt_layer_local_spec(qk_layernorm=cfg.model.qk_layernorm, normalization="RMSNorm")
    )


def build_gpt(
    cfg: Config,
    config: Any,
    *,
    pre_process: bool = True,
    post_process: bool = True,
    vocab_size: Optional[int] = None,
    vp_stage: Optional[int] = None,
) -> Any:
    """One ``GPTModel`` for the given stage flags (no wrapping, no device move); ``vp_stage``:
    the model chunk's virtual pipeline stage (its layers' global offset follows from it)."""
    from megatron.core.models.gpt import GPTModel

    m = cfg.model
    return GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(cfg, config),
        vocab_size=vocab_size or padded_vocab_size(m, cfg.parallel.tensor_model_parallel_size),
        max_sequence_length=m.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=m.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=m.rope_theta,
        rope_scaling=m.rope_scaling == "llama3",
        rope_scaling_factor=m.rope_scaling_factor,
        # GPTModel(vp_stage=...): core_v0.16.1 and core_v0.19.0 models/gpt/gpt_model.py
        **({"vp_stage": vp_stage} if vp_stage is not None else {}),
    )


def fp8_disabled_without_grad(config: Any) -> contextlib.AbstractContextManager[None]:
    """A context in which a forward pass without gradient runs in bf16 instead of FP8.

    Why: megatron-core enters ``fp8_autocast`` per forward from ``config.fp8``
    (``TransformerBlock.forward`` -> ``fp8_utils.get_fp8_context``: ``need_fp8_context =
    config.fp8``; core_v0.16.1 ``transformer/transformer_block.py`` ~line 717, the same in
    core_v0.19.0), and TE updates delayed-scaling factors only when grad is enabled: on
    leaving the outermost ``fp8_autocast``, ``FP8GlobalStateManager.fp8_autocast_exit`` runs
    ``reduce_and_update_fp8_tensors(forward=True)`` only ``if enabled and AUTOCAST_DEPTH == 0
    and not _graph and torch.is_grad_enabled()`` (TE v2.11 ``pytorch/quantization.py`` line 607).
    A no-grad pass (anchors, scoring, the cache tool, held-out eval) would therefore quantise
    with stale scales (1.0 on a fresh model) and skew the log-probs it records. bf16 is exact
    for these passes and needs no calibration; TE modules outside ``fp8_autocast`` compute in
    the parameters' dtype. With grad enabled (training) nothing changes.
    """
    if getattr(config, "fp8", None) is None or torch.is_grad_enabled():
        return contextlib.nullcontext()
    return _swap_attr(config, "fp8", None)


@contextlib.contextmanager
def _swap_attr(obj: Any, name: str, value: Any) -> Iterator[None]:
    saved = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, saved)


@functools.lru_cache(maxsize=1)
def float16_module_class() -> type:
    """megatron's ``Float16Module`` with the two changes this project needs (see the module doc).

    * ``fp32_output=False`` by default: ``Float16Module.forward(*inputs, fp32_output=True)``
      (core_v0.16.1 and core_v0.19.0 ``transformer/module.py``) upcasts the last stage's output
      with ``float16_to_fp32``, a full-vocabulary fp32 copy of the logits per micro-batch (4
      bytes per entry next to the 2 of the bf16 ones while both live). The vocab-parallel ops
      take bf16 logits and compute in fp32 per chunk, and the output GEMM produced bf16 anyway,
      so the copy adds memory and no precision. Callers may still pass ``fp32_output=True``.
    * no-grad forwards run without FP8 (:func:`fp8_disabled_without_grad`).
    """
    from megatron.core.transformer.module import Float16Module

    class ERPDFloat16Module(Float16Module):
        """Float16Module returning model-dtype logits; no FP8 without grad."""

        def forward(self, *inputs: Any, fp32_output: bool = False, **kwargs: Any) -> Any:
            with fp8_disabled_without_grad(self.config):
                return super().forward(*inputs, fp32_output=fp32_output, **kwargs)

    return ERPDFloat16Module


def build_model(
    cfg: Config,
    *,
    wrap_ddp: bool = False,
    ddp_config: Any = None,
    config: Any = None,
    forward_only: Optional[bool] = None,
    **config_overrides: Any,
) -> list[Any]:
    """Build this rank's model chunks: one GPTModel, or one per virtual pipeline stage with
    ``parallel.virtual_pipeline_model_parallel_size`` (the interleaved schedule).

    Needs :func:`erpd_megatron.runtime.distributed.init_distributed` first. ``pre_process``
    / ``post_process`` come from the pipeline stage. bf16/fp16 models are wrapped in
    ``Float16Module`` (bf16 logits on the last stage: :func:`float16_module_class`). With
    ``wrap_ddp`` each chunk is
    wrapped in megatron's ``DistributedDataParallel`` (``ddp_config`` defaults from
    ``cfg.parallel``: fp32 grad reduce, the distributed optimizer flag, overlap flag) and
    ``config.no_sync_func`` / ``finalize_model_grads_func`` are set for the schedules; the
    trainer still sets ``config.grad_scale_func`` from its optimizer.
    ``config`` (a TransformerConfig) or ``config_overrides`` customise the config.
    ``forward_only`` (default: ``not wrap_ddp``, i.e. ``Engine(cfg, train=False)``) builds the
    model without FP8: forward-only engines (the cache tool, scoring) run in bf16, see
    :func:`fp8_disabled_without_grad`. Training models keep FP8 for their gradient passes.
    """
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        raise RuntimeError("build_model() needs init_distributed() first (megatron parallel_state)")
    if forward_only is None:
        forward_only = not wrap_ddp
    if forward_only and cfg.precision.fp8 is not None and config is None:
        config_overrides.setdefault("fp8", None)
    config = config or transformer_config(cfg, **config_overrides)
    from megatron.core import tensor_parallel

    vpp = cfg.parallel.virtual_pipeline_model_parallel_size
    chunks = []
    for vp in range(vpp) if vpp else [None]:
        # with VPP, first/last is per chunk: chunk 0 of PP rank 0 embeds, the last chunk of
        # the last PP rank holds the output layer (parallel_state.is_pipeline_*_stage)
        model = build_gpt(
            cfg,
            config,
            pre_process=ps.is_pipeline_first_stage(ignore_virtual=vp is None, vp_stage=vp),
            post_process=ps.is_pipeline_last_stage(ignore_virtual=vp is None, vp_stage=vp),
            vp_stage=vp,
        )
        if torch.cuda.is_available():
            model.cuda(torch.cuda.current_device())
        for p in model.parameters():
            # megatron's optimizer and DDP expect these attributes on every parameter.
            tensor_parallel.set_defaults_if_not_set_tensor_model_parallel_attributes(p)
        if config.bf16 or config.fp16:
            model = float16_module_class()(config, model)
        chunks.append(model)
    if wrap_ddp:
        chunks = wrap_with_ddp(cfg, chunks, ddp_config)
    return chunks


def wrap_with_ddp(cfg: Config, chunks: list[Any], ddp_config: Any = None) -> list[Any]:
    """Wrap model chunks in megatron's DDP and set the schedule hooks on their config."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads

    if ddp_config is None:
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=cfg.parallel.overlap_grad_reduce,
            use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
        )
    config = get_config(chunks[0])
    wrapped = [
        DistributedDataParallel(
            config=config, ddp_config=ddp_config, module=c, disable_bucketing=i > 0
        )
        for i, c in enumerate(chunks)
    ]
    config.no_sync_func = wrapped[0].no_sync if len(wrapped) == 1 else [w.no_sync for w in wrapped]
    config.finalize_model_grads_func = finalize_model_grads
    return wrapped


def unwrap_model(model: Any) -> Any:
    """Strip DDP / Float16Module wrappers down to the GPTModel."""
    while (
        hasattr(model, "module")
        and not hasattr(model, "decoder")
        and not hasattr(model, "embedding")
    ):
        model = model.module
    return model


def get_config(model: Any) -> Any:
    """The TransformerConfig of a (possibly wrapped) model chunk."""
    return unwrap_model(model).config


def mask_padded_vocab(
    logits: torch.Tensor, vocab_start: int, vocab_size: int, value: float = float("-inf")
) -> torch.Tensor:
    """Set logits of padded vocabulary rows (global id >= ``vocab_size``) to ``value``, in place.

    ``logits[..., j]`` is global token ``vocab_start + j`` (``vocab_start = tp_rank * V_local``
    for TP-sharded logits, 0 for gathered ones). Returns ``logits``.
    """
    local = logits.shape[-1]
    first_pad = max(0, vocab_size - vocab_start)
    if first_pad < local:
        logits[..., first_pad:] = value
    return logits


def _default_positions(input_ids: torch.Tensor) -> torch.Tensor:
    b, s = input_ids.shape
    return torch.arange(s, device=input_ids.device).unsqueeze(0).expand(b, s)


@torch.no_grad()
def forward_logits(
    model_chunks: list[Any],
    input_ids: torch.Tensor,
    position_ids: Optional[torch.Tensor] = None,
    attention_mask: Optional[torch.Tensor] = None,
) -> Optional[torch.Tensor]:
    """Forward pass (no grad) returning this TP rank's logits ``[batch, seq, V_padded / tp]``.

    Works for any pipeline size: with PP=1 the model is called directly; with PP>1 it runs
    megatron's schedule (``forward_only=True``, one micro-batch) and returns the logits on
    the last stage and ``None`` on the others. ``attention_mask`` is megatron's boolean
    ``[b, 1, s, s]`` mask (True = masked); ``None`` means causal. Padded vocabulary rows
    are NOT masked (see :func:`mask_padded_vocab`).
    """
    from megatron.core import parallel_state as ps

    if position_ids is None:
        position_ids = _default_positions(input_ids)
    for c in model_chunks:
        c.eval()
    if ps.get_pipeline_model_parallel_world_size() == 1:
        return model_chunks[0](input_ids, position_ids, attention_mask)
    from megatron.core.pipeline_parallel import get_forward_backward_func

    b, s = input_ids.shape
    batch = {"tokens": input_ids, "position_ids": position_ids, "attention_mask": attention_mask}

    def step(data_iterator: Any, model: Any) -> tuple[torch.Tensor, None]:
        data = next(data_iterator)
        return model(data["tokens"], data["position_ids"], data["attention_mask"]), None

    # loss_func None: the schedule hands back the last stage's raw output.
    out = get_forward_backward_func()(
        forward_step_func=step,
        data_iterator=iter([batch]),
        model=model_chunks,
        num_microbatches=1,
        seq_length=s,
        micro_batch_size=b,
        forward_only=True,
    )
    if not ps.is_pipeline_last_stage(ignore_virtual=True):
        return None
    return out[0]
