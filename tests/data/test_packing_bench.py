"""benchmarks/bench_packing.py's pure parts: the proxy model keeps Qwen3-4B's cost shares at
the scaled lengths, and the multiply-add ceiling of packing against the padded arms, computed
on the micro-batches the benchmark runs."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import bench_packing as bp  # noqa: E402

from erpd_megatron.config import load_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def _cfg(scale: float, kind: str = "qwen3-4b", extra: tuple[str, ...] = ()):
    overrides = bp.proxy_model(scale, kind) + [
        "model.max_position_embeddings=4096",
        "data.max_seq_length=4096",
        *extra,
    ]
    return load_config(ROOT / "configs/recipes/tiny-cpu.yaml", overrides)


@pytest.mark.parametrize("scale", [1 / 32, 1 / 16])
def test_proxy_keeps_reference_cost_shares(scale: float) -> None:
    m = _cfg(scale).model
    ref_model = bp.reference_model()
    assert ref_model.hidden_size == 2560 and ref_model.vocab_size == 151936
    assert m.hidden_size == round(2560 * scale)
    for q in (1, 8):  # the median and the p99 length
        ref = bp.cost_shares(ref_model, 2048 * q)
        got = bp.cost_shares(m, 2048 * scale * q)
        assert got == pytest.approx(ref, rel=0.08), (q, got, ref)
    legacy = bp.cost_shares(_cfg(scale, "legacy").model, 2048 * scale)
    assert legacy[1] > 0.5  # the former model: the vocabulary projection dominates


def _ceiling(lengths, batches, budget: int) -> dict[str, float]:
    extra = (f"data.max_tokens_per_microbatch={budget}",)
    cfg = _cfg(1 / 32, extra=extra)
    cfg_pack = _cfg(1 / 32, extra=extra + ("data.packing=true",))
    table = bp.random_table(np.asarray(lengths), cfg.model.vocab_size)
    plans = bp.build_plans(cfg, cfg_pack, table, batches, budget)
    return bp.flop_ceiling(cfg.model, plans)


def test_flop_ceiling() -> None:
    m = _cfg(1 / 32).model
    # equal lengths fill padded micro-batches exactly: nothing to gain
    got = _ceiling(np.full(12, 50), [np.arange(12)], 200)
    assert got == pytest.approx({"unsorted": 1.0, "padded": 1.0})
    # one long and three short rows in arrival order: padded pays 4 x 100 tokens and 4 x 100^2
    # attention, packed 100 + 3 x 10 tokens and 100^2 + 3 x 10^2 (one row of 130)
    ratio = bp.cost_shares(m, 1.0)[0] * (1 - bp.cost_shares(m, 1.0)[1])
    got = _ceiling(np.array([10, 100, 10, 10]), [np.arange(4)], 400)
    want = (400 * (1 + 100 * ratio)) / (100 * (1 + 100 * ratio) + 30 * (1 + 10 * ratio))
    assert got["unsorted"] == pytest.approx(want)
    # sorted, the four rows still fit one micro-batch of 4 x 100: the same padding
    assert got["padded"] == pytest.approx(want)
    # at the bench's lengths and default budget: the documented ceilings
    lengths = bp.lognormal_lengths(192, 1 / 32)
    order = np.random.default_rng(2).permutation(192)
    got = _ceiling(lengths, [order[i : i + 64] for i in range(0, 192, 64)], 1024)
    assert got["unsorted"] == pytest.approx(2.040, abs=0.01)
