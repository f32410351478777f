"""Token math over vocab-parallel logits: log-prob, entropy, top-k and top-k + tail KL.

Logits are ``[..., V_local]``, the vocabulary split over a tensor-parallel group (rank r
holds global ids ``[vocab_start, vocab_start + V_local)``; padded rows beyond the true
``vocab_size`` get no probability and a zero gradient). ``group=None``: no tensor
parallelism and no ``torch.distributed`` call. The full vocabulary is never gathered. Work
is chunked over tokens (about ``DEFAULT_CHUNK_ELEMENTS`` logits per chunk) with reused fp32
workspaces. With a gradient, fp32/fp64 logits and a separate gradient, the forward writes
``exp(z - m_r)`` into the gradient tensor it allocates and the backward only scales it (as
Megatron's cross entropy keeps its softmax); otherwise (in place, low precision) the
backward recomputes it per chunk from the logits and a few saved per-token numbers. Math is
in fp32 per chunk (fp64 for fp64 inputs); gradients are in the logits' dtype.

With ``z`` the logits of one token, ``m = max z``, ``S = sum exp(z-m)``, ``q = softmax(z)``.
One pass per chunk takes the shard's row max ``m_r`` and the sums of ``exp(z - m_r)``; ONE
MAX all-reduce gives ``m``, the shard's sums move onto it by ``exp(m_r - m)``, and ONE SUM
all-reduce (packed) gives ``S`` and the rest. Everything is relative to ``m``
(``log q_y = (z_y - m) - log S``), so large logits keep fp32 precision. Backward: no
communication.

* log-prob of the target ``y``: ``(z_y - m) - log S``; ``d/dz_v = [v == y] - q_v``.
* entropy ``H = log S - sum_v q_v (z_v - m)``; ``dH/dz_v = -q_v (log q_v + H)``.
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

Non-finite logits (NaN/+Inf, or a row of -Inf) make that token's outputs NaN and its gradient
0 (callers mask and count them, :mod:`erpd_megatron.ops.common`; ``ERPD_DEBUG_NONFINITE=1``
raises). Targets or teacher ids outside ``[0, vocab_size)`` give NaN for that token.
"""

from __future__ import annotations

import ctypes
import sys
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from erpd_megatron.ops.common import Tensor, debug_nonfinite

DEFAULT_CHUNK_ELEMENTS = {"cpu": 1 << 20, "cuda": 1 << 24}
"""Logits per chunk (rows = this // V_local, at least 1) when ``chunk_size`` is None, by device
type: 4 MiB of fp32 on a CPU (the chunk stays in cache), 64 MiB on a GPU."""


@dataclass(frozen=True)
class _Shard:
    group: Any
    world: int
    vocab_start: int
    n_valid: int  # real (non-padded) columns of this shard
    vocab_size: int
    chunk: int
    cdtype: torch.dtype
    inplace: bool = False  # backward writes the gradient into the logits' memory


def _shard(
    logits: Tensor,
    group: Any,
    vocab_start: int | None,
    vocab_size: int | None,
    chunk_size: int | None,
    inplace: bool = False,
) -> _Shard:
    world = 1 if group is None else dist.get_world_size(group)
    rank = 0 if group is None else dist.get_rank(group)
    v_local = logits.shape[-1]
    vocab_start = rank * v_local if vocab_start is None else vocab_start
    vocab_size = v_local * world if vocab_size is None else vocab_size
    n_valid = max(0, min(v_local, vocab_size - vocab_start))
    if chunk_size is None:
        budget = DEFAULT_CHUNK_ELEMENTS.get(logits.device.type, 1 << 23)
        chunk_size = max(1, budget // max(1, n_valid))
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    cdtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    return _Shard(
        group if world > 1 else None,
        world,
        vocab_start,
        n_valid,
        vocab_size,
        chunk_size,
        cdtype,
        inplace,
    )


def _all_reduce(t: Tensor, op: str, sh: _Shard) -> Tensor:
    """In-place all-reduce (``op`` "max" or "sum") over the TP group; nothing without one."""
    if sh.group is not None:
        dist.all_reduce(
            t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM, group=sh.group
        )
    return t


def _flat(logits: Tensor) -> Tensor:
    if logits.dim() < 1:
        raise ValueError("logits need a vocabulary dimension")
    return logits.reshape(-1, logits.shape[-1])


def _chunk_shift(xc: Tensor, sh: _Shard) -> tuple[Tensor, Tensor]:
    """Row max of a chunk of this shard, and the shift used for its exps (0 where not finite)."""
    m = xc.amax(dim=-1).to(sh.cdtype)
    return m, torch.where(torch.isfinite(m), m, 0.0)


def _to_global(m_loc: Tensor, sh: _Shard) -> tuple[Tensor, Tensor, Tensor]:
    """One MAX all-reduce: (global row max, factor exp(m_loc - m) that moves this shard's
    sums of exp(z - m_loc) onto the global max, flag of NaN/+Inf rows of this shard)."""
    m = _all_reduce(m_loc.clone(), "max", sh)
    finite = torch.isfinite(m_loc)
    scale = torch.where(
        finite, torch.exp(torch.where(finite, m_loc, 0.0) - torch.where(finite, m, 0.0)), 0.0
    )
    bad_loc = (torch.isnan(m_loc) | (m_loc == float("inf"))).to(m_loc.dtype)
    return m, scale, bad_loc


def _local_index(ids: Tensor, sh: _Shard) -> tuple[Tensor, Tensor, Tensor]:
    """(clamped local column, in-shard mask, in-vocab mask) of global ids."""
    local = ids - sh.vocab_start
    in_shard = (local >= 0) & (local < sh.n_valid)
    in_vocab = (ids >= 0) & (ids < sh.vocab_size)
    return torch.where(in_shard, local, torch.zeros_like(local)), in_shard, in_vocab


def _check_rows(name: str, values: Tensor) -> Tensor:
    """Bool mask of tokens whose statistics are not finite; raises in debug mode."""
    bad = ~torch.isfinite(values)
    if debug_nonfinite() and bool(bad.any()):
        raise ValueError(
            f"{name}: logits contain NaN/Inf in {int(bad.sum())} token row(s) "
            "(ERPD_DEBUG_NONFINITE is on)"
        )
    return bad


def _chunks(n: int, sh: _Shard):
    yield from ((s, min(n, s + sh.chunk)) for s in range(0, n, sh.chunk))


def _zero_rows(grad: Tensor, bad: Tensor) -> None:
    grad.index_fill_(0, bad.nonzero().flatten(), 0)


_MADV_HUGEPAGE = 14  # Linux
_libc: Any = None


def _advise_huge_pages(t: Tensor) -> None:
    """Ask Linux for transparent huge pages for a fresh, large CPU tensor before its first
    touch (as torch under ``THP_MEM_ALLOC_ENABLE=1``): far fewer page faults. A hint only."""
    global _libc
    nbytes = t.numel() * t.element_size()
    if t.device.type != "cpu" or not sys.platform.startswith("linux") or nbytes < (8 << 20):
        return
    try:
        if _libc is None:
            _libc = ctypes.CDLL(None, use_errno=True)
        huge = 2 << 20
        start = (t.data_ptr() + huge - 1) // huge * huge
        end = (t.data_ptr() + nbytes) // huge * huge
        if end > start:
            _libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_HUGEPAGE)
    except (OSError, AttributeError):
        pass


def _new_grad(x: Tensor, sh: _Shard) -> tuple[Tensor, Tensor | None]:
    """The gradient tensor (a new one, or the logits themselves when in place) and, for
    low-precision logits, an fp32 chunk workspace."""
    grad = x if sh.inplace else torch.empty_like(x, memory_format=torch.contiguous_format)
    if not sh.inplace:
        _advise_huge_pages(grad)
    if sh.n_valid < x.shape[1]:
        grad[:, sh.n_valid :] = 0
    work = None
    if x.dtype != sh.cdtype and sh.n_valid > 0:
        work = torch.empty(min(sh.chunk, x.shape[0]), sh.n_valid, dtype=sh.cdtype, device=x.device)
    return grad, work


def _exp_store(x: Tensor, sh: _Shard, needs_grad: bool) -> Tensor | None:
    """A fresh gradient tensor in which the forward keeps ``exp(z - m_loc)`` (the backward
    scales it, no second exp); None (recompute) without a gradient, for low-precision
    logits, or in place (the logits stay intact for other ops until backward)."""
    if sh.inplace or not needs_grad or x.dtype != sh.cdtype or sh.n_valid == 0 or x.shape[0] == 0:
        return None
    return _new_grad(x, sh)[0]


class _LogProbEntropy(torch.autograd.Function):
    """Target log-prob and (optionally) entropy; see the module docstring for the math."""

    @staticmethod
    def forward(
        ctx: Any, x: Tensor, target: Tensor, sh: _Shard, want_entropy: bool
    ) -> tuple[Tensor, Tensor]:
        n, v = x.shape[0], sh.n_valid
        tgt_local, tgt_in, tgt_ok = _local_index(target, sh)
        m_loc = torch.full((n,), float("-inf"), dtype=sh.cdtype, device=x.device)
        loc = torch.zeros(n, 2, dtype=sh.cdtype, device=x.device)  # sums of e and e*(z-m_loc)
        stats = torch.zeros(n, 4, dtype=sh.cdtype, device=x.device)  # S, sum e*(z-m), z_y, bad
        if v > 0 and n > 0:
            stats[:, 2] = torch.where(
                tgt_in, x.gather(1, tgt_local[:, None])[:, 0].to(sh.cdtype), 0.0
            )
        store = _exp_store(x, sh, ctx.needs_input_grad[0])
        if v > 0 and n > 0:
            rows = min(sh.chunk, n)
            buf = torch.empty(rows, v, dtype=sh.cdtype, device=x.device)
            buf2 = torch.empty_like(buf) if want_entropy and store is None else None
            fmin = torch.finfo(sh.cdtype).min
            for s, e in _chunks(n, sh):
                xc, t = x[s:e, :v], buf[: e - s]
                m_loc[s:e], shift = _chunk_shift(xc, sh)
                torch.sub(xc, shift[:, None], out=t)  # the chunk is still in cache from amax
                if want_entropy:
                    t.clamp_(min=fmin)  # -inf logits: exp -> 0 and 0 * fmin = 0, not NaN
                    ex = torch.exp(t, out=buf2[: e - s] if store is None else store[s:e, :v])
                    loc[s:e, 0] = ex.sum(dim=-1)
                    loc[s:e, 1] = torch.bmm(ex[:, None, :], t[:, :, None])[:, 0, 0]
                elif store is None:
                    loc[s:e, 0] = t.exp_().sum(dim=-1)
                else:
                    loc[s:e, 0] = torch.exp(t, out=store[s:e, :v]).sum(dim=-1)
        m, scale, bad_loc = _to_global(m_loc, sh)
        stats[:, 0] = loc[:, 0] * scale
        # sum e^(z-m) (z-m) = scale * (sum e^(z-m_loc) (z-m_loc) + (m_loc - m) * S_loc)
        if want_entropy:
            dm = torch.where(scale > 0, m_loc - m, 0.0)
            stats[:, 1] = scale * (loc[:, 1] + dm * loc[:, 0])
        stats[:, 3] = bad_loc
        _all_reduce(stats, "sum", sh)
        m = torch.where(stats[:, 3] > 0, float("nan"), m)
        log_s = torch.log(stats[:, 0])
        bad = _check_rows("vocab-parallel log-prob/entropy", m + log_s)
        # everything relative to the max: (z_y - m) - log S keeps fp32 precision for large |m|
        lp = torch.where(tgt_ok, (stats[:, 2] - m) - log_s, float("nan"))
        ent = log_s - stats[:, 1] / stats[:, 0] if want_entropy else torch.zeros_like(log_s)
        ctx.save_for_backward(x, tgt_local, tgt_in, m, log_s, ent, bad, scale)
        ctx.sh, ctx.want_entropy, ctx.store = sh, want_entropy, store
        return lp, ent

    @staticmethod
    def backward(ctx: Any, g_lp: Tensor | None, g_ent: Tensor | None) -> tuple[Tensor | None, ...]:
        x, tgt_local, tgt_in, m, log_s, ent, bad, scale = ctx.saved_tensors
        sh: _Shard = ctx.sh
        n, v = x.shape[0], sh.n_valid
        use_ent = ctx.want_entropy and g_ent is not None
        store, ctx.store = ctx.store, None
        grad, work = (store, None) if store is not None else _new_grad(x, sh)
        if v == 0 or n == 0:
            return grad, None, None, None
        g_lp = torch.zeros_like(m) if g_lp is None else g_lp.to(sh.cdtype)
        neg_inv_s = -torch.exp(-log_s)  # -1/S: q_v = exp(z_v - m) / S
        fmin = torch.finfo(sh.cdtype).min
        buf2 = (
            torch.empty(min(sh.chunk, n), v, dtype=sh.cdtype, device=x.device) if use_ent else None
        )
        add_at_target = (g_lp * tgt_in)[:, None]
        if use_ent:
            # dH/dz_v = -q_v (z_v - m - log S + H): with t = z - m and e = exp(t),
            # grad = e * (t + (H - log S)) * (-g_H / S) + e * (-g_lp / S)
            shift = (ent - log_s)[:, None]
            a = (g_ent.to(sh.cdtype) * neg_inv_s)[:, None]
        b = (g_lp * neg_inv_s)[:, None]
        stored = store is not None and not use_ent  # with the entropy's gradient: recompute
        if stored:  # e_loc = exp(z - m_loc) kept by the forward; exp(z - m) = scale * e_loc
            b = b * torch.where(torch.isfinite(m), scale, 0.0)[:, None]
        for s, e in _chunks(n, sh):
            t = work[: e - s] if work is not None else grad[s:e, :v]
            if stored:
                t.mul_(b[s:e])
            else:
                torch.sub(x[s:e, :v], m[s:e, None], out=t)
                if use_ent:
                    t.clamp_(min=fmin)
                    ex = torch.exp(t, out=buf2[: e - s])
                    t.add_(shift[s:e]).mul_(a[s:e]).add_(b[s:e]).mul_(ex)
                else:
                    t.exp_().mul_(b[s:e])
            t.scatter_add_(1, tgt_local[s:e, None], add_at_target[s:e])
            if work is not None:
                grad[s:e, :v].copy_(t)
        _zero_rows(grad, bad)
        return grad, None, None, None


def vp_logprob_and_entropy(
    logits: Tensor,
    target: Tensor,
    group: Any = None,
    vocab_start: int | None = None,
    vocab_size: int | None = None,
    *,
    chunk_size: int | None = None,
    inplace_backward: bool = False,
) -> tuple[Tensor, Tensor]:
    """Log-prob of ``target`` and token entropy in one pass, both differentiable.

    ``logits [..., V_local]`` (this rank's vocab shard), ``target [...]`` global ids;
    ``vocab_start`` defaults to ``rank * V_local``, ``vocab_size`` (real vocabulary) to
    ``V_local * world``. Returns two ``[...]`` fp32 tensors (fp64 for fp64 logits).
    ``inplace_backward=True`` (every op here with a backward takes it) writes the gradient
    into the logits' memory, as Megatron's cross entropy: no logits-sized allocation, but
    backward overwrites the logits. Use it only when this op is their last user; autograd
    raises (version counter) if another op saved them for its own backward."""
    x = _flat(logits)
    sh = _shard(x, group, vocab_start, vocab_size, chunk_size, inplace_backward)
    lp, ent = _LogProbEntropy.apply(x, target.reshape(-1).long(), sh, True)
    return lp.view(logits.shape[:-1]), ent.view(logits.shape[:-1])


def vp_logprob(
    logits: Tensor,
    target: Tensor,
    group: Any = None,
    vocab_start: int | None = None,
    vocab_size: int | None = None,
    *,
    chunk_size: int | None = None,
    inplace_backward: bool = False,
) -> Tensor:
    """Differentiable log-prob of ``target`` under vocab-parallel ``logits`` (see above)."""
    x = _flat(logits)
    sh = _shard(x, group, vocab_start, vocab_size, chunk_size, inplace_backward)
    lp, _ = _LogProbEntropy.apply(x, target.reshape(-1).long(), sh, False)
    return lp.view(logits.shape[:-1])


def vp_entropy(
    logits: Tensor,
    group: Any = None,
    vocab_start: int | None = None,
    vocab_size: int | None = None,
    *,
    chunk_size: int | None = None,
    inplace_backward: bool = False,
) -> Tensor:
    """Differentiable token entropy ``-sum_v q_v log q_v`` of vocab-parallel ``logits``."""
    x = _flat(logits)
    sh = _shard(x, group, vocab_start, vocab_size, chunk_size, inplace_backward)
    target = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    _, ent = _LogProbEntropy.apply(x, target, sh, True)
    return ent.view(logits.shape[:-1])


def _bucket_stats(
    x: Tensor, ids: Tensor, sh: _Shard, store: Tensor | None = None
) -> tuple[Tensor, ...]:
    """Forward of the top-k buckets (``store``: see :func:`_exp_store`; its I slots are 0).

    Returns (log q_I, log Q_t, m, tail, local ids, in-shard mask, first occurrences, bad
    rows, exp(m_loc - m)), where ``tail = sum_{v not in I} exp(z_v - m)`` over all shards.
    """
    n, v = x.shape[0], sh.n_valid
    k = ids.shape[1]
    local, in_shard, in_vocab = _local_index(ids, sh)
    m_loc = torch.full((n,), float("-inf"), dtype=sh.cdtype, device=x.device)
    tail_loc = torch.zeros(n, dtype=sh.cdtype, device=x.device)
    pack = torch.zeros(n, k + 2, dtype=sh.cdtype, device=x.device)  # tail sum, bad, z_I
    if v > 0 and n > 0:
        pack[:, 2:] = torch.where(in_shard, x.gather(1, local).to(sh.cdtype), 0.0)
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
            t.scatter_reduce_(1, local[s:e], zero_at[s:e], "amin")  # this shard's ids of I -> 0
            tail_loc[s:e] = t.sum(dim=-1)
    m, scale, bad_loc = _to_global(m_loc, sh)
    pack[:, 0] = tail_loc * scale
    pack[:, 1] = bad_loc
    _all_reduce(pack, "sum", sh)
    m = torch.where(pack[:, 1] > 0, float("nan"), m)
    tail, z_i = pack[:, 0], pack[:, 2:]
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
    return log_q, log_qt, m, tail, local, in_shard, first, bad | bad_ids, scale


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
        log_q, log_qt, m, tail, local, in_shard, first, bad, scale = _bucket_stats(
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
) -> tuple[Tensor, Tensor]:
    """Log-probs of given ids and of the mass outside them (forward only).

    For the cache writer: run on pi_r's logits with the teacher's top-k ``ids [..., k]`` to
    get ``ref_logprobs [..., k]`` and ``ref_tail_logprob [...]`` for the geometric-mixture
    target of :func:`vp_topk_kl`. The tail is a direct sum over the complement (exact even
    near 0 or 1), and the same machinery gives the student's buckets in :func:`vp_topk_kl`.
    """
    x = _flat(logits)
    sh = _shard(x, group, vocab_start, vocab_size, chunk_size)
    k = ids.shape[-1]
    log_q, log_qt, _, _, _, _, _, bad, _ = _bucket_stats(x, ids.reshape(-1, k).long(), sh)
    log_q = torch.where(bad[:, None], float("nan"), log_q)
    return log_q.view(*logits.shape[:-1], k), log_qt.view(logits.shape[:-1])


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
) -> tuple[Tensor, Tensor]:
    """Top-k over the full real vocabulary: ``(ids [..., k] int64 global, logprobs [..., k])``.

    Sorted by log-prob, descending; log-probs normalised over the full real vocabulary
    (fp32; fp64 for fp64 logits). Forward only. Needs ``k <= vocab_size``.
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
    stats = torch.stack([sum_loc * scale, bad_loc], dim=1)
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
    return gids.view(shape), lp.view(shape)
