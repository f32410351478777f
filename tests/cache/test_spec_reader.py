"""An independent reader written from docs/cache_format.md alone (struct, json, hashlib; no
numpy, no erpd code) must read what the writer wrote: the document is the format."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import numpy as np

from erpd_megatron.cache import TeacherCache
from tests.cache.helpers import build_cache


def bf16_to_float(bits: int) -> float:
    return struct.unpack("<f", struct.pack("<I", bits << 16))[0]


def read_by_the_doc(cache_dir: Path) -> dict[int, dict]:
    manifest = json.loads((cache_dir / "manifest.json").read_text())
    assert manifest["format_version"] == 1
    out = {}
    for entry in manifest["shards"]:
        data = (cache_dir / entry["file"]).read_bytes()
        (
            magic,
            version,
            header_size,
            file_size,
            vocab,
            k,
            vdtype,
            b,
            nsec,
            rank,
            seq,
            nsamp,
            slen,
            ntok,
        ) = struct.unpack_from("<8sIIQQIBBHIIIIQ", data, 0)
        assert magic == b"ERPDCACH" and version == 1 and file_size == len(data)
        digest, size2, end = struct.unpack_from("<32sQ8s", data, file_size - 48)
        assert end == b"ERPDEND\x00" and size2 == file_size
        assert hashlib.sha256(data[: file_size - 48]).hexdigest() == digest.hex() == entry["sha256"]
        schema = json.loads(data[64 + 32 * nsec : 64 + 32 * nsec + slen])
        sections = {}
        for s in range(nsec):
            kind, dtype, _, model, offset, nbytes, _ = struct.unpack_from(
                "<BBHIQQQ", data, 64 + 32 * s
            )
            assert offset % 64 == 0
            sections[(kind, model)] = (offset, dtype)
        assert b == max(1, (vocab - 1).bit_length())
        fmt, size = {1: ("e", 2), 2: ("H", 2), 3: ("f", 4)}[vdtype]
        for row in range(nsamp):
            sid, tok_off, count, ids_off = struct.unpack_from(
                "<qQQQ", data, sections[(1, 0)][0] + 32 * row
            )
            rec = {"sampled": {}, "ids": {}, "lps": {}}
            for i, name in enumerate(schema["sampled"]):
                rec["sampled"][name] = list(
                    struct.unpack_from(f"<{count}f", data, sections[(2, i)][0] + 4 * tok_off)
                )
            for t, name in enumerate(schema["teachers"]):
                vals = struct.unpack_from(
                    f"<{count * k}{fmt}", data, sections[(3, t)][0] + size * k * tok_off
                )
                rec["lps"][name] = [bf16_to_float(v) for v in vals] if vdtype == 2 else list(vals)
                stream = sections[(5, t)][0] + ids_off
                ids = []
                for i in range(count * k):
                    bit = i * b
                    (w,) = struct.unpack_from("<Q", data, stream + (bit >> 3))
                    ids.append((w >> (bit & 7)) & ((1 << b) - 1))
                rec["ids"][name] = ids
            out[sid] = rec
    return out


def test_independent_reader_agrees(tmp_path: Path) -> None:
    for vd in ("fp16", "bf16"):
        d = tmp_path / vd
        build_cache(
            d,
            list(range(8)),
            world_size=2,
            vocab_size=262144,
            k=3,
            value_dtype=vd,
            id_low=131072,
            max_shard_bytes=3000,
        )
        theirs = read_by_the_doc(d)
        cache = TeacherCache.open(d)
        assert sorted(theirs) == sorted(cache.sample_ids)
        for sid, rec in theirs.items():
            ours = cache.get(sid)
            for name, vals in rec["sampled"].items():
                assert vals == ours.sampled[name].tolist()
            for name in cache.teachers:
                assert rec["ids"][name] == ours.topk_ids[name].reshape(-1).tolist()
                assert np.array_equal(
                    np.array(rec["lps"][name], np.float32),
                    np.asarray(ours.topk_logprobs[name], np.float32).reshape(-1),
                )
