"""From a fixed rollout set to micro-batches: advantages, epoch order, DP shards, token budget.

Everything here is deterministic given (seed, epoch, layout) and free of Megatron and
torch.distributed, so every rank of a job computes the same global picture without
communication: which sequences form global batch ``i`` of epoch ``e``, how they are split
over data-parallel ranks, and how each rank's share is cut into micro-batches under a
token budget (length-bucketed, never padded to the longest sequence of the whole set).

Positions: a sequence is ``prompt + response``; the token at position ``i+1`` is predicted
from position ``i``, so response token ``j`` (0-based) is scored at position
``len(prompt) - 1 + j``. ``loss_mask`` is 1 exactly at those positions.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
import torch


@dataclass
class SampleTable:
    """All samples of one round, columnar. Row ``i`` is sample ``sample_ids[i]``."""

    sample_ids: np.ndarray
    """int64 stable ids."""
    group_ids: np.ndarray
    """int64 group (prompt) of each sample."""
    prompt_ids: list[np.ndarray]
    """Prompt token ids per sample."""
    response_ids: list[np.ndarray]
    """Response token ids per sample."""
    rewards: np.ndarray
    """float32 verifier rewards."""
    engine_logprobs: list[np.ndarray] | None = None
    """Rollout-engine log-probs of the response tokens (for the mismatch report only)."""
    advantages: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    """float32 sequence advantages (filled by :func:`group_advantages`)."""

    def __len__(self) -> int:
        return len(self.sample_ids)

    @cached_property
    def lengths(self) -> np.ndarray:
        """Prompt + response length of each sample (computed once; read-only, since a table's
        token lists never change: :meth:`select` builds a new table)."""
        return _frozen(
            self.response_lengths
            + np.fromiter(map(len, self.prompt_ids), np.int64, len(self.prompt_ids))
        )

    @cached_property
    def response_lengths(self) -> np.ndarray:
        """Response length of each sample (computed once, read-only)."""
        return _frozen(np.fromiter(map(len, self.response_ids), np.int64, len(self.response_ids)))

    def select(self, rows: np.ndarray) -> SampleTable:
        """A new table with the given rows, in that order."""
        rows = np.asarray(rows, np.int64)
        return SampleTable(
            sample_ids=self.sample_ids[rows],
            group_ids=self.group_ids[rows],
            prompt_ids=[self.prompt_ids[i] for i in rows],
            response_ids=[self.response_ids[i] for i in rows],
            rewards=self.rewards[rows],
            engine_logprobs=None
            if self.engine_logprobs is None
            else [self.engine_logprobs[i] for i in rows],
            advantages=self.advantages[rows] if len(self.advantages) else self.advantages,
        )


def _frozen(a: np.ndarray) -> np.ndarray:
    a.setflags(write=False)
    return a


def group_advantages(
    rewards: np.ndarray, group_ids: np.ndarray, *, std_normalize: bool = False, eps: float = 1e-6
) -> np.ndarray:
    """``A = r - mean(group rewards)``, optionally divided by the group std (+eps).

    Computed in float64 and returned as float32; a group of one sample gets 0.
    """
    rewards = np.asarray(rewards, np.float64)
    uniq, inv = np.unique(np.asarray(group_ids), return_inverse=True)
    count = np.bincount(inv, minlength=len(uniq)).astype(np.float64)
    mean = np.bincount(inv, weights=rewards, minlength=len(uniq)) / count
    adv = rewards - mean[inv]
    if std_normalize:
        var = np.bincount(inv, weights=adv**2, minlength=len(uniq)) / count
        adv = adv / (np.sqrt(var)[inv] + eps)
    return adv.astype(np.float32)


def epoch_order(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    """The deterministic shuffle of epoch ``epoch`` (a permutation of ``range(num_samples)``)."""
    rng = np.random.default_rng([seed, epoch])
    return rng.permutation(num_samples)


def global_batches(order: np.ndarray, global_batch_size: int) -> list[np.ndarray]:
    """Cut an epoch order into global batches; a short last batch is kept (not dropped),
    since on fixed data every sample should count in every epoch."""
    return [order[i : i + global_batch_size] for i in range(0, len(order), global_batch_size)]


def dp_partition(rows: np.ndarray, lengths: np.ndarray, dp_size: int) -> list[np.ndarray]:
    """Every DP rank's rows of a global batch, balancing tokens: longest first, each to the
    least loaded rank (ties to the lower rank). Deterministic, no communication: each rank
    can compute every other rank's share (see :func:`dp_micro_batch_count`)."""
    rows = np.asarray(rows, np.int64)
    if dp_size == 1:
        return [rows]
    lens = np.asarray(lengths)[rows].astype(np.int64)
    order = np.lexsort((np.arange(len(rows)), -lens))  # longest first, stable
    heap = [(0, k) for k in range(dp_size)]  # (load, rank): the least loaded, then the lowest rank
    shards: list[list[int]] = [[] for _ in range(dp_size)]
    for i in order.tolist():
        load, k = heapq.heappop(heap)
        shards[k].append(int(rows[i]))
        heapq.heappush(heap, (load + int(lens[i]), k))
    return [np.array(s, dtype=np.int64) for s in shards]


def dp_shard(rows: np.ndarray, lengths: np.ndarray, dp_rank: int, dp_size: int) -> np.ndarray:
    """This DP rank's rows of a global batch (its part of :func:`dp_partition`)."""
    return dp_partition(rows, lengths, dp_size)[dp_rank]


def dp_micro_batch_count(
    rows: np.ndarray, lengths: np.ndarray, dp_size: int, max_tokens: int
) -> int:
    """The largest number of micro-batches any DP rank cuts its share of ``rows`` into.

    Every DP rank must run this many micro-batches (padding with :func:`dummy_micro_batch`):
    a rank that ran fewer, or returned early with none, would leave the others waiting in the
    data-parallel gradient reduction (and, under FP8 delayed scaling, in the per-forward amax
    reduction over TP x DP). Computed from the global picture, without communication."""
    return dp_micro_batches(rows, lengths, 0, dp_size, max_tokens)[1]


def dp_micro_batches(
    rows: np.ndarray,
    lengths: np.ndarray,
    dp_rank: int,
    dp_size: int,
    max_tokens: int,
    *,
    packing: bool = False,
    seq_multiple: int = 1,
) -> tuple[list[np.ndarray], int]:
    """This DP rank's micro-batches (row arrays) of a global batch, and
    :func:`dp_micro_batch_count` (one partition for both). With ``packing`` each micro-batch
    is one packed row filled by :func:`pack_rows` (first-fit-decreasing)."""

    def cut(s: np.ndarray) -> list[np.ndarray]:
        if packing:
            return pack_rows(s, lengths, max_tokens, seq_multiple=seq_multiple)
        return micro_batches(s, lengths, max_tokens)

    cuts = [cut(s) for s in dp_partition(rows, lengths, dp_size)]
    return cuts[dp_rank], max(len(c) for c in cuts)


def pack_rows(
    rows: np.ndarray, lengths: np.ndarray, max_tokens: int, *, seq_multiple: int = 1
) -> list[np.ndarray]:
    """First-fit-decreasing bin packing of ``rows`` into packed rows of at most ``max_tokens``
    tokens: longest first (ties by row number, so the result depends only on the rows and
    their lengths), each into the first bin with room, a new bin otherwise. A sequence longer
    than the budget gets a bin of its own. Each sequence counts ``round_up(len, seq_multiple)``
    tokens (context parallel aligns every packed sequence, see :func:`pack_seq_multiple`).
    Inside a bin sequences keep their insertion order (longest first)."""
    lens = {int(i): round_up(int(lengths[i]), seq_multiple) for i in np.asarray(rows).tolist()}
    order = sorted(lens, key=lambda i: (-lens[i], i))
    bins: list[list[int]] = []
    loads: list[int] = []
    for i in order:
        n = lens[i]
        for k, load in enumerate(loads):
            if load + n <= max_tokens:
                bins[k].append(i)
                loads[k] += n
                break
        else:
            bins.append([i])
            loads.append(n)
    return [np.array(b, dtype=np.int64) for b in bins]


def pack_in_order_packed(
    rows: list[int], lengths: np.ndarray, max_tokens: int, *, seq_multiple: int = 1
) -> list[np.ndarray]:
    """Cut ``rows``, in the given order, into consecutive packed rows of at most
    ``max_tokens`` tokens (for writers that must see samples in a fixed order)."""
    out: list[list[int]] = []
    load = 0
    for i in rows:
        n = round_up(int(lengths[i]), seq_multiple)
        if out and load + n <= max_tokens:
            out[-1].append(i)
            load += n
        else:
            out.append([i])
            load = n
    return [np.array(b, dtype=np.int64) for b in out]


def micro_batches(rows: np.ndarray, lengths: np.ndarray, max_tokens: int) -> list[np.ndarray]:
    """Split rows into micro-batches whose padded size (count x longest) stays within
    ``max_tokens``; rows are bucketed by length (sorted) so padding is small. A single
    sequence longer than the budget forms its own micro-batch."""
    order = sorted(np.asarray(rows).tolist(), key=lambda i: (int(lengths[i]), i))
    return pack_in_order(order, lengths, max_tokens)


def pack_in_order(rows: list[int], lengths: np.ndarray, max_tokens: int) -> list[np.ndarray]:
    """Cut ``rows``, in the given order, into consecutive micro-batches whose padded size
    (count x longest) stays within ``max_tokens``."""
    out: list[list[int]] = []
    cur: list[int] = []
    longest = 0
    for i in rows:
        n = int(lengths[i])
        if cur and (len(cur) + 1) * max(longest, n) > max_tokens:
            out.append(cur)
            cur, longest = [], 0
        cur.append(i)
        longest = max(longest, n)
    if cur:
        out.append(cur)
    return [np.array(mb, dtype=np.int64) for mb in out]


@dataclass
class MicroBatch:
    """Tensors of one micro-batch: one sequence per row, right-padded to the longest
    (:func:`collate`), or several sequences packed into one row (:func:`collate_packed`).

    Sequences are numbered ``0..n_seq-1`` within the micro-batch: ``rows[k]`` is sequence
    ``k``'s table row, ``rewards[k]`` its reward, and ``seq_index`` maps every scoring position
    to its sequence. Consumers that need per-sequence values (rewards, drift, the per-sequence
    means of ``mse``, per-sample extraction) go through ``seq_index``, never through the tensor
    row, so that both layouts give the same results."""

    rows: np.ndarray
    """[n_seq] rows of the SampleTable, in sequence-number order."""
    input_ids: torch.Tensor
    """[b, s] int64 tokens (pad 0)."""
    position_ids: torch.Tensor
    """[b, s] int64 positions 0..len-1."""
    targets: torch.Tensor
    """[b, s] int64 next tokens (0 where masked)."""
    loss_mask: torch.Tensor
    """[b, s] float32, 1 at positions that predict a response token."""
    advantages: torch.Tensor
    """[b, s] float32 sequence advantage broadcast over its response positions (0 elsewhere)."""
    rewards: torch.Tensor
    """[n_seq] float32 reward of each sequence (index with ``seq_index``; padding may add
    trailing zeros that no position refers to)."""
    seq_index: torch.Tensor
    """[b, s] int64 sequence number within the micro-batch at response positions, -1 elsewhere."""
    token_arrays: dict[str, torch.Tensor] = field(default_factory=dict)
    """Extra per-response-token arrays (e.g. ``anchor_logprobs``) placed at response positions."""
    segments: torch.Tensor | None = None
    """Packed micro-batches only: [b, s] int64 attention segment of every position (sequence
    number over the sequence and its alignment padding, -1 on the row's trailing padding).
    A position attends causally within its segment only (:func:`packed_attention_mask`, or
    THD ``cu_seqlens`` from :func:`packed_cu_seqlens` on Transformer Engine). None: one
    sequence per row, plain causal attention."""

    seq_owned: torch.Tensor | None = None
    """Context parallel only: [n_seq] bool, whether this CP rank holds the sequence's first
    scoring position (it then counts the sequence in per-sequence counts; sums of per-token
    values are partial on every rank and add up over CP). None: this rank has whole sequences."""

    @property
    def num_sequences(self) -> int:
        """Sequences in this micro-batch (``len(rows)``)."""
        return len(self.rows)

    def per_token(self, values: torch.Tensor) -> torch.Tensor:
        """Per-sequence ``values`` [n_seq] spread to [b, s] through ``seq_index`` (0 where
        no sequence is scored)."""
        idx = self.seq_index.to(values.device)
        if values.numel() == 0:
            return torch.zeros(idx.shape, dtype=values.dtype, device=values.device)
        out = values[idx.clamp(min=0)]
        return torch.where(idx >= 0, out, torch.zeros((), dtype=values.dtype, device=values.device))

    @property
    def num_tokens(self) -> int:
        """Valid (loss) tokens."""
        return int(self.loss_mask.sum().item())

    def to(self, device: torch.device | str) -> MicroBatch:
        """Move every tensor to ``device``."""
        moved = {k: v.to(device) for k, v in self.token_arrays.items()}
        return MicroBatch(
            rows=self.rows,
            input_ids=self.input_ids.to(device),
            position_ids=self.position_ids.to(device),
            targets=self.targets.to(device),
            loss_mask=self.loss_mask.to(device),
            advantages=self.advantages.to(device),
            rewards=self.rewards.to(device),
            seq_index=self.seq_index.to(device),
            token_arrays=moved,
            segments=None if self.segments is None else self.segments.to(device),
            seq_owned=None if self.seq_owned is None else self.seq_owned.to(device),
        )


def collate(
    table: SampleTable,
    rows: np.ndarray,
    token_arrays: dict[str, list[np.ndarray]] | None = None,
    *,
    pad_to: int = 1,
) -> MicroBatch:
    """Build the padded tensors of ``rows``. ``token_arrays[name][row]`` holds one entry per
    response token of that row (shape [T] or [T, k], e.g. cached log-probs or top-k ids) and
    is placed at the scoring positions, keeping its dtype; other positions are 0. The sequence
    length is rounded up to a multiple of ``pad_to`` (see :func:`pad_multiple`)."""
    rows = np.asarray(rows, np.int64)
    lens = [len(table.prompt_ids[i]) + len(table.response_ids[i]) for i in rows]
    return _place(table, rows, token_arrays, lens, round_up(max(lens), pad_to), packed=False)


def collate_packed(
    table: SampleTable,
    rows: np.ndarray,
    token_arrays: dict[str, list[np.ndarray]] | None = None,
    *,
    pad_to: int = 1,
    seq_multiple: int = 1,
) -> MicroBatch:
    """``rows`` packed into ONE row ``[1, S]``, in the given order: sequence ``k`` occupies
    ``round_up(len_k, seq_multiple)`` positions (its alignment padding belongs to its attention
    segment), with position ids ``0..len_k-1`` of its own (RoPE is relative, so a sequence's
    logits do not depend on where it sits), and the row is right-padded to a multiple of
    ``pad_to`` (segment -1). Targets, loss mask, advantages and ``token_arrays`` are placed as
    in :func:`collate`; ``seq_index`` numbers the sequences and ``segments`` drives the
    block-diagonal causal attention."""
    rows = np.asarray(rows, np.int64)
    spans = [
        round_up(len(table.prompt_ids[i]) + len(table.response_ids[i]), seq_multiple) for i in rows
    ]
    return _place(table, rows, token_arrays, spans, round_up(sum(spans), pad_to), packed=True)


def _place(
    table: SampleTable,
    rows: np.ndarray,
    token_arrays: dict[str, list[np.ndarray]] | None,
    spans: list[int],
    s: int,
    *,
    packed: bool,
) -> MicroBatch:
    """The tensors of :func:`collate` (sequence ``j`` in row ``j``) or :func:`collate_packed`
    (every sequence in row 0, one after another, each over ``spans[j]`` positions)."""
    b = 1 if packed else len(rows)
    ids = np.zeros((b, s), np.int64)
    tgt = np.zeros((b, s), np.int64)
    mask = np.zeros((b, s), np.float32)
    seq = np.full((b, s), -1, np.int64)
    segs = np.full((b, s), -1, np.int64)
    pos = np.zeros((b, s), np.int64)
    adv = np.zeros((b, s), np.float32)
    extra = {}
    for k, arrs in (token_arrays or {}).items():
        first = np.asarray(arrs[rows[0]])
        extra[k] = np.zeros((b, s) + first.shape[1:], first.dtype)
    has_adv = len(table.advantages) == len(table)
    off = 0
    for j, (i, span) in enumerate(zip(rows, spans)):
        row, o = (0, off) if packed else (j, 0)
        p, r = table.prompt_ids[i], table.response_ids[i]
        n = len(p) + len(r)
        ids[row, o : o + len(p)] = p
        ids[row, o + len(p) : o + n] = r
        pos[row, o : o + span] = np.arange(span)
        segs[row, o : o + span] = j
        lo, hi = o + len(p) - 1, o + n - 1  # positions predicting the response tokens
        tgt[row, lo:hi] = r
        mask[row, lo:hi] = 1.0
        seq[row, lo:hi] = j
        if has_adv:
            adv[row, lo:hi] = table.advantages[i]
        for k, arrs in (token_arrays or {}).items():
            a = np.asarray(arrs[i])
            if len(a) != len(r):
                raise ValueError(
                    f"{k}: sample {int(table.sample_ids[i])} has {len(a)} values for "
                    f"{len(r)} response tokens"
                )
            extra[k][row, lo:hi] = a
        off += span
    return MicroBatch(
        rows=rows,
        input_ids=torch.from_numpy(ids),
        position_ids=torch.from_numpy(pos),
        targets=torch.from_numpy(tgt),
        loss_mask=torch.from_numpy(mask),
        advantages=torch.from_numpy(adv),
        rewards=torch.from_numpy(table.rewards[rows].astype(np.float32)),
        seq_index=torch.from_numpy(seq),
        token_arrays={k: torch.from_numpy(v) for k, v in extra.items()},
        segments=torch.from_numpy(segs) if packed else None,
    )


def packed_attention_mask(segments: torch.Tensor) -> torch.Tensor:
    """Megatron's boolean attention mask ``[b, 1, s, s]`` (True = masked) for packed rows:
    position ``q`` sees ``k <= q`` of its own segment only (block-diagonal causal).

    The local spec's ``DotProductAttention`` hands the mask to ``FusedScaleMaskSoftmax``;
    with ``masked_softmax_fusion=False`` (models/builder.py) its ``forward_torch_softmax`` uses
    a given mask instead of building the causal one (megatron-core 0.16.1
    ``fusions/fused_softmax.py``: the default causal mask only ``if ... mask is None``) and
    ``attention_mask_func`` fills True with -10000 (``transformer/utils.py``), which underflows
    to an exact 0 after the softmax: a sequence's logits equal its unpacked ones up to
    rounding. (The fused upper-triangular kernel would ignore the mask; it is never used.)"""
    seg = segments
    same = seg[:, :, None] == seg[:, None, :]
    s = seg.shape[1]
    causal = torch.ones((s, s), dtype=torch.bool, device=seg.device).tril()
    return ~(same & causal)[:, None]


def packed_cu_seqlens(segments: torch.Tensor) -> tuple[torch.Tensor, int]:
    """THD boundaries of ONE packed row: int32 ``cu_seqlens`` [n_segments + 1] (starts of the
    runs of equal segment id, then the row length: alignment padding belongs to its sequence,
    the trailing padding is a segment of its own) and the longest segment."""
    if segments.shape[0] != 1:
        raise ValueError(
            f"THD packing needs one packed row per micro-batch, got {segments.shape[0]}"
        )
    seg = segments[0]
    change = torch.nonzero(seg[1:] != seg[:-1]).reshape(-1) + 1
    zero = torch.zeros(1, dtype=torch.long, device=seg.device)
    end = torch.full((1,), seg.numel(), dtype=torch.long, device=seg.device)
    cu = torch.cat([zero, change, end])
    return cu.to(torch.int32), int((cu[1:] - cu[:-1]).max().item())


def pack_seq_multiple(cfg: Any) -> int:
    """What every packed sequence is aligned to: ``2 x CP`` with context parallelism
    (megatron's load-balanced split cuts each sequence into 2 x CP chunks; TE's THD context
    parallel asserts every sequence divisible by it), else 1."""
    cp = int(getattr(cfg.parallel, "context_parallel_size", 1) or 1)
    return 2 * cp if cp > 1 else 1


def build_micro_batches(
    cfg: Any,
    table: SampleTable,
    rows: np.ndarray,
    dp_rank: int,
    dp_size: int,
    token_arrays: dict[str, list[np.ndarray]] | None = None,
    *,
    max_tokens: int | None = None,
) -> list[MicroBatch]:
    """This DP rank's micro-batches of ``rows`` for ``cfg``: packed (``data.packing``) or
    padded per row, sequence length padded to :func:`pad_multiple`, then zero-loss dummies up
    to the DP-wide count (every DP rank runs the same schedule)."""
    budget = int(max_tokens or cfg.data.max_tokens_per_microbatch)
    packing = bool(getattr(cfg.data, "packing", False))
    pad, seqm = pad_multiple(cfg), pack_seq_multiple(cfg)
    mine, count = dp_micro_batches(
        rows, table.lengths, dp_rank, dp_size, budget, packing=packing, seq_multiple=seqm
    )
    if packing:
        mbs = [collate_packed(table, r, token_arrays, pad_to=pad, seq_multiple=seqm) for r in mine]
    else:
        mbs = [collate(table, r, token_arrays, pad_to=pad) for r in mine]
    return pad_micro_batches(mbs, count, length=pad, token_arrays=token_arrays)


def round_up(n: int, multiple: int) -> int:
    """The smallest multiple of ``multiple`` that is >= ``n`` (and >= ``multiple``)."""
    multiple = max(1, int(multiple))
    return max(multiple, -(-int(n) // multiple) * multiple)


def pad_multiple(cfg: Any) -> int:
    """The multiple that every micro-batch's sequence length is padded to for ``cfg``.

    * ``precision.fp8``: Transformer Engine's FP8 GEMMs assert that the product of an input's
      leading dims is divisible by 8 and its last dim by 16 (TE 2.x
      ``transformer_engine/pytorch/utils.py`` ``assert_dim_for_fp8_exec``); MXFP8 needs both
      divisible by 32 (``pytorch/tensor/mxfp8_tensor.py`` ``MXFP8Quantizer.is_quantizable``,
      ``MXFP8_BLOCK_SCALING_SIZE = 32``; ``blockwise`` is padded the same way). Megatron's GEMM
      inputs are ``[s, b, h]`` (``[s/tp, b, h]`` under sequence parallelism), so a sequence
      length that is a multiple of 8 (32) makes ``s*b`` one for every micro-batch size. The
      hidden sizes (last dims) are the model's and are checked by ``validate``.
    * ``parallel.sequence_parallel``: Megatron scatters the sequence over the TP ranks, so
      ``s`` must be divisible by TP (then each rank's ``s/tp`` must still meet the FP8 rule:
      the two factors multiply).
    * ``parallel.context_parallel_size``: the sequence is cut into 2 x CP chunks.
    """
    m = 1
    prec = getattr(cfg, "precision", None)
    if prec is not None and getattr(prec, "fp8", None):
        m = 32 if getattr(prec, "fp8_recipe", "delayed") in ("mxfp8", "blockwise") else 8
    par = cfg.parallel
    if par.sequence_parallel and par.tensor_model_parallel_size > 1:
        m *= int(par.tensor_model_parallel_size)
    cp = int(getattr(par, "context_parallel_size", 1) or 1)
    if cp > 1:  # megatron's load-balanced split: 2 x CP equal chunks (data/context_parallel.py)
        m *= 2 * cp
    return m


def dummy_micro_batch(
    length: int, token_arrays: dict[str, list[np.ndarray]] | None = None
) -> MicroBatch:
    """A micro-batch of one all-padding sequence of ``length`` tokens whose loss is exactly
    zero (``loss_mask`` all 0, no scoring positions, reward and advantage 0): it runs forward
    and backward through the pipeline schedule like any other, so that every DP rank runs the
    same number of micro-batches, and adds nothing to gradients or metric sums. Its
    ``token_arrays`` have the per-token shape and dtype of ``token_arrays``' first entry."""
    s = max(1, int(length))
    z = torch.zeros((1, s), dtype=torch.int64)
    extra = {}
    for k, arrs in (token_arrays or {}).items():
        try:  # row-indexable (a list, or a cache column without len())
            first = np.asarray(arrs[0])
        except IndexError:
            first = np.zeros(0, np.float32)
        extra[k] = torch.zeros((1, s) + first.shape[1:], dtype=torch.from_numpy(first[:0]).dtype)
    return MicroBatch(
        rows=np.zeros(0, np.int64),
        input_ids=z,
        position_ids=torch.arange(s, dtype=torch.int64)[None],
        targets=z.clone(),
        loss_mask=torch.zeros((1, s), dtype=torch.float32),
        advantages=torch.zeros((1, s), dtype=torch.float32),
        rewards=torch.zeros(1, dtype=torch.float32),
        seq_index=torch.full((1, s), -1, dtype=torch.int64),
        token_arrays=extra,
    )


def pad_micro_batches(
    mbs: list[MicroBatch],
    count: int,
    *,
    length: int = 1,
    token_arrays: dict[str, list[np.ndarray]] | None = None,
) -> list[MicroBatch]:
    """``mbs`` followed by zero-loss :func:`dummy_micro_batch` es up to ``count`` in all."""
    if len(mbs) > count:
        raise ValueError(f"{len(mbs)} micro-batches but the DP-wide count is {count}")
    return list(mbs) + [dummy_micro_batch(length, token_arrays) for _ in range(count - len(mbs))]


def scatter_response_values(mb: MicroBatch, values: torch.Tensor) -> list[np.ndarray]:
    """Inverse of :func:`collate` / :func:`collate_packed` for one per-position tensor
    ``values`` [b, s]: each sequence's values at its response positions, as float32 arrays
    in the micro-batch's sequence order (``mb.rows``)."""
    return [v.float().numpy().copy() for v in sequence_values(mb, values.detach().float())]


def sequence_values(mb: MicroBatch, values: torch.Tensor) -> list[torch.Tensor]:
    """Each sequence's entries of ``values`` ([b, s, ...]) at its response positions, in
    sequence order, on the CPU (keeping the dtype): row-major order within a sequence is its
    token order in both layouts."""
    values = values.detach().cpu()
    idx = mb.seq_index.cpu()
    if values.shape[:2] != idx.shape:
        raise ValueError(
            f"values of shape {tuple(values.shape)} for a micro-batch of {tuple(idx.shape)}"
        )
    flat_idx = idx.reshape(-1)
    flat = values.reshape((-1,) + tuple(values.shape[2:]))
    order = torch.argsort(flat_idx, stable=True)
    counts = torch.bincount(flat_idx[flat_idx >= 0], minlength=mb.num_sequences).tolist()
    start = int((flat_idx < 0).sum())
    out = []
    for c in counts[: mb.num_sequences]:
        out.append(flat[order[start : start + c]])
        start += c
    return out
