"""Checksums are verified once per shard across a job: each rank hashes its part."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from erpd_megatron.cache import CacheError, TeacherCache
from erpd_megatron.cache.format import KIND_TOPK_LOGPROBS
from tests.cache.helpers import build_cache
from tests.cache.test_errors import flip_byte, locate, nonempty_row

IDS = list(range(200, 260))
WORLD = 4  # ranks of the reading job


def _manifest_order(cache_dir: Path) -> list[Path]:
    entries = json.loads((cache_dir / "manifest.json").read_text())["shards"]
    return [cache_dir / e["file"] for e in entries]


def test_each_shard_is_hashed_by_exactly_one_rank(tmp_path: Path) -> None:
    # vocab 250 as a TP=2 student pads it to 256: ids up to 249 only
    build_cache(tmp_path, IDS, world_size=2, vocab_size=250, k=4, max_shard_bytes=6_000)
    shards = _manifest_order(tmp_path)
    assert len(shards) > WORLD  # some ranks own several shards
    for victim in (1, len(shards) - 1):
        path = shards[victim]
        data = path.read_bytes()
        offset, _ = locate(path, KIND_TOPK_LOGPROBS, nonempty_row(path))
        flip_byte(path, offset)
        failed = []
        for rank in range(WORLD):
            try:
                TeacherCache.open(tmp_path, verify_part=(rank, WORLD)).close()
            except CacheError as e:
                assert "checksum mismatch" in str(e) and str(path) in str(e), e
                failed.append(rank)
        assert failed == [victim % WORLD], (victim, failed)
        with pytest.raises(CacheError, match="checksum mismatch"):  # a lone reader hashes all
            TeacherCache.open(tmp_path)
        path.write_bytes(data)
    with TeacherCache.open(tmp_path, verify_part=(0, WORLD)) as cache:
        assert len(cache) == len(IDS) and cache.vocab_size == 250
        assert max(int(cache.get(s).topk_ids["teacher0"].max(initial=0)) for s in IDS) == 249
    with pytest.raises(ValueError, match="verify_part"):
        TeacherCache.open(tmp_path, verify_part=(4, WORLD))
