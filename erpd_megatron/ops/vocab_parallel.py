"""Token math over vocab-parallel logits: log-prob and entropy (this module), top-k and
top-k + tail KL (:mod:`erpd_megatron.ops.vocab_parallel_topk`), on shared machinery.

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
* top-k, top-k + tail KL and bucket log-probs: :mod:`erpd_megatron.ops.vocab_parallel_topk`
  (same machinery, same conventions).

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
                    # sum e*(z - m_loc) with torch's cascade (pairwise) summation: a bmm
                    # dot accumulated sequentially lost ~9e-4 nats of entropy at V=152k
                    loc[s:e, 1] = t.mul_(ex).sum(dim=-1)
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
