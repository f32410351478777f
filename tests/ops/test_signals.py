"""Stage-2 signals and trust-region surrogate against plain per-token references (float64)."""

from __future__ import annotations

import math

import pytest
import torch

from erpd_megatron.ops.kl import kl_penalty
from erpd_megatron.ops.signals import (
    build_signal,
    clipped_surrogate,
    combine_teachers,
    gated_signal,
    outlier_mask,
    scale_and_clip,
    stage2_signal_loss,
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
    g_add = teacher_signal("gated", lp_t, lp_unlearned=lp_u, adv=adv, gate_source="contrast",
                           gate_mode="add", gate_alpha=0.5)
    for i in range(4):
        for j in range(11):
            lr = lp_t[i, j].item() - lp_r[i, j].item()
            ct = lp_t[i, j].item() - lp_u[i, j].item()
            a = adv[i, j].item()
            assert s_lr[i, j].item() == lr and s_ct[i, j].item() == ct
            assert g_sign[i, j].item() == (lr if _sign(lr) == _sign(a) else 0.0)
            assert abs(g_add[i, j].item() - (a + 0.5 * ct)) < 1e-15
    combo = combine_teachers([s_lr, s_ct, g_add], [0.5, 0.25, -1.0])
    assert torch.allclose(combo, 0.5 * s_lr + 0.25 * s_ct - g_add, rtol=0, atol=1e-15)
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
    assert torch.autograd.gradcheck(lambda x: clipped_surrogate(x, lp_r, s, mask, eps=eps, normalizer=25)[0], (lp,))
    # the whole loss = surrogate on the built signal + k3 penalty on kept tokens
    full, fm = stage2_signal_loss(logp, lp_r, s, mask, normalizer=25, lam=2.0, clip=1.5, c_out=2.5,
                                  eps=eps, kl_coef=0.05)
    adv, keep, _ = build_signal(s, mask, lam=2.0, clip=1.5, c_out=2.5)
    ref = clipped_surrogate(logp, lp_r, adv, keep, eps=eps, normalizer=25)[0]
    ref = ref + kl_penalty(logp, lp_r, keep, coef=0.05, normalizer=25)[0]
    assert torch.allclose(full, ref, rtol=0, atol=1e-15)
    assert {"clipped_tokens", "signal_sum", "kl_k3_sum", "nonfinite_tokens"} <= set(fm)


def test_stage2_empty_mask_and_nonfinite(gen):
    lp_r = _lp(gen)
    logp = lp_r.clone().requires_grad_()
    s = torch.randn(4, 11, generator=gen, dtype=D)
    s[0, 0] = float("nan")
    empty = torch.zeros(4, 11, dtype=torch.bool)
    loss, m = stage2_signal_loss(logp, lp_r, s, empty, normalizer=0, kl_coef=0.1)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(logp.grad, torch.zeros_like(logp))
    full = torch.ones(4, 11, dtype=torch.bool)
    loss, m = stage2_signal_loss(logp, lp_r, s, full, normalizer=44)
    assert m["nonfinite_tokens"].item() == 1 and torch.isfinite(loss)
