"""Context parallelism (``parallel.context_parallel_size``): which sequence positions a CP
rank holds, and the loss reductions that stay exact when a sequence is split over ranks.

The load-balanced split is megatron's: a sequence of length ``s`` (a multiple of ``2 x CP``)
is cut into ``2 x CP`` equal chunks and CP rank ``r`` takes chunks ``r`` and
``2 x CP - 1 - r``, so that under causal attention every rank does the same work
(megatron-core 0.16.1 ``core/utils.py`` ``get_batch_on_this_cp_rank``: ``index = [cp_rank,
2 * cp_size - cp_rank - 1]`` on the view ``[.., 2 * cp_size, s // (2 * cp_size), ..]``). For
packed (THD) rows each sequence is split that way on its own (Transformer Engine's
``thd_get_partitioned_indices``, which megatron's THD path uses), hence every packed sequence
is aligned to ``2 x CP`` (:func:`erpd_megatron.data.batching.pack_seq_multiple`).

Losses on a CP rank see only its positions. The vocab-parallel ops are per token, so
log-probs, entropy and top-k KL need nothing from other positions; token sums divided by
the GLOBAL normaliser are partial sums whose total over the CP ranks is the loss, and
megatron's DDP reduces gradients over the DP x CP group (``distributed_data_parallel.py``:
``gradient_scaling_factor = 1.0 / self.dp_cp_group.size()``), which the engine's loss scale
undoes (it multiplies by DP x CP). A loss that is NONLINEAR in a per-sequence sum (``mse``:
the square of a sequence's mean drift) needs the full sums first: :func:`cp_all_reduce`
sums them over the CP group with a backward that sums the gradients too, and each rank then
contributes ``1/CP`` of the per-sequence loss (:func:`cp_share`).
"""

from __future__ import annotations

from typing import Any

import torch


def cp_chunk_indices(seq_len: int, cp_size: int, cp_rank: int) -> torch.Tensor:
    """Positions (int64, increasing) of a length-``seq_len`` sequence held by ``cp_rank``:
    chunks ``cp_rank`` and ``2 * cp_size - 1 - cp_rank`` of ``2 * cp_size``."""
    if cp_size < 1 or not 0 <= cp_rank < cp_size:
        raise ValueError(f"cp_rank {cp_rank} outside a context-parallel group of {cp_size}")
    if cp_size == 1:
        return torch.arange(seq_len)
    n = 2 * cp_size
    if seq_len % n:
        raise ValueError(
            f"sequence length {seq_len} is not a multiple of 2 x CP = {n}: pad it "
            "(data.packing aligns every packed sequence; pad_multiple the row)"
        )
    c = seq_len // n
    first, second = cp_rank * c, (n - 1 - cp_rank) * c
    return torch.cat([torch.arange(first, first + c), torch.arange(second, second + c)])


def cp_packed_indices(cu_seqlens: torch.Tensor, cp_size: int, cp_rank: int) -> torch.Tensor:
    """Positions of a packed row held by ``cp_rank``: every segment ``[cu[i], cu[i+1])`` split
    by :func:`cp_chunk_indices` on its own, segments in order."""
    cu = [int(x) for x in cu_seqlens.tolist()]
    parts = [cp_chunk_indices(b - a, cp_size, cp_rank) + a for a, b in zip(cu[:-1], cu[1:])]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)


def cp_split(x: torch.Tensor, index: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """This rank's part of ``x`` along the sequence dim ``dim`` (``index`` from
    :func:`cp_chunk_indices` / :func:`cp_packed_indices`)."""
    return x.index_select(dim, index.to(x.device))


def cp_unsplit(
    parts: list[torch.Tensor], indices: list[torch.Tensor], dim: int = 1
) -> torch.Tensor:
    """Inverse of :func:`cp_split` over all ranks: the full tensor from every rank's part
    (``parts[r]`` at ``indices[r]``); the indices must cover the sequence exactly once."""
    idx = torch.cat([i.to(parts[0].device) for i in indices])
    total = idx.numel()
    if not torch.equal(torch.sort(idx).values, torch.arange(total, device=idx.device)):
        raise ValueError("the CP indices do not cover the sequence exactly once")
    cat = torch.cat(parts, dim=dim)
    shape = list(cat.shape)
    out = cat.new_empty(shape)
    return out.index_copy(dim, idx, cat)


class _AllReduceSum(torch.autograd.Function):
    """Sum over a process group, forward and backward (every rank's output feeds a loss that
    depends on all ranks' inputs)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any) -> torch.Tensor:
        from erpd_megatron.runtime import comm

        ctx.group = group
        return comm.all_reduce(x, group=group)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None]:
        from erpd_megatron.runtime import comm

        return comm.all_reduce(g, group=ctx.group), None


def cp_all_reduce(x: torch.Tensor, group: Any) -> torch.Tensor:
    """``x`` summed over the CP group (autograd: the gradient is summed too); ``group=None``:
    no context parallelism, ``x`` itself. Tensors must sit on the group's device."""
    if group is None:
        return x
    return _AllReduceSum.apply(x, group)


def cp_share(loss: torch.Tensor, cp_size: int) -> torch.Tensor:
    """A loss computed identically on every CP rank (from :func:`cp_all_reduce` d sums),
    scaled so that its sum over the CP ranks is the loss once."""
    return loss / cp_size if cp_size > 1 else loss
