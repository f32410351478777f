"""Shard writer of the teacher cache: one per data-parallel rank, resumable after a crash.

Usage on every rank (the forward pass that computes the log-probs is the caller's)::

    with CacheWriter(cache_dir, rank=r, sample_ids=my_ids, vocab_size=V, k=64,
                     sampled_models=["base", "teacher0"], teachers=["teacher0"]) as w:
        for sid in w.pending():          # empty on a rerun that finds everything done
            w.write_sample(sid, sampled={...}, topk={"teacher0": (ids, logprobs)})
    # caller: barrier; then rank 0: finalize_manifest(cache_dir, world_size, meta)

Shard boundaries depend only on the rank's sample order and token counts, shards appear by
atomic rename, and a rerun keeps the verified complete shards of its rank and recomputes
the rest, so that an interrupted-then-resumed cache is byte-identical to an uninterrupted
one (given a deterministic forward pass).
"""

from __future__ import annotations

import hashlib
import os
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from erpd_megatron.cache.codec import VALUE_DTYPES, clamp_logprobs, encode_logprobs, pack_ids
from erpd_megatron.cache.format import (
    ALIGN,
    END_MAGIC,
    FOOTER,
    FORMAT_VERSION,
    HEADER,
    INDEX_DTYPE,
    KIND_INDEX,
    MAGIC,
    MANIFEST_NAME,
    SECTION_DTYPE,
    CacheError,
    CacheLayout,
    ShardFile,
    align,
    header_size,
    parse_shard_name,
    schema_bytes,
    shard_name,
)
from erpd_megatron.utils.files import atomic_write_json
from erpd_megatron.utils.log import get_logger

log = get_logger(__name__)

DEFAULT_MAX_SHARD_BYTES = 256 << 20
_ZEROS = bytes(ALIGN)


def done_name(rank: int) -> str:
    """File a writer leaves when its rank has written every sample: ``rank00003.done.json``."""
    return f"rank{rank:05d}.done.json"


def as_sample_id(x: Any) -> int:
    """A sample id as a Python int in the int64 range (the rollout Parquet's ``sample_id``)."""
    if isinstance(x, (bool, np.bool_)) or not isinstance(x, (int, np.integer)):
        raise CacheError(
            f"sample ids are int64 (the rollout data's sample_id column); got {type(x).__name__} "
            f"{x!r}"
        )
    x = int(x)
    if not -(1 << 63) <= x < (1 << 63):
        raise CacheError(f"sample id {x} is outside the int64 range")
    return x


def sample_ids_digest(sample_ids: Sequence[int]) -> str:
    """SHA-256 of a sample-id sequence as little-endian int64 (order matters)."""
    return hashlib.sha256(np.asarray(sample_ids, dtype="<i8").tobytes()).hexdigest()


@dataclass
class _Encoded:
    sample_id: int
    num_tokens: int
    parts: list[np.ndarray]  # one per non-index section, in section order


class CacheWriter:
    """Writes the samples of one rank, in a fixed order, into bounded shards.

    Args:
        cache_dir: the cache folder, shared by all ranks.
        rank: this writer's rank; its files are ``rank{rank:05d}-{seq:05d}.erpdc``.
        sample_ids: every sample this rank writes, in the order it writes them; fixes the
            shard boundaries, so a rerun must pass the same list.
        vocab_size: the full (padded) vocabulary size of the models; ids are packed at
            ``ceil(log2(vocab_size))`` bits.
        k: top-k entries per token per teacher.
        sampled_models: names whose log-prob of the sampled token is stored per token
            (e.g. ``["base", "teacher0", "unlearned"]``; ``base`` is pi_r).
        teachers: names whose top-k ids and log-probs are stored.
        ref_teachers: teachers for which pi_r's log-probs at that teacher's top-k ids are
            stored too (``ref_topk_logprobs``).
        value_dtype: ``fp16`` (default), ``bf16`` or ``fp32`` for top-k log-probs; sampled
            log-probs are always fp32.
        max_shard_bytes: bound on a shard file's size; a single sample larger than it gets
            a shard of its own.
        fsync: flush each shard and the folder to disk before going on.
    """

    def __init__(
        self,
        cache_dir: str | os.PathLike,
        *,
        rank: int,
        sample_ids: Sequence[int],
        vocab_size: int,
        k: int,
        sampled_models: Sequence[str],
        teachers: Sequence[str],
        ref_teachers: Sequence[str] = (),
        value_dtype: str = "fp16",
        max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
        fsync: bool = True,
    ) -> None:
        if rank < 0 or rank > 99999:
            raise CacheError(f"rank must be in [0, 99999], got {rank}")
        if value_dtype not in VALUE_DTYPES:
            raise CacheError(
                f"value_dtype must be one of {sorted(VALUE_DTYPES)}, got {value_dtype!r}"
            )
        try:
            self.layout = CacheLayout(
                int(vocab_size),
                int(k),
                value_dtype,
                tuple(sampled_models),
                tuple(teachers),
                tuple(ref_teachers),
            )
        except ValueError as e:
            raise CacheError(str(e)) from e
        self.cache_dir = Path(cache_dir)
        self.rank = rank
        self.max_shard_bytes = int(max_shard_bytes)
        self.fsync = fsync
        self._order = [as_sample_id(s) for s in sample_ids]
        if len(set(self._order)) != len(self._order):
            seen: set[int] = set()
            dup = next(s for s in self._order if s in seen or seen.add(s))
            raise CacheError(f"rank {rank}: sample id {dup} appears twice in sample_ids")
        self._sections = self.layout.sections()
        self._schema_len = len(schema_bytes(self.layout, self.max_shard_bytes, False))
        self._hsize = header_size(self.layout, self._schema_len)
        self._shards: list[dict[str, Any]] = []
        self._buffer: list[_Encoded] = []
        self._buf_tokens = 0
        self._buf_ids_bytes = 0
        self._next = 0
        self._seq = 0
        self._closed = False
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self._resume()

    # ---- resume -------------------------------------------------------------------------

    def _resume(self) -> None:
        """Keep this rank's verified complete shards that match the sample order; drop the rest."""
        prefix = f"rank{self.rank:05d}"
        for tmp in self.cache_dir.glob(f".{prefix}*.tmp"):
            tmp.unlink(missing_ok=True)
        files: list[tuple[int, Path]] = []
        for p in self.cache_dir.glob(f"{prefix}-*.erpdc"):
            rank_seq = parse_shard_name(p.name)
            if rank_seq is not None and rank_seq[0] == self.rank:
                files.append((rank_seq[1], p))
        files.sort()
        existing = dict(files)
        pos, seq = 0, 0
        while seq in existing:
            try:
                shard = ShardFile.open(existing[seq], verify=True)
            except CacheError as e:
                log.warning("rank %d: recomputing from %s on: %s", self.rank, existing[seq].name, e)
                break
            try:
                if shard.layout != self.layout or shard.max_shard_bytes != self.max_shard_bytes:
                    raise CacheError(
                        f"{shard.path}: written with {shard.layout.to_json()} and max_shard_bytes "
                        f"{shard.max_shard_bytes}, this writer has {self.layout.to_json()} and "
                        f"{self.max_shard_bytes}; use the same settings or delete {self.cache_dir}"
                    )
                ids = [int(s) for s in shard.index["sample_id"]]
                if ids != self._order[pos : pos + len(ids)]:
                    raise CacheError(
                        f"{shard.path}: holds samples {ids[:4]}... but this rank's sample order "
                        "has "
                        f"{self._order[pos : pos + 4]}... at position {pos}; the rank's sample "
                        "list "
                        "changed since it was written: pass the same list or delete "
                        f"{self.cache_dir}"
                    )
                end = pos + len(ids)
                if shard.final != (end == len(self._order)):
                    log.warning(
                        "rank %d: recomputing from %s on: it ended the rank's samples at %d of %d",
                        self.rank,
                        shard.name,
                        end,
                        len(self._order),
                    )
                    break
                self._shards.append(shard.summary())
                pos, seq = end, seq + 1
            finally:
                shard.close()
        for s, p in files:
            if s >= seq:
                log.info("rank %d: removing %s", self.rank, p.name)
                p.unlink(missing_ok=True)
        self._next, self._seq = pos, seq
        if pos:
            log.info(
                "rank %d: resuming: %d of %d samples already in %d complete shard(s)",
                self.rank,
                pos,
                len(self._order),
                seq,
            )
        if pos < len(self._order):
            (self.cache_dir / done_name(self.rank)).unlink(missing_ok=True)
            (self.cache_dir / MANIFEST_NAME).unlink(missing_ok=True)

    # ---- public API ---------------------------------------------------------------------

    def pending(self) -> list[int]:
        """Sample ids still to write, in the order they must be written."""
        return self._order[self._next :]

    @property
    def num_done(self) -> int:
        """Samples written to complete shards or buffered for the current one."""
        return self._next

    @property
    def shards(self) -> list[dict[str, Any]]:
        """Summaries of this rank's complete shards so far."""
        return list(self._shards)

    def write_sample(
        self,
        sample_id: int,
        sampled: Mapping[str, np.ndarray],
        topk: Mapping[str, tuple],
    ) -> None:
        """Add one sample; the next pending id must be ``sample_id``.

        Args:
            sample_id: int64 id of the sample.
            sampled: ``{model: [T] log-probs of the sampled tokens}`` for every sampled model.
            topk: ``{teacher: (ids [T, k] int, logprobs [T, k], ref_logprobs [T, k] or
                omitted)}``; ``ref_logprobs`` is required for ref_teachers and only for them.

        Log-probs are clamped to ``[LOGPROB_FLOOR, 0]``; NaN or positive values and ids
        outside ``[0, vocab_size)`` raise :class:`CacheError` naming the sample.
        """
        if self._closed:
            raise CacheError(f"rank {self.rank}: write_sample after close")
        sid = as_sample_id(sample_id)
        if self._next >= len(self._order):
            raise CacheError(
                f"rank {self.rank}: sample {sid} written, but all {len(self._order)} samples of "
                "this rank are done"
            )
        if sid != self._order[self._next]:
            raise CacheError(
                f"rank {self.rank}: got sample {sid}, the next pending sample is "
                f"{self._order[self._next]}; "
                "write samples in the order of writer.pending()"
            )
        enc = self._encode(sid, sampled, topk)
        ids_bytes = self.layout.ids_nbytes(enc.num_tokens)
        if (
            self._buffer
            and self._file_size(
                len(self._buffer) + 1,
                self._buf_tokens + enc.num_tokens,
                self._buf_ids_bytes + ids_bytes,
            )
            > self.max_shard_bytes
        ):
            self._flush(final=False)
        self._buffer.append(enc)
        self._buf_tokens += enc.num_tokens
        self._buf_ids_bytes += ids_bytes
        self._next += 1
        if self._next == len(self._order):
            self._flush(final=True)

    def close(self) -> dict[str, Any]:
        """Finish the rank: every sample must have been written. Writes (atomically) the
        rank's ``done`` file, which :func:`finalize_manifest` requires, and returns it."""
        if self._closed:
            raise CacheError(f"rank {self.rank}: writer already closed")
        if self._next < len(self._order):
            raise CacheError(
                f"rank {self.rank}: close() with {len(self._order) - self._next} of "
                f"{len(self._order)} "
                f"samples not written (next: {self._order[self._next]})"
            )
        self._closed = True
        done = {
            "format_version": FORMAT_VERSION,
            "rank": self.rank,
            "layout": self.layout.to_json(),
            "max_shard_bytes": self.max_shard_bytes,
            "num_samples": len(self._order),
            "num_tokens": sum(s["num_tokens"] for s in self._shards),
            "sample_ids_sha256": sample_ids_digest(self._order),
            "shards": self._shards,
        }
        atomic_write_json(self.cache_dir / done_name(self.rank), done)
        return done

    def abort(self) -> None:
        """Drop the samples buffered for the unfinished shard; complete shards stay."""
        self._buffer.clear()
        self._closed = True

    def __enter__(self) -> CacheWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    # ---- encoding -----------------------------------------------------------------------

    def _encode(self, sid: int, sampled: Mapping[str, Any], topk: Mapping[str, Any]) -> _Encoded:
        lay, where = self.layout, f"rank {self.rank}, sample {sid}"
        _check_keys(where, "sampled", sampled, lay.sampled)
        _check_keys(where, "topk", topk, lay.teachers)
        parts: list[np.ndarray] = []
        num_tokens: int | None = None
        for name in lay.sampled:
            arr = np.asarray(sampled[name])
            if arr.ndim != 1 or (num_tokens is not None and arr.shape[0] != num_tokens):
                raise CacheError(
                    f"{where}: sampled[{name!r}] has shape {arr.shape}, expected "
                    f"({num_tokens if num_tokens is not None else 'T'},)"
                )
            num_tokens = arr.shape[0]
            parts.append(_values(where, f"sampled[{name!r}]", arr, None))
        for name in lay.teachers:
            entry = topk[name]
            if not isinstance(entry, (tuple, list)) or len(entry) not in (2, 3):
                raise CacheError(
                    f"{where}: topk[{name!r}] must be (ids, logprobs) or (ids, logprobs, "
                    "ref_logprobs)"
                )
            ids, lps = np.asarray(entry[0]), np.asarray(entry[1])
            ref = None if len(entry) == 2 or entry[2] is None else np.asarray(entry[2])
            if num_tokens is None:
                num_tokens = ids.shape[0] if ids.ndim == 2 else -1
            arrays = {"ids": ids, "logprobs": lps}
            if ref is not None:
                arrays["ref_logprobs"] = ref
            for what, arr in arrays.items():
                if arr.shape != (num_tokens, lay.k):
                    raise CacheError(
                        f"{where}: topk[{name!r}] {what} has shape {arr.shape}, expected "
                        f"({num_tokens}, {lay.k})"
                    )
            if (ref is not None) != (name in lay.ref_teachers):
                need = "needs" if name in lay.ref_teachers else "must not have"
                raise CacheError(
                    f"{where}: teacher {name!r} {need} ref_logprobs "
                    f"(ref_teachers={list(lay.ref_teachers)})"
                )
            parts.append(_values(where, f"topk[{name!r}] logprobs", lps, lay.value_dtype))
            if ref is not None:
                parts.append(_values(where, f"topk[{name!r}] ref_logprobs", ref, lay.value_dtype))
            parts.append(self._pack(where, name, ids))
        return _Encoded(sid, int(num_tokens or 0), parts)

    def _pack(self, where: str, name: str, ids: np.ndarray) -> np.ndarray:
        lay = self.layout
        if ids.dtype.kind not in "iu":
            raise CacheError(f"{where}: topk[{name!r}] ids must be integers, got {ids.dtype}")
        if ids.size:
            bad = (ids < 0) | (ids >= lay.vocab_size)
            if bad.any():
                t, j = (int(x) for x in np.argwhere(bad)[0])
                raise CacheError(
                    f"{where}: topk[{name!r}] id {int(ids[t, j])} at token {t}, rank {j} is "
                    f"outside the vocabulary [0, {lay.vocab_size})"
                )
        out = np.zeros(lay.ids_nbytes(ids.shape[0]), np.uint8)  # zero padding to 8 bytes
        pack_ids(ids, lay.bits_per_id, check=False, out=out)
        return out

    # ---- shards -------------------------------------------------------------------------

    def _file_size(self, num_samples: int, num_tokens: int, ids_bytes: int) -> int:
        total = self._hsize + FOOTER.size
        for kind, _, _ in self._sections:
            nb = (
                num_samples * INDEX_DTYPE.itemsize
                if kind == KIND_INDEX
                else self.layout.section_nbytes(kind, num_tokens, ids_bytes)
            )
            total += align(nb)
        return total

    def _flush(self, final: bool) -> None:
        lay, buf = self.layout, self._buffer
        index = np.zeros(len(buf), INDEX_DTYPE)
        index["sample_id"] = [e.sample_id for e in buf]
        counts = np.array([e.num_tokens for e in buf], np.int64)
        index["token_count"] = counts
        index["token_offset"] = np.concatenate([[0], np.cumsum(counts)[:-1]])
        ids_len = lay.ids_nbytes_array(counts)
        index["ids_offset"] = np.concatenate([[0], np.cumsum(ids_len)[:-1]])
        # section bodies: the index, then each non-index section as its samples' parts
        bodies: list[list[np.ndarray]] = [[index]] + [
            [e.parts[i] for e in buf] for i in range(len(self._sections) - 1)
        ]
        table = np.zeros(len(self._sections), SECTION_DTYPE)
        offset = self._hsize
        for i, ((kind, dcode, model), body) in enumerate(zip(self._sections, bodies)):
            nb = sum(p.nbytes for p in body)
            table[i] = (kind, dcode, 0, model, offset, nb, 0)
            offset += align(nb)
        file_size = offset + FOOTER.size
        schema = schema_bytes(lay, self.max_shard_bytes, final)
        assert len(schema) == self._schema_len and file_size == self._file_size(
            len(buf), self._buf_tokens, self._buf_ids_bytes
        )
        header = HEADER.pack(
            MAGIC,
            FORMAT_VERSION,
            self._hsize,
            file_size,
            lay.vocab_size,
            lay.k,
            VALUE_DTYPES[lay.value_dtype][0],
            lay.bits_per_id,
            len(self._sections),
            self.rank,
            self._seq,
            len(buf),
            len(schema),
            self._buf_tokens,
        )
        head = header + table.tobytes() + schema
        head += bytes(self._hsize - len(head))
        path = self.cache_dir / shard_name(self.rank, self._seq)
        digest = self._write_atomic(path, head, bodies, file_size)
        self._shards.append(
            {
                "file": path.name,
                "rank": self.rank,
                "seq": self._seq,
                "bytes": file_size,
                "sha256": digest,
                "num_samples": len(buf),
                "num_tokens": self._buf_tokens,
            }
        )
        log.debug(
            "rank %d: wrote %s (%d samples, %d bytes)", self.rank, path.name, len(buf), file_size
        )
        self._seq += 1
        self._buffer = []
        self._buf_tokens = self._buf_ids_bytes = 0

    def _write_atomic(
        self, path: Path, head: bytes, bodies: list[list[np.ndarray]], file_size: int
    ) -> str:
        """Write the shard to a temporary file beside ``path``, then rename it into place."""
        h = hashlib.sha256()
        # os.open rather than mkstemp: the file gets the umask's permissions, not 0600
        tmp = str(self.cache_dir / f".{path.name}.{secrets.token_hex(6)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            with os.fdopen(fd, "wb") as f:

                def put(data) -> None:
                    h.update(data)
                    f.write(data)

                put(head)
                for body in bodies:
                    nb = 0
                    for part in body:
                        put(np.ascontiguousarray(part).view(np.uint8).reshape(-1))
                        nb += part.nbytes
                    put(_ZEROS[: align(nb) - nb])
                digest = h.digest()
                f.write(FOOTER.pack(digest, file_size, END_MAGIC))
                if f.tell() != file_size:
                    raise AssertionError(f"{path}: wrote {f.tell()} bytes, expected {file_size}")
                if self.fsync:
                    f.flush()
                    os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        if self.fsync:
            dfd = os.open(self.cache_dir, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        return digest.hex()


def _check_keys(where: str, what: str, given: Mapping[str, Any], expected: Sequence[str]) -> None:
    if not isinstance(given, Mapping):
        raise CacheError(
            f"{where}: {what} must be a dict keyed by model name, got {type(given).__name__}"
        )
    missing = [n for n in expected if n not in given]
    extra = [n for n in given if n not in expected]
    if missing or extra:
        raise CacheError(
            f"{where}: {what} models {sorted(given)} do not match the writer's {list(expected)} "
            f"(missing {missing}, unexpected {extra})"
        )


def _values(where: str, what: str, arr: Any, value_dtype: str | None) -> np.ndarray:
    """Clamped, quantised values; ``value_dtype`` None means fp32 (sampled log-probs)."""
    try:
        return clamp_logprobs(arr) if value_dtype is None else encode_logprobs(arr, value_dtype)
    except ValueError as e:
        raise CacheError(f"{where}: {what}: {e}") from e
