"""`erpd study` without training: the grid, fingerprint sharing, the plan, the report."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from erpd_megatron.cli import main as erpd
from erpd_megatron.config.loader import ConfigError
from erpd_megatron.pipeline.study import link_shared, owners, plan_study, status_rows
from erpd_megatron.pipeline.study_report import write_study_report
from erpd_megatron.pipeline.study_spec import load_study
from tests.train.fixtures import RECIPE

ROOT = Path(__file__).resolve().parents[2]


def _study(tmp_path: Path, body: str) -> Path:
    base = tmp_path / "base_hf"
    base.mkdir(exist_ok=True)
    (base / "config.json").write_text(json.dumps({"max_position_embeddings": 512}))
    for f in ("train.jsonl", "heldout.jsonl"):
        (tmp_path / f).write_text("{}\n")
    p = tmp_path / "study.yaml"
    p.write_text(
        f"""name: s
recipe: {RECIPE}
output_dir: {tmp_path / "out"}
overrides: [round.base_hf={base}, rollout.dataset={tmp_path / "train.jsonl"},
  "eval.datasets=[{tmp_path / "heldout.jsonl"}]"]
"""
        + body
    )
    return p


def test_grid_zip_seeds_and_names(tmp_path):
    p = _study(
        tmp_path,
        """axes:
  - {name: epochs, key: stage1.epochs, values: [2, 4]}
  - {name: size, values: {small: [model.num_layers=2], large: [model.num_layers=4]}}
  - {name: lr, key: optimizer.lr, values: [1.0e-4, 5.0e-5]}
zip: [[size, lr]]
seeds: [1, 2]
""",
    )
    study = load_study(p)
    pts = study.points()
    assert [x.name for x in pts][:3] == [
        "epochs-2__size-small__lr-0.0001__seed-1",
        "epochs-2__size-small__lr-0.0001__seed-2",
        "epochs-2__size-large__lr-5e-05__seed-1",
    ]
    assert len(pts) == 2 * 2 * 2  # the zipped axes are one dimension
    large = pts[2]
    assert "model.num_layers=4" in large.overrides and "optimizer.lr=5.0e-05" in large.overrides
    assert f"output_dir={tmp_path / 'out' / large.name}" in large.overrides
    assert "logging.wandb_group=s" in large.overrides and large.axes == {
        "epochs": 2,
        "size": "large",
        "lr": 5e-05,
        "seed": 1,
    }
    assert [x.name for x in load_study(p).points()] == [x.name for x in pts]  # deterministic
    for body, needle in [
        ("axes: [{name: e, values: [1, 2]}]\n", "axes.0 ('e'): a list of values needs key"),
        ("axes: [{name: e, key: a.b, valuez: [1]}]\n", "unknown key(s) ['valuez']"),
        ("axis: []\n", "'axis' (did you mean 'axes'?)"),
        (
            "axes: [{name: a, key: x.y, values: [1]}, {name: b, key: x.z, values: [1, 2]}]\n"
            "zip: [[a, b]]\n",
            "zip.0: zipped axes need equal lengths",
        ),
        ("seeds: [1, x]\n", "seeds must be a non-empty list of integers"),
    ]:
        with pytest.raises(ConfigError, match=None) as e:
            load_study(_study(tmp_path, body))
        assert needle in str(e.value) and "study.yaml" in str(e.value), (needle, str(e.value))


def test_points_differing_only_in_stage2_share_one_stage1_run(tmp_path):
    p = _study(
        tmp_path,
        """axes:
  - {name: eps, key: stage2.eps, values: [0.1, 0.3]}
  - {name: epochs, key: stage1.epochs, values: [2, 3]}
""",
    )
    study = load_study(p)
    plans = plan_study(study)
    names = [pp.point.name for pp in plans]
    assert names == [
        "eps-0.1__epochs-2",
        "eps-0.1__epochs-3",
        "eps-0.3__epochs-2",
        "eps-0.3__epochs-3",
    ]
    shared = owners(plans, require_done=False)
    a, b, c, d = names
    # only Stage 2 differs between a and c: rollouts, conversion, Stage 1 and the cache are a's
    assert {k[2]: v[0] for k, v in shared.items() if k[0] == c} == {
        "policy_mcore": a,
        "rollouts": a,
        "s1_teacher": a,
        "cache": a,
    }
    # Stage 1 differs between a and b: only what comes before it is shared
    assert {k[2] for k, v in shared.items() if k[0] == b} == {"policy_mcore", "rollouts"}
    assert {k[2]: v[0] for k, v in shared.items() if k[0] == d}["s1_teacher"] == b
    assert link_shared(shared, plans) == 4 + 2 + 4
    s1 = {pp.point.name: pp.rounds[0][1] for pp in plans}
    out_c = next(s.plan.outputs[0] for s in s1[c] if s.plan.name == "s1_teacher")
    out_a = next(s.plan.outputs[0] for s in s1[a] if s.plan.name == "s1_teacher")
    assert out_c.is_symlink() and Path(os.path.realpath(out_c)) == out_a.resolve()
    # a's Stage 1 finishes: c's is done too (one run), b's and d's are not
    for m in (
        out_a / "stage1/checkpoints/manifest.json",
        out_a.parent / "rollouts/manifest.json",
        out_a.parent / "policy_mcore/model_config.yaml",
    ):
        m.parent.mkdir(parents=True)
        m.write_text("{}")
    cols, rows = status_rows(study)
    cell = {r["point"]: r["s1_teacher"] for r in rows}
    assert cell[a] == "done" and cell[c] == f"done [shared: {a}]", cell
    assert cell[b] == "todo" and cell[d] == f"todo [shared: {b}]", cell
    assert cols[:3] == ["policy_mcore", "rollouts", "s1_teacher"]
    # b's own rollouts made with other inputs (stale): shared only when replacing stale outputs
    rb = next(s.plan.outputs[0] for s in s1[b] if s.plan.name == "rollouts")
    rb.unlink()
    (rb / "manifest.json").parent.mkdir(parents=True)
    (rb / "manifest.json").write_text("{}")
    (rb.parent / "round_state.json").write_text(
        json.dumps({"steps": {"rollouts": {"fingerprint": "old"}}})
    )
    plans = plan_study(study)
    assert (b, 0, "rollouts") not in owners(plans, require_done=True)
    shared = owners(plans, require_done=True, replace_stale=True)
    assert shared[(b, 0, "rollouts")][0] == a
    link_shared(shared, plans)
    assert rb.is_symlink() and (rb / "manifest.json").exists()


def test_plan_over_gpu_recipes_prints_memory_and_gpu_hours(capsys):
    assert (
        erpd(["study", "plan", "--config", str(ROOT / "configs/studies/qwen3-scaling.yaml")]) == 0
    )
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| model-")]
    assert len(rows) == 6, out
    for line in rows:
        cells = [c.strip() for c in line.strip("|").split("|")]
        mem, total = cells[4], float(cells[-2])
        assert "fits" in mem and float(mem.split()[0]) > 10, line
        assert total > 1, line
    # the 4B points differ only in Stage-1 epochs: one rollout set, counted once
    four = [[c.strip() for c in r.strip("|").split("|")] for r in rows if "4b" in r]
    assert float(four[0][5]) > 0 and float(four[1][5]) == 0
    assert "MFU 0.35" in out and "GPU-hours over 6 points" in out


def test_report_keeps_missing_points_and_accounts_compute(tmp_path):
    p = _study(
        tmp_path, "axes: [{name: epochs, key: stage1.epochs, values: [2, 3]}]\nseeds: [1, 2]\n"
    )
    study = load_study(p)
    plans = plan_study(study)
    done = plans[0]
    root = done.point.output_dir / "round_0"
    rows = [
        {
            "model": "base",
            "dataset": "heldout",
            "is_base": True,
            "accuracy": 0.2,
            "accuracy_se": 0.05,
            "kl_to_base": 0.0,
        },
        {
            "model": "teacher0",
            "dataset": "heldout",
            "is_base": False,
            "accuracy": 0.5,
            "accuracy_se": 0.05,
            "kl_to_base": 3.0,
            "acc_gain_per_nat": 0.1,
        },
        {
            "model": "student",
            "dataset": "heldout",
            "is_base": False,
            "accuracy": 0.4,
            "accuracy_se": 0.05,
            "kl_to_base": 1.0,
            "acc_gain_per_nat": 0.2,
        },
    ]
    (root / "eval").mkdir(parents=True)
    (root / "eval/results.json").write_text(json.dumps({"rows": rows}))
    man = root / "s1_teacher/stage1/checkpoints/manifest.json"
    man.parent.mkdir(parents=True)
    man.write_text(
        json.dumps(
            {
                "status": "complete",
                "compute": {
                    "trained_tokens": 1000,
                    "wall_s": 3600.0,
                    "gpus": 8,
                    "model_flops": 8 * 3600 * 2e14,
                },
            }
        )
    )
    paths = write_study_report(study)
    doc = json.loads(paths["json"].read_text())
    by_point = {}
    for r in doc["rows"]:
        by_point.setdefault(r["point"], []).append(r)
    assert len(by_point) == 4  # every point, evaluated or not
    assert [r["status"] for r in by_point[done.point.name]] == ["ok"] * 3
    assert all(rs[0]["status"] == "missing" for n, rs in by_point.items() if n != done.point.name)
    stu = next(r for r in by_point[done.point.name] if r["model"] == "student")
    assert stu["gpu_hours"] == pytest.approx(8.0) and stu["acc_gain_per_gpu_hour"] == pytest.approx(
        0.2 / 8
    )
    [c] = doc["compute"]
    assert c["step"] == "s1_teacher" and c["tflops_per_gpu"] == pytest.approx(200.0)
    assert doc["seeds"][0]["seeds"] == 1  # only seed 1 of epochs 2 evaluated
    md = paths["md"].read_text()
    assert "1 of 4 points evaluated" in md and "missing" in md
    for k in ("accuracy_vs_kl", "accuracy_vs_epochs", "gain_per_axis"):
        assert paths[k].read_bytes()[:4] == b"\x89PNG"


def test_report_logs_a_wandb_run_per_point_offline(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    p = _study(
        tmp_path,
        "wandb_project: erpd-studies\naxes: [{name: alpha, key: stage2.teachers.0.alpha, "
        "values: [0.25]}]\n",
    )
    study = load_study(p)
    [pt] = study.points()
    write_study_report(study)
    [run_file] = list((pt.output_dir / "wandb").glob("offline-run-*/*.wandb"))
    data = run_file.read_bytes()
    assert (
        b"study-point" in data
        and b"alpha" in data
        and pt.name.encode() in data
        and b"erpd-studies" in data
    )
