"""The trainer's data-parallel edge cases, for real on 2 gloo processes: a last global batch
of one row (DP rank 1 has no rows: it must still run the schedule, with a zero-loss dummy
micro-batch, instead of leaving rank 0 waiting in the gradient reduction), equal micro-batch
counts on every DP rank, DP=2 weights equal to DP=1 after the same steps, and the NaN guard
(a skipped step's non-finite sums stay out of the epoch metrics)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.dist import run_gloo
from tests.train import dp_edge_workers as w


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dp_edges")
    print(f"data seed {w.DATA_SEED}")
    # before the fix rank 0 waited forever in the DP gradient all-reduce: a timeout, not a hang
    ranks = run_gloo(w.dp2_then_dp1, 2, str(tmp), timeout=240)
    return tmp, ranks


def test_short_last_batch_finishes_with_equal_micro_batch_counts(results):
    _, (r0, r1) = results
    a, b = r0["dp2"], r1["dp2"]
    assert a["batch_sizes"] == [4, 4, 4, 1]
    assert (a["rows"][-1], b["rows"][-1]) == (1, 0)  # rank 1 has no row of the last batch
    assert a["counts"] == b["counts"] and all(c >= 1 for c in a["counts"])
    assert a["steps"] == b["steps"] == 4


def test_dp2_weights_equal_dp1_after_the_same_steps(results):
    _, (r0, r1) = results
    two, one = r0["dp2"]["weights"], r0["dp1"]["weights"]
    assert two.keys() == one.keys()
    assert r0["dp2"]["moved"] > 1e-3 and r0["dp1"]["moved"] > 1e-3  # 3 applied Adam steps
    worst = max(float(np.abs(two[k] - one[k]).max()) for k in two)
    print(f"max |w_dp2 - w_dp1| = {worst:.3g}")
    for k in two:
        assert np.array_equal(two[k], r1["dp2"]["weights"][k]), k  # DP replicas identical
        np.testing.assert_allclose(two[k], one[k], rtol=1e-5, atol=1e-6, err_msg=k)
    assert r0["dp1"]["steps"] == 4


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.parametrize("run", ["dp1", "dp2"])
def test_skipped_step_not_averaged_into_epoch_metrics(results, run):
    tmp, (r0, _) = results
    assert r0[run]["skipped"] == 1
    recs = _records(tmp / run / "stage1_metrics.jsonl")
    steps = [r for r in recs if "stage1/loss" in r]
    epoch = [r for r in recs if "stage1/epoch/loss" in r]
    assert len(steps) == 4 and len(epoch) == 1
    applied = [r for r in steps if r["stage1/update_applied"] == 1]
    skipped = [r for r in steps if r["stage1/update_applied"] == 0]
    assert len(applied) == 3 and len(skipped) == 1 and not w.finite(skipped[0]["stage1/loss"])
    tokens = sum(r["stage1/tokens"] for r in applied)
    want = sum(r["stage1/loss"] * r["stage1/tokens"] for r in applied) / tokens
    got = epoch[0]
    assert w.finite(got["stage1/epoch/loss"])
    assert got["stage1/epoch/loss"] == pytest.approx(want, rel=1e-9, abs=1e-12)
    assert got["stage1/epoch/tokens"] == tokens
