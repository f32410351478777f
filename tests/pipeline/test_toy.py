"""The embedded toy task: deterministic splits, a verifiable answer format, the base's data."""

from __future__ import annotations

import json

from erpd_megatron.pipeline import toy
from erpd_megatron.rollout.verifier import math_reward


def test_splits_are_deterministic_and_disjoint(tmp_path):
    a = toy.write_splits(tmp_path / "a", train=300, heldout=50, seed=7)
    b = toy.write_splits(tmp_path / "b", train=300, heldout=50, seed=7)
    assert a["train"].read_text() == b["train"].read_text()
    train = {json.loads(line)["problem"] for line in a["train"].read_text().splitlines()}
    held = {json.loads(line)["problem"] for line in a["heldout"].read_text().splitlines()}
    assert len(train) == 300 and len(held) == 50 and not train & held


def test_reference_solutions_are_correct_and_unboxed_ones_score_zero():
    for p in toy.make_problems(50, seed=1):
        assert math_reward(p.solution, str(p.answer)) == 1.0
        plain = toy.unboxed(p.solution)
        assert toy.BOXED not in plain and plain.endswith(f";{p.answer}")
        assert plain.rsplit(";", 1)[0] == p.solution.rsplit(";", 1)[0]  # same working
        assert math_reward(plain, str(p.answer)) == 0.0


def test_sft_records_follow_the_format_a_given_fraction_of_the_time(tmp_path):
    paths = toy.write_splits(tmp_path, train=1000, heldout=10, seed=0)
    tok = toy.build_tokenizer()
    recs = toy.sft_records(paths["train"], tok, unboxed_fraction=0.3, seed=5)
    plain = sum(toy.BOXED not in r.response_text for r in recs) / len(recs)
    assert 0.26 < plain < 0.34
    assert recs[0].response_token_ids[-1] == tok.eos_token_id
    assert tok.decode(recs[0].response_token_ids, skip_special_tokens=True) == recs[0].response_text
    again = toy.sft_records(paths["train"], tok, unboxed_fraction=0.3, seed=5)
    assert [r.response_text for r in again] == [r.response_text for r in recs]
    assert all(toy.BOXED in r.response_text for r in toy.sft_records(paths["train"], tok))
