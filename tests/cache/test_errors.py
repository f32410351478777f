"""Damaged or mismatched caches fail loudly, naming the shard and the sample."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from erpd_megatron.cache import CacheError, CacheWriter, TeacherCache, finalize_manifest
from erpd_megatron.cache.format import KIND_TOPK_IDS, KIND_TOPK_LOGPROBS, ShardFile
from tests.cache.helpers import FINGERPRINT, build_cache, make_sample, meta, token_counts

IDS = list(range(100, 130))


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    build_cache(tmp_path, IDS, world_size=2, max_shard_bytes=10_000)
    return tmp_path


def shard_paths(cache_dir: Path) -> list[Path]:
    return sorted(cache_dir.glob("*.erpdc"))


def locate(path: Path, kind: int, sample_row: int) -> tuple[int, int]:
    """(absolute byte offset of the sample's data in teacher 0's section, sample id)."""
    shard = ShardFile.open(path)
    try:
        row = shard.index[sample_row]
        off = shard.sections[(kind, 0)][0]
        if kind == KIND_TOPK_IDS:
            return off + int(row["ids_offset"]), int(row["sample_id"])
        return off + int(row["token_offset"]) * shard.layout.k * 2, int(row["sample_id"])
    finally:
        shard.close()


def nonempty_row(path: Path) -> int:
    shard = ShardFile.open(path)
    try:
        return int(np.flatnonzero(shard.index["token_count"] > 0)[0])
    finally:
        shard.close()


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x5A
    path.write_bytes(bytes(data))


def test_corrupt_byte_is_a_checksum_error_naming_the_shard(cache_dir: Path) -> None:
    path = shard_paths(cache_dir)[1]
    offset, _ = locate(path, KIND_TOPK_LOGPROBS, nonempty_row(path))
    flip_byte(path, offset)
    with pytest.raises(CacheError, match="checksum mismatch") as e:
        TeacherCache.open(cache_dir)
    assert str(path) in str(e.value) and "rank" in str(e.value)


def test_corrupt_ids_without_checksums_name_shard_and_sample(cache_dir: Path) -> None:
    path = shard_paths(cache_dir)[0]
    row = nonempty_row(path)
    offset, sid = locate(path, KIND_TOPK_IDS, row)
    data = bytearray(path.read_bytes())
    data[offset : offset + 3] = b"\xff\xff\xff"  # first id: all 18 bits set = 262143 >= 151936
    path.write_bytes(bytes(data))
    cache = TeacherCache.open(cache_dir, verify_checksums=False)
    with pytest.raises(
        CacheError, match=f"sample {sid}, teacher 'teacher0': id 262143 >= vocab_size 151936"
    ) as e:
        cache.get(sid)
    assert str(path) in str(e.value)


def test_corrupt_magic(cache_dir: Path) -> None:
    path = shard_paths(cache_dir)[0]
    flip_byte(path, 2)
    with pytest.raises(CacheError, match="not a teacher-cache shard") as e:
        TeacherCache.open(cache_dir, verify_checksums=False)
    assert str(path) in str(e.value)


@pytest.mark.parametrize("verify", [True, False])
def test_truncated_shard(cache_dir: Path, verify: bool) -> None:
    path = shard_paths(cache_dir)[-1]
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size - 100)
    with pytest.raises(CacheError, match=f"truncated shard: {size - 100} bytes of {size}") as e:
        TeacherCache.open(cache_dir, verify_checksums=verify)
    assert str(path) in str(e.value)
    with open(path, "r+b") as f:
        f.truncate(10)
    with pytest.raises(CacheError, match="shorter than the 64-byte header"):
        TeacherCache.open(cache_dir, verify_checksums=verify)


def test_missing_and_replaced_shards(cache_dir: Path) -> None:
    a, b = shard_paths(cache_dir)[:2]
    tmp = a.with_suffix(".bak")
    a.rename(tmp)
    with pytest.raises(CacheError, match="shard listed in the manifest is missing") as e:
        TeacherCache.open(cache_dir)
    assert str(a) in str(e.value)
    shutil.copy(b, a)  # a valid shard, but not the one the manifest lists
    with pytest.raises(CacheError, match="does not match the manifest") as e:
        TeacherCache.open(cache_dir)
    assert str(a) in str(e.value)


def test_manifest_of_another_rollout_set(cache_dir: Path) -> None:
    with pytest.raises(
        CacheError,
        match=f"written for rollout set {FINGERPRINT}, the data is rollouts-sha256:2222"
        ".*cache_teacher_logprobs",
    ):
        TeacherCache.open(cache_dir, expect_rollout_fingerprint="rollouts-sha256:2222")
    TeacherCache.open(cache_dir, expect_rollout_fingerprint=FINGERPRINT).close()


def test_wrong_vocab(cache_dir: Path) -> None:
    with pytest.raises(CacheError, match="written for vocab_size 151936, the student has 151680"):
        TeacherCache.open(cache_dir, expect_vocab_size=151680)


def test_token_counts_against_rollout_data(cache_dir: Path) -> None:
    counts = token_counts({sid: make_sample(sid, vocab_size=151936, k=8) for sid in IDS})
    TeacherCache.open(cache_dir, expect_token_counts=counts).close()
    wrong = dict(counts)
    wrong[105] += 1
    with pytest.raises(
        CacheError,
        match=rf"sample 105 in {cache_dir}/rank0000\d-\d+\.erpdc: {counts[105]} tokens cached, "
        rf"the rollout data has {counts[105] + 1}",
    ):
        TeacherCache.open(cache_dir, expect_token_counts=wrong)
    with pytest.raises(
        CacheError, match=r"2 sample\(s\) of the rollout data are not in the cache, e.g. \[7, 8\]"
    ):
        TeacherCache.open(cache_dir, expect_token_counts={**counts, 7: 3, 8: 1})


def test_unfinished_cache(tmp_path: Path) -> None:
    build_cache(tmp_path, IDS, world_size=2, finalize=False)
    with pytest.raises(CacheError, match="manifest.json: not found: the cache is incomplete"):
        TeacherCache.open(tmp_path)
    with pytest.raises(
        CacheError, match=r"rank 2 has not finished writing \(no rank00002.done.json\)"
    ):
        finalize_manifest(tmp_path, 3, meta())
    with pytest.raises(CacheError, match=r"lacks \['unlearned'\]"):
        finalize_manifest(
            tmp_path,
            2,
            {
                **meta(),
                "models": {
                    n: {"path": "p", "fingerprint": "f"} for n in ("base", "teacher0", "teacher1")
                },
            },
        )
    with pytest.raises(CacheError, match="rollout_fingerprint"):
        finalize_manifest(tmp_path, 2, {"models": meta()["models"]})
    with pytest.raises(CacheError, match=r"rank00001-00000.erpdc: not part of this 1-rank cache"):
        finalize_manifest(tmp_path, 1, meta())


def test_sample_written_by_two_ranks(tmp_path: Path) -> None:
    for rank in range(2):
        with CacheWriter(
            tmp_path,
            rank=rank,
            sample_ids=[rank, 9],
            vocab_size=10,
            k=1,
            sampled_models=["base"],
            teachers=[],
            fsync=False,
        ) as w:
            for sid in w.pending():
                w.write_sample(sid, sampled={"base": np.zeros(2)}, topk={})
    with pytest.raises(
        CacheError,
        match=r"sample 9 was written twice, in "
        r"\['rank00000-00000.erpdc', 'rank00001-00000.erpdc'\]",
    ):
        finalize_manifest(tmp_path, 2, meta(names=("base",)))


def writer(tmp_path: Path, ids: list[int]) -> CacheWriter:
    return CacheWriter(
        tmp_path,
        rank=3,
        sample_ids=ids,
        vocab_size=151936,
        k=8,
        sampled_models=["base", "teacher0", "teacher1", "unlearned"],
        teachers=["teacher0", "teacher1"],
        ref_teachers=["teacher0"],
        fsync=False,
    )


def test_writer_rejects_bad_input_naming_the_sample(tmp_path: Path) -> None:
    w = writer(tmp_path, [5, 6])
    good = make_sample(5, vocab_size=151936, k=8)
    t = len(good["sampled"]["base"])

    def bad(mutate) -> dict:
        s = make_sample(5, vocab_size=151936, k=8)
        mutate(s)
        return s

    def set_id(s: dict) -> None:
        s["topk"]["teacher1"][0][t - 1, 2] = 151936

    def set_nan(s: dict) -> None:
        s["sampled"]["unlearned"][0] = np.nan

    cases = [
        (
            bad(set_id),
            r"rank 3, sample 5: topk\['teacher1'\] id 151936 at token \d+, rank 2 is outside the "
            r"vocabulary \[0, 151936\)",
        ),
        (bad(set_nan), r"rank 3, sample 5: sampled\['unlearned'\]: log-probs contain NaN"),
        (bad(lambda s: s["sampled"].pop("base")), r"missing \['base'\]"),
        (
            bad(lambda s: s["topk"].update(teacher2=s["topk"]["teacher1"])),
            r"unexpected \['teacher2'\]",
        ),
        (
            bad(lambda s: s["topk"].update(teacher0=s["topk"]["teacher0"][:2])),
            "teacher 'teacher0' needs ref_logprobs",
        ),
        (
            bad(
                lambda s: s["topk"].update(
                    teacher1=(*s["topk"]["teacher1"], s["topk"]["teacher1"][1])
                )
            ),
            "teacher 'teacher1' must not have ref_logprobs",
        ),
        (
            bad(
                lambda s: s["topk"].update(
                    teacher1=(s["topk"]["teacher1"][0][:, :4], s["topk"]["teacher1"][1])
                )
            ),
            rf"ids has shape \({t}, 4\), expected \({t}, 8\)",
        ),
    ]
    for sample, match in cases:
        with pytest.raises(CacheError, match=match):
            w.write_sample(5, **sample)
    with pytest.raises(CacheError, match="got sample 6, the next pending sample is 5"):
        w.write_sample(6, **good)
    with pytest.raises(CacheError, match="sample ids are int64"):
        w.write_sample("5", **good)
    w.write_sample(5, **good)  # the failures left the writer usable
    with pytest.raises(CacheError, match="close\\(\\) with 1 of 2 samples not written"):
        w.close()
    with pytest.raises(CacheError, match="sample id 4 appears twice"):
        writer(tmp_path, [4, 1, 4])
