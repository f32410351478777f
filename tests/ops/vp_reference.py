"""Plain float64 full-vocabulary references for the vocab-parallel ops, and input builders.

Nothing here is clever on purpose: the whole real vocabulary is materialised in float64,
padded columns are simply cut off, and gradients come from autograd.
"""

from __future__ import annotations

import torch

D = torch.float64


def ref_logprob_entropy(x: torch.Tensor, target: torch.Tensor, vocab_size: int):
    """Log-prob of the target and entropy, from float64 logits ``x [N, V_padded]``."""
    logq = torch.log_softmax(x[:, :vocab_size].to(D), dim=-1)
    lp = logq.gather(1, target[:, None])[:, 0]
    ent = -(logq.exp() * logq).sum(dim=-1)
    return lp, ent


def ref_buckets(x: torch.Tensor, ids: torch.Tensor, vocab_size: int):
    """Student log-probs of ``ids`` and log of the student's mass outside ``ids``."""
    logq = torch.log_softmax(x[:, :vocab_size].to(D), dim=-1)
    q = logq.exp()
    in_ids = torch.zeros_like(q, dtype=torch.bool).scatter_(1, ids, True)
    tail = torch.where(in_ids, torch.zeros_like(q), q).sum(dim=-1)
    return logq.gather(1, ids), torch.log(tail)


def ref_target(teacher_lp, vocab_size, alpha=1.0, ref_lp=None, ref_tail_lp=None):
    """Target probabilities on the k+1 buckets, written in probability space."""
    p = teacher_lp.to(D).exp()
    total = p.sum(dim=-1, keepdim=True)
    p = torch.where(total > 1, p / total, p)
    tail = (1 - total[:, 0]).clamp(min=0)
    if teacher_lp.shape[-1] >= vocab_size:
        tail = torch.zeros_like(tail)
    pt = torch.cat([p, tail[:, None]], dim=1)
    if alpha == 1.0:
        return pt
    r = ref_lp.to(D).exp()
    r_tail = (
        ref_tail_lp.to(D).exp() if ref_tail_lp is not None else (1 - r.sum(dim=-1)).clamp(min=0)
    )
    rt = torch.cat([r, r_tail[:, None]], dim=1)
    if alpha == 0.0:
        return rt / rt.sum(dim=-1, keepdim=True)
    both = (pt > 0) & (rt > 0)
    w = torch.where(both, rt.clamp(min=1e-300) ** (1 - alpha) * pt.clamp(min=1e-300) ** alpha, 0.0)
    return w / w.sum(dim=-1, keepdim=True)


def ref_topk_kl(x, ids, teacher_lp, vocab_size, alpha=1.0, ref_lp=None, ref_tail_lp=None):
    """Per-token KL(target || student) on the k+1 buckets, differentiable w.r.t. ``x``."""
    target = ref_target(teacher_lp, vocab_size, alpha, ref_lp, ref_tail_lp)
    lq_i, lq_t = ref_buckets(x, ids, vocab_size)
    lq = torch.cat([lq_i, lq_t[:, None]], dim=1)
    safe_log_target = torch.log(torch.where(target > 0, target, torch.ones_like(target)))
    return torch.where(target > 0, target * (safe_log_target - lq), torch.zeros_like(lq)).sum(
        dim=-1
    )


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Norm-wise relative error ``|a - b| / |b|`` in float64."""
    a, b = a.detach().to(D), b.detach().to(D)
    return float((a - b).norm() / b.norm().clamp(min=1e-300))


def distinct_ids(gen: torch.Generator, n: int, k: int, vocab_size: int) -> torch.Tensor:
    """``[n, k]`` ids, distinct within a row, drawn uniformly from the real vocabulary."""
    return torch.rand(n, vocab_size, generator=gen).argsort(dim=-1)[:, :k]


def make_kl_case(
    gen: torch.Generator,
    n: int,
    v_padded: int,
    vocab_size: int,
    k: int,
    dtype: torch.dtype,
    shard: int | None = None,
):
    """Student logits, teacher top-k ids/log-probs and pi_r logits with the awkward rows.

    Row 0: teacher tail exactly 0 (its top-k masses sum to just over 1). Row 1: teacher
    tail near 1. Row 2: student mass almost all on the teacher's ids (its tail ~ e^-25).
    Row 3: student tail near 1. Row 4: ties in the student logits. Rows 5-6: ids 0 and
    vocab_size - 1 present. With ``shard`` (a TP shard width): row 7 has all its ids on
    shard 1 starting at its local slot 0, row 8 all on shard 0 (ids 0..k-1). Row 9 repeats
    an id; row 10 is the filler of masked positions (id 0, log-prob 0, k times). Other rows:
    random.
    """
    x = torch.randn(n, v_padded, generator=gen, dtype=D) * 2
    x[:, vocab_size:] = 0.0  # padded rows give logit 0, as in Megatron
    teacher = torch.randn(n, vocab_size, generator=gen, dtype=D) * 3
    t_lp_full = torch.log_softmax(teacher, dim=-1)
    t_lp, ids = t_lp_full.topk(k, dim=-1)
    ids[5, 0] = 0 if 0 not in ids[5] else ids[5, 0]
    ids[6, 1] = vocab_size - 1 if vocab_size - 1 not in ids[6] else ids[6, 1]
    if shard is not None and shard + k <= vocab_size:
        ids[7] = torch.arange(shard, shard + k)
        ids[8] = torch.arange(k)
    ids[9, 1] = ids[9, 0]  # a repeated id
    t_lp = t_lp_full.gather(1, ids)
    ids[10], t_lp[10] = 0, 0.0  # filler of masked positions: id 0 with log-prob 0, k times
    t_lp[0] = torch.log(torch.full((k,), 1.0 / k, dtype=D)) + 1e-6
    t_lp[1] = -25.0 - torch.rand(k, generator=gen, dtype=D)
    x[2] = -20.0 + torch.randn(v_padded, generator=gen, dtype=D)
    x[2].scatter_(0, ids[2], 5.0 + torch.randn(k, generator=gen, dtype=D))
    x[3].scatter_(0, ids[3], -30.0 + torch.randn(k, generator=gen, dtype=D))
    x[4] = torch.randint(-2, 3, (v_padded,), generator=gen).to(D)
    x[:, vocab_size:] = 0.0
    pi_r = torch.randn(n, v_padded, generator=gen, dtype=D) * 2
    x = x.to(dtype)
    t_lp = t_lp.to(torch.float64 if dtype == torch.float64 else torch.float32)
    return x, ids, t_lp, pi_r.to(dtype)
