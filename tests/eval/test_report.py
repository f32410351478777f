"""Report formatting and the row statistics, on synthetic numbers (no model)."""

from __future__ import annotations

import csv
import io
import json
import math

import numpy as np
import pytest

from erpd_megatron.eval import stats
from erpd_megatron.eval.report import format_csv, format_table, write_report


def synthetic_rows() -> list[dict]:
    common = {
        "dataset": "math500",
        "prompts": 100,
        "n": 4,
        "temperature": 1.0,
        "pass@1": 0.3,
        "pass@4": 0.5,
        "pass@8": None,
        "accuracy_se": 0.04,
        "finish_stop": 390,
        "finish_length": 10,
        "truncated_frac": 0.025,
        "response_tokens_mean": 31.5,
        "seconds": {"generate": 1.5},
    }
    return [
        {
            "model": "base",
            "is_base": True,
            "accuracy": 0.30,
            "kl_to_base": 0.0,
            "kl_to_base_se": 0.0,
            "entropy": 1.2,
            "drift_pos": 0.0,
            "drift_neg": 0.0,
            "acc_gain_per_nat": None,
            **common,
        },
        {
            "model": "teacher_e8",
            "is_base": False,
            "accuracy": 0.45,
            "kl_to_base": 12.0,
            "kl_to_base_se": 0.8,
            "entropy": 0.4,
            "drift_pos": 2.5,
            "drift_neg": -9.0,
            "acc_gain_per_nat": 0.0125,
            **common,
        },
        {
            "model": "student",
            "is_base": False,
            "accuracy": 0.47,
            "kl_to_base": 1.5,
            "kl_to_base_se": 0.1,
            "entropy": float("nan"),
            "drift_pos": 0.3,
            "drift_neg": None,
            "acc_gain_per_nat": 0.11333,
            **common,
        },
    ]


def test_format_table():
    md = format_table(synthetic_rows())
    lines = md.strip().splitlines()
    assert lines[0] == "#### math500: 100 prompts x 4 samples, temperature 1.0"
    header = lines[2]
    assert "avg@4" in header and "pass@1" in header and "pass@4" in header
    assert "pass@8" not in header  # not reported for any model (k > n)
    assert len(lines) == 4 + 3
    assert lines[4].startswith("| base | 0.3000 ± 0.0400 |") and "0 (base)" in lines[4]
    assert "12.0000 ± 0.8000" in lines[5] and "0.013" in lines[5] and "2.500 / -9.000" in lines[5]
    assert "| — |" in lines[6] and "0.300 / —" in lines[6]  # NaN entropy and None drift shown as —
    assert all(line.count("|") == header.count("|") for line in lines[2:])


def test_write_report_files(tmp_path):
    rows = synthetic_rows()
    paths = write_report(rows, tmp_path / "out", meta={"note": float("inf")})
    assert set(paths) == {"results_md", "results_csv", "results_json", "accuracy_vs_kl"}
    doc = json.loads(paths["results_json"].read_text())  # strict JSON: NaN/inf become null
    assert doc["rows"][2]["entropy"] is None and doc["meta"]["note"] is None
    parsed = list(csv.DictReader(io.StringIO(format_csv(rows))))
    assert parsed[1]["kl_to_base"] == "12.0" and parsed[0]["acc_gain_per_nat"] == ""
    assert parsed[0]["seconds_generate"] == "1.5"
    assert paths["accuracy_vs_kl"].stat().st_size > 15_000


def test_statistics():
    rewards = np.array([[1, 0, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]], dtype=float)
    acc = stats.accuracy_stats(rewards, [1, 2, 4, 8])
    assert acc["accuracy"] == pytest.approx(5 / 12)
    assert acc["accuracy_se"] == pytest.approx(np.std([0.25, 1.0, 0.0], ddof=1) / math.sqrt(3))
    assert acc["pass@1"] == pytest.approx(5 / 12)
    assert acc["pass@2"] == pytest.approx((0.5 + 1 + 0) / 3)  # 1 - C(3,2)/C(4,2) = 0.5
    assert acc["pass@4"] == pytest.approx(2 / 3) and acc["pass@8"] is None
    kl = stats.sequence_kl(
        [np.array([-1.0, -2.0]), np.array([-0.5])], [np.array([-1.5, -2.5]), np.array([-0.25])]
    )
    assert kl.tolist() == pytest.approx([1.0, -0.25])
    assert stats.kl_stats(kl, 3)["kl_to_base_per_token"] == pytest.approx(0.25)
    with pytest.raises(ValueError, match="sequence 0"):
        stats.sequence_kl([np.zeros(2)], [np.zeros(3)])
    assert stats.accuracy_per_nat(0.5, 0.3, 2.0, is_base=False) == pytest.approx(0.1)
    assert stats.accuracy_per_nat(0.5, 0.3, 2.0, is_base=True) is None
    assert stats.accuracy_per_nat(0.5, 0.3, 1e-5, is_base=False) is None
    assert stats.accuracy_per_nat(0.5, 0.3, None, is_base=False) is None
    d = stats.drift_stats(np.array([1.0, -3.0, 2.0]), np.array([1.0, 0.0, 1.0]))
    assert d == {"drift": 0.0, "drift_pos": 1.5, "drift_neg": -3.0}
    assert stats.finish_counts(["stop", "length", "stop"]) == {"length": 1, "stop": 2}
