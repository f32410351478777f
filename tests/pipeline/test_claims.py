"""The claims' statistics and PASS/FAIL logic on a stored tiny result set (synthetic numbers
made by hand, tests/pipeline/data/claims_tiny.json): no megatron, no training."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest

from erpd_megatron.pipeline import claims

DATA = Path(__file__).parent / "data" / "claims_tiny.json"


@pytest.fixture()
def tiny():
    doc = json.loads(DATA.read_text())
    return doc["records"], doc["roles"]


def _stat(result: dict, claim: str, name: str) -> dict:
    return next(s for s in result["claims"][claim]["stats"] if s["name"] == name)


def test_mean_se_and_verdicts():
    s = claims.mean_se([0.01, -0.01, 0.0])
    assert s["mean"] == pytest.approx(0.0) and s["n"] == 3
    assert s["se"] == pytest.approx(0.01 / math.sqrt(3))
    assert claims.verdict(s, lower=-0.03) == "PASS"  # -0.0115 > -0.03
    assert claims.verdict(s, lower=0.0) == "FAIL"
    assert claims.verdict(claims.mean_se([0.5]), lower=0.0) == "n/a"  # one seed: no SE
    assert claims.verdict(claims.mean_se([]), lower=0.0) == "n/a"
    assert claims.all_of(["PASS", "n/a"]) == "n/a" and claims.all_of(["PASS", "FAIL"]) == "FAIL"


def test_paired_se_uses_prompts_when_present():
    a = {"prompt_accuracy": [0.5, 0.25, 1.0, 0.0], "accuracy_se": 0.2}
    b = {"prompt_accuracy": [0.25, 0.0, 0.75, 0.0], "accuracy_se": 0.2}
    se, kind = claims.paired_se(a, b)
    # differences 0.25, 0.25, 0.25, 0: std(ddof=1) = 0.125, / sqrt(4)
    assert kind == "paired" and se == pytest.approx(0.0625)
    se, kind = claims.paired_se({"accuracy_se": 0.03}, {"accuracy_se": 0.04})
    assert kind == "unpaired bound" and se == pytest.approx(0.05)


def test_claims_on_the_tiny_set(tiny):
    records, roles = tiny
    r = claims.compute(records, roles)
    assert r["seeds"] == [1234, 2234, 3234]
    early = _stat(r, "1", "early_gain")
    assert early["values"] == pytest.approx([0.10, 0.10, 0.09]) and early["verdict"] == "PASS"
    assert _stat(r, "1", "early_minus_late")["values"] == pytest.approx([0.14, 0.14, 0.12])
    kl = _stat(r, "1", "kl_growth")
    assert kl["mean"] == pytest.approx(0.7) and kl["se"] == pytest.approx(0.1 / math.sqrt(3))
    assert r["claims"]["1"]["verdict"] == "PASS"
    assert _stat(r, "2", "ceiling_drop")["values"] == pytest.approx([0.04, 0.05, 0.04])
    assert r["claims"]["2"]["verdict"] == "PASS"
    acc = _stat(r, "3", "acc_student_minus_teacher")
    assert acc["mean"] == pytest.approx(0.0, abs=1e-12) and acc["verdict"] == "PASS"
    ratio = _stat(r, "3", "kl_ratio")
    assert ratio["values"] == pytest.approx([0.4 / 1.2, 0.5 / 1.4, 0.3 / 1.0])
    assert r["claims"]["3"]["verdict"] == "PASS"
    c4 = r["claims"]["4"]
    assert _stat(r, "4", "weak_teacher_minus_base")["verdict"] == "PASS"
    contrast = _stat(r, "4", "student_weak_contrast_minus_base")
    gated = _stat(r, "4", "student_weak_gated_minus_base")
    assert contrast["values"] == pytest.approx([0.03, 0.03, 0.03]) and contrast["verdict"] == "PASS"
    assert gated["mean"] == pytest.approx(0.0, abs=1e-12) and gated["verdict"] == "FAIL"
    # power: the unpaired bound hypot(se_a, se_b) without per-prompt accuracies
    assert contrast["within_seed_se"] == pytest.approx([math.hypot(0.004, 0.004)] * 3)
    assert contrast["power_met"] and not gated["power_met"]
    assert c4["verdict"] == "PASS" and c4["passed_signals"] == ["student_weak_contrast"]
    base = next(m for m in r["models"] if m["model"] == "base")
    assert base["accuracy"]["mean"] == pytest.approx(0.30)
    assert base["per_seed"]["2234"]["accuracy"] == 0.32


def test_claims_fail_and_one_seed(tiny):
    records, roles = tiny
    bad = copy.deepcopy(records)
    for rec, acc in zip(bad, (0.33, 0.30, 0.29)):  # contrast gains 0.03, -0.02, 0.01
        rec["models"]["student_weak_contrast"]["accuracy"] = acc
    for rec in bad:  # the weak teacher is better than the base: the precondition fails
        rec["models"]["t_weak"]["accuracy"] = rec["models"]["base"]["accuracy"] + 0.1
    r = claims.compute(bad, roles)
    assert _stat(r, "4", "student_weak_contrast_minus_base")["verdict"] == "FAIL"
    assert _stat(r, "4", "weak_teacher_minus_base")["verdict"] == "FAIL"
    assert r["claims"]["4"]["verdict"] == "FAIL" and r["claims"]["4"]["passed_signals"] == []
    one = claims.compute(records[:1], roles)
    assert {c["verdict"] for c in one["claims"].values()} == {"n/a"}
    no_tight = claims.compute(records, roles | {"curve_tight": None})
    assert no_tight["claims"]["2"]["verdict"] == "n/a"


def test_collect_render_readme_and_plots(tiny, tmp_path):
    records, roles = tiny
    runs = []
    for rec in records:  # the files of a round directory, from the records
        rd = tmp_path / f"seed_{rec['seed']}" / "round_0"
        (rd / "eval").mkdir(parents=True)
        rows = [{"model": n, **row} for n, row in rec["models"].items()]
        (rd / "eval" / "results.json").write_text(json.dumps({"rows": rows}))
        for run, pts in rec["curves"].items():
            for p in pts:
                d = rd / f"s1_{run}" / "stage1" / "heldout" / f"epoch_{p['epoch']:04d}"
                d.mkdir(parents=True)
                (d / "result.json").write_text(json.dumps({"accuracy": p["accuracy"]}))
        runs.append({"seed": rec["seed"], "round_dir": str(rd)})
        got = claims.collect_seed(rec["seed"], rd, roles)
        assert got["curves"]["ce"] == [p | {"epoch": p["epoch"]} for p in rec["curves"]["ce"]]
        assert got["models"]["student"]["accuracy"] == rec["models"]["student"]["accuracy"]
    spec = {"roles": roles, "runs": runs, "seeds": [r["seed"] for r in records],
            "commit": "0123abc", "dirty": False, "command": "erpd demo --seeds 3",
            "eval_split": "test"}  # fmt: skip
    (tmp_path / "claims_spec.json").write_text(json.dumps(spec))
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{claims.BEGIN}\nold table\n{claims.END}\n\nafter\n")
    assert claims.main([str(tmp_path), "--readme", str(readme)]) == 0
    md = (tmp_path / "claims.md").read_text()
    assert "commit `0123abc`" in md and "seeds 1234, 2234, 3234" in md
    assert md.count("**PASS**") == 4 and "| 4 | student_weak_gated_minus_base" in md
    text = readme.read_text()
    assert "old table" not in text and "0123abc" in text and text.endswith("after\n")
    assert json.loads((tmp_path / "claims.json").read_text())["claims"]["4"]["verdict"] == "PASS"
    for png in ("claims_accuracy_vs_kl.png", "claims_stage1.png"):
        assert (tmp_path / png).stat().st_size > 10_000, png
