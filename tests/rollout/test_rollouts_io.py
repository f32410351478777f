"""Rollout Parquet: writer/reader round trip, the checks on open, inspect and pass@k."""

from __future__ import annotations

import json
import math
from itertools import combinations

import numpy as np
import pyarrow.parquet as pq
import pytest

from erpd_megatron.data.rollouts import (
    COLUMNS,
    SCHEMA,
    RolloutDataError,
    RolloutRecord,
    RolloutSet,
    inspect_rollouts,
    pass_at_k,
    write_rollout_set,
)
from erpd_megatron.utils.files import with_self_digest


def make_records(num_prompts: int = 5, g: int = 4, seed: int = 0) -> list[RolloutRecord]:
    rng = np.random.default_rng(seed)
    out = []
    for p in range(num_prompts):
        prompt = rng.integers(0, 100, size=int(rng.integers(3, 9))).tolist()
        for j in range(g):
            n = int(rng.integers(1, 12))
            out.append(
                RolloutRecord(
                    sample_id=p * g + j,
                    prompt_id=100 + p,
                    group_index=p,
                    sample_index=j,
                    prompt_token_ids=prompt,
                    response_token_ids=rng.integers(0, 100, size=n).tolist(),
                    reward=float(rng.integers(0, 2)),
                    finish_reason="stop" if j % 2 else "length",
                    engine_logprobs=(-rng.random(n)).tolist(),
                    prompt_text=f"prompt {p}",
                    response_text=f"response {p}.{j}",
                    reference=str(p),
                )
            )
    return out


def test_round_trip(tmp_path):
    recs = make_records()
    rs = write_rollout_set(
        tmp_path / "r", recs, prompts_per_shard=2, manifest_extra={"engine": "test"}
    )
    assert len(rs.shard_paths) == 3 and rs.num_samples == 20 and rs.num_prompts == 5
    assert (
        rs.samples_per_prompt == 4 and len(rs.fingerprint) == 64 and rs.manifest["engine"] == "test"
    )
    assert pq.read_schema(rs.shard_paths[0]).remove_metadata().equals(SCHEMA)
    cols = rs.load()
    assert set(cols) == set(COLUMNS)
    assert cols["sample_id"].dtype == np.int64 and cols["reward"].dtype == np.float32
    assert cols["sample_id"].tolist() == list(range(20))
    for r, ids, lps in zip(recs, cols["response_token_ids"], cols["engine_logprobs"]):
        assert ids.dtype == np.int32 and lps.dtype == np.float32
        assert ids.tolist() == r.response_token_ids
        np.testing.assert_allclose(lps, r.engine_logprobs, rtol=1e-6)
    values, offsets = rs.load_packed("prompt_token_ids")
    assert (
        len(offsets) == 21 and values[offsets[5] : offsets[6]].tolist() == recs[5].prompt_token_ids
    )
    back = list(rs)
    assert [b.sample_id for b in back] == list(range(20))
    assert (
        back[7].response_text == recs[7].response_text
        and back[7].finish_reason == recs[7].finish_reason
    )
    # the fingerprint depends on content only: the same records give the same fingerprint
    rs2 = write_rollout_set(
        tmp_path / "r2", recs, prompts_per_shard=2, manifest_extra={"engine": "test"}
    )
    assert rs2.fingerprint == rs.fingerprint
    rs3 = write_rollout_set(tmp_path / "r3", make_records(seed=1), prompts_per_shard=2)
    assert rs3.fingerprint != rs.fingerprint


def test_writer_rejects_bad_records(tmp_path):
    recs = make_records(2, 2)
    with pytest.raises(RolloutDataError, match="appears twice"):
        write_rollout_set(tmp_path / "a", recs + [recs[0]])
    bad = make_records(1, 1)
    bad[0].engine_logprobs = bad[0].engine_logprobs + [0.0]
    with pytest.raises(RolloutDataError, match="log-probs"):
        write_rollout_set(tmp_path / "b", bad)
    bad = make_records(1, 1)
    bad[0].finish_reason = "abort"
    with pytest.raises(RolloutDataError, match="finish_reason"):
        write_rollout_set(tmp_path / "c", bad)
    write_rollout_set(tmp_path / "d", recs)
    with pytest.raises(RolloutDataError, match="already holds"):
        write_rollout_set(tmp_path / "d", recs)


def test_open_detects_missing_manifest_truncation_corruption_and_missing_columns(tmp_path):
    with pytest.raises(RolloutDataError, match="does not exist"):
        RolloutSet.open(tmp_path / "nothing")
    rs = write_rollout_set(tmp_path / "r", make_records(), prompts_per_shard=2)
    shard = rs.shard_paths[1]
    data = shard.read_bytes()
    # truncated shard: named, with the remedy
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(RolloutDataError, match=shard.name):
        RolloutSet.open(rs.directory)
    # same size, flipped byte: the hash check names the file
    flipped = bytearray(data)
    flipped[len(data) // 3] ^= 0xFF
    shard.write_bytes(bytes(flipped))
    with pytest.raises(RolloutDataError, match=f"{shard.name}.*(hash|Parquet|read)"):
        RolloutSet.open(rs.directory)
    shard.write_bytes(data)
    RolloutSet.open(rs.directory)
    # a shard without a required column
    table = pq.read_table(shard).drop_columns(["engine_logprobs"])
    pq.write_table(table, shard)
    manifest = json.loads((rs.directory / "manifest.json").read_text())
    manifest["shards"][1]["bytes"] = shard.stat().st_size
    (rs.directory / "manifest.json").write_text(json.dumps(manifest))
    # an edited manifest fails its self digest, naming the file and the repair
    with pytest.raises(RolloutDataError, match="manifest.json: content differs.*--finalize"):
        RolloutSet.open(rs.directory, verify=False)
    (rs.directory / "manifest.json").write_text(json.dumps(with_self_digest(manifest)))
    with pytest.raises(
        RolloutDataError, match=f"{shard.name}: missing columns \\['engine_logprobs'\\]"
    ):
        RolloutSet.open(rs.directory, verify=False)
    (rs.directory / "manifest.json").unlink()
    with pytest.raises(RolloutDataError, match="no manifest.json \\(3 shards present\\)"):
        RolloutSet.open(rs.directory)


def test_unknown_columns_are_an_error(tmp_path):
    rs = write_rollout_set(tmp_path / "r", make_records(1, 2))
    with pytest.raises(RolloutDataError, match="unknown columns"):
        rs.load(["rewards"])


def brute_pass_at_k(n: int, c: int, k: int) -> float:
    outcomes = [1] * c + [0] * (n - c)
    subsets = list(combinations(range(n), k))
    return sum(any(outcomes[i] for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize(
    "n,c,k",
    [(4, 0, 1), (4, 1, 1), (4, 1, 2), (4, 2, 2), (8, 3, 4), (8, 7, 2), (5, 5, 3), (6, 1, 6)],
)
def test_pass_at_k_is_the_unbiased_estimator(n, c, k):
    assert math.isclose(pass_at_k(n, c, k), brute_pass_at_k(n, c, k), rel_tol=1e-12)


def test_inspect_reports_accuracy_pass_at_k_lengths_and_finish_reasons(tmp_path):
    recs = make_records(4, 4)
    for r in recs:  # group 0 all correct, group 1 all wrong, groups 2-3 one correct each
        r.reward = (
            1.0 if r.group_index == 0 or (r.group_index >= 2 and r.sample_index == 0) else 0.0
        )
    write_rollout_set(tmp_path / "r", recs, manifest_extra={"engine": "hf", "model_path": "/m"})
    text = inspect_rollouts(tmp_path / "r")
    assert "samples 16 = 4 prompts x 4" in text
    assert "accuracy 0.3750" in text
    assert f"k=1: {np.mean([1, 0, 0.25, 0.25]):.4f}" in text
    assert f"k=2: {np.mean([1, 0, 0.5, 0.5]):.4f}" in text and "k=4: 0.7500" in text
    assert "all-correct 1 (25%), all-wrong 1 (25%), mixed 2 (50%)" in text
    assert "finish   length 8 (50.0%), stop 8 (50.0%)" in text
    assert "prompt tokens" in text and "response tokens" in text and "engine: hf" in text
