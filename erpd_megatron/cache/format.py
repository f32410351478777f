"""Byte layout of one teacher-cache shard (docs/cache_format.md), and its verified opening.

A shard is: a 64-byte header, a section table, a JSON schema, the sections (each on a
64-byte boundary) and a 48-byte footer holding the SHA-256 of everything before it.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from erpd_megatron.cache.codec import (
    LOGPROB_FLOOR,
    VALUE_DTYPE_BY_CODE,
    VALUE_DTYPES,
    bits_per_id,
    packed_nbytes,
    unaligned_u64_view,
)

FORMAT_VERSION = 1
MAGIC = b"ERPDCACH"
END_MAGIC = b"ERPDEND\x00"
SHARD_SUFFIX = ".erpdc"
MANIFEST_NAME = "manifest.json"
ALIGN = 64

HEADER = struct.Struct("<8sIIQQIBBHIIIIQ")
"""magic, version, header_size, file_size, vocab_size, k, value_dtype, bits_per_id,
num_sections, rank, seq, num_samples, schema_len, num_tokens (64 bytes)."""
FOOTER = struct.Struct("<32sQ8s")
"""sha256 of bytes [0, file_size - 48), file_size, END_MAGIC (48 bytes)."""
SECTION_DTYPE = np.dtype(
    [
        ("kind", "u1"),
        ("dtype", "u1"),
        ("reserved0", "<u2"),
        ("model", "<u4"),
        ("offset", "<u8"),
        ("nbytes", "<u8"),
        ("reserved1", "<u8"),
    ]
)
INDEX_DTYPE = np.dtype(
    [("sample_id", "<i8"), ("token_offset", "<u8"), ("token_count", "<u8"), ("ids_offset", "<u8")]
)
assert HEADER.size == 64 and FOOTER.size == 48
assert SECTION_DTYPE.itemsize == 32 and INDEX_DTYPE.itemsize == 32

# Section kinds, and the dtype code of sections that do not hold log-prob values.
KIND_INDEX, KIND_SAMPLED, KIND_TOPK_LOGPROBS, KIND_REF_LOGPROBS, KIND_TOPK_IDS = 1, 2, 3, 4, 5
DTYPE_RECORDS, DTYPE_FP32, DTYPE_PACKED_IDS = 0, 3, 4

_SHARD_RE = re.compile(r"^rank(\d{5})-(\d{5})\.erpdc$")


class CacheError(ValueError):
    """A teacher cache is missing, damaged, or does not match what the caller expects."""


class MissingSampleError(CacheError, KeyError):
    """A sample id asked of a cache is not in it."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


def align(n: int, to: int = ALIGN) -> int:
    """``n`` rounded up to a multiple of ``to``."""
    return -(-n // to) * to


def shard_name(rank: int, seq: int) -> str:
    """File name of shard ``seq`` of writer ``rank``, e.g. ``rank00003-00012.erpdc``."""
    return f"rank{rank:05d}-{seq:05d}{SHARD_SUFFIX}"


def parse_shard_name(name: str) -> tuple[int, int] | None:
    """``(rank, seq)`` of a shard file name, or None for any other name."""
    m = _SHARD_RE.match(name)
    return (int(m.group(1)), int(m.group(2))) if m else None


@dataclass(frozen=True)
class CacheLayout:
    """What every sample of a cache holds; identical in every shard of one cache."""

    vocab_size: int
    k: int
    value_dtype: str
    sampled: tuple[str, ...]
    teachers: tuple[str, ...]
    ref_teachers: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.value_dtype not in VALUE_DTYPES:
            raise ValueError(
                f"value_dtype must be one of {sorted(VALUE_DTYPES)}, got {self.value_dtype!r}"
            )
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")
        bits_per_id(self.vocab_size)  # validates the vocabulary size
        for what, names in (("sampled", self.sampled), ("teachers", self.teachers)):
            if len(set(names)) != len(names) or not all(isinstance(n, str) and n for n in names):
                raise ValueError(
                    f"{what} model names must be distinct non-empty strings, got {list(names)}"
                )
        unknown = [t for t in self.ref_teachers if t not in self.teachers]
        if unknown or len(set(self.ref_teachers)) != len(self.ref_teachers):
            raise ValueError(
                f"ref_teachers {list(self.ref_teachers)} must be distinct names from teachers "
                f"{list(self.teachers)}"
            )

    @property
    def bits_per_id(self) -> int:
        """Bits of one packed token id: ``ceil(log2(vocab_size))``."""
        return bits_per_id(self.vocab_size)

    @property
    def value_itemsize(self) -> int:
        """Bytes of one stored top-k log-prob."""
        return VALUE_DTYPES[self.value_dtype][1].itemsize

    def sections(self) -> list[tuple[int, int, int]]:
        """``(kind, dtype code, model index)`` of every section, in file order."""
        vcode = VALUE_DTYPES[self.value_dtype][0]
        out = [(KIND_INDEX, DTYPE_RECORDS, 0)]
        out += [(KIND_SAMPLED, DTYPE_FP32, i) for i in range(len(self.sampled))]
        for t, name in enumerate(self.teachers):
            out.append((KIND_TOPK_LOGPROBS, vcode, t))
            if name in self.ref_teachers:
                out.append((KIND_REF_LOGPROBS, vcode, t))
            out.append((KIND_TOPK_IDS, DTYPE_PACKED_IDS, t))
        return out

    def ids_nbytes(self, num_tokens: int) -> int:
        """Bytes one sample's packed ids take in each teacher's id section (8-byte padded)."""
        return align(packed_nbytes(num_tokens * self.k, self.bits_per_id), 8)

    def ids_nbytes_array(self, token_counts: np.ndarray) -> np.ndarray:
        """:meth:`ids_nbytes` of many samples at once (int64)."""
        bits = (np.asarray(token_counts, np.int64) * self.k) * self.bits_per_id
        return ((bits + 7) // 8 + 7) // 8 * 8

    def section_nbytes(self, kind: int, num_tokens: int, ids_nbytes: int) -> int:
        """Bytes of a section of ``kind`` for a shard of ``num_tokens`` tokens."""
        if kind == KIND_SAMPLED:
            return 4 * num_tokens
        if kind in (KIND_TOPK_LOGPROBS, KIND_REF_LOGPROBS):
            return self.value_itemsize * num_tokens * self.k
        if kind == KIND_TOPK_IDS:
            return ids_nbytes
        raise ValueError(kind)

    def to_json(self) -> dict[str, Any]:
        """The layout as JSON-able fields (the manifest and shard schemas use these)."""
        return {
            "vocab_size": self.vocab_size,
            "k": self.k,
            "value_dtype": self.value_dtype,
            "bits_per_id": self.bits_per_id,
            "logprob_floor": LOGPROB_FLOOR,
            "sampled_models": list(self.sampled),
            "teachers": list(self.teachers),
            "ref_teachers": list(self.ref_teachers),
        }


def schema_bytes(layout: CacheLayout, max_shard_bytes: int, final: bool) -> bytes:
    """The shard's JSON schema: model names, the writer's shard bound and whether this shard
    was closed by the end of its rank's samples (``final`` 1) or by the bound (0)."""
    doc = {
        "sampled": list(layout.sampled),
        "teachers": list(layout.teachers),
        "ref_teachers": list(layout.ref_teachers),
        "max_shard_bytes": int(max_shard_bytes),
        "final": int(final),
    }
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def header_size(layout: CacheLayout, schema_len: int) -> int:
    """Bytes before the first section: header, section table, schema, padding."""
    return align(HEADER.size + SECTION_DTYPE.itemsize * len(layout.sections()) + schema_len)


@dataclass
class ShardFile:
    """One opened (memory-mapped) shard, its header, schema, sections and index."""

    path: Path
    rank: int
    seq: int
    layout: CacheLayout
    max_shard_bytes: int
    final: bool
    num_tokens: int
    file_size: int
    digest: bytes
    index: np.ndarray
    sections: dict[tuple[int, int], tuple[int, int]]  # (kind, model) -> (offset, nbytes)
    mm: mmap.mmap | None = field(repr=False, default=None)
    words: np.ndarray | None = field(repr=False, default=None)

    @property
    def name(self) -> str:
        """The shard's file name."""
        return self.path.name

    @property
    def sha256(self) -> str:
        """Hex SHA-256 of the shard's bytes before its footer, as stored in the footer."""
        return self.digest.hex()

    @property
    def num_samples(self) -> int:
        """Samples in the shard."""
        return int(self.index.size)

    def summary(self) -> dict[str, Any]:
        """JSON-able description (file, rank, seq, bytes, sha256, samples, tokens)."""
        return {
            "file": self.name,
            "rank": self.rank,
            "seq": self.seq,
            "bytes": self.file_size,
            "sha256": self.sha256,
            "num_samples": self.num_samples,
            "num_tokens": self.num_tokens,
        }

    def array(self, kind: int, model: int, dtype: np.dtype, start: int, count: int) -> np.ndarray:
        """Zero-copy read-only view of ``count`` elements from element ``start`` of a section."""
        offset, _ = self.sections[(kind, model)]
        return np.frombuffer(self.mm, dtype, count=count, offset=offset + start * dtype.itemsize)

    def close(self) -> None:
        """Unmap the file; views handed out keep it alive until they are gone."""
        self.words = None
        if self.mm is not None:
            try:
                self.mm.close()
            except BufferError:
                pass  # arrays still reference the mapping; it closes when they are freed
            self.mm = None

    @classmethod
    def open(cls, path: str | os.PathLike, *, verify: bool = True) -> ShardFile:
        """Map and check a shard: magic, version, size (truncation), footer, SHA-256 (with
        ``verify``), schema, section bounds and index. Errors name the file, and the sample
        where one is at fault."""
        path = Path(path)
        size = path.stat().st_size if path.exists() else -1
        if size < 0:
            raise CacheError(f"{path}: shard file not found")
        if size < HEADER.size:
            raise CacheError(
                f"{path}: truncated shard: {size} bytes, shorter than the {HEADER.size}-byte header"
            )
        with open(path, "rb") as f:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            return cls._parse(path, mm, size, verify)
        except BaseException:
            mm.close()
            raise

    @classmethod
    def _parse(cls, path: Path, mm: mmap.mmap, size: int, verify: bool) -> ShardFile:
        (
            magic,
            version,
            hsize,
            fsize,
            vocab,
            k,
            vcode,
            bits,
            nsec,
            rank,
            seq,
            nsamp,
            slen,
            ntok,
        ) = HEADER.unpack_from(mm, 0)
        if magic != MAGIC:
            raise CacheError(
                f"{path}: not a teacher-cache shard (magic {magic!r}, expected {MAGIC!r})"
            )
        if version != FORMAT_VERSION:
            raise CacheError(
                f"{path}: format version {version}, this code reads version {FORMAT_VERSION}; "
                "rebuild the cache"
            )
        if size != fsize:
            what = (
                f"truncated shard: {size} bytes of {fsize}"
                if size < fsize
                else f"{size - fsize} unexpected bytes after the {fsize}-byte shard"
            )
            raise CacheError(f"{path}: {what}; delete it and rerun its writer (rank {rank})")
        digest, fsize2, end = FOOTER.unpack_from(mm, size - FOOTER.size)
        if end != END_MAGIC or fsize2 != fsize:
            raise CacheError(
                f"{path}: damaged footer (end magic {end!r}, size {fsize2}); delete it and rerun "
                f"its writer (rank {rank})"
            )
        if verify:
            body = memoryview(mm)[: size - FOOTER.size]
            try:
                actual = hashlib.sha256(body).digest()
            finally:
                body.release()
            if actual != digest:
                raise CacheError(
                    f"{path}: checksum mismatch (stored sha256 {digest.hex()[:16]}..., computed "
                    f"{actual.hex()[:16]}...): corrupt bytes; delete it and rerun its writer (rank "
                    f"{rank})"
                )
        if vcode not in VALUE_DTYPE_BY_CODE:
            raise CacheError(f"{path}: unknown value dtype code {vcode}")
        schema_at = HEADER.size + SECTION_DTYPE.itemsize * nsec
        if schema_at + slen > hsize or hsize > size - FOOTER.size:
            raise CacheError(
                f"{path}: header of {hsize} bytes cannot hold {nsec} sections and a {slen}-byte "
                "schema"
            )
        try:
            schema = json.loads(bytes(mm[schema_at : schema_at + slen]))
            layout = CacheLayout(
                vocab_size=int(vocab),
                k=int(k),
                value_dtype=VALUE_DTYPE_BY_CODE[vcode],
                sampled=tuple(schema["sampled"]),
                teachers=tuple(schema["teachers"]),
                ref_teachers=tuple(schema["ref_teachers"]),
            )
        except (ValueError, KeyError, TypeError) as e:
            raise CacheError(f"{path}: unreadable shard schema ({e})") from e
        if layout.bits_per_id != bits:
            raise CacheError(
                f"{path}: header says {bits} bits per id, vocab_size {vocab} needs "
                f"{layout.bits_per_id}"
            )
        table = np.frombuffer(mm, SECTION_DTYPE, count=nsec, offset=HEADER.size)
        expected = layout.sections()
        found = [(int(s["kind"]), int(s["dtype"]), int(s["model"])) for s in table]
        if found != expected or hsize != header_size(layout, slen):
            raise CacheError(
                f"{path}: section table {found} does not match the schema's {expected}"
            )
        body_end = size - FOOTER.size
        sections: dict[tuple[int, int], tuple[int, int]] = {}
        for s in table:
            off, nb = int(s["offset"]), int(s["nbytes"])
            if off % ALIGN or off < hsize or off + nb > body_end:
                raise CacheError(
                    f"{path}: section (kind {int(s['kind'])}, model {int(s['model'])}) at [{off}, "
                    f"{off + nb}) lies outside the shard body"
                )
            sections[(int(s["kind"]), int(s["model"]))] = (off, nb)
        ioff, inb = sections[(KIND_INDEX, 0)]
        if inb != nsamp * INDEX_DTYPE.itemsize:
            raise CacheError(f"{path}: index holds {inb} bytes for {nsamp} samples")
        index = np.frombuffer(mm, INDEX_DTYPE, count=nsamp, offset=ioff)
        shard = cls(
            path=path,
            rank=int(rank),
            seq=int(seq),
            layout=layout,
            max_shard_bytes=int(schema.get("max_shard_bytes", 0)),
            final=bool(schema.get("final", 0)),
            num_tokens=int(ntok),
            file_size=int(fsize),
            digest=digest,
            index=index,
            sections=sections,
            mm=mm,
            words=unaligned_u64_view(mm),
        )
        shard._check_index()
        return shard

    def _check_index(self) -> None:
        lay, idx = self.layout, self.index
        counts = idx["token_count"].astype(np.int64)
        tok_off = np.concatenate([[0], np.cumsum(counts)])
        ids_len = lay.ids_nbytes_array(counts)
        ids_off = np.concatenate([[0], np.cumsum(ids_len)])
        bad = np.flatnonzero(
            (idx["token_offset"].astype(np.int64) != tok_off[:-1])
            | (idx["ids_offset"].astype(np.int64) != ids_off[:-1])
        )
        if bad.size:
            raise CacheError(
                f"{self.path}: index entry of sample {int(idx['sample_id'][bad[0]])} has "
                "inconsistent offsets"
            )
        if int(tok_off[-1]) != self.num_tokens:
            raise CacheError(
                f"{self.path}: index counts {int(tok_off[-1])} tokens, header says "
                f"{self.num_tokens}"
            )
        if np.unique(idx["sample_id"]).size != idx.size:
            raise CacheError(f"{self.path}: a sample id appears twice in the index")
        for (kind, model), (_, nb) in self.sections.items():
            if kind != KIND_INDEX and nb != lay.section_nbytes(
                kind, self.num_tokens, int(ids_off[-1])
            ):
                raise CacheError(
                    f"{self.path}: section (kind {kind}, model {model}) holds {nb} bytes, the "
                    f"index implies {lay.section_nbytes(kind, self.num_tokens, int(ids_off[-1]))}"
                )
