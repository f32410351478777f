"""Advantages, deterministic epoch order, DP sharding and token-budget micro-batches."""

from __future__ import annotations

import numpy as np
import pytest

from erpd_megatron.data.batching import (
    SampleTable,
    collate,
    dp_shard,
    epoch_order,
    global_batches,
    group_advantages,
    micro_batches,
    scatter_response_values,
)


def make_table(n=24, group=4, seed=0):
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(1, 50, rng.integers(2, 6)) for _ in range(n)]
    resps = [rng.integers(1, 50, rng.integers(1, 12)) for _ in range(n)]
    rewards = rng.integers(0, 2, n).astype(np.float32)
    t = SampleTable(sample_ids=np.arange(n) * 7, group_ids=np.arange(n) // group, prompt_ids=prompts,
                    response_ids=resps, rewards=rewards)
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
