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

from dataclasses import dataclass, field

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

    @property
    def lengths(self) -> np.ndarray:
        """Prompt + response length of each sample."""
        return np.array([len(p) + len(r) for p, r in zip(self.prompt_ids, self.response_ids)], np.int64)

    @property
    def response_lengths(self) -> np.ndarray:
        """Response length of each sample."""
        return np.array([len(r) for r in self.response_ids], np.int64)

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


def dp_shard(rows: np.ndarray, lengths: np.ndarray, dp_rank: int, dp_size: int) -> np.ndarray:
    """This DP rank's rows of a global batch, balancing tokens: longest first, each to the
    least loaded rank (ties to the lower rank). Deterministic, no communication."""
    rows = np.asarray(rows)
    if dp_size == 1:
        return rows
    order = sorted(range(len(rows)), key=lambda i: (-int(lengths[rows[i]]), i))
    load = [0] * dp_size
    mine = []
    for i in order:
        r = min(range(dp_size), key=lambda k: (load[k], k))
        load[r] += int(lengths[rows[i]])
        if r == dp_rank:
            mine.append(rows[i])
    return np.array(mine, dtype=np.int64)


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
            token_arrays: dict[str, list[np.ndarray]] | None = None) -> MicroBatch:
    """Build the padded tensors of ``rows``. ``token_arrays[name][row]`` holds one entry per
    response token of that row (shape [T] or [T, k], e.g. cached log-probs or top-k ids) and
    is placed at the scoring positions, keeping its dtype; other positions are 0."""
    rows = np.asarray(rows, np.int64)
    lens = [len(table.prompt_ids[i]) + len(table.response_ids[i]) for i in rows]
    b, s = len(rows), max(lens)
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


def scatter_response_values(mb: MicroBatch, values: torch.Tensor) -> list[np.ndarray]:
    """Inverse of :func:`collate` for one per-position tensor ``values`` [b, s]: the values at
    each row's response positions, as float32 arrays in the micro-batch's row order."""
    values = values.detach().float().cpu()
    mask = mb.loss_mask.bool()
    return [values[j][mask[j]].numpy().copy() for j in range(len(mb.rows))]
