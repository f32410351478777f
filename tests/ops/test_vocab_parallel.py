"""Vocab-parallel ops (one process) against float64 full-vocabulary references.

Tolerances (norm-wise relative error over the whole batch, values and gradients):
float64 logits 1e-12 (checks the math itself); fp32 logits 1e-6 (fp32 arithmetic against
the exact float64 result of the same fp32 inputs); bf16 logits 1e-6 for values (math is
fp32 on the exact bf16 values) and 8e-3 for gradients (returned in bf16: 2^-8 rounding).
"""

from __future__ import annotations

import pytest
import torch

from erpd_megatron.ops.common import set_debug_nonfinite
from erpd_megatron.ops.losses import token_mean_loss
from erpd_megatron.ops.vocab_parallel import vp_entropy, vp_logprob, vp_logprob_and_entropy
from erpd_megatron.ops.vocab_parallel_topk import (
    topk_target_logprobs,
    vp_bucket_logprobs,
    vp_topk,
    vp_topk_kl,
)
from tests.ops.vp_reference import (
    D,
    make_kl_case,
    ref_buckets,
    ref_logprob_entropy,
    ref_topk_kl,
    rel_err,
)

TOL = {torch.float64: (1e-12, 1e-12), torch.float32: (1e-6, 1e-6), torch.bfloat16: (1e-6, 8e-3)}
DTYPES = [torch.float64, torch.float32, torch.bfloat16]


def _sizes(gen: torch.Generator, padded: bool):
    n = int(torch.randint(20, 60, (1,), generator=gen))
    v = int(torch.randint(48, 97, (1,), generator=gen))
    vocab = v - int(torch.randint(1, 7, (1,), generator=gen)) if padded else v
    chunk = int(torch.randint(1, n + 1, (1,), generator=gen))
    return n, v, vocab, chunk


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("padded", [False, True])
def test_logprob_entropy_match_reference(gen, dtype, padded):
    n, v, vocab, chunk = _sizes(gen, padded)
    x0 = (torch.randn(n, v, generator=gen, dtype=D) * 3).to(dtype)
    x0[: n // 4] = torch.randint(-2, 3, (n // 4, v), generator=gen).to(dtype)  # ties
    x0[:, vocab:] = 0
    target = torch.randint(0, vocab, (n,), generator=gen)
    g_lp, g_ent = torch.randn(n, generator=gen, dtype=D), torch.randn(n, generator=gen, dtype=D)
    xr = x0.to(D).clone().requires_grad_()
    lp_r, ent_r = ref_logprob_entropy(xr, target, vocab)
    (lp_r * g_lp + ent_r * g_ent).sum().backward()
    tv, tg = TOL[dtype]

    x = x0.clone().requires_grad_()
    lp, ent = vp_logprob_and_entropy(x, target, vocab_size=vocab, chunk_size=chunk)
    assert lp.dtype == ent.dtype == (D if dtype == D else torch.float32)
    (lp * g_lp.to(lp.dtype) + ent * g_ent.to(lp.dtype)).sum().backward()
    assert x.grad.dtype == dtype
    assert rel_err(lp, lp_r) < tv and rel_err(ent, ent_r) < tv
    assert rel_err(x.grad, xr.grad) < tg
    assert torch.all(x.grad[:, vocab:] == 0)

    # the separate ops agree with the combined one, values and gradients
    xa = x0.clone().requires_grad_()
    (
        vp_logprob(xa, target, vocab_size=vocab, chunk_size=chunk) * g_lp.to(lp.dtype)
    ).sum().backward()
    xb = x0.clone().requires_grad_()
    (vp_entropy(xb, vocab_size=vocab, chunk_size=chunk) * g_ent.to(lp.dtype)).sum().backward()
    grad_sum = xa.grad.to(D) + xb.grad.to(D)
    assert rel_err(grad_sum, xr.grad) < 2 * tg
    # leading dims are kept; the default chunk size gives the same values
    lp3 = vp_logprob(x0.view(1, n, v), target.view(1, n), vocab_size=vocab)
    assert lp3.shape == (1, n) and rel_err(lp3[0], lp_r) < tv


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("alpha", [1.0, 0.5, 1.6, 0.0])
def test_topk_kl_matches_reference(gen, dtype, padded, alpha):
    n, v, vocab, chunk = _sizes(gen, padded)
    k = int(torch.randint(2, 9, (1,), generator=gen))
    x0, ids, t_lp, pi_r = make_kl_case(gen, n, v, vocab, k, dtype)
    ref_lp = ref_tail = None
    if alpha != 1.0:
        ref_lp, ref_tail = vp_bucket_logprobs(pi_r, ids, vocab_size=vocab, chunk_size=chunk)
        want_lp, want_tail = ref_buckets(pi_r.to(D), ids, vocab)
        assert (
            rel_err(ref_lp, want_lp) < TOL[dtype][0]
            and rel_err(ref_tail, want_tail) < TOL[dtype][0]
        )
    g = torch.randn(n, generator=gen, dtype=D)
    xr = x0.to(D).clone().requires_grad_()
    kl_r = ref_topk_kl(xr, ids, t_lp, vocab, alpha, ref_lp, ref_tail)
    (kl_r * g).sum().backward()

    x = x0.clone().requires_grad_()
    kl = vp_topk_kl(
        x,
        ids,
        t_lp,
        vocab_size=vocab,
        alpha=alpha,
        ref_logprobs=ref_lp,
        ref_tail_logprob=ref_tail,
        chunk_size=chunk,
    )
    (kl * g.to(kl.dtype)).sum().backward()
    tv, tg = TOL[dtype]
    distinct = [r for r in range(n) if r not in (9, 10)]  # rows 9, 10 repeat ids (see make_kl_case)
    assert torch.isfinite(kl).all() and (kl[distinct] > -1e-6).all()
    assert rel_err(kl, kl_r) < tv, rel_err(kl, kl_r)
    assert rel_err(x.grad, xr.grad) < tg, rel_err(x.grad, xr.grad)
    assert torch.all(x.grad[:, vocab:] == 0)


def test_topk_kl_tail_zero_when_topk_covers_vocab(gen):
    n, vocab = 9, 12
    x0 = torch.randn(n, vocab, generator=gen, dtype=D)
    t_lp_full = torch.log_softmax(torch.randn(n, vocab, generator=gen, dtype=D), -1)
    t_lp, ids = t_lp_full.topk(vocab, dim=-1)
    x = x0.clone().requires_grad_()
    kl = vp_topk_kl(x, ids, t_lp, vocab_size=vocab)
    xr = x0.clone().requires_grad_()
    kl_r = ref_topk_kl(xr, ids, t_lp, vocab)
    kl.sum().backward()
    kl_r.sum().backward()
    # the k+1 buckets are the full distribution: the KL is the exact full-vocab KL
    full = (t_lp_full.exp() * (t_lp_full - torch.log_softmax(x0, -1))).sum(-1)
    assert rel_err(kl, full) < 1e-12 and rel_err(kl, kl_r) < 1e-12
    assert rel_err(x.grad, xr.grad) < 1e-12
    target = topk_target_logprobs(t_lp, vocab_size=vocab)
    assert torch.all(target[:, -1] == float("-inf"))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("padded", [False, True])
def test_topk_matches_reference(gen, dtype, padded):
    n, v, vocab, chunk = _sizes(gen, padded)
    k = int(torch.randint(1, 12, (1,), generator=gen))
    x = (torch.randn(n, v, generator=gen, dtype=D) * 3).to(dtype)
    x[: n // 3] = torch.randint(-1, 2, (n // 3, v), generator=gen).to(dtype)  # many ties
    x[:, vocab:] = 100  # padded rows must never be picked, whatever their value
    ids, lps = vp_topk(x, k, vocab_size=vocab, chunk_size=chunk)
    logq = torch.log_softmax(x[:, :vocab].to(D), -1)
    srt = torch.sort(logq, dim=-1, descending=True, stable=True)  # ties: lowest id first
    want, want_ids = srt.values[:, :k], srt.indices[:, :k]
    assert ids.dtype == torch.long and ids.shape == (n, k)
    assert rel_err(lps, want) < TOL[dtype][0]
    assert torch.all((ids >= 0) & (ids < vocab))
    assert torch.all(ids.sort(-1).values[:, 1:] != ids.sort(-1).values[:, :-1])  # distinct
    assert torch.equal(ids, want_ids)
    assert torch.all(lps[:, 1:] <= lps[:, :-1])
    with pytest.raises(ValueError):
        vp_topk(x, vocab + 1, vocab_size=vocab)


def test_empty_batch_and_out_of_range_targets(gen):
    assert not torch.distributed.is_initialized()  # group=None needs no process group
    x = torch.randn(0, 32, dtype=torch.float32, requires_grad=True)
    lp, ent = vp_logprob_and_entropy(x, torch.zeros(0, dtype=torch.long))
    kl = vp_topk_kl(x, torch.zeros(0, 4, dtype=torch.long), torch.zeros(0, 4))
    (lp.sum() + ent.sum() + kl.sum()).backward()
    assert x.grad.shape == (0, 32)
    # an ignore index gives NaN for that token only; masked, the loss and gradient are clean
    x = torch.randn(6, 32, generator=gen, requires_grad=True)
    target = torch.randint(0, 32, (6,), generator=gen)
    target[2] = -100
    lp = vp_logprob(x, target)
    assert torch.isnan(lp[2]) and torch.isfinite(lp[[0, 1, 3, 4, 5]]).all()
    mask = target >= 0
    loss, m = token_mean_loss(-lp, mask, normalizer=mask.sum())
    loss.backward()
    assert torch.isfinite(x.grad).all() and m["nonfinite_tokens"].item() == 0


def test_nonfinite_logits_counted_or_raised(gen):
    x0 = torch.randn(7, 40, generator=gen)
    x0[3, 5] = float("nan")
    x0[5, 0] = float("inf")
    target = torch.randint(0, 40, (7,), generator=gen)
    ids = torch.rand(7, 40, generator=gen).argsort(-1)[:, :4]
    t_lp = torch.log_softmax(torch.randn(7, 40, generator=gen), -1).gather(1, ids)
    for op in (lambda x: vp_logprob(x, target), vp_entropy, lambda x: vp_topk_kl(x, ids, t_lp)):
        x = x0.clone().requires_grad_()
        out = op(x)
        bad = torch.tensor([False, False, False, True, False, True, False])
        assert torch.isnan(out[bad]).all() and torch.isfinite(out[~bad]).all()
        loss, m = token_mean_loss(out, None, normalizer=7)
        assert m["nonfinite_tokens"].item() == 2 and torch.isfinite(loss)
        loss.backward()
        assert torch.isfinite(x.grad).all() and torch.all(x.grad[bad] == 0)
    set_debug_nonfinite(True)
    with pytest.raises(ValueError, match="NaN/Inf"):
        vp_logprob(x0, target)
    with pytest.raises(ValueError, match="NaN/Inf"):
        vp_topk(x0, 3)
    clean = x0.nan_to_num(nan=0.0, posinf=0.0)
    with pytest.raises(ValueError, match="outside"):
        vp_topk_kl(clean, ids + 40, t_lp)
    set_debug_nonfinite(False)
    out = vp_topk_kl(clean, torch.where(torch.arange(7)[:, None] == 2, ids + 40, ids), t_lp)
    assert torch.isnan(out[2]) and torch.isfinite(out[[0, 1, 3, 4, 5, 6]]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inplace_backward_gives_the_same_gradient(gen, dtype):
    n, v, vocab, chunk = _sizes(gen, padded=True)
    x0 = (torch.randn(n, v, generator=gen) * 2).to(dtype)
    target = torch.randint(0, vocab, (n,), generator=gen)
    ids = torch.rand(n, vocab, generator=gen).argsort(-1)[:, :5]
    t_lp = torch.log(0.8 * torch.softmax(torch.randn(n, 5, generator=gen), -1))
    ops = [
        lambda x, **kw: vp_logprob(x, target, vocab_size=vocab, chunk_size=chunk, **kw),
        lambda x, **kw: vp_entropy(x, vocab_size=vocab, chunk_size=chunk, **kw),
        lambda x, **kw: sum(
            vp_logprob_and_entropy(x, target, vocab_size=vocab, chunk_size=chunk, **kw)
        ),
        lambda x, **kw: vp_topk_kl(x, ids, t_lp, vocab_size=vocab, chunk_size=chunk, **kw),
    ]
    for op in ops:
        a = x0.clone().requires_grad_()
        op(a).sum().backward()
        h = x0.clone()  # a non-leaf, as logits from the output layer are
        b = h.clone().requires_grad_()
        logits = b * 1.0
        op(logits, inplace_backward=True).sum().backward()
        assert torch.equal(b.grad, a.grad)
    # another op that saved the same logits never reads the gradient silently: either its
    # backward ran first (exact result) or autograd raises
    ref = x0.clone().requires_grad_()
    (vp_logprob(ref, target, vocab_size=vocab) + vp_entropy(ref, vocab_size=vocab)).sum().backward()
    b = x0.clone().requires_grad_()
    logits = b * 1.0
    out = vp_logprob(logits, target, vocab_size=vocab, inplace_backward=True) + vp_entropy(
        logits, vocab_size=vocab
    )
    out.sum().backward()
    assert torch.equal(b.grad, ref.grad)
    b = x0.clone().requires_grad_()
    logits = b * 1.0
    out = vp_entropy(logits, vocab_size=vocab) + vp_logprob(
        logits, target, vocab_size=vocab, inplace_backward=True
    )
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


def test_kept_exps_give_the_recomputed_gradient(gen):
    """fp32 with a separate gradient: the forward keeps exp(z - m) in the gradient tensor and
    the backward only scales it; a second backward (retain_graph) recomputes from the logits.
    Both equal the float64 reference's gradient (and each other up to rounding)."""
    n, v, vocab, chunk = _sizes(gen, padded=True)
    x0 = torch.randn(n, v, generator=gen) * 3
    target = torch.randint(0, vocab, (n,), generator=gen)
    ids = torch.rand(n, vocab, generator=gen).argsort(-1)[:, :5]
    t_lp = torch.log(0.8 * torch.softmax(torch.randn(n, 5, generator=gen), -1))
    w = torch.randn(n, generator=gen)
    for op in (
        lambda x: vp_logprob_and_entropy(x, target, vocab_size=vocab, chunk_size=chunk)[0],
        lambda x: vp_topk_kl(x, ids, t_lp, vocab_size=vocab, chunk_size=chunk),
    ):
        ref = x0.double().requires_grad_()
        (op(ref) * w.double()).sum().backward()
        x = x0.clone().requires_grad_()
        out = (op(x) * w).sum()
        out.backward(retain_graph=True)
        kept = x.grad.clone()
        x.grad = None
        out.backward()
        torch.testing.assert_close(kept, ref.grad.float(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(x.grad, kept, rtol=1e-6, atol=1e-7)


def test_entropy_fp32_exact_at_qwen_vocab():
    """fp32 entropy at V = 151,936 within 5e-6 nats of float64 (the sum of e*(z-m) over the
    vocabulary was a sequentially accumulated bmm dot: 8.7e-4 nats off at logit scale 3)."""
    gen = torch.Generator().manual_seed(0)
    v = 151_936
    x = torch.randn(16, v, generator=gen) * 3.0
    target = torch.randint(0, v, (16,), generator=gen)
    lp, ent = vp_logprob_and_entropy(x, target)
    q = torch.log_softmax(x.double(), dim=-1)
    assert (ent.double() - (-(q.exp() * q).sum(-1))).abs().max() < 5e-6
    assert (lp.double() - q.gather(1, target[:, None])[:, 0]).abs().max() < 5e-6
