"""Pure numpy codec of the teacher cache: bit-packed token ids and quantised log-probs.

Ids are packed into an LSB-first bit stream: id ``i`` occupies bits ``[i*b, (i+1)*b)`` of
the stream, bit ``j`` of the stream being bit ``j % 8`` of byte ``j // 8``, with
``b = bits_per_id(vocab_size) = ceil(log2(vocab_size))``. That is exact for every
vocabulary (Qwen's 151,936 needs 18 bits; 17-bit packing breaks above 131,072).

Log-probs are clamped to ``[LOGPROB_FLOOR, 0]`` (``-inf`` becomes the floor) and stored as
fp16, bf16 (round to nearest even, as raw ``uint16``) or fp32. NaN, ``+inf`` and values
above ``POSITIVE_TOLERANCE`` are refused: they are never log-probs.

No torch, no I/O: every function here is a function of numpy arrays.
"""

from __future__ import annotations

import threading

import numpy as np

LOGPROB_FLOOR = -8192.0
"""Smallest stored log-prob: ``-2**13``, exact in fp16, bf16 and fp32; ``exp`` of it is 0."""

POSITIVE_TOLERANCE = 1e-2
"""Log-probs in ``(0, POSITIVE_TOLERANCE]`` (rounding noise) are stored as 0; larger ones
are an error (logits passed where log-probs were meant, most likely)."""

MAX_BITS_PER_ID = 57
"""The decoder reads one unaligned 64-bit word per id, shifted by up to 7 bits."""

VALUE_DTYPES: dict[str, tuple[int, np.dtype]] = {
    # name: (code in the shard header, storage dtype)
    "fp16": (1, np.dtype("<f2")),
    "bf16": (2, np.dtype("<u2")),
    "fp32": (3, np.dtype("<f4")),
}
VALUE_DTYPE_BY_CODE: dict[int, str] = {code: name for name, (code, _) in VALUE_DTYPES.items()}

_CHUNK = 1 << 18  # ids per vectorised step; a multiple of 8, so chunks start on a byte


def bits_per_id(vocab_size: int) -> int:
    """``ceil(log2(vocab_size))`` (at least 1): the bits that hold any id in ``[0, vocab_size)``."""
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
    bits = max(1, (int(vocab_size) - 1).bit_length())
    if bits > MAX_BITS_PER_ID:
        raise ValueError(
            f"vocab_size {vocab_size} needs {bits} bits per id; at most {MAX_BITS_PER_ID} supported"
        )
    return bits


def packed_nbytes(n: int, bits: int) -> int:
    """Bytes of the bit stream holding ``n`` ids of ``bits`` bits (unpadded)."""
    return (n * bits + 7) // 8


def pack_ids(
    ids: np.ndarray, bits: int, *, check: bool = True, out: np.ndarray | None = None
) -> np.ndarray:
    """Pack integer ids (any shape, C order) into an LSB-first bit stream of ``bits`` bits each.

    Returns a ``uint8`` array of ``packed_nbytes(ids.size, bits)`` bytes, written into the
    start of ``out`` when given (a ``uint8`` array at least that long; bytes past the stream
    are left as they are). With ``check``, ids outside ``[0, 2**bits)`` raise ``ValueError``
    (they would corrupt their neighbours).
    """
    flat = np.asarray(ids).reshape(-1)
    if flat.dtype.kind not in "iu":
        raise ValueError(f"ids must be integers, got dtype {flat.dtype}")
    if not 1 <= bits <= MAX_BITS_PER_ID:
        raise ValueError(f"bits must be in [1, {MAX_BITS_PER_ID}], got {bits}")
    n = flat.size
    if check and n:
        lo, hi = int(flat.min()), int(flat.max())
        if lo < 0 or hi >= (1 << bits):
            raise ValueError(
                f"ids must be in [0, {1 << bits}) for {bits}-bit packing, got range [{lo}, {hi}]"
            )
    total = packed_nbytes(n, bits)
    if out is None:
        out = np.empty(total, np.uint8)
    elif out.dtype != np.uint8 or out.ndim != 1 or out.size < total:
        raise ValueError(f"out must be a 1-D uint8 array of at least {total} bytes")
    # 8 ids fill exactly `bits` bytes; each group of 8 is assembled in a few 64-bit words
    words = (8 * bits + 63) // 64 + 1
    plan = [((j * bits) >> 6, (j * bits) & 63) for j in range(8)]
    u64 = np.uint64
    for start in range(0, n, _CHUNK):
        chunk = flat[start : start + _CHUNK]
        m = -(-chunk.size // 8)
        vals = _scratch("pack_vals", m * 8)
        vals[: chunk.size] = chunk
        vals[chunk.size :] = 0
        vals = vals.reshape(m, 8)
        acc = _scratch("pack_acc", m * words).reshape(m, words)
        acc[...] = 0
        for j, (w, s) in enumerate(plan):
            col = vals[:, j]
            acc[:, w] |= col << u64(s)
            if s + bits > 64:
                acc[:, w + 1] |= col >> u64(64 - s)
        b0 = start // 8 * bits
        nb = min(m * bits, total - b0)
        out[b0 : b0 + nb] = acc.view(np.uint8).reshape(m, words * 8)[:, :bits].reshape(-1)[:nb]
    return out[:total]


_local = threading.local()


def _scratch(name: str, n: int) -> np.ndarray:
    """A per-thread ``uint64`` work array of ``n`` elements, reused across calls: fresh large
    allocations cost a page fault per 4 KiB on first touch, which dominated packing time.
    At most one chunk's worth (a few MiB) per name and thread."""
    buf = getattr(_local, name, None)
    if buf is None or buf.size < n:
        buf = np.empty(n, np.uint64)
        setattr(_local, name, buf)
    return buf[:n]


_tables: dict[int, tuple[np.ndarray, np.ndarray]] = {}
_tables_lock = threading.Lock()


def _gather_table(bits: int) -> tuple[np.ndarray, np.ndarray]:
    """(byte offset, bit shift) of ids ``0.._CHUNK-1``; built once per width, then read-only."""
    table = _tables.get(bits)
    if table is None:
        with _tables_lock:
            table = _tables.get(bits)
            if table is None:
                pos = np.arange(_CHUNK, dtype=np.uint64) * np.uint64(bits)
                table = ((pos >> np.uint64(3)).astype(np.intp), pos & np.uint64(7))
                _tables[bits] = table
    return table


def unaligned_u64_view(buf) -> np.ndarray:
    """A read-only ``uint64`` view of a byte buffer with a stride of one byte: element ``i`` is
    the little-endian word starting at byte ``i``. Zero-copy over bytes, mmap or numpy."""
    arr = np.frombuffer(buf, np.uint8)
    return np.ndarray((max(arr.size - 7, 0),), dtype="<u8", buffer=arr, strides=(1,))


def unpack_ids_from_words(words: np.ndarray, byte_offset: int, n: int, bits: int) -> np.ndarray:
    """Decode ``n`` ids starting at ``byte_offset`` of the buffer behind ``words`` (an
    :func:`unaligned_u64_view`). The buffer must extend at least 7 bytes past the last byte
    of the stream (the shard footer guarantees it). Returns a new ``int64`` array."""
    out = np.empty(n, np.uint64)
    if n == 0:
        return out.view(np.int64)
    last = byte_offset + (((n - 1) * bits) >> 3)
    if byte_offset < 0 or last >= words.size:
        raise ValueError(
            f"packed ids [{byte_offset}, {last + 8}) run past the {words.size + 7}-byte buffer"
        )
    offsets, shifts = _gather_table(bits)
    mask = np.uint64((1 << bits) - 1)
    for start in range(0, n, _CHUNK):
        m = min(_CHUNK, n - start)
        dst = out[start : start + m]
        base = byte_offset + start // 8 * bits
        # take() would copy a non-contiguous source whole: copy only this chunk's words
        count = (((m - 1) * bits) >> 3) + 1
        src = _scratch("unpack_src", count)
        np.copyto(src, words[base : base + count])
        np.take(src, offsets[:m], out=dst)
        dst >>= shifts[:m]
        dst &= mask
    return out.view(np.int64)


def unpack_ids(packed, n: int, bits: int) -> np.ndarray:
    """Inverse of :func:`pack_ids`: ``n`` ids (``int64``, flat) from a bit stream
    (bytes-like or ``uint8`` array). Copies the stream once if it lacks 7 bytes of slack."""
    raw = (
        np.frombuffer(packed, np.uint8)
        if not isinstance(packed, np.ndarray)
        else packed.reshape(-1)
    )
    need = packed_nbytes(n, bits)
    if raw.size < need:
        raise ValueError(f"packed stream has {raw.size} bytes, {n} ids of {bits} bits need {need}")
    if raw.size < need + 8:
        padded = np.zeros(need + 8, np.uint8)
        padded[:need] = raw[:need]
        raw = padded
    return unpack_ids_from_words(unaligned_u64_view(raw), 0, n, bits)


def _bad_value_message(x: np.ndarray, bad: np.ndarray, what: str) -> str:
    pos = np.unravel_index(int(np.flatnonzero(bad.reshape(-1))[0]), x.shape)
    where = tuple(int(p) for p in pos)
    return f"{int(bad.sum())} {what} value(s), first {x[pos]!r} at position {where}"


def _clamped(x, out_dtype: str) -> np.ndarray:
    """``x`` rounded to float32, checked, clamped to ``[LOGPROB_FLOOR, 0]`` and cast to
    ``out_dtype`` in one pass, into a new array (never a view of the caller's)."""
    x32 = np.asarray(x, dtype=np.float32)
    if x32.size:
        top = float(x32.max())  # NaN propagates through max: one pass checks both
        if np.isnan(top):
            raise ValueError(
                "log-probs contain NaN: " + _bad_value_message(x32, np.isnan(x32), "NaN")
            )
        if top > POSITIVE_TOLERANCE:
            raise ValueError(
                "log-probs must be <= 0: "
                + _bad_value_message(x32, x32 > POSITIVE_TOLERANCE, "positive")
                + " (logits instead of log-probs?)"
            )
    return np.clip(x32, LOGPROB_FLOOR, 0.0, out=np.empty(x32.shape, out_dtype), casting="same_kind")


def clamp_logprobs(x) -> np.ndarray:
    """Float32 copy of ``x`` clamped to ``[LOGPROB_FLOOR, 0]``; ``-inf`` becomes the floor.

    Raises ``ValueError`` on NaN, ``+inf`` or a value above ``POSITIVE_TOLERANCE``, naming
    the first offending position.
    """
    return _clamped(x, "<f4")


def float32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """Round finite float32 values to bfloat16 (nearest, ties to even); raw ``uint16`` bits."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = u + (np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1)))
    return (rounded >> np.uint32(16)).astype(np.uint16)


def bf16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """Exact float32 values of raw bfloat16 bits (a new array)."""
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)


def encode_logprobs(x, value_dtype: str) -> np.ndarray:
    """Clamp (:func:`clamp_logprobs`) and quantise log-probs to their storage dtype
    (``float16``, ``uint16`` bf16 bits, or ``float32``), same shape, little-endian."""
    if value_dtype not in VALUE_DTYPES:
        raise ValueError(f"value_dtype must be one of {sorted(VALUE_DTYPES)}, got {value_dtype!r}")
    if value_dtype == "fp16":
        return _clamped(x, "<f2")
    x32 = _clamped(x, "<f4")
    return float32_to_bf16_bits(x32) if value_dtype == "bf16" else x32


def decode_logprobs(stored: np.ndarray, value_dtype: str) -> np.ndarray:
    """Readable values of a stored array: fp16 and fp32 as they are (no copy), bf16 bits
    as exact float32 (a copy, since numpy has no bfloat16)."""
    if value_dtype == "bf16":
        return bf16_bits_to_float32(stored)
    return stored


def quantize_reference(x, value_dtype: str) -> np.ndarray:
    """What a round trip through the cache returns for ``x``, as float32 (for tests and
    callers that want to know the stored value without writing it)."""
    stored = encode_logprobs(x, value_dtype)
    return np.asarray(decode_logprobs(stored, value_dtype), dtype=np.float32)
