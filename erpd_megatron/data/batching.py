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
        return _frozen(self.response_lengths + np.fromiter(map(len, self.prompt_ids), np.int64,
                                                           len(self.prompt_ids)))

    @cached_property
    def response_lengths(self) -> np.ndarray:
        """Response length of each sample (computed once, read-only)."""
        return _frozen(np.fromiter(map(len, self.response_ids), np.int64, len(self.response_ids)))

    def select(self, rows: np.ndarray) -> SampleTable:
        """A new table with the given rows, in that order."""
        rows = np.asarray(rows, np.int64)
        return SampleTable(
            sample_ids=self.sample_ids[rows], group_ids=self.group_ids[rows],
            prompt_ids=[self.prompt_ids[i] for i in rows], response_ids=[self.response_ids[i] for i in rows],
            rewards=self.rewards[rows],
            engine_logprobs=None if self.engine_logprobs is None else [self.engine_logprobs[i] for i in rows],
            advantages=self.advantages[rows] if len(self.advantages) else self.advantages,
        )


def _frozen(a: np.ndarray) -> np.ndarray:
    a.setflags(write=False)
    return a


def group_advantages(rewards: np.ndarray, group_ids: np.ndarray, *, std_normalize: bool = False,
                     eps: float = 1e-6) -> np.ndarray:
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


def dp_micro_batch_count(rows: np.ndarray, lengths: np.ndarray, dp_size: int,
                         max_tokens: int) -> int:
    """The largest number of micro-batches any DP rank cuts its share of ``rows`` into.

    Every DP rank must run this many micro-batches (padding with :func:`dummy_micro_batch`):
    a rank that ran fewer, or returned early with none, would leave the others waiting in the
    data-parallel gradient reduction (and, under FP8 delayed scaling, in the per-forward amax
    reduction over TP x DP). Computed from the global picture, without communication."""
    return dp_micro_batches(rows, lengths, 0, dp_size, max_tokens)[1]


def dp_micro_batches(rows: np.ndarray, lengths: np.ndarray, dp_rank: int, dp_size: int,
                     max_tokens: int) -> tuple[list[np.ndarray], int]:
    """This DP rank's micro-batches (row arrays) of a global batch, and
    :func:`dp_micro_batch_count` (one partition for both)."""
    cuts = [micro_batches(s, lengths, max_tokens) for s in dp_partition(rows, lengths, dp_size)]
    return cuts[dp_rank], max(len(c) for c in cuts)


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
    """Tensors of one micro-batch, right-padded to its longest sequence."""

    rows: np.ndarray
    """Rows of the SampleTable in this micro-batch."""
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
    """[b] float32."""
    seq_index: torch.Tensor
    """[b, s] int64 sequence number within the micro-batch at response positions, -1 elsewhere."""
    token_arrays: dict[str, torch.Tensor] = field(default_factory=dict)
    """Extra per-response-token arrays (e.g. ``anchor_logprobs``) placed at response positions."""

    @property
    def num_tokens(self) -> int:
        """Valid (loss) tokens."""
        return int(self.loss_mask.sum().item())

    def to(self, device: torch.device | str) -> MicroBatch:
        """Move every tensor to ``device``."""
        moved = {k: v.to(device) for k, v in self.token_arrays.items()}
        return MicroBatch(
            rows=self.rows, input_ids=self.input_ids.to(device), position_ids=self.position_ids.to(device),
            targets=self.targets.to(device), loss_mask=self.loss_mask.to(device),
            advantages=self.advantages.to(device), rewards=self.rewards.to(device),
            seq_index=self.seq_index.to(device), token_arrays=moved,
        )


def collate(table: SampleTable, rows: np.ndarray,
            token_arrays: dict[str, list[np.ndarray]] | None = None, *, pad_to: int = 1) -> MicroBatch:
    """Build the padded tensors of ``rows``. ``token_arrays[name][row]`` holds one entry per
    response token of that row (shape [T] or [T, k], e.g. cached log-probs or top-k ids) and
    is placed at the scoring positions, keeping its dtype; other positions are 0. The sequence
    length is rounded up to a multiple of ``pad_to`` (see :func:`pad_multiple`)."""
    rows = np.asarray(rows, np.int64)
    lens = [len(table.prompt_ids[i]) + len(table.response_ids[i]) for i in rows]
    b, s = len(rows), round_up(max(lens), pad_to)
    ids = np.zeros((b, s), np.int64)
    tgt = np.zeros((b, s), np.int64)
    mask = np.zeros((b, s), np.float32)
    seq = np.full((b, s), -1, np.int64)
    pos = np.zeros((b, s), np.int64)
    adv = np.zeros((b, s), np.float32)
    extra = {}
    for k, arrs in (token_arrays or {}).items():
        first = np.asarray(arrs[rows[0]])
        extra[k] = np.zeros((b, s) + first.shape[1:], first.dtype)
    has_adv = len(table.advantages) == len(table)
    for j, i in enumerate(rows):
        p, r = table.prompt_ids[i], table.response_ids[i]
        n = len(p) + len(r)
        ids[j, : len(p)] = p
        ids[j, len(p) : n] = r
        pos[j, :n] = np.arange(n)
        lo, hi = len(p) - 1, n - 1  # positions predicting the response tokens
        tgt[j, lo:hi] = r
        mask[j, lo:hi] = 1.0
        seq[j, lo:hi] = j
        if has_adv:
            adv[j, lo:hi] = table.advantages[i]
        for k, arrs in (token_arrays or {}).items():
            a = np.asarray(arrs[i])
            if len(a) != len(r):
                raise ValueError(
                    f"{k}: sample {int(table.sample_ids[i])} has {len(a)} values for {len(r)} response tokens"
                )
            extra[k][j, lo:hi] = a
    return MicroBatch(
        rows=rows, input_ids=torch.from_numpy(ids), position_ids=torch.from_numpy(pos),
        targets=torch.from_numpy(tgt), loss_mask=torch.from_numpy(mask), advantages=torch.from_numpy(adv),
        rewards=torch.from_numpy(table.rewards[rows].astype(np.float32)), seq_index=torch.from_numpy(seq),
        token_arrays={k: torch.from_numpy(v) for k, v in extra.items()},
    )


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
    """
    m = 1
    prec = getattr(cfg, "precision", None)
    if prec is not None and getattr(prec, "fp8", None):
        m = 32 if getattr(prec, "fp8_recipe", "delayed") in ("mxfp8", "blockwise") else 8
    par = cfg.parallel
    if par.sequence_parallel and par.tensor_model_parallel_size > 1:
        m *= int(par.tensor_model_parallel_size)
    return m


def dummy_micro_batch(length: int,
                      token_arrays: dict[str, list[np.ndarray]] | None = None) -> MicroBatch:
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
        rows=np.zeros(0, np.int64), input_ids=z,
        position_ids=torch.arange(s, dtype=torch.int64)[None], targets=z.clone(),
        loss_mask=torch.zeros((1, s), dtype=torch.float32),
        advantages=torch.zeros((1, s), dtype=torch.float32),
        rewards=torch.zeros(1, dtype=torch.float32),
        seq_index=torch.full((1, s), -1, dtype=torch.int64), token_arrays=extra,
    )


def pad_micro_batches(mbs: list[MicroBatch], count: int, *, length: int = 1,
                      token_arrays: dict[str, list[np.ndarray]] | None = None) -> list[MicroBatch]:
    """``mbs`` followed by zero-loss :func:`dummy_micro_batch` es up to ``count`` in all."""
    if len(mbs) > count:
        raise ValueError(f"{len(mbs)} micro-batches but the DP-wide count is {count}")
    return list(mbs) + [dummy_micro_batch(length, token_arrays) for _ in range(count - len(mbs))]


def scatter_response_values(mb: MicroBatch, values: torch.Tensor) -> list[np.ndarray]:
    """Inverse of :func:`collate` for one per-position tensor ``values`` [b, s]: the values at
    each row's response positions, as float32 arrays in the micro-batch's row order."""
    values = values.detach().float().cpu()
    mask = mb.loss_mask.bool()
    return [values[j][mask[j]].numpy().copy() for j in range(len(mb.rows))]
