"""The vocab-parallel ops at TP=2 (two gloo processes) equal the same ops at TP=1.

Every case is rebuilt from one seed in each process; rank r keeps its column shard of the
logits. Compared: log-prob and entropy (values and gradients, combined and separate ops),
top-k (ids and log-probs), top-k + tail KL with alpha 1 and 0.5 (values and gradients) and
pi_r's bucket log-probs. Cases: fp64 with a padded last shard, fp64 where shard 1 is all
padding, fp32 unpadded, bf16 padded. Teacher ids fall on both shards, all on shard 1 from
its local slot 0, and all on shard 0 (the scatter-collision case).
"""

from __future__ import annotations

import random

import numpy as np
import torch

from erpd_megatron.ops.vocab_parallel import vp_entropy, vp_logprob, vp_logprob_and_entropy
from erpd_megatron.ops.vocab_parallel_topk import vp_bucket_logprobs, vp_topk, vp_topk_kl
from tests.dist import run_gloo
from tests.ops.vp_reference import D, make_kl_case, rel_err

V_LOCAL = 32
CASES = [  # (dtype name, real vocab size, chunk size)
    ("float64", 60, 7),
    ("float64", 30, 64),
    ("float32", 64, 5),
    ("bfloat16", 61, 11),
]
TOL = {"float64": (1e-12, 1e-12), "float32": (1e-6, 1e-6), "bfloat16": (1e-6, 8e-3)}


def _np(t: torch.Tensor) -> np.ndarray:
    t = t.detach()
    return (t.float() if t.dtype == torch.bfloat16 else t).numpy().copy()


def run_case(seed: int, case_index: int, rank: int, world: int, group) -> dict[str, np.ndarray]:
    """Build case ``case_index`` from ``seed`` and run every op on shard ``rank`` of ``world``."""
    dtype_name, vocab, chunk = CASES[case_index]
    dtype = getattr(torch, dtype_name)
    gen = torch.Generator().manual_seed(seed + case_index)
    n, k = 23, 6
    x_full, ids, t_lp, pi_r_full = make_kl_case(gen, n, 2 * V_LOCAL, vocab, k, dtype, shard=V_LOCAL)
    target = torch.randint(0, vocab, (n,), generator=gen)
    g1, g2 = torch.randn(n, generator=gen, dtype=D), torch.randn(n, generator=gen, dtype=D)
    cols = slice(rank * V_LOCAL, (rank + 1) * V_LOCAL) if world > 1 else slice(None)
    x0, pi_r = x_full[:, cols].contiguous(), pi_r_full[:, cols].contiguous()
    kw = dict(group=group, vocab_size=vocab, chunk_size=chunk)
    out: dict[str, np.ndarray] = {}
    cd = D if dtype == D else torch.float32

    x = x0.clone().requires_grad_()
    lp, ent = vp_logprob_and_entropy(x, target, **kw)
    (lp * g1.to(cd) + ent * g2.to(cd)).sum().backward()
    out.update(lp=_np(lp), ent=_np(ent), grad_lp_ent=_np(x.grad))
    x = x0.clone().requires_grad_()
    (vp_logprob(x, target, **kw) * g1.to(cd)).sum().backward()
    out["grad_lp"] = _np(x.grad)
    x = x0.clone().requires_grad_()
    (vp_entropy(x, **kw) * g2.to(cd)).sum().backward()
    out["grad_ent"] = _np(x.grad)
    for kk in (5, min(40, vocab)):
        top_ids, top_lp, top_target = vp_topk(x0, kk, **kw, target=target)
        out[f"topk{kk}_ids"], out[f"topk{kk}_lp"] = _np(top_ids), _np(top_lp)
        out[f"topk{kk}_target_lp"] = _np(top_target)  # the cache pass's fused log-prob
    ref_lp, ref_tail, ref_target = vp_bucket_logprobs(pi_r, ids, **kw, target=target)
    out.update(ref_lp=_np(ref_lp), ref_tail=_np(ref_tail), ref_target_lp=_np(ref_target))
    for alpha in (1.0, 0.5):
        x = x0.clone().requires_grad_()
        kl = vp_topk_kl(
            x, ids, t_lp, alpha=alpha, ref_logprobs=ref_lp, ref_tail_logprob=ref_tail, **kw
        )
        (kl * g1.to(cd)).sum().backward()
        out[f"kl{alpha}"], out[f"grad_kl{alpha}"] = _np(kl), _np(x.grad)
    return out


def run_case_logprob(seed: int, case_index: int) -> tuple[np.ndarray, np.ndarray]:
    """``vp_logprob`` (no entropy) of case ``case_index``'s student and pi_r logits at TP=1."""
    dtype_name, vocab, chunk = CASES[case_index]
    gen = torch.Generator().manual_seed(seed + case_index)
    n, k = 23, 6
    x, _, _, pi_r = make_kl_case(
        gen, n, 2 * V_LOCAL, vocab, k, getattr(torch, dtype_name), shard=V_LOCAL
    )
    target = torch.randint(0, vocab, (n,), generator=gen)
    kw = dict(vocab_size=vocab, chunk_size=chunk)
    return _np(vp_logprob(x, target, **kw)), _np(vp_logprob(pi_r, target, **kw))


def nonfinite_case(seed: int, rank: int, world: int, group) -> dict[str, np.ndarray]:
    """A NaN in row 3 and an Inf in row 5, both inside shard 1 only."""
    gen = torch.Generator().manual_seed(seed)
    n = 8
    x_full = torch.randn(n, 2 * V_LOCAL, generator=gen)
    x_full[3, V_LOCAL + 2] = float("nan")
    x_full[5, V_LOCAL + 7] = float("inf")
    target = torch.randint(0, 2 * V_LOCAL, (n,), generator=gen)
    ids = torch.rand(n, 2 * V_LOCAL, generator=gen).argsort(-1)[:, :4]
    t_lp = torch.log_softmax(torch.randn(n, 2 * V_LOCAL, generator=gen), -1).gather(1, ids)
    cols = slice(rank * V_LOCAL, (rank + 1) * V_LOCAL) if world > 1 else slice(None)
    x = x_full[:, cols].contiguous().requires_grad_()
    lp, ent = vp_logprob_and_entropy(x, target, group)
    kl = vp_topk_kl(x, ids, t_lp, group)
    _, top = vp_topk(x.detach(), 3, group)
    finite = torch.isfinite(lp) & torch.isfinite(ent) & torch.isfinite(kl)
    (torch.where(finite, lp + ent + kl, 0.0)).sum().backward()
    return {
        "finite": _np(finite),
        "top_finite": _np(torch.isfinite(top).all(-1)),
        "grad": _np(x.grad),
    }


def tp_worker(rank: int, world: int, seed: int) -> list[dict[str, np.ndarray]]:
    """Entry point of each gloo process: all cases on this rank's shard."""
    import torch.distributed as dist

    out = [run_case(seed, i, rank, world, dist.group.WORLD) for i in range(len(CASES))]
    return out + [nonfinite_case(seed, rank, world, dist.group.WORLD)]


def test_tp2_equals_tp1():
    seed = random.SystemRandom().randrange(2**31)
    print(f"seed={seed}")
    ranks = run_gloo(tp_worker, 2, seed)  # a FileStore rendezvous: no port to race for
    for i, (dtype_name, _, _) in enumerate(CASES):
        one = run_case(seed, i, 0, 1, None)
        two = {key: [r[i][key] for r in ranks] for key in one}
        tv, tg = TOL[dtype_name]
        for key, want in one.items():
            got = two[key]
            if key.startswith("grad"):
                got_full = np.concatenate(got, axis=1)
                assert rel_err(torch.from_numpy(got_full), torch.from_numpy(want)) < tg, (
                    dtype_name,
                    key,
                )
                continue
            # per-token outputs are replicated: every rank holds the same full result
            for g in got:
                if key.endswith("_ids"):  # ties (row 4, bf16) go to the lowest id at any TP
                    assert np.array_equal(g, want), (dtype_name, key)
                else:
                    assert rel_err(torch.from_numpy(g), torch.from_numpy(want)) < tv, (
                        dtype_name,
                        key,
                    )
        # the log-prob fused into the top-k pass is vp_logprob's, bit for bit
        want, want_r = run_case_logprob(seed, i)
        assert np.array_equal(one["topk5_target_lp"], want), dtype_name
        assert np.array_equal(one["ref_target_lp"], want_r), dtype_name
        for r in ranks:
            assert rel_err(torch.from_numpy(r[i]["topk5_target_lp"]), torch.from_numpy(want)) < tv
            assert rel_err(torch.from_numpy(r[i]["ref_target_lp"]), torch.from_numpy(want_r)) < tv
    # non-finite logits on one shard only: every rank flags the same tokens, zero gradient there
    one = nonfinite_case(seed, 0, 1, None)
    expect = np.array([True, True, True, False, True, False, True, True])
    assert np.array_equal(one["finite"], expect) and np.array_equal(one["top_finite"], expect)
    for r, res in enumerate(ranks):
        got = res[-1]
        assert np.array_equal(got["finite"], expect) and np.array_equal(got["top_finite"], expect)
        assert np.isfinite(got["grad"]).all() and (got["grad"][~expect] == 0).all()
        want = one["grad"][:, r * V_LOCAL : (r + 1) * V_LOCAL]
        assert np.allclose(got["grad"], want, rtol=1e-5, atol=1e-7)
