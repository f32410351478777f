"""Varlen core attention for the local (CPU) spec: a packed row attends per sequence.

On the local spec a packed micro-batch is one row ``[1, T]`` with the block-diagonal causal
mask of :func:`erpd_megatron.data.batching.packed_attention_mask` (Transformer Engine takes
THD ``cu_seqlens`` instead and is untouched by this module). megatron-core's
``DotProductAttention`` computes the full ``T x T`` score matrix of such a row and masks it.
:class:`VarlenDotProductAttention` recognises the block-diagonal causal mask, gathers the
segments into ``[L_b, n_b]`` batches (sorted by length, grouped so that the per-call overhead
and the padding to each group's longest are balanced, :func:`segment_buckets`) and runs
megatron's own forward on each with the plain causal mask: exactly the computation of the
unpacked, right-padded micro-batches, at ``sum(n_b x L_b^2)`` instead of ``T^2`` scores.

Numerics: a packed sequence's attention probabilities were already exact zeros outside its
segment (the -10000 fill underflows after the softmax); per group each sequence sees the same
keys, its padding after it is masked by causality as in an unpacked padded batch, so outputs
and gradients agree to rounding (tests/models/test_varlen_attention.py: 1e-6). Any other mask
(several rows, not block-diagonal causal, a sliding window) goes to megatron's forward as is.

Interfaces relied on (megatron-core 0.16.1, ``transformer/dot_product_attention.py``):
``DotProductAttention.forward(query, key, value, attention_mask, attn_mask_type,
attention_bias, packed_seq_params)`` with q/k/v ``[s, b, heads/tp, d]`` (sbhd; under
sequence parallelism the sequence is already gathered) returning ``[s, b, heads/tp * d]``;
with ``attention_mask=None`` its ``FusedScaleMaskSoftmax`` builds the causal mask itself
(``fusions/fused_softmax.py`` ``forward_torch_softmax``; ``masked_softmax_fusion=False`` in
models/builder.py). The local layer specs name the class in
``SelfAttentionSubmodules.core_attention`` (``models/gpt/gpt_layer_specs.py``
``get_gpt_layer_local_spec``; ``models/backends.py`` ``LocalSpecProvider.core_attention``).
"""

from __future__ import annotations

import dataclasses
import functools
import weakref
from typing import Any, Optional

import torch
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType

# the last mask recognised: (weak reference, version counter, segment lengths or None); all
# layers of one forward (and a full-recompute backward) see the same mask object
_LAST: list[Any] = [None, -1, None]


def block_causal_mask(lengths: list[int], device: Any = None) -> torch.Tensor:
    """Megatron's boolean mask ``[1, 1, T, T]`` (True = masked) of consecutive causal
    segments of the given lengths (the block-diagonal causal mask of a packed row)."""
    seg = torch.repeat_interleave(
        torch.arange(len(lengths), device=device), torch.tensor(lengths, device=device)
    )
    t = seg.numel()
    causal = torch.ones((t, t), dtype=torch.bool, device=device).tril()
    return ~((seg[:, None] == seg[None, :]) & causal)[None, None]


def packed_segment_lengths(mask: Optional[torch.Tensor]) -> Optional[list[int]]:
    """The segment lengths of a block-diagonal causal mask ``[1, 1, T, T]`` (True = masked),
    or None when ``mask`` is not one (None, several rows, another pattern). The segments
    start where a position cannot see its predecessor; the whole mask is then compared with
    the one those segments give (once per mask tensor, cached on its identity)."""
    if mask is None or mask.dtype != torch.bool or mask.dim() != 4:
        return None
    if mask.shape[0] != 1 or mask.shape[1] != 1 or mask.shape[2] != mask.shape[3]:
        return None
    ref, version, cached = _LAST
    if ref is not None and ref() is mask and version == mask._version:
        return cached
    m = mask[0, 0]
    t = int(m.shape[0])
    starts = (torch.nonzero(m.diagonal(-1)).reshape(-1) + 1).tolist()
    bounds = [0] + [int(s) for s in starts] + [t]
    lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    ok = t > 0 and torch.equal(block_causal_mask(lengths, m.device)[0, 0], m)
    _LAST[:] = [weakref.ref(mask), mask._version, lengths if ok else None]
    return lengths if ok else None


# What one megatron attention call costs beyond its arithmetic, in multiply-adds of its
# q.k^T (b x heads x L^2 x d): measured on the 2-core CPU forward+backward at 4 heads of 32,
# ~0.5 ms per call against ~11 ms for one 512-token row (~3.4e7 of them). It decides how
# segments are grouped (:func:`segment_buckets`): a call per segment is overhead-bound for
# the short sequences of a long-tailed mix, one call for all pads them to the longest.
CALL_COST = 1.5e6


@functools.lru_cache(maxsize=64)
def segment_buckets(
    lengths: tuple[int, ...], per_row: float, call_cost: float = CALL_COST
) -> tuple[tuple[int, ...], ...]:
    """The segments (indices into ``lengths``) of each attention call: the lengths sorted
    longest first and cut into consecutive groups minimising ``sum(call_cost + rows x
    longest^2 x per_row)`` (dynamic programme over the cut points; ``per_row``: the
    multiply-adds per score, heads x head size). ``call_cost=0``: one call per segment."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    n = len(order)
    best = [0.0] + [float("inf")] * n  # best[j]: cost of the first j sorted segments
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(j):  # group order[i:j], whose longest is order[i]
            c = best[i] + call_cost + (j - i) * lengths[order[i]] ** 2 * per_row
            if c < best[j]:
                best[j], cut[j] = c, i
    groups = []
    j = n
    while j > 0:
        groups.append(tuple(order[cut[j] : j]))
        j = cut[j]
    return tuple(reversed(groups))


@functools.lru_cache(maxsize=64)
def _gather_plan(
    lengths: tuple[int, ...], per_row: float, call_cost: float, device: torch.device
) -> tuple[list[tuple[torch.Tensor, int, int]], torch.Tensor]:
    """Per call: the packed positions ``[L_b * n_b]`` of its ``[L_b, n_b]`` batch (sequence
    ``j`` in column ``j`` from row 0, right-padded with its own first position; causal
    attention never lets a real position see the padding after it), ``L_b`` and ``n_b``;
    and where each packed position's output lies in the calls' outputs, concatenated."""
    starts = [0]
    for n in lengths[:-1]:
        starts.append(starts[-1] + n)
    calls, back = [], [0] * sum(lengths)
    off = 0
    for group in segment_buckets(lengths, per_row, call_cost):
        longest = lengths[group[0]]
        idx = [
            [starts[j] + p if p < lengths[j] else starts[j] for j in group] for p in range(longest)
        ]
        for col, j in enumerate(group):
            for p in range(lengths[j]):
                back[starts[j] + p] = off + p * len(group) + col
        calls.append((torch.tensor(idx, device=device).reshape(-1), longest, len(group)))
        off += longest * len(group)
    return calls, torch.tensor(back, device=device)


class VarlenDotProductAttention(DotProductAttention):
    """megatron-core's local ``DotProductAttention`` that runs a packed row (block-diagonal
    causal mask) as batches of its segments with the plain causal mask (segments of similar
    length grouped, :func:`segment_buckets`); identical otherwise."""

    call_cost: float = CALL_COST
    """The per-call cost :func:`segment_buckets` weighs (0: one call per segment)."""

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[torch.Tensor] = None,
        packed_seq_params: Any = None,
    ) -> torch.Tensor:
        """Core attention of ``[s, b, heads/tp, d]`` q/k/v: ``[s, b, heads/tp * d]``."""
        lengths = None
        if (
            packed_seq_params is None
            and attention_bias is None
            and self.attn_mask_type == AttnMaskType.causal
            and self.scale_mask_softmax.window_size is None
            and query.shape[0] == key.shape[0]
            and query.shape[1] == 1
        ):
            lengths = packed_segment_lengths(attention_mask)
        if lengths is None or query.shape[0] != sum(lengths):
            return super().forward(
                query, key, value, attention_mask, attn_mask_type, attention_bias, packed_seq_params
            )
        if len(lengths) == 1:  # one causal segment: the plain causal call
            return super().forward(query, key, value, None, attn_mask_type)
        heads, d = int(query.shape[2]), int(query.shape[3])
        calls, back = _gather_plan(tuple(lengths), float(heads * d), self.call_cost, query.device)
        outs = []
        for idx, longest, n in calls:
            q, k, v = (
                x[:, 0].index_select(0, idx).view(longest, n, *x.shape[2:])
                for x in (query, key, value)
            )
            outs.append(super().forward(q, k, v, None).reshape(longest * n, -1))
        flat = outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)
        return flat.index_select(0, back).unsqueeze(1)


# the spec fields on the way to the core attention: ModuleSpec (module, submodules),
# TransformerBlockSubmodules (layer_specs), TransformerLayerSubmodules (self_attention),
# SelfAttentionSubmodules (core_attention); megatron-core 0.16.1 transformer/spec_utils.py,
# transformer_block.py, transformer_layer.py, attention.py
_SPEC_FIELDS = ("module", "submodules", "layer_specs", "self_attention", "core_attention")


def with_varlen_core_attention(spec: Any) -> Any:
    """``spec`` (a layer ``ModuleSpec`` or a block spec with ``layer_specs``) with every
    local ``DotProductAttention`` core attention replaced by
    :class:`VarlenDotProductAttention` (new spec objects; TE specs come back unchanged)."""
    if isinstance(spec, (list, tuple)):
        return type(spec)(with_varlen_core_attention(s) for s in spec)
    if spec is DotProductAttention:
        return VarlenDotProductAttention
    if not dataclasses.is_dataclass(spec) or isinstance(spec, type):
        return spec
    changes = {}
    for f in dataclasses.fields(spec):
        if f.name not in _SPEC_FIELDS:
            continue
        old = getattr(spec, f.name)
        new = with_varlen_core_attention(old)
        if new is not old:
            changes[f.name] = new
    return dataclasses.replace(spec, **changes) if changes else spec
