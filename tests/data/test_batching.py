"""Advantages, deterministic epoch order, DP sharding and token-budget micro-batches."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from erpd_megatron.data.batching import (
    SampleTable,
    collate,
    dp_micro_batch_count,
    dp_micro_batches,
    dp_partition,
    dp_shard,
    dummy_micro_batch,
    epoch_order,
    global_batches,
    group_advantages,
    micro_batches,
    pad_micro_batches,
    pad_multiple,
    round_up,
    scatter_response_values,
)


def make_table(n=24, group=4, seed=0):
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(1, 50, rng.integers(2, 6)) for _ in range(n)]
    resps = [rng.integers(1, 50, rng.integers(1, 12)) for _ in range(n)]
    rewards = rng.integers(0, 2, n).astype(np.float32)
    t = SampleTable(
        sample_ids=np.arange(n) * 7,
        group_ids=np.arange(n) // group,
        prompt_ids=prompts,
        response_ids=resps,
        rewards=rewards,
    )
    t.advantages = group_advantages(t.rewards, t.group_ids)
    return t


def test_group_advantages_against_loop():
    r = np.array([1, 0, 0, 1, 1, 1, 0, 0], np.float32)
    g = np.array([0, 0, 0, 0, 1, 1, 2, 2])
    a = group_advantages(r, g)
    np.testing.assert_allclose(a, [0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0])
    s = group_advantages(r, g, std_normalize=True)
    np.testing.assert_allclose(s[:4], [1, -1, -1, 1], atol=1e-5)
    assert np.all(s[4:] == 0)


def test_epoch_order_deterministic_and_differs_by_epoch():
    a, b = epoch_order(100, 3, 0), epoch_order(100, 3, 0)
    assert (a == b).all() and sorted(a) == list(range(100))
    assert not (epoch_order(100, 3, 1) == a).all()


def test_global_batches_keep_the_tail():
    bs = global_batches(np.arange(10), 4)
    assert [len(b) for b in bs] == [4, 4, 2]


@pytest.mark.parametrize("dp", [1, 2, 3])
def test_dp_shards_partition_the_batch(dp):
    t = make_table()
    rows = np.arange(len(t))
    parts = [dp_shard(rows, t.lengths, r, dp) for r in range(dp)]
    assert sorted(np.concatenate(parts).tolist()) == rows.tolist()
    loads = [int(t.lengths[p].sum()) for p in parts]
    assert max(loads) - min(loads) <= int(t.lengths.max())


def test_micro_batches_respect_budget_and_cover_rows():
    t = make_table(40)
    rows = np.arange(len(t))
    mbs = micro_batches(rows, t.lengths, 40)
    assert sorted(np.concatenate(mbs).tolist()) == rows.tolist()
    for mb in mbs:
        assert len(mb) * t.lengths[mb].max() <= 40 or len(mb) == 1


def test_collate_positions_and_roundtrip():
    t = make_table(6)
    lp = [np.arange(len(r), dtype=np.float32) + 100 * i for i, r in enumerate(t.response_ids)]
    mb = collate(t, np.array([3, 1, 4]), {"anchor": lp})
    for j, i in enumerate([3, 1, 4]):
        p, r = t.prompt_ids[i], t.response_ids[i]
        m = mb.loss_mask[j].bool()
        # targets at masked positions are exactly the response tokens
        assert mb.targets[j][m].tolist() == r.tolist()
        # the input at the first masked position is the last prompt token
        first = int(m.nonzero()[0])
        assert first == len(p) - 1 and mb.input_ids[j, first] == p[-1]
        assert np.allclose(mb.advantages[j][m].numpy(), t.advantages[i])
    back = scatter_response_values(mb, mb.token_arrays["anchor"])
    for j, i in enumerate([3, 1, 4]):
        np.testing.assert_array_equal(back[j], lp[i])
    assert mb.num_tokens == sum(len(t.response_ids[i]) for i in [3, 1, 4])


def test_collate_rejects_misaligned_token_arrays():
    t = make_table(4)
    bad = [np.zeros(len(r) + 1, np.float32) for r in t.response_ids]
    with pytest.raises(ValueError, match="sample 0 has"):
        collate(t, np.array([0]), {"anchor": bad})


def _dp_shard_reference(rows, lengths, dp_rank, dp_size):
    """The original O(n * dp) greedy: longest first, to the least loaded (then lowest) rank."""
    order = sorted(range(len(rows)), key=lambda i: (-int(lengths[rows[i]]), i))
    load, mine = [0] * dp_size, []
    for i in order:
        r = min(range(dp_size), key=lambda k: (load[k], k))
        load[r] += int(lengths[rows[i]])
        if r == dp_rank:
            mine.append(rows[i])
    return mine


@pytest.mark.parametrize("dp", [2, 3, 8])
def test_dp_partition_matches_the_greedy_reference(dp):
    t = make_table(n=40, seed=3)
    rows = epoch_order(len(t), 5, 0)[:29]
    parts = dp_partition(rows, t.lengths, dp)
    for r in range(dp):
        assert parts[r].tolist() == _dp_shard_reference(rows, t.lengths, r, dp)
        assert dp_shard(rows, t.lengths, r, dp).tolist() == parts[r].tolist()


def test_lengths_computed_once_and_read_only():
    t = make_table()
    assert t.lengths is t.lengths and t.response_lengths is t.response_lengths  # cached
    assert t.lengths.tolist() == [len(p) + len(r) for p, r in zip(t.prompt_ids, t.response_ids)]
    assert t.response_lengths.tolist() == [len(r) for r in t.response_ids]
    with pytest.raises(ValueError):
        t.lengths[0] = 1
    sub = t.select(np.array([3, 1]))
    assert sub.lengths.tolist() == [t.lengths[3], t.lengths[1]]  # a new table: its own lengths


def test_equal_micro_batch_counts_with_empty_shard():
    """A last global batch of one row: DP rank 1 has nothing, yet both ranks run as many
    micro-batches as the rank with the most, the extra ones zero-loss dummies."""
    t = make_table()
    for rows, budget in ((np.array([5]), 64), (np.arange(11), 24), (np.arange(24), 1000)):
        count = dp_micro_batch_count(rows, t.lengths, 2, budget)
        own = [micro_batches(s, t.lengths, budget) for s in dp_partition(rows, t.lengths, 2)]
        assert count == max(len(o) for o in own) >= 1
        for r in (0, 1):
            mine, n = dp_micro_batches(rows, t.lengths, r, 2, budget)
            assert n == count and [m.tolist() for m in mine] == [m.tolist() for m in own[r]]
        padded = [pad_micro_batches([collate(t, m) for m in o], count) for o in own]
        assert [len(p) for p in padded] == [count, count]
        for o, p in zip(own, padded):
            assert all(mb.loss_mask.sum() == 0 and len(mb.rows) == 0 for mb in p[len(o) :])
    assert dp_micro_batch_count(np.array([5]), t.lengths, 2, 64) == 1
    assert dp_micro_batch_count(np.zeros(0, np.int64), t.lengths, 4, 64) == 0
    with pytest.raises(ValueError, match="DP-wide count"):
        pad_micro_batches([collate(t, np.array([0]))] * 3, 2)


def test_dummy_micro_batch_has_zero_loss_tensors_of_the_right_shape():
    arrays = {"ids": [np.zeros((3, 4), np.int32)], "lp": [np.zeros(3, np.float16)]}
    mb = dummy_micro_batch(16, arrays)
    assert mb.input_ids.shape == (1, 16) and mb.loss_mask.sum() == 0 and (mb.seq_index == -1).all()
    assert mb.position_ids.tolist() == [list(range(16))] and mb.rewards.tolist() == [0.0]
    ids = mb.token_arrays["ids"]
    assert ids.shape == (1, 16, 4) and ids.dtype == torch.int32
    assert mb.token_arrays["lp"].dtype == torch.float16 and mb.num_tokens == 0

    class Column:  # row-indexable without len(), like Stage 2's cache columns
        def __getitem__(self, row):
            return np.zeros((5, 2), np.int64)

    assert dummy_micro_batch(4, {"c": Column()}).token_arrays["c"].shape == (1, 4, 2)


def _cfg(fp8=None, recipe="delayed", sp=False, tp=1):
    return SimpleNamespace(
        precision=SimpleNamespace(fp8=fp8, fp8_recipe=recipe),
        parallel=SimpleNamespace(sequence_parallel=sp, tensor_model_parallel_size=tp),
    )


@pytest.mark.parametrize(
    "cfg, want",
    [
        (_cfg(), 1),
        (_cfg(fp8="hybrid"), 8),
        (_cfg(fp8="e4m3", recipe="mxfp8"), 32),
        (_cfg(sp=True, tp=4), 4),
        (_cfg(sp=True, tp=1), 1),
        (_cfg(sp=False, tp=4), 1),
        (_cfg(fp8="hybrid", sp=True, tp=2), 16),
    ],
)
def test_pad_multiple(cfg, want):
    assert pad_multiple(cfg) == want


def test_collate_pads_to_the_multiple_without_changing_the_data():
    t = make_table()
    rows = np.array([0, 1, 2])
    plain, padded = collate(t, rows), collate(t, rows, pad_to=8)
    s = plain.input_ids.shape[1]
    assert padded.input_ids.shape[1] == round_up(s, 8) and padded.input_ids.shape[1] % 8 == 0
    assert padded.input_ids.shape[0] * padded.input_ids.shape[1] % 8 == 0  # TE's leading-dims rule
    for name in ("input_ids", "position_ids", "targets", "loss_mask", "seq_index"):
        a, b = getattr(plain, name), getattr(padded, name)
        assert torch.equal(b[:, :s], a), name
    assert padded.loss_mask[:, s:].sum() == 0 and (padded.seq_index[:, s:] == -1).all()
    assert round_up(0, 8) == 8 and round_up(17, 1) == 17 and round_up(16, 16) == 16
