"""Reader of the teacher cache: memory-mapped, random access by sample id, and a streaming
iterator with background prefetch. Independent of how many ranks wrote the cache and of
how the reader's own ranks split the samples."""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from erpd_megatron.cache.codec import VALUE_DTYPES, decode_logprobs, unpack_ids_from_words
from erpd_megatron.cache.format import (
    KIND_REF_LOGPROBS,
    KIND_SAMPLED,
    KIND_TOPK_IDS,
    KIND_TOPK_LOGPROBS,
    CacheError,
    CacheLayout,
    MissingSampleError,
    ShardFile,
)
from erpd_megatron.cache.manifest import REBUILD_HINT, load_manifest, open_shards
from erpd_megatron.cache.writer import as_sample_id

_F32 = np.dtype("<f4")


@dataclass(frozen=True)
class CacheRecord:
    """Everything cached for one sample; arrays are read-only views of the mapped shard
    unless the record was copied (``stream`` copies by default).

    Attributes:
        sample_id: the sample's int64 id.
        num_tokens: T, the number of response tokens.
        sampled: ``{model: [T] float32}`` log-prob of each sampled token.
        topk_ids: ``{teacher: [T, k] int64}`` top-k token ids.
        topk_logprobs: ``{teacher: [T, k]}`` their log-probs: float16 (fp16 caches), float32
            (fp32 caches, and bf16 caches, decoded exactly).
        ref_topk_logprobs: ``{teacher: [T, k]}`` pi_r's log-probs at that teacher's top-k
            ids, for the teachers that have them.
        shard: file name of the shard holding the sample.
    """

    sample_id: int
    num_tokens: int
    sampled: dict[str, np.ndarray]
    topk_ids: dict[str, np.ndarray]
    topk_logprobs: dict[str, np.ndarray]
    ref_topk_logprobs: dict[str, np.ndarray]
    shard: str

    def copy(self) -> CacheRecord:
        """A record whose arrays own their memory (no reference to the mapped file)."""

        def cp(d: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            return {k: np.array(v, copy=True) for k, v in d.items()}

        return CacheRecord(
            self.sample_id,
            self.num_tokens,
            cp(self.sampled),
            cp(self.topk_ids),
            cp(self.topk_logprobs),
            cp(self.ref_topk_logprobs),
            self.shard,
        )


class TeacherCache:
    """An opened, checked teacher cache. Use :meth:`open`."""

    def __init__(
        self,
        cache_dir: Path,
        manifest: dict[str, Any],
        layout: CacheLayout,
        shards: list[ShardFile],
    ) -> None:
        self.cache_dir = cache_dir
        self.manifest = manifest
        self.layout = layout
        self._shards = shards
        self._shard_of = (
            np.concatenate([np.full(s.num_samples, i, np.int32) for i, s in enumerate(shards)])
            if shards
            else np.zeros(0, np.int32)
        )
        self._row_of = (
            np.concatenate([np.arange(s.num_samples, dtype=np.int64) for s in shards])
            if shards
            else np.zeros(0, np.int64)
        )
        ids = [int(x) for s in shards for x in s.index["sample_id"]]
        self._pos: dict[int, int] = {sid: i for i, sid in enumerate(ids)}
        if len(self._pos) != len(ids):
            seen: set[int] = set()
            dup = next(s for s in ids if s in seen or seen.add(s))
            where = [s.name for s in shards if (s.index["sample_id"] == dup).any()]
            raise CacheError(
                f"{cache_dir}: sample {dup} appears in several shards {where}; {REBUILD_HINT}"
            )
        self._ids = ids
        self._check_id_range = layout.vocab_size < (1 << layout.bits_per_id)

    @classmethod
    def open(
        cls,
        cache_dir: str | os.PathLike,
        *,
        expect_vocab_size: int | None = None,
        expect_rollout_fingerprint: str | None = None,
        expect_token_counts: Mapping[int, int] | None = None,
        verify_checksums: bool = True,
        verify_part: tuple[int, int] | None = None,
    ) -> TeacherCache:
        """Open a cache and check it before anything is computed from it.

        Args:
            cache_dir: folder holding ``manifest.json`` and the shards.
            expect_vocab_size: the student's vocabulary size; must equal the cache's.
            expect_rollout_fingerprint: fingerprint of the rollout data the trainer reads;
                must equal the one the cache was written for.
            expect_token_counts: ``{sample_id: response tokens}`` of the rollout data; every
                sample must be cached with exactly that many tokens.
            verify_checksums: recompute the shards' SHA-256 (parallel threads). Sizes,
                headers, footers, indexes and the manifest's digests are checked regardless.
            verify_part: ``(rank, world_size)``: hash only the shards ``i`` (manifest order)
                with ``i % world_size == rank``. A job whose every rank opens the cache with
                its own part hashes each shard exactly once in all (32 ranks do not read a
                terabyte cache 32 times); a rank that finds a corrupt shard fails before
                training starts. None: hash every shard.

        Raises :class:`CacheError` naming the shard and sample at fault.
        """
        cache_dir = Path(cache_dir)
        manifest = load_manifest(cache_dir)
        fp = manifest["rollout_fingerprint"]
        if expect_rollout_fingerprint is not None and fp != expect_rollout_fingerprint:
            raise CacheError(
                f"{cache_dir}: this cache was written for rollout set {fp}, the data is "
                f"{expect_rollout_fingerprint}; {REBUILD_HINT}"
            )
        if expect_vocab_size is not None and int(expect_vocab_size) != manifest["vocab_size"]:
            raise CacheError(
                f"{cache_dir}: the cache was written for vocab_size {manifest['vocab_size']}, the "
                "student "
                f"has {expect_vocab_size}; top-k ids would not index the student's vocabulary; "
                f"{REBUILD_HINT}"
            )
        try:
            layout = CacheLayout(
                int(manifest["vocab_size"]),
                int(manifest["k"]),
                manifest["value_dtype"],
                tuple(manifest["sampled_models"]),
                tuple(manifest["teachers"]),
                tuple(manifest["ref_teachers"]),
            )
        except ValueError as e:
            raise CacheError(f"{cache_dir / 'manifest.json'}: {e}") from e
        entries = manifest["shards"]
        for entry in entries:
            if not (cache_dir / entry["file"]).exists():
                raise CacheError(
                    f"{cache_dir / entry['file']}: shard listed in the manifest is missing; "
                    f"{REBUILD_HINT}"
                )
        if verify_part is not None:
            rank, world = int(verify_part[0]), int(verify_part[1])
            if world < 1 or not 0 <= rank < world:
                raise ValueError(
                    "verify_part must be (rank, world_size) with 0 <= rank < world_size, got "
                    f"{verify_part}"
                )
            verify = [verify_checksums and i % world == rank for i in range(len(entries))]
        else:
            verify = [verify_checksums] * len(entries)
        shards = open_shards([cache_dir / e["file"] for e in entries], verify=verify)
        try:
            for shard, entry in zip(shards, entries):
                if shard.summary() != entry:
                    raise CacheError(
                        f"{shard.path}: does not match the manifest (shard {shard.summary()}, "
                        f"manifest {entry}): "
                        f"replaced after the manifest was written; {REBUILD_HINT}"
                    )
                if shard.layout != layout:
                    raise CacheError(
                        f"{shard.path}: layout {shard.layout.to_json()} differs from the manifest's"
                    )
            cache = cls(cache_dir, manifest, layout, shards)
            if len(cache) != manifest["num_samples"]:
                raise CacheError(
                    f"{cache_dir}: shards hold {len(cache)} samples, the manifest says "
                    f"{manifest['num_samples']}"
                )
            if expect_token_counts is not None:
                cache._check_token_counts(expect_token_counts)
        except BaseException:
            for shard in shards:
                shard.close()
            raise
        return cache

    # ---- checks ---------------------------------------------------------------------------

    def _check_token_counts(self, expected: Mapping[int, int]) -> None:
        missing, wrong = [], []
        for sid, count in expected.items():
            pos = self._pos.get(int(sid))
            if pos is None:
                missing.append(int(sid))
                continue
            shard = self._shards[self._shard_of[pos]]
            cached = int(shard.index["token_count"][self._row_of[pos]])
            if cached != int(count):
                wrong.append(
                    f"sample {int(sid)} in {shard.path}: {cached} tokens cached, the rollout data "
                    f"has {int(count)}"
                )
        if missing:
            raise CacheError(
                f"{self.cache_dir}: {len(missing)} sample(s) of the rollout data are not in the "
                "cache, "
                f"e.g. {missing[:5]}; {REBUILD_HINT}"
            )
        if wrong:
            more = f" (and {len(wrong) - 3} more)" if len(wrong) > 3 else ""
            raise CacheError(
                f"{self.cache_dir}: token counts differ from the rollout data: "
                + "; ".join(wrong[:3])
                + more
                + f"; {REBUILD_HINT}"
            )

    # ---- access ---------------------------------------------------------------------------

    @property
    def sample_ids(self) -> list[int]:
        """Every cached sample id, in shard order (rank, then sequence, then write order)."""
        return list(self._ids)

    @property
    def models(self) -> dict[str, dict[str, Any]]:
        """``{name: {"path", "fingerprint", ...}}`` of the models the cache was computed with."""
        return self.manifest["models"]

    @property
    def teachers(self) -> tuple[str, ...]:
        """Models with top-k ids and log-probs."""
        return self.layout.teachers

    @property
    def sampled_models(self) -> tuple[str, ...]:
        """Models with the log-prob of each sampled token."""
        return self.layout.sampled

    @property
    def ref_teachers(self) -> tuple[str, ...]:
        """Teachers whose top-k ids also carry pi_r's log-probs."""
        return self.layout.ref_teachers

    @property
    def vocab_size(self) -> int:
        """Vocabulary size the ids index."""
        return self.layout.vocab_size

    @property
    def k(self) -> int:
        """Top-k entries per token per teacher."""
        return self.layout.k

    @property
    def value_dtype(self) -> str:
        """Storage dtype of top-k log-probs: fp16, bf16 or fp32."""
        return self.layout.value_dtype

    @property
    def num_tokens(self) -> int:
        """Response tokens over all samples."""
        return int(self.manifest["num_tokens"])

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, sample_id: object) -> bool:
        try:
            return as_sample_id(sample_id) in self._pos
        except CacheError:
            return False

    def _locate(self, sample_id: int) -> tuple[ShardFile, np.void]:
        sid = as_sample_id(sample_id)
        pos = self._pos.get(sid)
        if pos is None:
            raise MissingSampleError(
                f"sample {sid} is not in the teacher cache {self.cache_dir} ({len(self)} samples)"
            )
        shard = self._shards[self._shard_of[pos]]
        if shard.mm is None:
            raise CacheError(f"{self.cache_dir}: the cache was closed")
        return shard, shard.index[self._row_of[pos]]

    def token_count(self, sample_id: int) -> int:
        """Number of response tokens cached for a sample."""
        return int(self._locate(sample_id)[1]["token_count"])

    def get(self, sample_id: int) -> CacheRecord:
        """The record of one sample: zero-copy views for fp16/fp32 values and sampled
        log-probs, freshly decoded int64 ids (and float32 for bf16 values)."""
        shard, row = self._locate(sample_id)
        lay, sid = self.layout, int(row["sample_id"])
        t, tok_off, ids_off = (
            int(row["token_count"]),
            int(row["token_offset"]),
            int(row["ids_offset"]),
        )
        k, vname = lay.k, lay.value_dtype
        vdtype = VALUE_DTYPES[vname][1]
        sampled = {
            name: shard.array(KIND_SAMPLED, i, _F32, tok_off, t)
            for i, name in enumerate(lay.sampled)
        }
        ids, lps, refs = {}, {}, {}
        for ti, name in enumerate(lay.teachers):
            lps[name] = decode_logprobs(
                shard.array(KIND_TOPK_LOGPROBS, ti, vdtype, tok_off * k, t * k), vname
            ).reshape(t, k)
            if name in lay.ref_teachers:
                refs[name] = decode_logprobs(
                    shard.array(KIND_REF_LOGPROBS, ti, vdtype, tok_off * k, t * k), vname
                ).reshape(t, k)
            sec_off = shard.sections[(KIND_TOPK_IDS, ti)][0]
            try:
                decoded = unpack_ids_from_words(
                    shard.words, sec_off + ids_off, t * k, lay.bits_per_id
                )
            except ValueError as e:
                raise CacheError(f"{shard.path}: sample {sid}, teacher {name!r}: {e}") from e
            if self._check_id_range and decoded.size and int(decoded.max()) >= lay.vocab_size:
                raise CacheError(
                    f"{shard.path}: sample {sid}, teacher {name!r}: id {int(decoded.max())} >= "
                    f"vocab_size {lay.vocab_size}; the shard is corrupt"
                )
            ids[name] = decoded.reshape(t, k)
        return CacheRecord(sid, t, sampled, ids, lps, refs, shard.name)

    def stream(
        self, sample_ids: Iterable[int] | None = None, *, prefetch: int = 4, copy: bool = True
    ) -> Iterator[CacheRecord]:
        """Records in the caller's order, read and decoded ``prefetch`` samples ahead by a
        background thread (0: no thread). With ``copy`` the records own their arrays, so
        that page faults are taken by the thread, not the consumer. Close the iterator (or
        exhaust it) to stop the thread; errors surface at the record that failed."""
        order = self.sample_ids if sample_ids is None else [as_sample_id(s) for s in sample_ids]
        fetch = (lambda s: self.get(s).copy()) if copy else self.get
        if prefetch <= 0:
            return (fetch(s) for s in order)
        return _Prefetcher(fetch, order, prefetch)

    def close(self) -> None:
        """Unmap the shards; arrays already handed out stay valid until freed."""
        for shard in self._shards:
            shard.close()

    def __enter__(self) -> TeacherCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_END = object()


class _Prefetcher(Iterator[CacheRecord]):
    """Runs ``fetch`` over ``order`` in a daemon thread, ``depth`` items ahead of the consumer."""

    def __init__(self, fetch: Callable[[int], CacheRecord], order: list[int], depth: int) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._done = False
        self._thread = threading.Thread(
            target=self._run, args=(fetch, order), name="teacher-cache-prefetch", daemon=True
        )
        self._thread.start()

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, fetch: Callable[[int], CacheRecord], order: list[int]) -> None:
        for sid in order:
            if self._stop.is_set():
                return
            try:
                item: Any = fetch(sid)
            except BaseException as e:  # handed to the consumer
                self._put(e)
                return
            if not self._put(item):
                return
        self._put(_END)

    def __next__(self) -> CacheRecord:
        if self._done:
            raise StopIteration
        item = self._queue.get()
        if item is _END:
            self.close()
            raise StopIteration
        if isinstance(item, BaseException):
            self.close()
            raise item
        return item

    def close(self) -> None:
        """Stop the thread and drop what it fetched ahead."""
        self._done = True
        self._stop.set()
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        if self._thread is not threading.current_thread():
            self._thread.join()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
