"""Bit-packing of ids and quantisation of log-probs: exactness and clamping."""

from __future__ import annotations

import numpy as np
import pytest

from erpd_megatron.cache import LOGPROB_FLOOR, bits_per_id, encode_logprobs, pack_ids, unpack_ids
from erpd_megatron.cache.codec import decode_logprobs, quantize_reference


def reference_pack(ids: np.ndarray, bits: int) -> np.ndarray:
    """The documented bit order, written the slow obvious way: bit j of id i is stream bit
    i*bits + j, stream bit s is bit s % 8 of byte s // 8."""
    bitmat = (
        (ids.astype(np.uint64)[:, None] >> np.arange(bits, dtype=np.uint64)) & np.uint64(1)
    ).astype(np.uint8)
    return np.packbits(bitmat.reshape(-1), bitorder="little")


@pytest.mark.parametrize(
    "vocab,bits",
    [
        (1, 1),
        (2, 1),
        (3, 2),
        (7, 3),
        (8, 3),
        (9, 4),
        (131072, 17),
        (131073, 18),
        (151936, 18),
        (262144, 18),
        (262145, 19),
        (1 << 32, 32),
    ],
)
def test_bits_per_id_is_ceil_log2(vocab: int, bits: int) -> None:
    assert bits_per_id(vocab) == bits


@pytest.mark.parametrize("bits", [1, 2, 3, 7, 8, 13, 17, 18, 19, 24, 25, 31, 32, 33, 47, 57])
@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 63, 64, 65, 1000])
def test_pack_matches_reference_and_round_trips(bits: int, n: int) -> None:
    rng = np.random.default_rng(bits * 1000 + n)
    ids = rng.integers(0, 1 << bits, size=n, dtype=np.int64)
    if n:
        ids[0] = (1 << bits) - 1  # all ones, to catch a bit leaking into a neighbour
    packed = pack_ids(ids, bits)
    assert packed.dtype == np.uint8 and packed.size == (n * bits + 7) // 8
    assert np.array_equal(packed, reference_pack(ids, bits))
    out = unpack_ids(packed, n, bits)
    assert out.dtype == np.int64 and np.array_equal(out, ids)


def test_round_trip_large_chunked_stream() -> None:
    """More ids than one vectorised chunk (2**18), ids above 2**17 (where 17-bit packing breaks)."""
    rng = np.random.default_rng(0)
    ids = rng.integers(131072, 262144, size=(1 << 18) * 2 + 13, dtype=np.int64)
    assert np.array_equal(unpack_ids(pack_ids(ids, 18), ids.size, 18), ids)


def test_pack_refuses_ids_that_do_not_fit() -> None:
    with pytest.raises(ValueError, match=r"\[0, 8\)"):
        pack_ids(np.array([0, 8]), 3)
    with pytest.raises(ValueError, match="integers"):
        pack_ids(np.array([0.5]), 3)


@pytest.mark.parametrize("value_dtype,np_dtype", [("fp16", np.float16), ("fp32", np.float32)])
def test_fp16_fp32_values_exact_to_dtype(value_dtype: str, np_dtype: type) -> None:
    x = -np.random.default_rng(1).exponential(5.0, size=10000).astype(np.float32)
    stored = encode_logprobs(x, value_dtype)
    assert np.array_equal(decode_logprobs(stored, value_dtype), x.astype(np_dtype))


def test_bf16_rounds_to_nearest_even_like_torch() -> None:
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(2)
    x = np.concatenate(
        [-rng.exponential(5.0, size=20000), -rng.uniform(0, 1e-3, size=1000)]
    ).astype(np.float32)
    x[:4] = [-1.00390625, -1.01171875, -3.0078125, -0.0]  # exact ties at bf16 precision
    got = decode_logprobs(encode_logprobs(x, "bf16"), "bf16")
    want = torch.from_numpy(x).to(torch.bfloat16).to(torch.float32).numpy()
    assert got.dtype == np.float32 and np.array_equal(got, want)


@pytest.mark.parametrize("value_dtype", ["fp16", "bf16", "fp32"])
def test_clamping_to_floor_and_zero(value_dtype: str) -> None:
    x = np.array(
        [-np.inf, -1e30, -1e5, -65504.0, LOGPROB_FLOOR, -8191.9, -1.5, -0.0, 0.0, 1e-6, 1e-2]
    )
    got = quantize_reference(x, value_dtype)
    assert not np.isnan(got).any()
    assert got.min() == LOGPROB_FLOOR and got.max() == 0.0
    assert np.all(got[:5] == LOGPROB_FLOOR)
    assert got[6] == -1.5 and np.all(got[7:] == 0.0)
    # the floor is exact in every dtype
    assert float(np.float16(LOGPROB_FLOOR)) == LOGPROB_FLOOR
    assert (
        decode_logprobs(encode_logprobs(np.array([LOGPROB_FLOOR]), "bf16"), "bf16")[0]
        == LOGPROB_FLOOR
    )


@pytest.mark.parametrize("bad,match", [(np.nan, "NaN"), (np.inf, "<= 0"), (5.0, "logits")])
def test_invalid_logprobs_are_refused(bad: float, match: str) -> None:
    x = np.full((3, 4), -1.0, np.float32)
    x[1, 2] = bad
    with pytest.raises(ValueError, match=match) as e:
        encode_logprobs(x, "fp16")
    assert "(1, 2)" in str(e.value)
