"""Writer -> manifest -> reader round trips: exact ids, values exact to the chosen dtype,
any number of writer ranks, read back in any order and any reader layout."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from erpd_megatron.cache import CacheWriter, MissingSampleError, TeacherCache, finalize_manifest
from erpd_megatron.cache.codec import quantize_reference
from tests.cache.helpers import (
    FINGERPRINT,
    REF_TEACHERS,
    SAMPLED,
    TEACHERS,
    build_cache,
    meta,
    snapshot,
    split,
    token_counts,
)


def assert_record_matches(cache: TeacherCache, sid: int, sample: dict, value_dtype: str) -> None:
    rec = cache.get(sid)
    assert rec.sample_id == sid and rec.num_tokens == len(sample["sampled"]["base"])
    for name, lp in sample["sampled"].items():
        assert rec.sampled[name].dtype == np.float32
        assert np.array_equal(rec.sampled[name], lp)  # fp32 inputs: exact
    for name, entry in sample["topk"].items():
        ids, lps = entry[0], entry[1]
        assert rec.topk_ids[name].dtype == np.int64 and np.array_equal(rec.topk_ids[name], ids)
        assert np.array_equal(
            np.asarray(rec.topk_logprobs[name], np.float32), quantize_reference(lps, value_dtype)
        )
        if len(entry) == 3:
            assert np.array_equal(
                np.asarray(rec.ref_topk_logprobs[name], np.float32),
                quantize_reference(entry[2], value_dtype),
            )
        else:
            assert name not in rec.ref_topk_logprobs


@pytest.mark.parametrize(
    "vocab,k,value_dtype,id_low",
    [
        (151936, 64, "fp16", 0),
        (151936, 64, "bf16", 0),
        (151936, 1, "fp32", 0),
        (262144, 64, "fp16", 131072),  # ids 131,072..262,143: where 17-bit packing breaks
        (262144, 3, "bf16", 131072),
        (7, 1, "fp16", 0),  # 3 bits per id
        (7, 64, "fp32", 0),
    ],
)
def test_round_trip_exact(
    tmp_path: Path, vocab: int, k: int, value_dtype: str, id_low: int
) -> None:
    ids = list(range(1000, 1024))
    data = build_cache(
        tmp_path,
        ids,
        vocab_size=vocab,
        k=k,
        value_dtype=value_dtype,
        id_low=id_low,
        max_shard_bytes=40_000,
    )
    with TeacherCache.open(
        tmp_path,
        expect_vocab_size=vocab,
        expect_rollout_fingerprint=FINGERPRINT,
        expect_token_counts=token_counts(data),
    ) as cache:
        assert cache.k == k and cache.value_dtype == value_dtype and len(cache) == len(ids)
        assert (
            cache.teachers == TEACHERS
            and cache.sampled_models == SAMPLED
            and cache.ref_teachers == REF_TEACHERS
        )
        assert cache.models["teacher0"]["fingerprint"] == "weights-teacher0"
        for sid in reversed(ids):
            assert_record_matches(cache, sid, data[sid], value_dtype)
        if value_dtype == "fp16":  # zero-copy view of the mapped file
            rec = cache.get(ids[1])
            assert rec.topk_logprobs["teacher0"].dtype == np.float16
            assert (
                not rec.topk_logprobs["teacher0"].flags.owndata
                and not rec.topk_logprobs["teacher0"].flags.writeable
            )


def test_ranks_and_reader_layout_are_independent(tmp_path: Path) -> None:
    """3 writer ranks; 2 reader ranks each read their half, in their own order."""
    ids = [int(x) for x in np.random.default_rng(5).permutation(np.arange(-20, 40)) * 7919]
    data = build_cache(tmp_path / "w3", ids, world_size=3, max_shard_bytes=8_000)
    one = build_cache(tmp_path / "w1", ids, world_size=1, max_shard_bytes=8_000)
    manifest = TeacherCache.open(tmp_path / "w3").manifest
    assert manifest["world_size"] == 3 and {s["rank"] for s in manifest["shards"]} == {0, 1, 2}
    assert len(manifest["shards"]) > 3  # several shards per rank
    for cache_dir in (tmp_path / "w3", tmp_path / "w1"):
        cache = TeacherCache.open(cache_dir, expect_token_counts=token_counts(data))
        assert sorted(cache.sample_ids) == sorted(ids)
        for reader_rank, mine in enumerate(split(sorted(ids), 2)):
            order = mine[::-1] if reader_rank else mine
            for rec in cache.stream(order, prefetch=2):
                assert_record_matches(cache, rec.sample_id, one[rec.sample_id], "fp16")
        cache.close()


def test_stream_order_prefetch_and_early_stop(tmp_path: Path) -> None:
    ids = list(range(50))
    build_cache(tmp_path, ids, max_shard_bytes=10_000)
    cache = TeacherCache.open(tmp_path)
    order = [int(x) for x in np.random.default_rng(3).permutation(ids)]
    for prefetch in (0, 1, 8, 100):
        recs = list(cache.stream(order, prefetch=prefetch))
        assert [r.sample_id for r in recs] == order
        assert all(r.topk_logprobs["teacher0"].flags.owndata for r in recs[:3]) or prefetch == 0
    it = cache.stream(order, prefetch=4)
    assert next(it).sample_id == order[0]
    it.close()  # stops the thread
    assert list(it) == []
    # an unknown id fails at its place in the stream, not before
    it = cache.stream([order[0], 10**9, order[1]], prefetch=4)
    assert next(it).sample_id == order[0]
    with pytest.raises(MissingSampleError, match="sample 1000000000 is not in the teacher cache"):
        next(it)
    assert sum(1 for _ in cache.stream()) == len(ids)


def test_lookup_and_missing_sample(tmp_path: Path) -> None:
    build_cache(tmp_path, [3, 1, 2])
    cache = TeacherCache.open(tmp_path)
    assert 1 in cache and np.int64(2) in cache and 4 not in cache and "1" not in cache
    assert cache.sample_ids == [3, 1, 2]
    with pytest.raises(KeyError):
        cache.get(4)
    assert cache.token_count(1) == len(cache.get(1).sampled["base"])


def test_empty_samples_and_teacher_without_ref(tmp_path: Path) -> None:
    ids = [0, 11, 22, 5]  # multiples of 11 have no tokens (see helpers.make_sample)
    data = build_cache(tmp_path, ids, ref_teachers=())
    cache = TeacherCache.open(tmp_path)
    for sid in ids:
        assert_record_matches(cache, sid, data[sid], "fp16")
    assert (
        cache.get(0).topk_ids["teacher1"].shape == (0, 8) and cache.get(0).ref_topk_logprobs == {}
    )


def test_shards_respect_bound_and_boundaries_are_deterministic(tmp_path: Path) -> None:
    ids = list(range(60))
    build_cache(tmp_path / "a", ids, world_size=2, max_shard_bytes=12_000)
    build_cache(tmp_path / "b", ids, world_size=2, max_shard_bytes=12_000)
    assert snapshot(tmp_path / "a") == snapshot(tmp_path / "b")
    manifest = TeacherCache.open(tmp_path / "a").manifest
    for s in manifest["shards"]:
        assert s["bytes"] <= 12_000 or s["num_samples"] == 1
        assert os.path.getsize(tmp_path / "a" / s["file"]) == s["bytes"]
    assert sum(s["num_samples"] for s in manifest["shards"]) == 60


def test_oversized_sample_gets_its_own_shard(tmp_path: Path) -> None:
    data = build_cache(tmp_path, [1, 2, 3], max_shard_bytes=1000)
    cache = TeacherCache.open(tmp_path)
    assert all(s["num_samples"] == 1 for s in cache.manifest["shards"])
    assert_record_matches(cache, 2, data[2], "fp16")


def test_rank_with_no_samples(tmp_path: Path) -> None:
    for rank, mine in enumerate([[1, 2], []]):
        with CacheWriter(
            tmp_path,
            rank=rank,
            sample_ids=mine,
            vocab_size=100,
            k=2,
            sampled_models=["base"],
            teachers=[],
            fsync=False,
        ) as w:
            for sid in w.pending():
                w.write_sample(sid, sampled={"base": np.zeros(3)}, topk={})
    m = finalize_manifest(tmp_path, 2, meta(names=("base",)))
    assert m["num_samples"] == 2 and m["num_tokens"] == 6 and m["extra"] == {"round": 0}
    assert TeacherCache.open(tmp_path).get(2).sampled["base"].tolist() == [0.0, 0.0, 0.0]
