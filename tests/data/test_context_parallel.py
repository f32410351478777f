"""Context parallel, CPU parts: megatron's load-balanced split and its inverse (plain and
packed), and the CP-aware loss reductions on a real 2-rank gloo split of one sequence:
per-token losses (log-prob, top-k KL from the vocab-parallel ops) as partial sums, and a
per-sequence nonlinear loss through cp_all_reduce / cp_share, give the unsplit loss and
gradient."""

from __future__ import annotations

import pytest
import torch

from erpd_megatron.data.context_parallel import (
    cp_all_reduce,
    cp_chunk_indices,
    cp_packed_indices,
    cp_share,
    cp_split,
    cp_unsplit,
)
from tests.dist import run_gloo


def test_load_balanced_split_and_inverse():
    assert cp_chunk_indices(8, 2, 0).tolist() == [0, 1, 6, 7]
    assert cp_chunk_indices(8, 2, 1).tolist() == [2, 3, 4, 5]
    assert cp_chunk_indices(12, 3, 1).tolist() == [2, 3, 8, 9]
    x = torch.arange(2 * 24).reshape(2, 24, 1).float()
    for cp in (1, 2, 3):
        idx = [cp_chunk_indices(24, cp, r) for r in range(cp)]
        parts = [cp_split(x, i) for i in idx]
        assert all(p.shape == (2, 24 // cp, 1) for p in parts)
        assert torch.equal(cp_unsplit(parts, idx), x)
    # packed: each segment on its own
    cu = torch.tensor([0, 4, 12, 16], dtype=torch.int32)
    assert cp_packed_indices(cu, 2, 0).tolist() == [0, 3, 4, 5, 10, 11, 12, 15]
    idx = [cp_packed_indices(cu, 2, r) for r in range(2)]
    assert torch.equal(cp_unsplit([cp_split(x, i) for i in idx], idx), x[:, :16])
    with pytest.raises(ValueError, match="multiple of 2 x CP"):
        cp_chunk_indices(10, 3, 0)
    with pytest.raises(ValueError, match="exactly once"):
        cp_unsplit([x[:, :4], x[:, :4]], [torch.arange(4), torch.arange(4)])


def _losses(logits, targets, ids, lps, mask, n_tokens, *, cp_group=None, cp_size=1):
    """Per-token log-prob and top-k KL losses (partial sums / global normaliser) and a
    per-sequence squared mean log-prob (nonlinear in the sequence sum)."""
    from erpd_megatron.ops.vocab_parallel import vp_logprob
    from erpd_megatron.ops.vocab_parallel_topk import vp_topk_kl

    b, s, v = logits.shape
    lp = vp_logprob(
        logits.reshape(b * s, v), targets.reshape(-1), group=None, vocab_start=0, vocab_size=v
    ).reshape(b, s)
    kl = vp_topk_kl(
        logits.reshape(b * s, v),
        ids.reshape(b * s, -1),
        lps.reshape(b * s, -1),
        group=None,
        vocab_start=0,
        vocab_size=v,
    ).reshape(b, s)
    token = (-(lp * mask).sum() + (kl * mask).sum()) / n_tokens
    seq_sum = cp_all_reduce((lp * mask).sum(dim=1), cp_group)  # full-sequence sums
    seq = cp_share(((seq_sum / n_tokens) ** 2).sum(), cp_size)
    return token, seq


def _rank(rank, world, seed):
    import torch.distributed as dist

    g = torch.Generator().manual_seed(seed)
    s, v, k = 8, 11, 3
    logits = torch.randn(1, s, v, generator=g, dtype=torch.float64)
    targets = torch.randint(0, v, (1, s), generator=g)
    ids = torch.randint(0, v, (1, s, k), generator=g)
    lps = torch.log_softmax(torch.randn(1, s, k, generator=g, dtype=torch.float64), -1) - 0.5
    mask = torch.tensor([[0, 1, 1, 1, 1, 1, 1, 0]], dtype=torch.float64)
    idx = cp_chunk_indices(s, world, rank)
    local = cp_split(logits, idx).clone().requires_grad_(True)
    token, seq = _losses(
        local,
        cp_split(targets, idx),
        cp_split(ids, idx),
        cp_split(lps, idx),
        cp_split(mask, idx),
        float(mask.sum()),
        cp_group=dist.group.WORLD,
        cp_size=world,
    )
    (token + seq).backward()
    return idx.numpy(), float(token.detach()), float(seq.detach()), local.grad.numpy()


def test_cp_loss_reductions_equal_the_unsplit_sequence_on_two_gloo_ranks():
    out = run_gloo(_rank, 2, 5, timeout=120)
    g = torch.Generator().manual_seed(5)
    s, v, k = 8, 11, 3
    logits = torch.randn(1, s, v, generator=g, dtype=torch.float64).requires_grad_(True)
    targets = torch.randint(0, v, (1, s), generator=g)
    ids = torch.randint(0, v, (1, s, k), generator=g)
    lps = torch.log_softmax(torch.randn(1, s, k, generator=g, dtype=torch.float64), -1) - 0.5
    mask = torch.tensor([[0, 1, 1, 1, 1, 1, 1, 0]], dtype=torch.float64)
    token, seq = _losses(logits, targets, ids, lps, mask, float(mask.sum()))
    (token + seq).backward()
    assert sum(o[1] for o in out) == pytest.approx(float(token), rel=1e-12)
    assert sum(o[2] for o in out) == pytest.approx(float(seq), rel=1e-12)
    grad = cp_unsplit([torch.from_numpy(o[3]) for o in out], [torch.from_numpy(o[0]) for o in out])
    assert torch.allclose(grad, logits.grad, rtol=1e-10, atol=1e-12)
    assert float(seq) > 0 and logits.grad.abs().sum() > 0


def test_cp_micro_batch_split_keeps_sums_and_counts_each_sequence_once():
    import numpy as np

    from erpd_megatron.data.batching import collate, collate_packed, packed_cu_seqlens
    from erpd_megatron.train.engine import cp_micro_batch
    from erpd_megatron.train.policy_metrics import policy_metric_sums
    from tests.data.test_packing import _table

    t = _table(n=6, seed=2)
    rows = np.arange(6)
    for mb in (collate(t, rows, pad_to=4), collate_packed(t, rows, pad_to=4, seq_multiple=4)):
        g = torch.Generator().manual_seed(1)
        lp, ref, ent = (
            torch.randn(mb.loss_mask.shape, generator=g, dtype=torch.float64) for _ in range(3)
        )
        whole = policy_metric_sums(lp, ref, ent, mb)
        s = int(mb.input_ids.shape[1])
        parts, owned = [], []
        for r in range(2):
            sub = cp_micro_batch(mb, 2, r)
            i = (
                cp_packed_indices(packed_cu_seqlens(mb.segments)[0], 2, r)
                if mb.segments is not None
                else cp_chunk_indices(s, 2, r)
            )
            assert torch.equal(sub.loss_mask, mb.loss_mask[:, i])
            assert torch.equal(sub.seq_index, mb.seq_index[:, i])
            parts.append(policy_metric_sums(lp[:, i], ref[:, i], ent[:, i], sub))
            owned.append(sub.seq_owned)
        assert torch.equal(owned[0] ^ owned[1], torch.ones(6, dtype=torch.bool))
        for k in whole:
            assert torch.allclose(sum(p[k] for p in parts), whole[k], atol=1e-9), k
        assert float(whole["pm_sequences"]) == 6
