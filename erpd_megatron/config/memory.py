"""Memory per GPU of a recipe, as pure arithmetic over the config (no torch, no megatron).

What is counted, per rank of the most loaded pipeline stage (every stage is computed and
the largest reported: the first holds the embedding and the most micro-batches in flight,
the last the output layer and the logits):

* **Parameters on the rank.** Each layer's TP-sharded matrices (QKV, output projection,
  gated MLP) over TP, its norms replicated; ``L/PP`` layers per stage; the embedding on the
  first stage, the output layer and final norm on the last (both on one stage when PP=1);
  rows padded as :func:`~erpd_megatron.config.validate.padded_vocab_size` pads them. MoE
  (``model.num_experts``; the MoE fields are read with ``getattr`` defaults): the sparse
  layers (``decoder_sparse_step``, ``mlp_only_layers``) hold their routed experts
  (``moe_ffn_hidden_size`` wide, gated) spread over EP and sharded over ETP
  (``parallel.expert_tensor_parallel_size``, TP when the schema has no such field), a
  replicated router (and shared-expert gate), and a TP-sharded shared expert.
* **Weights, gradients, optimizer** (Megatron DDP + distributed optimizer, bytes per
  parameter): bf16/fp16 weights 2 B, fp32 main gradients 4 B (the DDP grad buffer is full
  size even with the distributed optimizer, which reduce-scatters into it), fp32 master copy
  + Adam m + v = 12 B, divided by DP with ``parallel.use_distributed_optimizer`` (expert
  parameters by the expert-DP size ``world / (TP * EP * PP)``). So 6 + 12/DP bytes per
  parameter, 18 without the distributed optimizer (the accounting of Megatron-LM's
  ``theoretical_memory_usage.py``). fp32 parameters: 4 + 4 + 8/DP (no master
  copy).
* **Activations** (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large
  Transformer Models", re-derived for this architecture: RMSNorm, SwiGLU, GQA, optional
  qk-norm, no dropout since the builder sets both dropouts to 0 and ``dropout(p=0)`` saves no
  mask). Per token per layer, in elements of the compute dtype:
  ``4h`` unsharded (the inputs and outputs of the two norms, which are the inputs of the QKV
  and fc1 GEMMs; divided by TP with sequence parallelism) plus, divided by TP,
  Q + K + V + attention output (``2q + 2kv`` with flash attention; the local spec materialises
  GQA-expanded K, V and the softmax probabilities ``a * s``: ``4q + a*s``), the fc1 output
  ``2F`` and SwiGLU output ``F``, and the qk-norm inputs ``q + kv`` (Qwen3). Flash attention
  also keeps its fp32 log-sum-exp (``a`` per token). Korthikanti's dense GPT figure
  ``34 + 5as/h`` is this count with q = kv = h, F = 4h, GeLU and two dropout masks.
  The CPU local spec (fp32, no fusions) keeps more: torch's composite RMSNorm one more
  tensor per norm, the unfused SwiGLU ``2F`` more, qk-norm ``2(q + kv)`` more; they are
  counted for a layout that is not fused, and ``benchmarks/bench_dryrun_memory.py`` finds
  this figure within 1% of what a real megatron-core forward saves and holds.
  Selective recompute drops the ``a*s`` term; full recompute keeps only the input (``h``,
  over TP with SP) of each group of ``recompute_num_layers`` layers (``uniform``) plus one
  group's working set while it is recomputed, or (``block``) recomputes only the first
  ``recompute_num_layers`` layers of each stage and keeps the others' activations.
  The 1F1B schedule keeps ``min(PP - k, micro-batches)`` micro-batches in flight on stage k
  (``PP - k`` is assumed: the count per step is not known before the data), so the first
  stage holds all L layers' worth; the interleaved schedule multiplies by
  ``1 + (PP-1)/(PP*VPP)``. Context parallelism divides the sequence by CP.
* **Logits** (last stage): the output layer's bf16 logits are cast to fp32 by
  ``Float16Module`` and saved by the vocab-parallel ops, and their fp32 gradient exists
  next to them in the backward (8 B per element of ``[tokens, V/TP]``; Stage 1's in-place
  backward needs 6, Stage 2 with several consumers 8, so 8 is counted), plus two fp32 chunk
  workspaces of ``DEFAULT_CHUNK_ELEMENTS["cuda"]`` logits each (:mod:`erpd_megatron.ops.
  vocab_parallel`).
* **ERPD buffers.** Every micro-batch of a step is moved to the GPU at the step's start
  (``train/engine.py``), so the per-token tensors of one step of this DP rank (ids, positions,
  targets, mask, advantages, sequence index: 40 B) and, in Stage 2, the cached arrays of each
  teacher (int64 top-k ids, top-k values in ``cache.dtype``, the reference top-k values when
  ``alpha != 1``, fp32 sampled log-probs) are resident, for up to ``global_batch_size / DP``
  sequences of ``max_seq_length`` tokens. The anchor scoring pass is forward-only (one
  layer's working set and the logits, nothing kept across layers) and the cache tool's
  distributed top-k gathers ``k * TP`` candidates (fp32 values + int64 ids) per token; both
  are reported, and the fit check takes the largest of the three passes.
* **Runtime**: a fixed 2 GiB for the CUDA context, NCCL buffers and cuBLAS/TE workspaces.

A layout fits when the total is within 90% of ``parallel.gpu_memory_gb`` (headroom for the
caching allocator's fragmentation). Not modelled: FP8 copies of activations (TE keeps some
GEMM inputs in FP8, which only lowers the figure), MoE routing imbalance (a sparse layer's
expert activations are counted per routed copy of each token, ``moe_router_topk`` copies,
as if every expert got its share) and the dispatcher's communication buffers, and the vLLM
engine, which runs as its own step.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Optional

from erpd_megatron.config.schema import Config
from erpd_megatron.config.validate import head_dim, padded_vocab_size

GIB = 1024**3
RUNTIME_OVERHEAD_GIB = 2.0
"""CUDA context, NCCL communicator buffers, cuBLAS / Transformer Engine workspaces."""
FIT_FRACTION = 0.9
"""A layout fits when its total is within this fraction of the GPU's memory."""
CHUNK_ELEMENTS_GPU = 1 << 24
"""``erpd_megatron.ops.vocab_parallel.DEFAULT_CHUNK_ELEMENTS["cuda"]`` (kept equal by a test:
this module stays free of torch)."""
CHUNK_WORKSPACES = 2
"""fp32 chunk buffers the vocab-parallel ops hold at once (the exps and the entropy term)."""
BATCH_BYTES_PER_TOKEN = 4 * 8 + 2 * 4
"""MicroBatch tensors per token: int64 ids, positions, targets, seq_index; fp32 mask, advantages."""
_VALUE_BYTES = {"fp16": 2, "bf16": 4, "fp32": 4}  # bf16 cache values are decoded to fp32


@dataclass(frozen=True)
class Layout:
    """The parallel layout and the memory-relevant knobs of a recipe."""

    world: int
    tp: int
    pp: int
    dp: int
    ep: int = 1
    etp: int = 1
    cp: int = 1
    vpp: Optional[int] = None
    sp: bool = False
    recompute: Optional[str] = None  # None, "selective" or "full"
    recompute_method: Optional[str] = None  # full: "uniform" (default) or "block"
    recompute_num_layers: Optional[int] = None  # full: layers per group / per stage (default 1)
    flash: bool = True
    act_bytes: int = 2
    param_bytes: int = 2
    distributed_optimizer: bool = True
    dropout: bool = False  # the builder sets hidden/attention dropout to 0 (models/builder.py)
    fused: bool = True  # TE norms + fused bias-SwiGLU (GPU); False: the CPU local spec's ops


def layout_of(cfg: Config, world_size: Optional[int] = None, *, on_gpu: bool = True) -> Layout:
    """The layout of ``cfg`` on ``world_size`` ranks (default: the recipe's cluster).

    Knobs the schema may not have yet (context parallelism, virtual pipeline, recompute)
    are read with ``getattr`` defaults, so the estimate follows them once they exist.
    ``on_gpu``: ``params_dtype: auto`` means bf16 and ``transformer_impl: auto`` means
    Transformer Engine (flash attention); False gives the CPU resolution (fp32, local spec).
    """
    par, prec = cfg.parallel, cfg.precision
    world = world_size or par.num_nodes * par.gpus_per_node
    tp, pp = par.tensor_model_parallel_size, par.pipeline_model_parallel_size
    cp = int(getattr(par, "context_parallel_size", 1) or 1)
    dtype = prec.params_dtype if prec.params_dtype != "auto" else ("bf16" if on_gpu else "fp32")
    nbytes = 4 if dtype == "fp32" else 2
    impl = (
        prec.transformer_impl
        if prec.transformer_impl != "auto"
        else ("transformer_engine" if on_gpu else "local")
    )
    recompute = getattr(par, "recompute_granularity", None) or getattr(
        cfg.model, "recompute_granularity", None
    )
    return Layout(
        world=world,
        tp=tp,
        pp=pp,
        dp=world // (tp * pp * cp),
        ep=par.expert_model_parallel_size,
        etp=int(getattr(par, "expert_tensor_parallel_size", tp) or tp),
        cp=cp,
        vpp=getattr(par, "virtual_pipeline_model_parallel_size", None),
        sp=bool(par.sequence_parallel),
        recompute=recompute,
        recompute_method=getattr(par, "recompute_method", None),
        recompute_num_layers=getattr(par, "recompute_num_layers", None),
        flash=impl == "transformer_engine",
        act_bytes=nbytes,
        param_bytes=nbytes,
        distributed_optimizer=par.use_distributed_optimizer,
        fused=impl == "transformer_engine" and on_gpu,
    )


@dataclass(frozen=True)
class LayerParams:
    """Unsharded parameters of one layer, by how they are sharded."""

    tp: int  # over TP: attention, dense MLP, shared expert
    replicated: int  # norms, router, shared-expert gate
    expert: int  # routed experts: over ETP * EP


@dataclass(frozen=True)
class MoeShape:
    """The MoE fields of a model (read with getattr: the schema grows them)."""

    experts: int
    topk: int
    ffn: int  # one routed expert's width
    shared: int  # shared expert width (0: none)
    shared_gate: bool
    pattern: tuple[int, ...]  # per layer: 1 = MoE layer


def moe_shape(cfg: Config) -> Optional[MoeShape]:
    """The MoE shape of ``cfg.model``; None for a dense model. Layer i is sparse when
    ``(i + 1) % decoder_sparse_step == 0`` and i is not in ``mlp_only_layers`` (HF's rule)."""
    m = cfg.model
    if not m.num_experts:
        return None
    step = int(getattr(m, "decoder_sparse_step", 1) or 1)
    skip = set(getattr(m, "mlp_only_layers", None) or [])
    return MoeShape(
        experts=m.num_experts,
        topk=int(getattr(m, "moe_router_topk", 2)),
        ffn=getattr(m, "moe_ffn_hidden_size", None) or m.ffn_hidden_size,
        shared=getattr(m, "shared_expert_intermediate_size", None) or 0,
        shared_gate=bool(getattr(m, "shared_expert_gate", False)),
        pattern=tuple(int(i not in skip and (i + 1) % step == 0) for i in range(m.num_layers)),
    )


def _attn_dims(cfg: Config) -> tuple[int, int, int]:
    m = cfg.model
    d = head_dim(m)
    return m.num_attention_heads * d, m.num_query_groups * d, d


def layer_params(cfg: Config, moe_layer: bool = False) -> LayerParams:
    """Parameters of one dense (or MoE) layer, unsharded."""
    m = cfg.model
    h = m.hidden_size
    q, kv, d = _attn_dims(cfg)
    attn = h * (q + 2 * kv) + q * h + (q + 2 * kv if m.add_qkv_bias else 0)
    norms = 2 * h + (2 * d if m.qk_layernorm else 0)
    moe = moe_shape(cfg) if moe_layer else None
    if moe is None:
        return LayerParams(tp=attn + 3 * h * m.ffn_hidden_size, replicated=norms, expert=0)
    return LayerParams(
        tp=attn + 3 * h * moe.shared,
        replicated=norms + h * moe.experts + (h if moe.shared and moe.shared_gate else 0),
        expert=3 * h * moe.ffn * moe.experts,
    )


def params_total(cfg: Config, tp: int = 1) -> int:
    """All parameters of the model (vocabulary padded for ``tp``)."""
    m = cfg.model
    moe = moe_shape(cfg)
    pattern = moe.pattern if moe else (0,) * m.num_layers
    layers = 0
    for sparse in (0, 1):
        lp = layer_params(cfg, bool(sparse))
        layers += sum(1 for x in pattern if x == sparse) * (lp.tp + lp.replicated + lp.expert)
    emb = padded_vocab_size(m, tp) * m.hidden_size
    return layers + emb * (1 if m.tie_word_embeddings else 2) + m.hidden_size


def params_active(cfg: Config, tp: int = 1) -> int:
    """Parameters one token passes through: :func:`params_total` with each MoE layer's
    routed experts counted ``moe_router_topk / num_experts`` (HF's "A3B" / "A22B" figure)."""
    moe = moe_shape(cfg)
    total = params_total(cfg, tp)
    if moe is None:
        return total
    expert = layer_params(cfg, True).expert * sum(moe.pattern)
    return int(total - expert + expert * moe.topk / moe.experts)


def _stage_layers(cfg: Config, lay: Layout, k: int) -> tuple[int, int]:
    """(dense, MoE) layers of pipeline stage ``k``."""
    n = cfg.model.num_layers // lay.pp
    moe = moe_shape(cfg)
    sparse = sum(moe.pattern[k * n : (k + 1) * n]) if moe else 0
    return n - sparse, sparse


def stage_params(cfg: Config, lay: Layout, k: int) -> tuple[float, float]:
    """(dense, expert) parameters on one rank of pipeline stage ``k``."""
    m = cfg.model
    n_dense, n_moe = _stage_layers(cfg, lay, k)
    dense = expert = 0.0
    for count, sparse in ((n_dense, False), (n_moe, True)):
        lp = layer_params(cfg, sparse)
        dense += count * (lp.tp / lay.tp + lp.replicated)
        expert += count * lp.expert / (lay.etp * lay.ep)
    emb = padded_vocab_size(m, lay.tp) * m.hidden_size / lay.tp
    if k == 0:
        dense += emb
    if k == lay.pp - 1:
        # the output layer (tied embeddings on PP > 1: megatron keeps a copy on the last stage)
        dense += m.hidden_size + (emb if not m.tie_word_embeddings or lay.pp > 1 else 0)
    return dense, expert


def layer_activation_elements(
    cfg: Config, lay: Layout, seq: int, moe_layer: bool = False
) -> tuple[float, float, float]:
    """Saved activations of one layer per token, in elements of the compute dtype:
    ``(unsharded, tp_sharded, routed)`` before any TP / SP division (see the module
    docstring); fp32 extras (flash's log-sum-exp, router probabilities) are converted to
    compute-dtype elements. ``routed``: an MoE layer's expert part, divided by ETP only."""
    m = cfg.model
    h, f, a = m.hidden_size, m.ffn_hidden_size, m.num_attention_heads
    q, kv, _ = _attn_dims(cfg)
    unsharded = 4.0 * h
    if lay.dropout:  # two 1-byte masks (attention output, MLP output), as Korthikanti counts
        unsharded += 2.0 * h / lay.act_bytes
    if lay.flash:
        attn = 2 * q + 2 * kv + a * 4 / lay.act_bytes
    else:
        k_saved = q if m.num_query_groups < a else kv  # repeat_interleave'd K and V
        probs = a * seq * (1 + (1.5 if lay.dropout else 0))  # + dropout mask and output
        attn = 2 * q + 2 * k_saved + (0 if lay.recompute == "selective" else probs)
    moe = moe_shape(cfg) if moe_layer else None
    mlp_width = moe.shared if moe else f
    sharded = attn + 3.0 * mlp_width + ((q + kv) if m.qk_layernorm else 0)
    routed = 0.0
    if moe:
        # per routed copy of a token: the permuted input (fc1's) and the unpermute input, plus
        # fc1's 2F and the SwiGLU output F of one expert; the router's fp32 logits and probs
        routed = moe.topk * (2.0 * h + 3.0 * moe.ffn) + 2 * moe.experts * 4 / lay.act_bytes
    if not lay.fused:
        # torch's composite RMSNorm also keeps x * rsqrt(...) (one more tensor per norm; the
        # k-norm's input view pins the whole fused QKV output), and the unfused SwiGLU keeps
        # silu(gate) and the product besides fc1's output
        unsharded += 2.0 * h
        sharded += 2.0 * mlp_width + (2 * (q + kv) if m.qk_layernorm else 0)
        routed += 2.0 * moe.topk * moe.ffn if moe else 0.0
    return unsharded, sharded, routed


def _one_layer_bytes(
    cfg: Config, lay: Layout, tokens: float, seq: int, moe_layer: bool = False
) -> float:
    """Saved activations of one layer for a micro-batch of ``tokens`` (already over CP)."""
    un, sh, routed = layer_activation_elements(cfg, lay, seq, moe_layer)
    per_token = un / (lay.tp if lay.sp else 1) + sh / lay.tp + routed / lay.etp
    return per_token * tokens * lay.act_bytes


def _stage_index(lay: Layout, stage: str | int) -> int:
    return {"first": 0, "only": 0, "last": lay.pp - 1}[stage] if isinstance(stage, str) else stage


def activation_bytes(
    cfg: Config, lay: Layout, tokens: int, seq: int, stage: str | int = "only"
) -> float:
    """Activation bytes pipeline stage ``stage`` (an index, or ``first``, ``last``, ``only``)
    keeps at the peak of a 1F1B step with micro-batches of ``tokens`` tokens and sequences of
    ``seq`` (logits excluded). Stage k has ``PP - k`` micro-batches in flight."""
    k = _stage_index(lay, stage)
    first, last = k == 0, k == lay.pp - 1
    tokens_cp = tokens / lay.cp
    seq = max(1, seq // lay.cp)
    n_dense, n_moe = _stage_layers(cfg, lay, k)
    layers = [(n_dense, _one_layer_bytes(cfg, lay, tokens_cp, seq))]
    if n_moe:
        layers.append((n_moe, _one_layer_bytes(cfg, lay, tokens_cp, seq, True)))
    sp_div = lay.tp if lay.sp else 1
    if lay.recompute == "full":
        n_all = n_dense + n_moe
        mean_layer = sum(n * b for n, b in layers) / n_all
        layer_input = cfg.model.hidden_size * tokens_cp * lay.act_bytes / sp_div
        group = max(1, lay.recompute_num_layers or 1)
        if lay.recompute_method == "block":  # the first `group` layers of the stage only
            done = min(group, n_all)
            per_mb = done * layer_input + (n_all - done) * mean_layer
            extra = mean_layer
        else:  # uniform: the input of each group of `group` layers; one group recomputed
            per_mb = math.ceil(n_all / group) * layer_input
            extra = min(group, n_all) * mean_layer
    else:
        per_mb, extra = sum(n * b for n, b in layers), 0.0
    if first:
        per_mb += 8 * tokens_cp  # int64 input ids of the embedding
        if lay.dropout:
            per_mb += cfg.model.hidden_size * tokens_cp  # the embedding dropout's 1-byte mask
    if last:
        # final norm: its input and output (the output layer's input); + x * rsqrt unfused
        norm = 2 if lay.fused else 3
        per_mb += norm * cfg.model.hidden_size * tokens_cp * lay.act_bytes / sp_div
    in_flight = float(lay.pp - k)
    if lay.vpp and lay.pp > 1:
        in_flight *= 1 + (lay.pp - 1) / (lay.pp * lay.vpp)
    return per_mb * in_flight + extra


def logits_bytes(cfg: Config, lay: Layout, tokens: int) -> float:
    """fp32 logits and their gradient on the last stage, plus the chunk workspaces."""
    v_local = padded_vocab_size(cfg.model, lay.tp) // lay.tp
    work = CHUNK_WORKSPACES * min(CHUNK_ELEMENTS_GPU, tokens / lay.cp * v_local) * 4
    return tokens / lay.cp * v_local * 8 + work


def erpd_buffer_bytes(cfg: Config, lay: Layout) -> float:
    """Per-token tensors of one step of this DP rank, resident on the GPU (Stage 2's cached
    teacher arrays included: the larger of Stage 1 and Stage 2)."""
    seq_len = cfg.data.max_seq_length or cfg.model.max_position_embeddings
    tokens = math.ceil(cfg.data.global_batch_size / lay.dp) * seq_len / lay.cp
    k, vb = cfg.cache.topk, _VALUE_BYTES[cfg.cache.dtype]
    per_token = BATCH_BYTES_PER_TOKEN + 4  # the sampled log-prob of pi_r
    for t in cfg.stage2.teachers:
        if t.signal == "topk_kl":
            per_token += k * (8 + vb) + (k * vb if t.alpha != 1.0 else 0)
        else:
            per_token += 4 * (2 if t.signal == "contrast" else 1)
    return tokens * per_token


@dataclass
class MemoryEstimate:
    """Parameters and memory (GiB) of the most loaded rank; ``stage`` says which."""

    world_size: int
    dp: int
    stage: str
    tokens_per_microbatch: int
    params_total: int
    params_per_rank: int
    weights_gib: float
    grads_gib: float
    optimizer_gib: float
    activations_gib: float
    logits_gib: float
    erpd_buffers_gib: float
    runtime_gib: float
    scoring_gib: float
    cache_tool_gib: float
    budget_gib: float

    @property
    def total_gib(self) -> float:
        """The training step's peak: every part."""
        return (
            self.weights_gib
            + self.grads_gib
            + self.optimizer_gib
            + self.activations_gib
            + self.logits_gib
            + self.erpd_buffers_gib
            + self.runtime_gib
        )

    @property
    def fits(self) -> bool:
        """Whether the training step (the largest of the passes) fits the GPU."""
        peak = max(self.total_gib, self.scoring_gib, self.cache_tool_gib)
        return peak <= FIT_FRACTION * self.budget_gib

    def to_dict(self) -> dict[str, Any]:
        """Plain figures for ``erpd dryrun --json``."""
        d = asdict(self)
        d["total_gib"] = self.total_gib
        d["fits"] = self.fits
        return d


def microbatch_tokens(cfg: Config) -> int:
    """Tokens of the largest micro-batch: the budget, or one sequence of ``max_seq_length``
    when that is longer (a sequence longer than the budget gets a micro-batch of its own)."""
    return max(cfg.data.max_tokens_per_microbatch, cfg.data.max_seq_length or 0)


def estimate_layout(cfg: Config, lay: Layout, tokens: Optional[int] = None) -> MemoryEstimate:
    """Memory of the most loaded rank of ``cfg`` laid out as ``lay``."""
    tokens = tokens if tokens is not None else microbatch_tokens(cfg)
    seq = min(tokens, cfg.data.max_seq_length or cfg.model.max_position_embeddings)
    total_params = params_total(cfg, lay.tp)
    edp = max(1, lay.world // (lay.etp * lay.ep * lay.pp))
    opt_b = 12 if lay.param_bytes == 2 else 8
    runtime = RUNTIME_OVERHEAD_GIB * GIB
    buffers = erpd_buffer_bytes(cfg, lay)
    best = None
    v_local = padded_vocab_size(cfg.model, lay.tp) // lay.tp
    tokens_cp = tokens / lay.cp
    seq_cp = max(1, seq // lay.cp)
    one_layer = max(
        _one_layer_bytes(cfg, lay, tokens_cp, seq_cp),
        _one_layer_bytes(cfg, lay, tokens_cp, seq_cp, moe_shape(cfg) is not None),
    )
    for k in range(lay.pp):
        stage = (
            "only"
            if lay.pp == 1
            else ("first" if k == 0 else "last" if k == lay.pp - 1 else f"middle ({k})")
        )
        dense, expert = stage_params(cfg, lay, k)
        params = dense + expert
        shard = lay.distributed_optimizer
        opt = dense * opt_b / (lay.dp if shard else 1) + expert * opt_b / (edp if shard else 1)
        acts = activation_bytes(cfg, lay, tokens, seq, k)
        has_logits = k == lay.pp - 1
        logits = logits_bytes(cfg, lay, tokens) if has_logits else 0.0
        states = params * (lay.param_bytes + 4) + opt
        # forward-only passes: one layer's working set, bf16 + fp32 logits while they are cast
        fwd_logits = tokens_cp * v_local * 6 if has_logits else 0.0
        scoring = states + one_layer + fwd_logits + buffers + runtime
        topk = tokens_cp * cfg.cache.topk * lay.tp * 12 * 2 if has_logits else 0.0
        cache_tool = params * lay.param_bytes + one_layer + fwd_logits + topk + runtime
        est = MemoryEstimate(
            world_size=lay.world,
            dp=lay.dp,
            stage=stage,
            tokens_per_microbatch=tokens,
            params_total=total_params,
            params_per_rank=int(params),
            weights_gib=params * lay.param_bytes / GIB,
            grads_gib=params * 4 / GIB,
            optimizer_gib=opt / GIB,
            activations_gib=acts / GIB,
            logits_gib=logits / GIB,
            erpd_buffers_gib=buffers / GIB,
            runtime_gib=runtime / GIB,
            scoring_gib=scoring / GIB,
            cache_tool_gib=cache_tool / GIB,
            budget_gib=cfg.parallel.gpu_memory_gb * 1e9 / GIB,
        )
        if best is None or est.total_gib > best.total_gib:
            best = est
    assert best is not None
    return best


def max_tokens_that_fit(cfg: Config, lay: Layout, *, step: int = 256, limit: int = 1 << 22) -> int:
    """The largest micro-batch token budget (a multiple of ``step``) that fits; 0 if none."""
    if not estimate_layout(cfg, lay, step).fits:
        return 0
    lo, hi = 1, limit // step  # lo fits; find the largest multiple that fits
    if estimate_layout(cfg, lay, hi * step).fits:
        return hi * step
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if estimate_layout(cfg, lay, mid * step).fits:
            lo = mid
        else:
            hi = mid
    return lo * step
