"""The Megatron wiring of training: DDP model chunks, optimizer, LR schedule, and one call that
runs a list of micro-batches through the pipeline schedule (forward+backward or forward-only).

Loss functions stay pure: they receive the last stage's vocab-parallel logits of one
micro-batch (``[b, s, V/tp]``, a transposed view of the model's own ``[s, b, V/tp]``: take
their rows with :func:`token_rows`, no copy) and return ``(loss, metrics)`` where ``loss``
is already normalised by the *global* batch normaliser (see :mod:`erpd_megatron.ops.losses`).
Megatron divides a returned loss by the number of micro-batches and DDP averages gradients
over data-parallel ranks;
:meth:`Engine.run` multiplies both factors back, so that the gradient is exactly the
gradient of the global-batch loss, whatever the micro-batching and DP size.

Equal micro-batch counts. Every data-parallel rank must pass :meth:`Engine.run` the same
number of micro-batches: callers pad their list with zero-loss dummies
(:func:`~erpd_megatron.data.batching.dp_micro_batch_count`,
:func:`~erpd_megatron.data.batching.pad_micro_batches`), also for forward-only passes. A rank
with fewer (or none, on a short last global batch) would leave the others blocked in the DP
gradient reduction, and under FP8 delayed scaling in the amax all-reduce that Transformer
Engine runs at every FP8 forward over megatron's amax group, TP x DP (megatron-core 0.16.1
``core/fp8_utils.py`` passes ``parallel_state.get_amax_reduction_group(with_context_parallel=
True, tp_only_amax_red=config.tp_only_amax_red)`` as ``fp8_group``; ``parallel_state.py``
returns ``_TENSOR_AND_DATA_PARALLEL_GROUP_WITH_CP`` unless ``tp_only_amax_red``). Equal counts
are the chosen answer (rather than a TP-only amax reduction, which would let DP replicas'
scales drift apart): the dummies cost one short forward/backward each and keep every
collective of the schedule matched.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from erpd_megatron.config.schema import Config
from erpd_megatron.data.batching import MicroBatch
from erpd_megatron.runtime import comm

LossFn = Callable[[torch.Tensor, MicroBatch], tuple[torch.Tensor, dict[str, torch.Tensor]]]


@dataclass
class VocabShard:
    """Where this rank's logits sit in the vocabulary."""

    group: Any
    """TP process group (None when TP = 1)."""
    start: int
    """First vocabulary id of this rank's logits."""
    vocab_size: int
    """The real (unpadded) vocabulary size; ids at or above it are padding."""


class Engine:
    """DDP-wrapped model chunks with (optionally) an optimizer and LR scheduler."""

    def __init__(self, cfg: Config, *, train: bool, total_steps: int = 1) -> None:
        from megatron.core import parallel_state as ps

        from erpd_megatron.models.builder import build_model

        self.cfg = cfg
        self.ps = ps
        self.train = train
        self.model: list[torch.nn.Module] = build_model(cfg, wrap_ddp=train)
        self.optimizer = self.scheduler = None
        if train:
            self.optimizer, self.scheduler = self._build_optimizer(total_steps)
            _unwrapped(self.model[0]).config.grad_scale_func = self.optimizer.scale_loss
        tp = ps.get_tensor_model_parallel_world_size()
        self.tp_size = tp
        self.dp_size = ps.get_data_parallel_world_size()
        self.dp_rank = ps.get_data_parallel_rank()
        self.cp_size = ps.get_context_parallel_world_size()
        self.cp_rank = ps.get_context_parallel_rank()
        self.is_last_stage = ps.is_pipeline_last_stage()
        self.is_first_stage = ps.is_pipeline_first_stage()
        from erpd_megatron.models.router_replay import attach

        self.moe = attach(cfg, self.model)  # MoE routing metrics, pi_r record/replay

    # ---- construction -------------------------------------------------------------------
    def _build_optimizer(self, total_steps: int) -> tuple[Any, Any]:
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        o = self.cfg.optimizer
        dtype = _unwrapped(self.model[0]).config.params_dtype
        ocfg = OptimizerConfig(
            optimizer="adam",
            lr=o.lr,
            min_lr=o.min_lr,
            weight_decay=o.weight_decay,
            adam_beta1=o.adam_beta1,
            adam_beta2=o.adam_beta2,
            adam_eps=o.adam_eps,
            clip_grad=o.clip_grad,
            bf16=dtype == torch.bfloat16,
            fp16=dtype == torch.float16,
            params_dtype=dtype,
            use_distributed_optimizer=self.cfg.parallel.use_distributed_optimizer,
        )
        optimizer = get_megatron_optimizer(ocfg, self.model)
        decay_steps = max(1, total_steps)
        scheduler = OptimizerParamScheduler(
            optimizer,
            init_lr=0.0 if o.lr_warmup_steps else o.lr,
            max_lr=o.lr,
            min_lr=o.min_lr,
            lr_warmup_steps=o.lr_warmup_steps,
            lr_decay_steps=decay_steps,
            lr_decay_style=o.lr_decay_style,
            start_wd=o.weight_decay,
            end_wd=o.weight_decay,
            wd_incr_steps=decay_steps,
            wd_incr_style="constant",
        )
        return optimizer, scheduler

    # ---- information ----------------------------------------------------------------------
    def vocab_shard(self) -> VocabShard:
        """The TP group and this rank's vocabulary offset, for the vocab-parallel ops."""
        from erpd_megatron.config.validate import padded_vocab_size

        padded = padded_vocab_size(self.cfg.model, self.tp_size)
        rank = self.ps.get_tensor_model_parallel_rank()
        group = self.ps.get_tensor_model_parallel_group() if self.tp_size > 1 else None
        return VocabShard(
            group=group, start=rank * padded // self.tp_size, vocab_size=self.cfg.model.vocab_size
        )

    # ---- running --------------------------------------------------------------------------
    def run(
        self, microbatches: list[MicroBatch], loss_fn: LossFn, *, forward_only: bool
    ) -> list[dict]:
        """Run ``microbatches`` through the pipeline schedule.

        Returns the per-micro-batch metric dicts of ``loss_fn`` on the last pipeline stage
        (an empty list on other stages). With ``forward_only=False`` gradients accumulate
        into the DDP buffers (zeroed here first) and are reduced over DP when it returns.
        Every DP rank must pass the same number of micro-batches (see the module docstring);
        an empty list is only allowed when it is empty on every rank.
        """
        from megatron.core.pipeline_parallel import get_forward_backward_func

        interleaved = len(self.model) > 1
        te = _unwrapped(self.model[0]).config.transformer_impl == "transformer_engine"
        # (what the model runs, what the loss sees): the same micro-batch, except that the
        # interleaved schedule runs padded copies and the loss gets the logits cropped back
        pairs = [(mb, mb) for mb in microbatches]
        if interleaved and microbatches:
            padded = _pad_for_interleaving(
                microbatches, self.ps.get_pipeline_model_parallel_world_size()
            )
            pairs = [
                (p, microbatches[i] if i < len(microbatches) else p) for i, p in enumerate(padded)
            ]
            microbatches = padded
        n = len(microbatches)
        if n == 0:
            return []
        # DDP averages gradients over DP x CP (core_v0.16.1 distributed_data_parallel.py:
        # gradient_scaling_factor = 1.0 / self.dp_cp_group.size()); CP ranks' losses are
        # partial sums over their positions (data/context_parallel.py)
        scale = float(n * (1 if forward_only else self.dp_size * self.cp_size))
        device = _device()
        if not forward_only:
            for m in self.model:
                m.zero_grad_buffer()
            self.optimizer.zero_grad()
        on_device = [
            (run.to(device), seen if seen is run else seen.to(device)) for run, seen in pairs
        ]
        # the interleaved schedule takes one iterator per model chunk and pulls every
        # micro-batch from each (core_v0.16.1 pipeline_parallel/schedules.py,
        # forward_backward_pipelining_with_interleaving: data_iterator[model_chunk_id])
        it: Any = [iter(on_device) for _ in self.model] if interleaved else iter(on_device)

        def loss_wrapper(mb: MicroBatch, logits: torch.Tensor) -> tuple[torch.Tensor, dict]:
            logits = logits.transpose(0, 1)  # [s, b, V] -> a [b, s, V] view, no copy
            b, s = mb.input_ids.shape
            if logits.shape[0] != b or logits.shape[1] != s:  # a padded interleaved copy
                logits = logits[:b, :s]
            loss, metrics = loss_fn(logits, mb)
            return loss * scale, metrics

        def forward_step(data_iterator: Any, model: torch.nn.Module) -> tuple[torch.Tensor, Any]:
            run, seen = next(data_iterator)
            mask, packed = packed_inputs(run, te=te)  # from the whole row (global cu_seqlens)
            if self.cp_size > 1:  # this CP rank's positions (validated: TE, no mask)
                run, seen = (cp_micro_batch(m, self.cp_size, self.cp_rank) for m in (run, seen))
            # labels= makes GPTModel hand the output layer's [s, b, V/tp] logits to
            # compute_language_model_loss (overridden below to return them unchanged), the
            # path of megatron's own loss; without labels it would return
            # logits.transpose(0, 1).contiguous(), a full-logits copy forward and backward
            # (core_v0.16.1 models/gpt/gpt_model.py, GPTModel._postprocess)
            if self.moe is not None:
                self.moe.before_forward(run)
            if packed is None:
                out = model(run.input_ids, run.position_ids, mask, labels=run.targets)
            else:
                out = model(
                    run.input_ids,
                    run.position_ids,
                    None,
                    labels=run.targets,
                    packed_seq_params=packed,
                )
            if self.moe is not None:
                self.moe.after_forward(run)
            return out, partial(loss_wrapper, seen)

        seq = max(int(mb.input_ids.shape[1]) for mb in microbatches) // self.cp_size
        mbs = max(int(mb.input_ids.shape[0]) for mb in microbatches)
        for m in self.model:
            # Interleaved: every micro-batch gets the step's largest shape (masked padding)
            # and megatron's fixed tensor_shape, so no p2p carries a shape handshake (with
            # variable shapes, the first CPU run failed with "grad_output has a shape of
            # [15, 4, 64] and output [10, 6, 64]"; that was the PP=2 batched-p2p mismatch
            # that builder.transformer_config now avoids, but fixed shapes are what this
            # path has been tested with).
            _unwrapped(m).config.variable_seq_lengths = not interleaved
        fb = get_forward_backward_func()
        chunks = [_unwrapped(m) for m in self.model]
        for c in chunks:  # an instance attribute shadows the method for this call only
            c.compute_language_model_loss = _logits_unchanged
        try:
            out = fb(
                forward_step_func=forward_step,
                data_iterator=it,
                model=self.model if len(self.model) > 1 else self.model[0],
                num_microbatches=n,
                seq_length=seq,
                micro_batch_size=mbs,
                forward_only=forward_only,
            )
        finally:
            for c in chunks:
                del c.compute_language_model_loss
        if not self.is_last_stage:
            return []
        out = list(out)
        if self.cp_size > 1 and forward_only:  # per-position results of the whole rows
            out = [self._cp_gather(d, seen) for d, (_, seen) in zip(out, on_device)]
        return out

    def _cp_gather(self, metrics: dict, mb: MicroBatch) -> dict:
        """Forward-only results of one micro-batch with the CP ranks' positions put back
        together: every ``[b, s/CP, ...]`` tensor is all-gathered over the CP group (each rank
        holds the same number of positions) and unsplit to ``mb``'s ``[b, s, ...]``; scalars
        pass through. Every CP peer of this last stage calls it for the same micro-batches."""

        from erpd_megatron.data.context_parallel import cp_unsplit

        idx = [cp_indices(mb, self.cp_size, r) for r in range(self.cp_size)]
        group = self.ps.get_context_parallel_group()
        b, local = int(mb.input_ids.shape[0]), int(idx[0].numel())
        out = {}
        for k, v in metrics.items():
            if torch.is_tensor(v) and v.dim() >= 2 and tuple(v.shape[:2]) == (b, local):
                v = cp_unsplit(comm.all_gather(v.contiguous(), group=group), idx, dim=1)
            out[k] = v
        return out

    def grads_finite(self) -> bool:
        """Whether every local gradient is finite, agreed over all ranks (MAX all-reduce)."""
        grads: list[torch.Tensor] = []
        for m in self.model:
            bufs = getattr(m, "buffers", None)  # DDP: every gradient lives in its grad buffers
            if isinstance(bufs, list):
                bufs = bufs + list(getattr(m, "expert_parallel_buffers", []))
                grads += [b.grad_data for b in bufs if b.grad_data.numel()]
                continue
            for p in m.parameters():
                g = getattr(p, "main_grad", None)
                g = p.grad if g is None else g
                if g is not None and g.numel():
                    grads.append(g)
        # one min/max reduction per buffer (NaN propagates; +-Inf shows as an extreme), the
        # flags summed on the device and read once: no per-parameter host sync
        bad = sum((~torch.isfinite(torch.stack(torch.aminmax(g)))).sum() for g in grads)
        return not comm.any_rank(bool(bad))

    def step(self) -> tuple[bool, float]:
        """Apply the optimizer and advance the LR schedule; returns (ok, grad_norm)."""
        ok, grad_norm, _ = self.optimizer.step()
        if ok:
            self.scheduler.step(increment=1)
        return bool(ok), float(grad_norm) if grad_norm is not None else 0.0

    def release(self) -> None:
        """Free the model's and optimizer's tensors now (the run is over).

        megatron-core's DDP registers its backward hooks on the parameters' AccumulateGrad
        nodes and keeps no handle (core_v0.16.1 distributed_data_parallel.py,
        ``grad_acc.register_hook(self._make_backward_post_hook(param))``); the hook closes over
        the DDP module, and a cycle through a C++ node is invisible to Python's garbage
        collector, so the weights, gradient buffers and main grads would outlive the run. In
        a process that runs several steps (``erpd round --in-process``) that is one model per
        step; here every tensor the cycle reaches is dropped instead."""
        self.optimizer = self.scheduler = None
        for chunk in self.model:
            for name in ("buffers", "expert_parallel_buffers"):  # DDP's grad/param buffers
                for buf in getattr(chunk, name, None) or []:
                    for obj in [buf, *getattr(buf, "buckets", [])]:
                        for k, v in list(vars(obj).items()):  # param_data, grad_data, ...
                            if isinstance(v, torch.Tensor):
                                setattr(obj, k, None)
            if hasattr(chunk, "grad_accs"):
                chunk.grad_accs = []
            for p in chunk.parameters():
                p.grad = None
                if hasattr(p, "main_grad"):
                    p.main_grad = None
                p.data = torch.empty(0, dtype=p.dtype, device=p.device)
            for b in torch.nn.Module.buffers(chunk):  # DDP has a `buffers` list attribute
                b.data = torch.empty(0, dtype=b.dtype, device=b.device)
        self.model = []

    def current_lr(self) -> float:
        """Learning rate of the first param group."""
        return float(self.optimizer.param_groups[0]["lr"])


def _logits_unchanged(labels: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Stands in for ``LanguageModule.compute_language_model_loss`` inside :meth:`Engine.run`:
    the loss functions take the ``[s, b, V/tp]`` logits themselves."""
    return logits


@dataclass(frozen=True)
class TokenOrder:
    """How the rows of :func:`token_rows` map to a micro-batch's ``[b, s]`` positions."""

    b: int
    s: int
    seq_major: bool
    """Rows are in ``[s, b]`` order (the model's own layout), else ``[b, s]``."""

    def flat(self, t: torch.Tensor) -> torch.Tensor:
        """A ``[b, s, ...]`` per-token tensor as ``[b*s, ...]`` rows in the logits' order."""
        if self.seq_major:
            t = t.transpose(0, 1)
        return t.reshape(-1, *t.shape[2:])

    def unflat(self, t: torch.Tensor) -> torch.Tensor:
        """``[b*s, ...]`` rows back to ``[b, s, ...]`` (a view)."""
        if self.seq_major:
            return t.view(self.s, self.b, *t.shape[1:]).transpose(0, 1)
        return t.view(self.b, self.s, *t.shape[1:])


def token_rows(logits: torch.Tensor) -> tuple[torch.Tensor, TokenOrder]:
    """The ``[b, s, V]`` logits a loss function receives as ``[b*s, V]`` rows without a copy.

    :meth:`Engine.run` passes a transposed view of the model's ``[s, b, V]`` logits; their
    rows are then in ``[s, b]`` order, and per-token inputs and outputs go through the
    returned :class:`TokenOrder`. A contiguous ``[b, s, V]`` tensor gives ``[b, s]`` order."""
    b, s, v = logits.shape
    sb = logits.transpose(0, 1)
    if not logits.is_contiguous() and sb.is_contiguous():
        return sb.view(s * b, v), TokenOrder(b, s, True)
    return logits.reshape(b * s, v), TokenOrder(b, s, False)


def packed_inputs(mb: MicroBatch, *, te: bool) -> tuple[torch.Tensor | None, Any]:
    """What a packed micro-batch (``mb.segments`` set) adds to the model call:
    ``(attention_mask, None)`` on the local spec, ``(None, PackedSeqParams)`` on Transformer
    Engine; ``(None, None)`` for an unpacked one (megatron's own causal mask).

    THD (GPU only, never run here; read in megatron-core 0.16.1 only, 0.19 unchecked):
    ``GPTModel.forward(..., packed_seq_params=)`` (``models/gpt/gpt_model.py``) passes it on;
    ``Attention.forward`` squeezes the batch dim of q/k/v for ``qkv_format == "thd"`` and
    applies RoPE per sequence from ``cu_seqlens_q(_padded)`` (``transformer/attention.py``,
    so position ids are not read), and ``TEDotProductAttention`` forwards ``cu_seqlens_*`` and
    ``max_seqlen_*`` to TE's fused attention, turning the causal mask type into
    ``padding_causal`` for THD (``extensions/transformer_engine.py``, TE >= 1.7); the
    rotary length is ``max(max_seqlen_q, max_seqlen_kv)`` (``rotary_pos_embedding.py``
    ``get_rotary_seq_len``). THD takes one row ([1, T]): ``collate_packed`` builds exactly
    that. The alignment padding of a sequence is part of its segment, so ``cu_seqlens`` and
    the padded variant coincide (both set). Under CP the row is split per segment and
    cu_seqlens stay global, as verl packs for megatron (``verl/models/mcore/util.py``
    ``preprocess_packed_seqs``: sequences padded to a multiple of TP x CP x 2, each split into
    the two load-balanced halves, ``cu_seqlens_padded`` of the whole row)."""
    if mb.segments is None:
        return None, None
    from erpd_megatron.data.batching import packed_attention_mask, packed_cu_seqlens

    if not te:
        return packed_attention_mask(mb.segments), None
    from megatron.core.packed_seq_params import PackedSeqParams

    cu, longest = packed_cu_seqlens(mb.segments)
    return None, PackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=cu,
        cu_seqlens_kv=cu,
        cu_seqlens_q_padded=cu,
        cu_seqlens_kv_padded=cu,
        max_seqlen_q=longest,
        max_seqlen_kv=longest,
    )


def cp_indices(mb: MicroBatch, cp_size: int, cp_rank: int) -> torch.Tensor:
    """Positions of ``mb``'s rows that CP rank ``cp_rank`` holds: the load-balanced chunks of
    the row, or of each packed segment."""
    from erpd_megatron.data.batching import packed_cu_seqlens
    from erpd_megatron.data.context_parallel import cp_chunk_indices, cp_packed_indices

    if mb.segments is not None:
        return cp_packed_indices(packed_cu_seqlens(mb.segments)[0].cpu(), cp_size, cp_rank)
    return cp_chunk_indices(int(mb.input_ids.shape[1]), cp_size, cp_rank)


def cp_micro_batch(mb: MicroBatch, cp_size: int, cp_rank: int) -> MicroBatch:
    """This CP rank's positions of ``mb`` (every [b, s, ...] tensor along the sequence):
    megatron's load-balanced chunks of the row, or of each packed segment (THD; TE's
    ``thd_get_partitioned_indices`` order, see :mod:`erpd_megatron.data.context_parallel`).
    Per-sequence values stay whole; ``seq_owned`` marks the sequences whose first scoring
    position is here (they are counted once over CP)."""
    from erpd_megatron.data.context_parallel import cp_split

    s = int(mb.input_ids.shape[1])
    idx = cp_indices(mb, cp_size, cp_rank)
    seq = mb.seq_index
    n = int(mb.rewards.shape[0])
    first = torch.full((n,), s, dtype=torch.long, device=seq.device)
    pos = torch.arange(s, device=seq.device).expand_as(seq)
    valid = seq >= 0
    if valid.any():
        first = first.scatter_reduce(0, seq[valid], pos[valid], reduce="amin")
    here = torch.zeros(s, dtype=torch.bool, device=seq.device)
    here[idx.to(seq.device)] = True
    owned = here[first.clamp(max=s - 1)] & (first < s)

    def cut(t: torch.Tensor) -> torch.Tensor:
        return cp_split(t, idx, dim=1)

    return MicroBatch(
        rows=mb.rows,
        input_ids=cut(mb.input_ids),
        position_ids=cut(mb.position_ids),
        targets=cut(mb.targets),
        loss_mask=cut(mb.loss_mask),
        advantages=cut(mb.advantages),
        rewards=mb.rewards,
        seq_index=cut(mb.seq_index),
        token_arrays={k: cut(v) for k, v in mb.token_arrays.items()},
        segments=None if mb.segments is None else cut(mb.segments),
        seq_owned=owned,
    )


def _pad_for_interleaving(mbs: list[MicroBatch], pp: int) -> list[MicroBatch]:
    """Zero-loss dummies up to a multiple of PP (at least PP): megatron's interleaved schedule
    refuses fewer than PP micro-batches or a last group of 1..PP-1 (core_v0.16.1
    ``schedules.py``, ``microbatch_group_size_per_vp_stage`` defaults to PP). Every DP rank has
    the same count already, so it pads the same."""
    from erpd_megatron.data.batching import pad_micro_batches

    count = max(pp, -(-len(mbs) // pp) * pp)
    t = mbs[-1]
    template = {k: [v[0].cpu().numpy()] for k, v in t.token_arrays.items()}
    mbs = pad_micro_batches(mbs, count, length=int(t.input_ids.shape[1]), token_arrays=template)
    b = max(int(m.input_ids.shape[0]) for m in mbs)
    s = max(int(m.input_ids.shape[1]) for m in mbs)
    return [_pad_shape(m, b, s) for m in mbs]


def _pad_shape(mb: MicroBatch, b: int, s: int) -> MicroBatch:
    """``mb`` right-padded to ``[b, s]`` with masked positions (loss mask 0, no sequence):
    the loss, its gradient and every metric sum are unchanged."""
    import torch.nn.functional as F

    db, ds = b - int(mb.input_ids.shape[0]), s - int(mb.input_ids.shape[1])
    if db == 0 and ds == 0:
        return mb

    def pad(t: torch.Tensor, value: float = 0) -> torch.Tensor:
        widths = [0, 0] * (t.dim() - 2) + [0, ds, 0, db]
        return F.pad(t, widths, value=value)

    return MicroBatch(
        rows=mb.rows,
        input_ids=pad(mb.input_ids),
        position_ids=pad(mb.position_ids),
        targets=pad(mb.targets),
        loss_mask=pad(mb.loss_mask),
        advantages=pad(mb.advantages),
        rewards=F.pad(mb.rewards, [0, db]),
        seq_index=pad(mb.seq_index, -1),
        token_arrays={k: pad(v) for k, v in mb.token_arrays.items()},
        segments=None if mb.segments is None else pad(mb.segments, -1),
    )


def _unwrapped(m: torch.nn.Module) -> torch.nn.Module:
    from erpd_megatron.models.builder import unwrap_model

    return unwrap_model(m)


def _device() -> torch.device:
    return (
        torch.device("cuda", torch.cuda.current_device())
        if torch.cuda.is_available()
        else torch.device("cpu")
    )


def reduce_metrics(
    metric_dicts: list[dict], keys: list[str], *, src_is_owner: bool
) -> dict[str, float]:
    """Sum per-micro-batch metric sums locally, then over the whole world, counting each
    value once: only ranks with ``src_is_owner`` (last pipeline stage, TP rank 0) contribute.
    Every rank gets the totals (so rank 0 can log them)."""
    vec = torch.zeros(len(keys), dtype=torch.float64)
    if src_is_owner:
        for d in metric_dicts:
            idx, parts = [], []
            for i, k in enumerate(keys):
                if k not in d:
                    continue
                if torch.is_tensor(d[k]):
                    idx.append(i)
                    parts.append(d[k].detach().double().sum())
                else:
                    vec[i] += float(d[k])
            if parts:  # one device-to-host copy per micro-batch, not one per metric
                dev = parts[0].device
                vec[idx] += torch.stack([t.to(dev) for t in parts]).cpu()
    return dict(zip(keys, comm.all_reduce(vec).tolist()))
