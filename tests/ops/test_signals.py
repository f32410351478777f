"""Stage-2 signals and trust-region surrogate against plain per-token references (float64)."""

from __future__ import annotations

import math

import pytest
import torch

from erpd_megatron.ops.kl import kl_penalty
from erpd_megatron.ops.signals import (
    TeacherTerm,
    build_signal,
    clipped_surrogate,
    gated_signal,
    outlier_mask,
    scale_and_clip,
    stage2_loss,
    teacher_signal,
)

D = torch.float64


def _lp(gen, shape=(4, 11)):
    return -torch.rand(*shape, generator=gen, dtype=D) * 4


def _sign(x: float) -> int:
    return (x > 0) - (x < 0)


def test_signal_definitions(gen):
    lp_t, lp_r, lp_u = _lp(gen), _lp(gen), _lp(gen)
    adv = torch.randn(4, 1, generator=gen, dtype=D).expand(4, 11).clone()
    adv[0] = 0.0
    s_lr = teacher_signal("logratio", lp_t, lp_r=lp_r)
    s_ct = teacher_signal("contrast", lp_t, lp_unlearned=lp_u)
    g_sign = teacher_signal("gated", lp_t, lp_r=lp_r, adv=adv, gate_mode="sign")
    g_add = teacher_signal(
        "gated",
        lp_t,
        lp_unlearned=lp_u,
        adv=adv,
        gate_source="contrast",
        gate_mode="add",
        gate_alpha=0.5,
    )
    for i in range(4):
        for j in range(11):
            lr = lp_t[i, j].item() - lp_r[i, j].item()
            ct = lp_t[i, j].item() - lp_u[i, j].item()
            a = adv[i, j].item()
            assert s_lr[i, j].item() == lr and s_ct[i, j].item() == ct
            assert g_sign[i, j].item() == (lr if _sign(lr) == _sign(a) else 0.0)
            assert abs(g_add[i, j].item() - (a + 0.5 * ct)) < 1e-15
    with pytest.raises(ValueError):
        gated_signal(s_lr, adv, mode="mul")
    with pytest.raises(ValueError):
        teacher_signal("gated", lp_t, lp_r=lp_r)


def test_scale_clip_outliers_and_stats(gen):
    s = torch.randn(6, 13, generator=gen, dtype=D) * 2
    mask = torch.rand(6, 13, generator=gen) > 0.2
    lam, c, c_out = 0.8, 1.0, 3.0
    x, clipped = scale_and_clip(s, lam=lam, clip=c)
    keep = outlier_mask(s, c_out)
    adv, kept, m = build_signal(s, mask, lam=lam, clip=c, c_out=c_out)
    n = tot = sq = nclip = nout = 0
    for i, j in mask.nonzero().tolist():
        v = s[i, j].item()
        if abs(v) > c_out:
            nout += 1
            assert not kept[i, j] and adv[i, j] == 0
            continue
        w = min(max(lam * v, -c), c)
        assert kept[i, j] and abs(adv[i, j].item() - w) < 1e-15 and abs(x[i, j].item() - w) < 1e-15
        n += 1
        tot += w
        sq += w * w
        nclip += abs(lam * v) > c
    assert m["signal_outlier_tokens"].item() == nout
    assert m["signal_clipped_tokens"].item() == nclip
    assert abs(m["signal_sum"].item() - tot) < 1e-12 and abs(m["signal_sq_sum"].item() - sq) < 1e-12
    assert m["tokens"].item() == mask.sum().item()
    assert keep.dtype == torch.bool and clipped.dtype == torch.bool


def test_clipped_surrogate_and_full_stage2_loss(gen):
    lp_r = _lp(gen)
    logp = lp_r + torch.randn(4, 11, generator=gen, dtype=D) * 0.3
    s = torch.randn(4, 11, generator=gen, dtype=D)
    mask = torch.rand(4, 11, generator=gen) > 0.3
    eps = 0.2
    loss, m = clipped_surrogate(logp, lp_r, s, mask, eps=eps, normalizer=25)
    total = 0.0
    for i, j in mask.nonzero().tolist():
        rho = math.exp(logp[i, j].item() - lp_r[i, j].item())
        a = s[i, j].item()
        total += -min(rho * a, min(max(rho, 1 - eps), 1 + eps) * a)
    assert abs(loss.item() - total / 25) < 1e-13
    lp = logp.clone().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x: clipped_surrogate(x, lp_r, s, mask, eps=eps, normalizer=25)[0], (lp,)
    )
    # the whole loss = surrogate on the built signal (outliers left out) + k3 penalty
    full, fm = stage2_loss(
        logp,
        lp_r,
        mask,
        [TeacherTerm("logratio", raw=s, lam=2.0, clip=1.5)],
        normalizer=25,
        c_out=2.5,
        eps=eps,
        kl_coef=0.05,
    )
    adv, keep, _ = build_signal(s, mask, lam=2.0, clip=1.5, c_out=2.5)
    ref = clipped_surrogate(logp, lp_r, adv, keep, eps=eps, normalizer=25)[0]
    ref = (
        ref + kl_penalty(logp, lp_r, mask, coef=0.05, normalizer=25)[0]
    )  # penalty: all valid tokens
    assert torch.allclose(full, ref, rtol=0, atol=1e-15)
    assert {"clipped_tokens", "t0_signal_sum", "kl_penalty_sum", "t0_nonfinite_tokens"} <= set(fm)


def test_stage2_empty_mask_and_nonfinite(gen):
    lp_r = _lp(gen)
    logp = lp_r.clone().requires_grad_()
    s = torch.randn(4, 11, generator=gen, dtype=D)
    s[0, 0] = float("nan")
    empty = torch.zeros(4, 11, dtype=torch.bool)
    term = [TeacherTerm("logratio", raw=s)]
    loss, m = stage2_loss(logp, lp_r, empty, term, normalizer=0, kl_coef=0.1)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(logp.grad, torch.zeros_like(logp))
    full = torch.ones(4, 11, dtype=torch.bool)
    loss, m = stage2_loss(logp, lp_r, full, term, normalizer=44)
    assert m["t0_nonfinite_tokens"].item() == 1 and torch.isfinite(loss)


def _mixed_terms(gen, logits, lp_r, adv, mask):
    """Two top-k KL teachers and three advantage-style ones, some tokens outliers for each."""
    from erpd_megatron.ops.vocab_parallel_topk import vp_topk_kl

    n, v = logits.shape
    terms = []
    for w in (0.7, 0.3):
        t_logits = logits.detach() + torch.randn(n, v, generator=gen, dtype=D)
        lps, ids = torch.log_softmax(t_logits, -1).topk(4, dim=-1)
        terms.append(TeacherTerm("topk_kl", weight=w, kl=vp_topk_kl(logits, ids, lps)))
    for kind, w, lam, clip in (
        ("logratio", 1.0, 2.0, 1.0),
        ("contrast", 0.5, 1.0, 0.5),
        ("gated", -0.25, 1.0, None),
    ):
        lp_t = lp_r + torch.randn(n, generator=gen, dtype=D) * 2
        raw = teacher_signal(
            kind, lp_t, lp_r=lp_r, lp_unlearned=lp_r - 0.3, adv=adv, gate_mode="add"
        )
        terms.append(TeacherTerm(kind, weight=w, raw=raw, lam=lam, clip=clip))
    return terms


def test_stage2_loss_does_not_depend_on_teacher_order(gen):
    """Every permutation of the teachers gives the same loss, gradient and summed metrics;
    per-teacher metrics follow their teacher. (train/stage2.py used to apply an advantage
    teacher's outlier mask only to the top-k KL teachers listed after it.)"""
    import itertools

    n, v = 24, 12
    logits = torch.randn(n, v, generator=gen, dtype=D)
    targets = torch.randint(0, v, (n,), generator=gen)
    lp_r = torch.log_softmax(logits + 0.3 * torch.randn(n, v, generator=gen, dtype=D), -1)
    lp_r = lp_r.gather(1, targets[:, None])[:, 0]
    adv = torch.randn(n, generator=gen, dtype=D)
    mask = torch.rand(n, generator=gen) > 0.15
    kw = dict(normalizer=int(mask.sum()), eps=0.3, c_out=2.5, kl_coef=0.05)
    results = []
    seed = int(torch.randint(0, 2**31, (1,), generator=gen))
    perms = list(itertools.permutations(range(5)))
    for perm in perms[:: len(perms) // 12]:  # 12 orders, the identity first
        x = logits.clone().requires_grad_()
        lp = torch.log_softmax(x, -1).gather(1, targets[:, None])[:, 0]
        terms = _mixed_terms(torch.Generator().manual_seed(seed), x, lp_r, adv, mask)  # same data
        order = [terms[i] for i in perm]
        loss, m = stage2_loss(lp, lp_r, mask, order, **kw)
        loss.backward()
        per_teacher = {
            perm[j]: {k.split("_", 1)[1]: val for k, val in m.items() if k.startswith(f"t{j}_")}
            for j in range(5)
        }
        shared = {k: val for k, val in m.items() if not k.startswith("t")}
        results.append((loss.detach(), x.grad.clone(), (per_teacher, shared)))
    ref_loss, ref_grad, (ref_pt, ref_shared) = results[0]
    assert ref_shared["masked_tokens"] > 0  # the outlier mask is exercised
    assert 0 < ref_shared["out_of_region_tokens"] < mask.sum()  # and the trust region
    for loss, grad, (pt, shared) in results[1:]:
        assert torch.allclose(loss, ref_loss, rtol=1e-13, atol=1e-15)
        assert torch.allclose(grad, ref_grad, rtol=1e-12, atol=1e-15)
        assert pt.keys() == ref_pt.keys()
        for j in pt:
            for k in pt[j]:
                assert torch.allclose(pt[j][k], ref_pt[j][k], rtol=1e-12, atol=1e-12), (j, k)
        for k in shared:
            assert torch.allclose(shared[k], ref_shared[k], rtol=1e-12, atol=1e-12), k


def test_stage2_loss_composition_against_plain_reference(gen):
    """The outlier union masks the surrogate only; top-k KL terms see the trust region; the
    penalty sees every valid token."""
    n, v = 20, 10
    logits = torch.randn(n, v, generator=gen, dtype=D)
    targets = torch.randint(0, v, (n,), generator=gen)
    lp = torch.log_softmax(logits, -1).gather(1, targets[:, None])[:, 0]
    lp_r = lp + 0.4 * torch.randn(n, generator=gen, dtype=D)
    adv = torch.randn(n, generator=gen, dtype=D)
    mask = torch.rand(n, generator=gen) > 0.2
    terms = _mixed_terms(gen, logits, lp_r, adv, mask)
    eps, c_out, coef, norm = 0.3, 2.5, 0.05, 17
    loss, m = stage2_loss(
        lp, lp_r, mask, terms, normalizer=norm, eps=eps, c_out=c_out, kl_coef=coef
    )
    total = 0.0
    for i in mask.nonzero()[:, 0].tolist():
        x = lp[i].item() - lp_r[i].item()
        rho = math.exp(x)
        if 1 - eps <= rho <= 1 + eps:
            total += sum(t.weight * t.kl[i].item() for t in terms if t.kind == "topk_kl")
        raws = [t for t in terms if t.kind != "topk_kl"]
        if all(abs(t.raw[i].item()) <= c_out for t in raws):
            a = sum(
                t.weight
                * (
                    t.lam * t.raw[i].item()
                    if t.clip is None
                    else min(max(t.lam * t.raw[i].item(), -t.clip), t.clip)
                )
                for t in raws
            )
            total += -min(rho * a, min(max(rho, 1 - eps), 1 + eps) * a)
        total += coef * (math.exp(-x) - 1 + x)
    assert abs(loss.item() - total / norm) < 1e-12
    assert abs(m["loss_total_sum"].item() - total) < 1e-10
