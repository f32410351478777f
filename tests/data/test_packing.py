"""Sequence packing (data.packing), pure parts: first-fit-decreasing, the packed row, its
block-diagonal causal mask and THD boundaries, and the per-sequence consumers (rewards,
policy metrics, per-sample extraction) giving the same values packed and unpacked."""

from __future__ import annotations

import numpy as np
import torch

from erpd_megatron.data.batching import (
    SampleTable,
    collate,
    collate_packed,
    dp_micro_batches,
    pack_in_order_packed,
    pack_rows,
    packed_attention_mask,
    packed_cu_seqlens,
    sequence_values,
)
from erpd_megatron.train.policy_metrics import policy_metric_sums


def _table(n: int = 9, seed: int = 4) -> SampleTable:
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(1, 50, rng.integers(2, 6)) for _ in range(n)]
    responses = [rng.integers(1, 50, rng.integers(1, 12)) for _ in range(n)]
    t = SampleTable(
        sample_ids=np.arange(100, 100 + n),
        group_ids=np.arange(n) // 3,
        prompt_ids=prompts,
        response_ids=responses,
        rewards=(rng.random(n) > 0.5).astype(np.float32),
    )
    t.advantages = rng.standard_normal(n).astype(np.float32)
    return t


def test_first_fit_decreasing_fills_bins_within_budget_deterministically():
    lengths = np.array([9, 3, 7, 2, 5, 5, 1, 12, 4])
    rows = np.random.default_rng(0).permutation(len(lengths))
    bins = pack_rows(rows, lengths, 12)
    # FFD by hand: 12 | 9+3 | 7+5 | 5+4+2+1
    assert [b.tolist() for b in bins] == [[7], [0, 1], [2, 4], [5, 8, 3, 6]]
    assert [b.tolist() for b in pack_rows(rows[::-1], lengths, 12)] == [b.tolist() for b in bins]
    assert sorted(np.concatenate(bins).tolist()) == list(range(len(lengths)))
    # a sequence over the budget sits alone; alignment counts in the budget
    assert [b.tolist() for b in pack_rows(np.arange(3), np.array([20, 3, 3]), 8)] == [[0], [1, 2]]
    assert [
        b.tolist() for b in pack_rows(np.arange(3), np.array([20, 3, 3]), 8, seq_multiple=8)
    ] == [[0], [1], [2]]
    assert [b.tolist() for b in pack_in_order_packed([4, 1, 2], lengths, 10)] == [[4, 1], [2]]
    # every DP rank gets the same count from the global picture
    mine0, c0 = dp_micro_batches(rows, lengths, 0, 2, 12, packing=True)
    mine1, c1 = dp_micro_batches(rows, lengths, 1, 2, 12, packing=True)
    assert c0 == c1 == max(len(mine0), len(mine1))
    assert sorted(np.concatenate(mine0 + mine1).tolist()) == list(range(len(lengths)))


def test_packed_row_matches_the_padded_rows_sequence_by_sequence():
    t = _table()
    rows = np.array([3, 0, 7, 5])
    arrays = {
        "x": [np.arange(len(r), dtype=np.float32) + 10 * i for i, r in enumerate(t.response_ids)],
        "ids": [np.tile(np.arange(len(r))[:, None], (1, 3)) for r in t.response_ids],
    }
    pad, pk = collate(t, rows, arrays), collate_packed(t, rows, arrays, pad_to=8, seq_multiple=4)
    assert pk.input_ids.shape[0] == 1 and pk.input_ids.shape[1] % 8 == 0
    assert pk.num_sequences == pad.num_sequences == 4
    for key in ("targets", "advantages", "loss_mask"):
        a, b = sequence_values(pad, getattr(pad, key)), sequence_values(pk, getattr(pk, key))
        assert all(torch.equal(x, y) for x, y in zip(a, b)), key
    for key in arrays:
        a, b = (
            sequence_values(pad, pad.token_arrays[key]),
            sequence_values(pk, pk.token_arrays[key]),
        )
        assert all(torch.equal(x, y) for x, y in zip(a, b)), key
        assert [len(v) for v in b] == [len(t.response_ids[i]) for i in rows]
    # per-sequence positions restart at 0; alignment padding belongs to its sequence
    segs = pk.segments[0]
    for k, i in enumerate(rows):
        where = torch.nonzero(segs == k).reshape(-1)
        n = len(t.prompt_ids[i]) + len(t.response_ids[i])
        assert len(where) == -(-n // 4) * 4 and torch.equal(
            pk.position_ids[0, where], torch.arange(len(where))
        )
        assert torch.equal(
            pk.input_ids[0, where[:n]],
            torch.from_numpy(np.concatenate([t.prompt_ids[i], t.response_ids[i]])),
        )
    assert torch.equal(
        pk.per_token(pk.rewards)[pk.seq_index >= 0],
        torch.from_numpy(t.rewards[rows][pk.seq_index[pk.seq_index >= 0].numpy()]),
    )


def test_block_diagonal_causal_mask_and_thd_boundaries():
    segs = torch.tensor([[0, 0, 0, 1, 1, 2, -1, -1]])
    m = packed_attention_mask(segs)[0, 0]  # True = masked
    assert m.shape == (8, 8)
    allowed = [(q, k) for q in range(8) for k in range(8) if not m[q, k]]
    expect = [(q, k) for q in range(8) for k in range(q + 1) if segs[0, q] == segs[0, k]]
    assert allowed == expect
    cu, longest = packed_cu_seqlens(segs)
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 3, 5, 6, 8] and longest == 3


def test_policy_metrics_and_rewards_per_sequence_packed_equal_unpacked():
    t = _table(seed=7)
    rows = np.arange(len(t))
    pad, pk = collate(t, rows), collate_packed(t, rows)

    def fake(mb, seed):  # the same per-token values at each sequence's positions
        g = torch.Generator().manual_seed(seed)
        vals = [torch.randn(len(t.response_ids[i]), generator=g) for i in rows]
        out = torch.zeros(mb.loss_mask.shape)
        for k, v in enumerate(vals):
            out[mb.seq_index == k] = v
        return out

    a = policy_metric_sums(fake(pad, 1), fake(pad, 2), fake(pad, 3), pad)
    b = policy_metric_sums(fake(pk, 1), fake(pk, 2), fake(pk, 3), pk)
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-9), k
    assert float(a["pm_pos_sequences"] + a["pm_neg_sequences"]) == len(t)
