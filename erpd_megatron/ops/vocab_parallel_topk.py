"""Top-k over vocab-parallel logits: the distributed top-k, top-k + tail forward KL to a
teacher's cached buckets, and the log-probs of given ids with the mass outside them.

The shard/chunk/all-reduce machinery and the conventions (logits ``[N, V_local]``, one MAX
and one SUM all-reduce per op, fp32 math per chunk, gradients in the logits' dtype,
``inplace_backward``, non-finite rows) are those of :mod:`erpd_megatron.ops.vocab_parallel`.

* top-k + tail forward KL to a teacher's cached top-k ids ``I`` and log-probs ``l_i``:
  teacher buckets ``p_i = exp(l_i)`` and tail ``P_t = max(0, 1 - sum p_i)`` (kept, never
  renormalised away); student buckets ``q_i`` and ``Q_t = sum_{v not in I} q_v`` (a direct
  sum over the complement; its log as ``log1p(-q(I))`` while ``q(I) < 1/2``, so a tail near
  0 or 1 keeps its precision). Optionally the target is the geometric mixture
  ``p~ ∝ p_r^(1-alpha) p^alpha`` on the k+1 buckets (:func:`topk_target_logprobs`). Per token
  ``L = sum_I p~_i (log p~_i - log q_i) + p~_t (log p~_t - log Q_t)`` (0 log 0 = 0) and
  ``dL/dz_v = q_v - p~_v`` with ``p~_v = p~_i`` on I and ``p~_t q_v / Q_t`` off I. Bucket
  slots of a chunk are zeroed by ``scatter_reduce_(amin)`` of 0 for this shard's ids and
  +inf for the others (clamped to slot 0, left unchanged: no collision with an in-shard id
  0). A repeated id within a token (filler at masked positions) acts as one bucket holding
  its entries' summed target mass. Off I the gradient is ``exp(z_v - m) (Q_t - p~_t) / tail``
  with ``tail = S Q_t`` (exact for tiny Q_t); a student tail of exactly 0 with ``p~_t > 0``
  gives KL = +Inf (the caller drops the token).
* distributed top-k: local top-k, all-gather values and global ids, top-k of the
  ``k * world`` candidates. Ties go to the lowest global id, so the ids do not depend on
  the TP layout.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from erpd_megatron.ops.common import Tensor, debug_nonfinite
from erpd_megatron.ops.vocab_parallel import (
    _all_reduce,
    _check_rows,
    _chunk_shift,
    _chunks,
    _exp_store,
    _flat,
    _local_index,
    _new_grad,
    _Shard,
    _shard,
    _to_global,
    _zero_rows,
)


def _bucket_stats(
    x: Tensor, ids: Tensor, sh: _Shard, store: Tensor | None = None, target: Tensor | None = None
) -> tuple[Tensor, ...]:
    """Forward of the top-k buckets (``store``: see :func:`_exp_store`; its I slots are 0).

    Returns (log q_I, log Q_t, m, tail, local ids, in-shard mask, first occurrences, bad
    rows, exp(m_loc - m), log q_y), where ``tail = sum_{v not in I} exp(z_v - m)`` over all
    shards and ``log q_y`` is the log-prob of ``target`` (None without one), computed with
    the very operations of ``vp_logprob`` (sum of the chunk's exps before the I slots are
    zeroed, the same all-reduced sums): equal to it bit for bit.
    """
    n, v = x.shape[0], sh.n_valid
    k = ids.shape[1]
    local, in_shard, in_vocab = _local_index(ids, sh)
    m_loc = torch.full((n,), float("-inf"), dtype=sh.cdtype, device=x.device)
    tail_loc = torch.zeros(n, dtype=sh.cdtype, device=x.device)
    with_y = target is not None
    # tail sum, bad, z_I (, sum of all exps, z_y)
    pack = torch.zeros(n, k + 2 + 2 * with_y, dtype=sh.cdtype, device=x.device)
    sum_loc = torch.zeros(n if with_y else 0, dtype=sh.cdtype, device=x.device)
    if with_y:
        tgt_local, tgt_in, tgt_ok = _local_index(target, sh)
        if v > 0 and n > 0:
            pack[:, -1] = torch.where(
                tgt_in, x.gather(1, tgt_local[:, None])[:, 0].to(sh.cdtype), 0.0
            )
    if v > 0 and n > 0:
        pack[:, 2 : k + 2] = torch.where(in_shard, x.gather(1, local).to(sh.cdtype), 0.0)
        buf = (
            torch.empty(min(sh.chunk, n), v, dtype=sh.cdtype, device=x.device)
            if store is None
            else None
        )
        zero_at = _zero_values(in_shard, sh)
        for s, e in _chunks(n, sh):
            xc, t = x[s:e, :v], buf[: e - s] if store is None else store[s:e, :v]
            m_loc[s:e], shift = _chunk_shift(xc, sh)
            torch.sub(xc, shift[:, None], out=t).exp_()
            if with_y:
                sum_loc[s:e] = t.sum(dim=-1)
            t.scatter_reduce_(1, local[s:e], zero_at[s:e], "amin")  # this shard's ids of I -> 0
            tail_loc[s:e] = t.sum(dim=-1)
    m, scale, bad_loc = _to_global(m_loc, sh)
    pack[:, 0] = tail_loc * scale
    pack[:, 1] = bad_loc
    if with_y:
        pack[:, -2] = sum_loc * scale
    _all_reduce(pack, "sum", sh)
    m = torch.where(pack[:, 1] > 0, float("nan"), m)
    tail, z_i = pack[:, 0], pack[:, 2 : k + 2]
    first = _first_occurrence(ids)
    mass_i = torch.where(first, torch.exp(z_i - m[:, None]), 0.0).sum(dim=-1)
    log_s = torch.log(tail + mass_i)
    bad = _check_rows("vocab-parallel top-k buckets", m + log_s)
    bad_ids = ~in_vocab.all(dim=-1)
    if debug_nonfinite() and bool(bad_ids.any()):
        raise ValueError(
            f"top-k ids outside [0, {sh.vocab_size}) in {int(bad_ids.sum())} token row(s)"
        )
    nan = torch.tensor(float("nan"), dtype=sh.cdtype, device=x.device)
    log_q = torch.where(bad_ids[:, None], nan, (z_i - m[:, None]) - log_s[:, None])
    # log Q_t: log1p(-q(I)) while q(I) < 1/2 (tail near 1), else log(tail / S) (tail near 0)
    frac_i = mass_i / (tail + mass_i)
    log_qt = torch.where(frac_i < 0.5, torch.log1p(-frac_i), torch.log(tail) - log_s)
    log_qt = torch.where(bad_ids, nan, log_qt)
    lp_y = None
    if with_y:  # as vp_logprob: (z_y - m) - log S
        lp_y = torch.where(tgt_ok, (pack[:, -1] - m) - torch.log(pack[:, -2]), float("nan"))
    return log_q, log_qt, m, tail, local, in_shard, first, bad | bad_ids, scale, lp_y


def _zero_values(in_shard: Tensor, sh: _Shard) -> Tensor:
    """Values for ``scatter_reduce_(..., "amin")`` that set this shard's bucket slots of a
    chunk of exps (>= 0) to exactly 0 and leave the slot that out-of-shard ids are clamped
    to unchanged (+inf): no collision with an in-shard id 0, and repeated ids are harmless."""
    return torch.where(in_shard, 0.0, float("inf")).to(sh.cdtype)


def _first_occurrence(ids: Tensor) -> Tensor:
    """Bool ``[N, k]``: True at the first entry of each distinct id of a row."""
    srt, order = ids.sort(dim=-1, stable=True)
    first_sorted = torch.ones_like(srt, dtype=torch.bool)
    first_sorted[:, 1:] = srt[:, 1:] != srt[:, :-1]
    return torch.empty_like(first_sorted).scatter_(1, order, first_sorted)


def topk_target_logprobs(
    teacher_logprobs: Tensor,
    *,
    alpha: float = 1.0,
    ref_logprobs: Tensor | None = None,
    ref_tail_logprob: Tensor | None = None,
    vocab_size: int | None = None,
) -> Tensor:
    """Log-probs of the KL target on the k+1 buckets (top-k ids, then the tail): ``[..., k+1]``.

    ``teacher_logprobs [..., k]``: the teacher's log-probs of its top-k ids over the full
    vocabulary. Tail ``P_t = max(0, 1 - sum exp(l_i))`` in fp64 (0 when ``k >= vocab_size``;
    if rounding makes ``sum exp(l_i) > 1`` the k masses are divided by that sum). For
    ``alpha != 1`` the target is the geometric mixture ``p ∝ p_r^(1-alpha) p_T^alpha`` on the
    buckets, which needs pi_r's bucket log-probs: ``ref_logprobs [..., k]`` (pi_r's log-probs
    of the TEACHER's top-k ids) and ``ref_tail_logprob [...]`` (log of pi_r's mass outside
    those ids; derived as ``log(1 - sum exp(ref_logprobs))`` when None). Both come from
    :func:`vp_bucket_logprobs` on pi_r's logits. A bucket empty under either distribution
    gets no mass (for ``0 < alpha``, ``alpha != 1``); ``alpha = 0`` returns pi_r's buckets.
    Returned in fp64 (a constant: no gradient).
    """

    def buckets(lp: Tensor, tail_lp: Tensor | None) -> Tensor:
        lp = lp.detach().to(torch.float64)
        if tail_lp is None:
            mass = torch.exp(lp).sum(dim=-1)
            over = mass > 1
            lp = torch.where(over[..., None], lp - torch.log(mass)[..., None], lp)
            tail_lp = torch.log1p(-mass.clamp(max=1.0))
            if vocab_size is not None and lp.shape[-1] >= vocab_size:
                tail_lp = torch.full_like(tail_lp, float("-inf"))
        else:
            tail_lp = tail_lp.detach().to(torch.float64)
        return torch.cat([lp, tail_lp[..., None]], dim=-1)

    target = buckets(teacher_logprobs, None)
    if alpha == 1.0:
        return target
    if ref_logprobs is None:
        raise ValueError(
            "alpha != 1 needs ref_logprobs (pi_r's log-probs of the teacher's top-k ids)"
        )
    ref = buckets(ref_logprobs, ref_tail_logprob)
    if alpha == 0.0:  # pi_r's buckets (normalised: a repeated id would count twice)
        return ref - torch.logsumexp(ref, dim=-1, keepdim=True)
    both = torch.isfinite(target) & torch.isfinite(ref)
    mix = torch.where(
        both,
        (1.0 - alpha) * torch.where(both, ref, 0.0) + alpha * torch.where(both, target, 0.0),
        float("-inf"),
    )
    return mix - torch.logsumexp(mix, dim=-1, keepdim=True)


class _TopKKL(torch.autograd.Function):
    """Per-token forward KL from target buckets to the student; see the module docstring."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, ids: Tensor, target_lp: Tensor, sh: _Shard) -> Tensor:
        store = _exp_store(x, sh, ctx.needs_input_grad[0])
        log_q, log_qt, m, tail, local, in_shard, first, bad, scale, _ = _bucket_stats(
            x, ids, sh, store
        )
        p = torch.exp(target_lp)
        lq = torch.cat([log_q, log_qt[:, None]], dim=1)
        terms = torch.where(p > 0, p * (target_lp - lq), torch.zeros_like(p))
        kl = torch.where(bad, float("nan"), terms.sum(dim=-1))
        # off I: dL/dz_v = q_v - p~_t q_v / Q_t = exp(z_v - m) * (Q_t - p~_t) / tail
        off = torch.where(tail > 0, (torch.exp(log_qt) - p[:, -1]) / tail, 0.0)
        # on I: q_i - (sum of the target's entries on id i); a repeated id counts q_i once
        on = torch.where(first, torch.exp(log_q), 0.0) - p[:, :-1]
        if store is not None:  # exp(z - m) = scale * exp(z - m_loc)
            off = off * torch.where(torch.isfinite(m), scale, 0.0)
        ctx.save_for_backward(x, local, in_shard, m, off, on, bad)
        ctx.sh, ctx.store = sh, store
        return kl

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        x, local, in_shard, m, off, on, bad = ctx.saved_tensors
        sh: _Shard = ctx.sh
        n, v = x.shape[0], sh.n_valid
        store, ctx.store = ctx.store, None
        grad, work = (store, None) if store is not None else _new_grad(x, sh)
        if v == 0 or n == 0:
            return grad, None, None, None
        g = g.to(sh.cdtype)
        coef = (g * off)[:, None]
        on = on * (g[:, None] * in_shard)  # on I: g (q_i - p~_i), 0 for ids of other shards
        zero_at = _zero_values(in_shard, sh)
        for s, e in _chunks(n, sh):
            t = work[: e - s] if work is not None else grad[s:e, :v]
            if store is None:  # else t holds exp(z - m_loc), I slots 0, from forward
                torch.sub(x[s:e, :v], m[s:e, None], out=t).exp_()
                t.scatter_reduce_(1, local[s:e], zero_at[s:e], "amin")  # this shard's I slots -> 0
            t.mul_(coef[s:e])
            t.scatter_add_(1, local[s:e], on[s:e])
            if work is not None:
                grad[s:e, :v].copy_(t)
        _zero_rows(grad, bad)
        return grad, None, None, None


def vp_topk_kl(
    logits: Tensor,
    teacher_ids: Tensor,
    teacher_logprobs: Tensor,
    group: Any = None,
    vocab_start: int | None = None,
    vocab_size: int | None = None,
    *,
    alpha: float = 1.0,
    ref_logprobs: Tensor | None = None,
    ref_tail_logprob: Tensor | None = None,
    chunk_size: int | None = None,
    inplace_backward: bool = False,
) -> Tensor:
    """Per-token forward KL(target || student) on the teacher's top-k + tail buckets.

    ``logits [..., V_local]``: the student's vocab shard. ``teacher_ids [..., k]``: global
    ids of the teacher's top-k (< ``vocab_size``; distinct within a token except harmless
    filler at masked positions); ``teacher_logprobs [..., k]``: their log-probs over the
    teacher's full vocabulary (tail ``1 - sum exp``). ``alpha``, ``ref_logprobs``,
    ``ref_tail_logprob``: the geometric-mixture target (:func:`topk_target_logprobs`).
    Returns ``[...]`` (fp32; fp64 for fp64 logits), differentiable w.r.t. ``logits``; mask
    and normalise with :func:`erpd_megatron.ops.losses.token_mean_loss`."""
    x = _flat(logits)
    sh = _shard(x, group, vocab_start, vocab_size, chunk_size, inplace_backward)
    k = teacher_ids.shape[-1]
    ids = teacher_ids.reshape(-1, k).long()
    target = topk_target_logprobs(
        teacher_logprobs.reshape(-1, k),
        alpha=alpha,
        ref_logprobs=None if ref_logprobs is None else ref_logprobs.reshape(-1, k),
        ref_tail_logprob=None if ref_tail_logprob is None else ref_tail_logprob.reshape(-1),
        vocab_size=sh.vocab_size,
    ).to(sh.cdtype)
    return _TopKKL.apply(x, ids, target, sh).view(logits.shape[:-1])


@torch.no_grad()
def vp_bucket_logprobs(
    logits: Tensor,
    ids: Tensor,
    group: Any = None,
    vocab_start: int | None = None,
    vocab_size: int | None = None,
    *,
    chunk_size: int | None = None,
    target: Tensor | None = None,
) -> tuple[Tensor, ...]:
    """Log-probs of given ids and of the mass outside them (forward only).

    For the cache writer: run on pi_r's logits with the teacher's top-k ``ids [..., k]`` to
    get ``ref_logprobs [..., k]`` and ``ref_tail_logprob [...]`` for the geometric-mixture
    target of :func:`vp_topk_kl`. The tail is a direct sum over the complement (exact even
    near 0 or 1), and the same machinery gives the student's buckets in :func:`vp_topk_kl`.
    With ``target [...]`` (global ids) a third output is its log-prob from the same pass,
    equal bit for bit to :func:`~erpd_megatron.ops.vocab_parallel.vp_logprob`'s.
    """
    x = _flat(logits)
    sh = _shard(x, group, vocab_start, vocab_size, chunk_size)
    k = ids.shape[-1]
    tgt = None if target is None else target.reshape(-1).long()
    log_q, log_qt, _, _, _, _, _, bad, _, lp_y = _bucket_stats(
        x, ids.reshape(-1, k).long(), sh, target=tgt
    )
    log_q = torch.where(bad[:, None], float("nan"), log_q)
    out = (log_q.view(*logits.shape[:-1], k), log_qt.view(logits.shape[:-1]))
    return out if lp_y is None else (*out, lp_y.view(logits.shape[:-1]))


def _topk_lowest_ids(x: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top-k of each row, sorted by (value desc, column asc); ties at the k-th value go to
    the lowest columns, so the result does not depend on the TP layout or the kernel."""
    tv, ti = x.topk(min(k + 1, x.shape[1]), dim=-1)  # the (k+1)-th shows a tie at the k-th
    fix = (
        (tv[:, k] == tv[:, k - 1]).nonzero().flatten()
        if tv.shape[1] > k
        else tv.new_zeros(0).long()
    )
    tv, ti, tau = tv[:, :k], ti[:, :k], tv[:, k - 1 : k]
    if fix.numel():  # the k-th value may be tied beyond the selection: take the lowest columns
        xf, tf = x[fix], tau[fix]
        col = torch.arange(x.shape[1], device=x.device, dtype=torch.float64)
        key = torch.where(xf > tf, float(x.shape[1]), torch.where(xf == tf, -col, float("-inf")))
        ti = ti.clone()
        ti[fix] = key.topk(k, dim=-1).indices
    ti = ti.sort(dim=-1).values
    tv = x.gather(1, ti)
    order = torch.sort(tv, dim=-1, descending=True, stable=True).indices
    return tv.gather(1, order), ti.gather(1, order)


@torch.no_grad()
def vp_topk(
    logits: Tensor,
    k: int,
    group: Any = None,
    vocab_start: int | None = None,
    vocab_size: int | None = None,
    *,
    chunk_size: int | None = None,
    target: Tensor | None = None,
) -> tuple[Tensor, ...]:
    """Top-k over the full real vocabulary: ``(ids [..., k] int64 global, logprobs [..., k])``.

    Sorted by log-prob, descending; log-probs normalised over the full real vocabulary
    (fp32; fp64 for fp64 logits). Forward only. Needs ``k <= vocab_size``. With
    ``target [...]`` (global ids) a third output is its log-prob (as
    :func:`~erpd_megatron.ops.vocab_parallel.vp_logprob`) from the same pass and all-reduce.
    """
    x = _flat(logits)
    sh = _shard(x, group, vocab_start, vocab_size, chunk_size)
    if not 0 < k <= sh.vocab_size:
        raise ValueError(f"k must be in [1, vocab_size={sh.vocab_size}], got {k}")
    n, v = x.shape[0], sh.n_valid
    vals = torch.full((n, k), float("-inf"), dtype=sh.cdtype, device=x.device)
    gids = torch.full((n, k), -1, dtype=torch.long, device=x.device)
    kk = min(k, v)
    m_loc = torch.full((n,), float("-inf"), dtype=sh.cdtype, device=x.device)
    sum_loc = torch.zeros(n, dtype=sh.cdtype, device=x.device)
    z_y = torch.zeros(n, dtype=sh.cdtype, device=x.device)
    if target is not None:
        tgt_local, tgt_in, tgt_ok = _local_index(target.reshape(-1).long(), sh)
        if v > 0 and n > 0:
            z_y = torch.where(tgt_in, x.gather(1, tgt_local[:, None])[:, 0].to(sh.cdtype), 0.0)
    if kk > 0 and n > 0:
        buf = torch.empty(min(sh.chunk, n), v, dtype=sh.cdtype, device=x.device)
        for s, e in _chunks(n, sh):
            xc, t = x[s:e, :v], buf[: e - s]
            m_loc[s:e], shift = _chunk_shift(xc, sh)
            sum_loc[s:e] = torch.sub(xc, shift[:, None], out=t).exp_().sum(dim=-1)
            tv, ti = _topk_lowest_ids(xc, kk)
            vals[s:e, :kk] = tv.to(sh.cdtype)
            gids[s:e, :kk] = ti + sh.vocab_start
    m, scale, bad_loc = _to_global(m_loc, sh)
    stats = torch.stack([sum_loc * scale, bad_loc, z_y], dim=1)
    _all_reduce(stats, "sum", sh)
    log_s = torch.log(stats[:, 0])
    m = torch.where(stats[:, 1] > 0, float("nan"), m)
    bad = _check_rows("vp_topk", m + log_s)
    if sh.group is not None:
        all_vals = [torch.empty_like(vals) for _ in range(sh.world)]
        all_ids = [torch.empty_like(gids) for _ in range(sh.world)]
        dist.all_gather(all_vals, vals, group=sh.group)
        dist.all_gather(all_ids, gids, group=sh.group)
        cand_v, cand_i = torch.cat(all_vals, dim=1), torch.cat(all_ids, dim=1)
        # candidates come rank by rank, each sorted (value desc, id asc): a stable sort by
        # value keeps ties in ascending global id, whatever the layout
        order = torch.sort(cand_v, dim=1, descending=True, stable=True).indices[:, :k]
        vals, gids = cand_v.gather(1, order), cand_i.gather(1, order)
    lp = torch.where(bad[:, None], float("nan"), (vals - m[:, None]) - log_s[:, None])
    shape = (*logits.shape[:-1], k)
    if target is None:
        return gids.view(shape), lp.view(shape)
    lp_y = torch.where(tgt_ok, (stats[:, 2] - m) - log_s, float("nan"))
    return gids.view(shape), lp.view(shape), lp_y.view(logits.shape[:-1])
