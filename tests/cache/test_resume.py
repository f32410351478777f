"""A killed writer, rerun, gives a cache byte-identical to an uninterrupted one, and the
rerun only computes the samples of incomplete shards."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from erpd_megatron.cache import CacheError, CacheWriter, TeacherCache, finalize_manifest
from tests.cache.helpers import (
    REF_TEACHERS,
    SAMPLED,
    TEACHERS,
    build_cache,
    make_sample,
    meta,
    snapshot,
    split,
)

REPO = Path(__file__).resolve().parents[2]
IDS = list(range(200, 260))
BOUND = 9_000  # bytes: several shards per rank

KILL_SCRIPT = """
import os, signal, sys
from pathlib import Path
from erpd_megatron.cache import CacheWriter
from tests.cache.helpers import REF_TEACHERS, SAMPLED, TEACHERS, make_sample, split
cache_dir, rank, kill_after = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
ids = split(list(range(200, 260)), 2)[rank]
w = CacheWriter(cache_dir, rank=rank, sample_ids=ids, vocab_size=151936, k=8,
                sampled_models=SAMPLED, teachers=TEACHERS, ref_teachers=REF_TEACHERS,
                max_shard_bytes=9000, fsync=True)
for n, sid in enumerate(w.pending()):
    if n == kill_after:
        os.kill(os.getpid(), signal.SIGKILL)
    w.write_sample(sid, **make_sample(sid, vocab_size=151936, k=8))
w.close()
"""


def run_rank(cache_dir: Path, rank: int, *, stop_after: int | None = None) -> int:
    """Write (the rest of) one rank in this process; returns how many samples it computed."""
    computed = 0
    with CacheWriter(
        cache_dir,
        rank=rank,
        sample_ids=split(IDS, 2)[rank],
        vocab_size=151936,
        k=8,
        sampled_models=SAMPLED,
        teachers=TEACHERS,
        ref_teachers=REF_TEACHERS,
        max_shard_bytes=BOUND,
        fsync=False,
    ) as w:
        for sid in w.pending():
            if stop_after is not None and computed == stop_after:
                raise RuntimeError("simulated crash")
            w.write_sample(sid, **make_sample(sid, vocab_size=151936, k=8))
            computed += 1
    return computed


@pytest.fixture
def reference(tmp_path: Path) -> dict[str, bytes]:
    build_cache(tmp_path / "ref", IDS, world_size=2, max_shard_bytes=BOUND)
    return snapshot(tmp_path / "ref")


def test_sigkilled_writer_rerun_is_byte_identical(
    tmp_path: Path, reference: dict[str, bytes]
) -> None:
    cache_dir = tmp_path / "c"
    run_rank(cache_dir, 0)
    proc = subprocess.run(
        [sys.executable, "-c", KILL_SCRIPT, str(cache_dir), "1", "23"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    complete = sorted(p.name for p in cache_dir.glob("rank00001-*.erpdc"))
    assert complete and not (cache_dir / "rank00001.done.json").exists()
    with pytest.raises(CacheError, match="rank 1 has not finished"):
        finalize_manifest(cache_dir, 2, meta())
    assert run_rank(cache_dir, 0) == 0  # rank 0 was done: nothing recomputed
    recomputed = run_rank(cache_dir, 1)
    assert 0 < recomputed < 23 + 1 and recomputed < len(split(IDS, 2)[1])
    finalize_manifest(cache_dir, 2, meta())
    assert snapshot(cache_dir) == reference


def test_exception_midway_then_rerun(tmp_path: Path, reference: dict[str, bytes]) -> None:
    cache_dir = tmp_path / "c"
    for stop in (4, 17):  # crash twice, at different points
        with pytest.raises(RuntimeError, match="simulated crash"):
            run_rank(cache_dir, 0, stop_after=stop)
    (cache_dir / ".rank00000-00009.erpdc.abc.tmp").write_bytes(
        b"partial"
    )  # a writer died mid-rename
    run_rank(cache_dir, 0)
    run_rank(cache_dir, 1)
    finalize_manifest(cache_dir, 2, meta())
    assert snapshot(cache_dir) == reference


def test_corrupt_complete_shard_is_recomputed(tmp_path: Path, reference: dict[str, bytes]) -> None:
    cache_dir = tmp_path / "c"
    build_cache(cache_dir, IDS, world_size=2, max_shard_bytes=BOUND)
    victim = cache_dir / "rank00000-00001.erpdc"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 1
    victim.write_bytes(bytes(data))
    computed = run_rank(cache_dir, 0)  # drops shard 1 and everything after it
    assert 0 < computed < len(split(IDS, 2)[0])
    assert not (cache_dir / "manifest.json").exists()  # a rewritten rank invalidates the manifest
    run_rank(cache_dir, 1)
    finalize_manifest(cache_dir, 2, meta())
    assert snapshot(cache_dir) == reference


def test_rerun_of_finished_cache_changes_nothing(
    tmp_path: Path, reference: dict[str, bytes]
) -> None:
    cache_dir = tmp_path / "ref"
    assert run_rank(cache_dir, 0) == 0 and run_rank(cache_dir, 1) == 0
    finalize_manifest(cache_dir, 2, meta())
    assert snapshot(cache_dir) == reference
    TeacherCache.open(cache_dir).close()


def test_rerun_with_other_settings_or_order_is_refused(tmp_path: Path) -> None:
    cache_dir = tmp_path / "ref"
    build_cache(cache_dir, IDS, world_size=2, max_shard_bytes=BOUND)
    kwargs = dict(
        vocab_size=151936,
        k=8,
        sampled_models=SAMPLED,
        teachers=TEACHERS,
        ref_teachers=REF_TEACHERS,
        fsync=False,
    )
    with pytest.raises(
        CacheError, match="rank00000-00000.erpdc: written with .* use the same settings"
    ):
        CacheWriter(
            cache_dir,
            rank=0,
            sample_ids=split(IDS, 2)[0],
            max_shard_bytes=BOUND,
            **{**kwargs, "k": 4},
        )
    with pytest.raises(
        CacheError, match="rank00000-00000.erpdc: holds samples .* the rank's sample list changed"
    ):
        CacheWriter(
            cache_dir, rank=0, sample_ids=split(IDS, 2)[0][::-1], max_shard_bytes=BOUND, **kwargs
        )


def test_grown_sample_list_rewrites_the_last_shard(tmp_path: Path) -> None:
    """A shard that ended a shorter list is not reused: an uninterrupted run with the longer
    list would have filled it further."""
    a, b = tmp_path / "a", tmp_path / "b"
    build_cache(a, IDS[:20], max_shard_bytes=BOUND, finalize=False)
    build_cache(a, IDS, max_shard_bytes=BOUND)
    build_cache(b, IDS, max_shard_bytes=BOUND)
    assert snapshot(a) == snapshot(b)
    assert np.array_equal(
        TeacherCache.open(a).get(IDS[-1]).topk_ids["teacher0"],
        make_sample(IDS[-1], vocab_size=151936, k=8)["topk"]["teacher0"][0],
    )
