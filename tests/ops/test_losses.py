"""Stage-1 losses and KL estimators against plain per-token Python references (float64)."""

from __future__ import annotations

import math

import pytest
import torch

from erpd_megatron.ops.common import set_debug_nonfinite
from erpd_megatron.ops.kl import kl_estimate, kl_k1, kl_k2, kl_k3, kl_penalty
from erpd_megatron.ops.losses import (
    ce_loss,
    mse_loss,
    pg_loss,
    sapo_loss,
    stage1_loss,
    token_mean_loss,
)

D = torch.float64


def _inputs(gen: torch.Generator, b: int = 5, t: int = 9):
    logp = -torch.rand(b, t, generator=gen, dtype=D) * 3
    anchor = logp + torch.randn(b, t, generator=gen, dtype=D) * 0.4
    adv = torch.randn(b, 1, generator=gen, dtype=D).expand(b, t).clone()
    mask = torch.rand(b, t, generator=gen) > 0.25
    return logp, anchor, adv, mask


def _plain_pg(lp, anc, a, el, eh):
    rho = math.exp(lp - anc)
    c = rho
    if el is not None:
        c = max(c, 1 - el)
    if eh is not None:
        c = min(c, 1 + eh)
    return -min(rho * a, c * a)


def _plain_sapo(lp, anc, a, tp, tn):
    rho = math.exp(lp - anc)
    tau = tp if a > 0 else tn
    return -(4 / tau) * (1 / (1 + math.exp(-tau * (rho - 1)))) * a


def _plain_mean(fn, mask, *cols, normalizer):
    total = 0.0
    for idx in mask.nonzero().tolist():
        total += fn(*[c[tuple(idx)].item() for c in cols])
    return total / normalizer


@pytest.mark.parametrize("eps", [(0.2, 0.28), (None, 0.2), (0.2, None), (None, None)])
def test_pg_matches_plain_reference(gen, eps):
    logp, anchor, adv, mask = _inputs(gen)
    norm = 40.0
    loss, m = pg_loss(logp, anchor, adv, mask, eps_low=eps[0], eps_high=eps[1], normalizer=norm)
    ref = _plain_mean(
        lambda lp, an, a: _plain_pg(lp, an, a, *eps), mask, logp, anchor, adv, normalizer=norm
    )
    assert abs(loss.item() - ref) <= 1e-12 * max(1.0, abs(ref))
    rho = torch.exp(logp - anchor)
    hi = (adv > 0) & (rho > 1 + eps[1]) if eps[1] is not None else torch.zeros_like(mask)
    lo = (adv < 0) & (rho < 1 - eps[0]) if eps[0] is not None else torch.zeros_like(mask)
    assert m["tokens"].item() == mask.sum().item()
    assert m["clipped_tokens"].item() == ((hi | lo) & mask).sum().item()
    assert abs(m["ratio_sum"].item() - rho[mask].sum().item()) < 1e-9
    assert abs(m["loss_sum"].item() - ref * norm) < 1e-9

    def f(lp):
        return pg_loss(lp, anchor, adv, mask, eps_low=eps[0], eps_high=eps[1], normalizer=norm)[0]

    assert torch.autograd.gradcheck(f, (logp.clone().requires_grad_(),))


def test_sapo_matches_plain_reference(gen):
    logp, anchor, adv, mask = _inputs(gen)
    loss, _ = sapo_loss(logp, anchor, adv, mask, normalizer=31, tau_pos=1.0, tau_neg=1.05)
    ref = _plain_mean(
        lambda lp, an, a: _plain_sapo(lp, an, a, 1.0, 1.05), mask, logp, anchor, adv, normalizer=31
    )
    assert abs(loss.item() - ref) <= 1e-12 * max(1.0, abs(ref))
    lp = logp.clone().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x: sapo_loss(x, anchor, adv, mask, normalizer=31)[0], (lp,)
    )
    # on-policy its gradient is the policy gradient -A / normalizer
    lp = anchor.clone().requires_grad_()
    sapo_loss(lp, anchor, adv, mask, normalizer=31)[0].backward()
    assert torch.allclose(lp.grad, torch.where(mask, -adv / 31, 0.0), atol=1e-15)


def test_ce_and_mse_match_plain_reference(gen):
    logp, ref_lp, adv, mask = _inputs(gen)
    w = (torch.rand(logp.shape[0], 1, generator=gen) > 0.5).to(D).expand_as(logp)
    loss, m = ce_loss(logp, mask, normalizer=17, weight=w)
    ref = _plain_mean(lambda lp, ww: -lp * ww, mask, logp, w, normalizer=17)
    assert abs(loss.item() - ref) < 1e-12
    assert m["tokens"].item() == (mask & (w > 0)).sum().item()
    beta = 0.7
    loss, m = mse_loss(logp, ref_lp, adv, mask, beta=beta, normalizer=4)
    total, nseq = 0.0, 0
    for i in range(logp.shape[0]):
        idx = [j for j in range(logp.shape[1]) if mask[i, j]]
        if not idx:
            continue
        nseq += 1
        d = sum(logp[i, j].item() - ref_lp[i, j].item() for j in idx) / len(idx)
        total += (d - adv[i, 0].item() / beta) ** 2
    assert abs(loss.item() - total / 4) < 1e-12
    assert m["sequences"].item() == nseq
    # per-sequence advantage and flat tokens with segment ids give the same loss
    seg = torch.arange(logp.shape[0]).repeat_interleave(logp.shape[1])
    flat, _ = mse_loss(
        logp.reshape(-1),
        ref_lp.reshape(-1),
        adv[:, 0],
        mask.reshape(-1),
        beta=beta,
        normalizer=4,
        segment_ids=seg,
        num_segments=logp.shape[0],
    )
    assert abs(flat.item() - total / 4) < 1e-12
    lp = logp.clone().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x: mse_loss(x, ref_lp, adv, mask, beta=beta, normalizer=4)[0], (lp,)
    )


def test_kl_estimators_and_penalty(gen):
    logp, ref, _, mask = _inputs(gen)
    for i, j in mask.nonzero().tolist():
        x = logp[i, j].item() - ref[i, j].item()
        assert abs(kl_k1(logp, ref)[i, j].item() - x) < 1e-15
        assert abs(kl_k2(logp, ref)[i, j].item() - x * x / 2) < 1e-15
        assert abs(kl_k3(logp, ref)[i, j].item() - (math.exp(-x) - 1 + x)) < 1e-14
    loss, m = kl_penalty(logp, ref, mask, coef=0.3, normalizer=50)
    ref_val = _plain_mean(
        lambda a, b: 0.3 * (math.exp(b - a) - 1 + a - b), mask, logp, ref, normalizer=50
    )
    assert abs(loss.item() - ref_val) < 1e-13
    assert abs(m["kl_k1_sum"].item() - (logp - ref)[mask].sum().item()) < 1e-12
    lp = logp.clone().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x: kl_penalty(x, ref, mask, coef=0.3, normalizer=50)[0], (lp,)
    )
    with pytest.raises(ValueError, match="unknown KL estimator"):
        kl_estimate("k4", logp, ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_k3_value_and_gradient_finite_with_the_right_sign_everywhere(dtype):
    """x in [-60, 60]: finite value and gradient, sign(grad) = sign(x) (the true k3's
    gradient is 1 - exp(-x)), |grad| <= exp(M) - 1, exact k3 for x >= -M (M = 20)."""
    m = 20.0
    x64 = torch.arange(-6000, 6001, dtype=D) / 100  # exact 0 in the middle
    x = x64.to(dtype).requires_grad_()
    val = kl_k3(x, torch.zeros_like(x), max_log_ratio=m)
    val.sum().backward()
    g = x.grad.double()
    assert torch.isfinite(val).all() and torch.isfinite(g).all()
    assert torch.equal(torch.sign(g), torch.sign(x64)), x64[torch.sign(g) != torch.sign(x64)][:5]
    assert g.abs().max().item() <= math.exp(m) - 1
    inside = x64 >= -m
    xr = x.detach().double()  # the rounded inputs
    true_val = torch.expm1(-xr) + xr
    true_grad = -torch.expm1(-xr)
    tol = 1e-5 if dtype == torch.float32 else 1e-13
    assert torch.allclose(val.double()[inside], true_val[inside], rtol=tol, atol=tol)
    assert torch.allclose(g[inside], true_grad[inside], rtol=tol, atol=tol)
    # beyond -M: the tangent continuation (value continuous, grad = 1 - exp(M), still growing)
    out = ~inside
    lin = math.expm1(m) + math.exp(m) * (-m - xr[out]) + xr[out]
    assert torch.allclose(val.double()[out], lin, rtol=tol)
    assert torch.allclose(g[out], torch.full_like(g[out], 1 - math.exp(m)), rtol=tol)
    assert (val.double()[out][:-1] > val.double()[out][1:]).all()
    # kl_penalty (both stages) uses the same estimator: finite, right-signed gradient
    lp = x64.to(dtype).requires_grad_()
    loss, _ = kl_penalty(lp, torch.zeros_like(lp), None, coef=0.1, normalizer=len(lp))
    loss.backward()
    assert torch.isfinite(loss) and torch.equal(torch.sign(lp.grad.double()), torch.sign(x64))


@pytest.mark.parametrize(
    "name,base",
    [
        ("pg", None),
        ("sapo", None),
        ("ce", None),
        ("mse", None),
        ("unlearned", "pg"),
        ("unlearned", "sapo"),
        ("unlearned", "ce"),
        ("unlearned", "mse"),
    ],
)
def test_dispatcher_and_unlearned(gen, name, base):
    logp, anchor, adv, mask = _inputs(gen)
    reward = (adv > 0).to(D)
    kw = dict(
        logp=logp,
        adv=adv,
        mask=mask,
        normalizer=30,
        anchor_logp=anchor,
        ref_logp=anchor,
        reward=reward,
        eps_low=0.2,
        eps_high=0.3,
        seq_normalizer=5,
        beta=2.0,
    )
    loss, _ = stage1_loss(name, base=base or "pg", **kw)
    kind = base or name
    a = -adv if name == "unlearned" else adv
    if kind == "pg":
        ref, _ = pg_loss(logp, anchor, a, mask, eps_low=0.2, eps_high=0.3, normalizer=30)
    elif kind == "sapo":
        ref, _ = sapo_loss(logp, anchor, a, mask, normalizer=30)
    elif kind == "ce":
        w = reward if name == "ce" else 1 - reward
        ref, _ = ce_loss(logp, mask, normalizer=30, weight=w)
    else:
        ref, _ = mse_loss(logp, anchor, a, mask, beta=2.0, normalizer=5)
    assert torch.equal(loss, ref)
    # with the k3 penalty added
    loss_kl, m = stage1_loss(name, base=base or "pg", kl_coef=0.1, **kw)
    pen, _ = kl_penalty(logp, anchor, mask, coef=0.1, normalizer=30)
    assert torch.allclose(loss_kl, ref + pen, rtol=0, atol=1e-15)
    assert "kl_k3_sum" in m


def test_gradient_accumulation_equals_one_batch(gen):
    logp, anchor, adv, mask = _inputs(gen, b=6)
    norm = mask.sum().item()
    fns = [
        lambda lp, an, a, mk, n: pg_loss(lp, an, a, mk, eps_low=0.2, eps_high=0.2, normalizer=n)[0],
        lambda lp, an, a, mk, n: sapo_loss(lp, an, a, mk, normalizer=n)[0],
        lambda lp, an, a, mk, n: ce_loss(lp, mk, normalizer=n)[0],
        lambda lp, an, a, mk, n: kl_penalty(lp, an, mk, coef=0.5, normalizer=n)[0],
        lambda lp, an, a, mk, n: token_mean_loss(lp * lp, mk, normalizer=n)[0],
        lambda lp, an, a, mk, n: mse_loss(lp, an, a, mk, beta=1.0, normalizer=6)[0],
    ]
    for fn in fns:
        full = logp.clone().requires_grad_()
        fn(full, anchor, adv, mask, norm).backward()
        micro = logp.clone().requires_grad_()
        total = sum(
            fn(micro[s], anchor[s], adv[s], mask[s], norm) for s in (slice(0, 2), slice(2, 6))
        )
        total.backward()
        one = fn(logp, anchor, adv, mask, norm)
        assert torch.allclose(total, one, rtol=1e-13, atol=0)
        assert torch.allclose(micro.grad, full.grad, rtol=1e-12, atol=1e-15)


def test_empty_mask_gives_exact_zero_without_nan(gen):
    logp, anchor, adv, _ = _inputs(gen)
    logp = logp.clone()
    logp[0, 0] = float("nan")  # garbage at masked positions never leaks
    anchor = anchor.clone()
    anchor[1, 1] = float("inf")
    empty = torch.zeros_like(logp, dtype=torch.bool)
    cases = [
        lambda lp: pg_loss(lp, anchor, adv, empty, eps_low=0.2, eps_high=0.2, normalizer=0),
        lambda lp: sapo_loss(lp, anchor, adv, empty, normalizer=0),
        lambda lp: ce_loss(lp, empty, normalizer=0),
        lambda lp: mse_loss(lp, anchor, adv, empty, beta=1.0, normalizer=0),
        lambda lp: kl_penalty(lp, anchor, empty, coef=1.0, normalizer=0),
        lambda lp: token_mean_loss(lp, empty, normalizer=None),
    ]
    for fn in cases:
        lp = logp.clone().requires_grad_()
        loss, metrics = fn(lp)
        assert loss.item() == 0.0 and loss.requires_grad
        loss.backward()
        assert torch.equal(lp.grad, torch.zeros_like(lp))
        assert all(torch.isfinite(v) for v in metrics.values())


def test_nonfinite_counted_or_raised(gen, monkeypatch):
    logp, anchor, adv, mask = _inputs(gen)
    mask[:] = True
    logp = logp.clone()
    logp[2, 3] = float("nan")
    anchor = anchor.clone()
    anchor[0, 1] = float("-inf")
    lp = logp.clone().requires_grad_()
    loss, m = pg_loss(lp, anchor, adv, mask, eps_low=0.2, eps_high=0.2, normalizer=mask.sum())
    assert m["nonfinite_tokens"].item() == 2 and torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(lp.grad).all() and lp.grad[2, 3] == 0 and lp.grad[0, 1] == 0
    set_debug_nonfinite(True)
    with pytest.raises(ValueError, match="'logp'"):
        pg_loss(logp, anchor, adv, mask, eps_low=0.2, eps_high=0.2, normalizer=1)
    with pytest.raises(ValueError, match="'per_token'"):
        token_mean_loss(logp, mask, normalizer=1)
    set_debug_nonfinite(None)
    monkeypatch.setenv("ERPD_DEBUG_NONFINITE", "1")
    with pytest.raises(ValueError, match="'anchor_logp'"):
        sapo_loss(logp.nan_to_num(), anchor, adv, mask, normalizer=1)
