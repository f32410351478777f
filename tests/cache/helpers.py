"""Deterministic synthetic samples and a multi-rank cache builder for the cache tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from erpd_megatron.cache import CacheWriter, finalize_manifest

SAMPLED = ("base", "teacher0", "teacher1", "unlearned")
TEACHERS = ("teacher0", "teacher1")
REF_TEACHERS = ("teacher0",)
FINGERPRINT = "rollouts-sha256:1111"


def make_sample(
    sid: int,
    *,
    vocab_size: int,
    k: int,
    max_tokens: int = 40,
    id_low: int = 0,
    sampled: tuple[str, ...] = SAMPLED,
    teachers: tuple[str, ...] = TEACHERS,
    ref_teachers: tuple[str, ...] = REF_TEACHERS,
) -> dict[str, Any]:
    """A sample whose content depends only on its id: float32 log-probs, ids in
    ``[id_low, vocab_size)`` including both ends."""
    rng = np.random.default_rng(sid & ((1 << 64) - 1))
    t = int(rng.integers(1, max_tokens + 1)) if sid % 11 else 0  # some empty responses
    topk = {}
    for name in teachers:
        ids = rng.integers(id_low, vocab_size, size=(t, k), dtype=np.int64)
        if ids.size:
            ids.reshape(-1)[0], ids.reshape(-1)[-1] = id_low, vocab_size - 1
        lps = (-rng.exponential(3.0, size=(t, k))).astype(np.float32)
        entry = (ids, lps)
        if name in ref_teachers:
            entry = (ids, lps, (-rng.exponential(4.0, size=(t, k))).astype(np.float32))
        topk[name] = entry
    return {
        "sampled": {name: (-rng.exponential(1.0, size=t)).astype(np.float32) for name in sampled},
        "topk": topk,
    }


def meta(fingerprint: str = FINGERPRINT, names: tuple[str, ...] = SAMPLED) -> dict[str, Any]:
    """Manifest metadata the caller of finalize_manifest provides."""
    return {
        "rollout_fingerprint": fingerprint,
        "models": {n: {"path": f"/ckpt/{n}", "fingerprint": f"weights-{n}"} for n in names},
        "round": 0,
    }


def split(sample_ids: list[int], world_size: int) -> list[list[int]]:
    """Round-robin assignment of samples to writer ranks."""
    return [sample_ids[r::world_size] for r in range(world_size)]


def build_cache(
    cache_dir: Path,
    sample_ids: list[int],
    *,
    world_size: int = 1,
    vocab_size: int = 151936,
    k: int = 8,
    value_dtype: str = "fp16",
    max_shard_bytes: int = 1 << 20,
    id_low: int = 0,
    sampled: tuple[str, ...] = SAMPLED,
    teachers: tuple[str, ...] = TEACHERS,
    ref_teachers: tuple[str, ...] = REF_TEACHERS,
    finalize: bool = True,
) -> dict[int, dict[str, Any]]:
    """Write a cache with ``world_size`` writer objects (one per simulated rank), finalize it,
    and return the samples written, by id."""
    data = {
        sid: make_sample(
            sid,
            vocab_size=vocab_size,
            k=k,
            id_low=id_low,
            sampled=sampled,
            teachers=teachers,
            ref_teachers=ref_teachers,
        )
        for sid in sample_ids
    }
    for rank, mine in enumerate(split(sample_ids, world_size)):
        with CacheWriter(
            cache_dir,
            rank=rank,
            sample_ids=mine,
            vocab_size=vocab_size,
            k=k,
            sampled_models=sampled,
            teachers=teachers,
            ref_teachers=ref_teachers,
            value_dtype=value_dtype,
            max_shard_bytes=max_shard_bytes,
            fsync=False,
        ) as w:
            for sid in w.pending():
                w.write_sample(sid, **data[sid])
    if finalize:
        finalize_manifest(cache_dir, world_size, meta(names=sampled))
    return data


def token_counts(data: dict[int, dict[str, Any]]) -> dict[int, int]:
    """``{sample_id: tokens}`` as the rollout data would give them."""
    return {sid: len(next(iter(s["sampled"].values()))) for sid, s in data.items()}


def snapshot(cache_dir: Path) -> dict[str, bytes]:
    """Every file of a cache folder, by name."""
    return {p.name: p.read_bytes() for p in sorted(cache_dir.iterdir()) if p.is_file()}
