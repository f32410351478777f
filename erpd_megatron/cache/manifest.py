"""The cache's ``manifest.json``: written last by rank 0 once every rank's writer is done."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from erpd_megatron.cache.format import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    CacheError,
    ShardFile,
    parse_shard_name,
)
from erpd_megatron.cache.writer import done_name
from erpd_megatron.utils.files import (
    atomic_write_json,
    read_json,
    self_digest_error,
    with_self_digest,
)
from erpd_megatron.utils.log import get_logger

log = get_logger(__name__)

FORMAT_NAME = "erpd-teacher-cache"
REBUILD_HINT = "rebuild it with tools/cache_teacher_logprobs.py"


def open_shards(
    paths: Sequence[Path], *, verify: bool | Sequence[bool], threads: int | None = None
) -> list[ShardFile]:
    """Open (and with ``verify`` checksum: one flag for all, or one per path) shards in
    parallel threads; hashing releases the GIL. Returns them in the order given; on any error
    closes them all and raises it."""
    threads = threads or min(8, os.cpu_count() or 1, max(1, len(paths)))
    flags = [bool(verify)] * len(paths) if isinstance(verify, bool) else [bool(v) for v in verify]
    if len(flags) != len(paths):
        raise ValueError(f"{len(paths)} shards but {len(flags)} verify flags")
    with ThreadPoolExecutor(threads) as pool:
        futures = [pool.submit(ShardFile.open, p, verify=v) for p, v in zip(paths, flags)]
        opened, error = [], None
        for fut in futures:
            try:
                opened.append(fut.result())
            except BaseException as e:  # keep the first error, close what opened
                error = error or e
    if error is not None:
        for shard in opened:
            shard.close()
        raise error
    return opened


def _check_meta(
    meta: Mapping[str, Any], names: Sequence[str]
) -> tuple[str, dict[str, dict[str, str]]]:
    fp = meta.get("rollout_fingerprint")
    if not isinstance(fp, str) or not fp:
        raise CacheError(
            "meta['rollout_fingerprint'] must be the rollout data's fingerprint (a non-empty "
            "string)"
        )
    models = meta.get("models")
    if not isinstance(models, Mapping):
        raise CacheError(
            "meta['models'] must map each model name to {'path': ..., 'fingerprint': ...}"
        )
    missing = [n for n in names if n not in models]
    if missing:
        raise CacheError(
            f"meta['models'] lacks {missing}; every cached model needs a path and a weight "
            "fingerprint"
        )
    out = {}
    for name, info in models.items():
        if not isinstance(info, Mapping) or not {"path", "fingerprint"} <= set(info):
            raise CacheError(
                f"meta['models'][{name!r}] must have 'path' and 'fingerprint', got {info!r}"
            )
        out[str(name)] = {str(k): v for k, v in info.items()}
    return fp, out


def finalize_manifest(
    cache_dir: str | os.PathLike,
    world_size: int,
    meta: Mapping[str, Any],
    *,
    verify_checksums: bool = True,
) -> dict[str, Any]:
    """Verify every rank's shards and write ``manifest.json`` atomically (run by rank 0
    after all writers closed; the caller provides the barrier).

    Args:
        cache_dir: the cache folder.
        world_size: number of writer ranks; each must have left its ``done`` file.
        meta: ``rollout_fingerprint`` (str), ``models`` (``{name: {"path", "fingerprint"}}``,
            covering every cached model) and any other JSON-able keys, kept under ``extra``.
        verify_checksums: recompute every shard's SHA-256 (the bytes were just written, but
            this is the last chance to catch a bad disk before training reads them).

    Returns the manifest. Raises :class:`CacheError` naming the rank, shard or sample at fault.
    """
    cache_dir = Path(cache_dir)
    dones = []
    for r in range(world_size):
        path = cache_dir / done_name(r)
        if not path.exists():
            raise CacheError(
                f"{cache_dir}: rank {r} has not finished writing (no {path.name}); rerun its "
                "writer, then finalize"
            )
        dones.append(read_json(path))
    layout = dones[0]["layout"] if dones else None
    for r, done in enumerate(dones):
        if done.get("format_version") != FORMAT_VERSION or done.get("rank") != r:
            raise CacheError(
                f"{cache_dir / done_name(r)}: not a format-{FORMAT_VERSION} done file of rank {r}"
            )
        if done["layout"] != layout or done["max_shard_bytes"] != dones[0]["max_shard_bytes"]:
            raise CacheError(
                f"{cache_dir}: rank {r} wrote with layout {done['layout']}, rank 0 with {layout}"
            )
    listed = [s for done in dones for s in done["shards"]]
    names = {s["file"] for s in listed}
    for p in sorted(cache_dir.iterdir()):
        rs = parse_shard_name(p.name)
        stray_done = p.name.endswith(".done.json") and p.name not in {
            done_name(r) for r in range(world_size)
        }
        if (rs is not None and p.name not in names) or stray_done:
            raise CacheError(
                f"{p}: not part of this {world_size}-rank cache (left from an earlier run?); "
                "delete it"
            )
    shards = open_shards([cache_dir / s["file"] for s in listed], verify=verify_checksums)
    try:
        for shard, entry in zip(shards, listed):
            if shard.summary() != entry:
                raise CacheError(
                    f"{shard.path}: is {shard.summary()}, its rank's done file says {entry}; rerun "
                    f"rank {shard.rank}'s writer"
                )
            if shard.layout.to_json() != layout:
                raise CacheError(
                    f"{shard.path}: layout {shard.layout.to_json()} differs from the cache's "
                    f"{layout}"
                )
        ids = (
            np.concatenate([s.index["sample_id"] for s in shards])
            if shards
            else np.zeros(0, np.int64)
        )
        uniq, counts = np.unique(ids, return_counts=True)
        if (counts > 1).any():
            sid = int(uniq[np.argmax(counts > 1)])
            where = [s.name for s in shards if (s.index["sample_id"] == sid).any()]
            raise CacheError(
                f"{cache_dir}: sample {sid} was written twice, in {where}; give each rank distinct "
                "samples"
            )
        num_tokens = sum(s.num_tokens for s in shards)
    finally:
        for shard in shards:
            shard.close()
    names_needed = list(
        dict.fromkeys((layout or {}).get("sampled_models", []) + (layout or {}).get("teachers", []))
    )
    fingerprint, models = _check_meta(meta, names_needed)
    manifest = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        **(layout or {}),
        "max_shard_bytes": dones[0]["max_shard_bytes"] if dones else None,
        "models": models,
        "rollout_fingerprint": fingerprint,
        "world_size": world_size,
        "num_samples": int(ids.size),
        "num_tokens": int(num_tokens),
        "shards": listed,
        "extra": {k: v for k, v in meta.items() if k not in ("rollout_fingerprint", "models")},
    }
    manifest = with_self_digest(manifest)
    atomic_write_json(cache_dir / MANIFEST_NAME, manifest)
    log.info(
        "teacher cache %s: %d samples, %d tokens in %d shards",
        cache_dir,
        ids.size,
        num_tokens,
        len(listed),
    )
    return manifest


def load_manifest(cache_dir: str | os.PathLike) -> dict[str, Any]:
    """Read and check the manifest's format; a missing one means an unfinished cache."""
    path = Path(cache_dir) / MANIFEST_NAME
    if not path.exists():
        raise CacheError(
            f"{path}: not found: the cache is incomplete (every rank's CacheWriter must close and "
            f"rank 0 must run finalize_manifest) or {cache_dir} is not a teacher cache; "
            f"{REBUILD_HINT}"
        )
    try:
        manifest = read_json(path)
    except ValueError as e:
        raise CacheError(str(e)) from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise CacheError(f"{path}: not a teacher-cache manifest")
    if why := self_digest_error(path, manifest):
        raise CacheError(f"{why}; {REBUILD_HINT}")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CacheError(
            f"{path}: format version {manifest.get('format_version')}, this code reads "
            f"{FORMAT_VERSION}; {REBUILD_HINT}"
        )
    required = (
        "vocab_size",
        "k",
        "value_dtype",
        "bits_per_id",
        "sampled_models",
        "teachers",
        "ref_teachers",
        "models",
        "rollout_fingerprint",
        "num_samples",
        "num_tokens",
        "shards",
    )
    missing = [k for k in required if k not in manifest]
    if missing:
        raise CacheError(f"{path}: manifest lacks {missing}")
    return manifest
