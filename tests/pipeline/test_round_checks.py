"""`erpd round` before any step runs: the whole round validated at once, and step fingerprints
that stop a rerun with changed overrides from silently reusing stale outputs (no training)."""

from __future__ import annotations

import json

import pytest

from erpd_megatron.cli import main as erpd
from erpd_megatron.config.loader import ConfigError, load_config
from erpd_megatron.pipeline.round import Runner, check_round, plan_rounds, run_rounds
from tests.train.fixtures import RECIPE, ROOT

MARKERS = [
    "policy_mcore/model_config.yaml",
    "rollouts/manifest.json",
    "s1_teacher/stage1/checkpoints/manifest.json",
    "cache/manifest.json",
    "s2_student/stage2/checkpoints/manifest.json",
    "hf/teacher0/config.json",
    "hf/student/config.json",
    "eval/results.json",
]


def test_round_names_every_problem_at_once(capsys, tmp_path):
    ov = [
        f"output_dir={tmp_path}",
        "round.teachers=[{name: t, run: nope}]",
        "round.students=[{name: s, overrides: ['stage2.teachers=[{model: missing}]']}]",
        "eval.max_new_tokens=4096",
    ]
    assert erpd(["round", "--config", str(RECIPE), *ov]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    for needle in (
        "round.base_hf is not set",
        "rollout.dataset is not set",
        "eval.datasets is empty",
        "run 'nope' is not in round.stage1_runs",
        "model='missing' is not a cached model",
        "eval.max_new_tokens=4096 is more than the 512 positions",
    ):
        assert needle in err, (needle, err)
    assert not (tmp_path / "round_0").exists()  # nothing ran


@pytest.fixture()
def finished_round(tmp_path):
    """A round whose every step looks finished (its manifests exist), and its overrides."""
    base = tmp_path / "base_hf"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"max_position_embeddings": 512}))
    (tmp_path / "train.jsonl").write_text("{}\n")
    (tmp_path / "heldout.jsonl").write_text("{}\n")
    ov = [
        f"output_dir={tmp_path / 'run'}",
        f"round.base_hf={base}",
        f"rollout.dataset={tmp_path / 'train.jsonl'}",
        f"eval.datasets=[{tmp_path / 'heldout.jsonl'}]",
    ]
    for m in MARKERS:
        p = tmp_path / "run" / "round_0" / m
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("{}")
    return ov


def _decisions(ov: list[str]) -> dict[str, str]:
    cfg = load_config(RECIPE, ov)
    check_round(str(RECIPE), ov, cfg)
    [(_, steps)] = plan_rounds(str(RECIPE), ov, cfg, Runner(str(RECIPE), ov, 1), 1)
    return {s.plan.name: s.plan.decision for s in steps}


def test_changed_override_flips_the_skip_decision(finished_round):
    ov = finished_round
    # finished before fingerprints were recorded: adopted (recorded, nothing runs)
    assert set(_decisions(ov).values()) == {"adopt"}
    run_rounds(str(RECIPE), ov)  # every step skipped, state recorded
    state = json.loads((load_path(ov) / "round_state.json").read_text())["steps"]
    assert sorted(state) == sorted(_decisions(ov))
    assert set(_decisions(ov).values()) == {"skip"}
    # a Stage-1 override: that run and everything downstream of it, not the rollouts
    d = _decisions(ov + ["stage1.epochs=3"])
    assert d == {
        "policy_mcore": "skip",
        "rollouts": "skip",
        "s1_teacher": "changed",
        "cache": "changed",
        "s2_student": "changed",
        "export": "changed",
        "eval": "changed",
    }, d
    # an eval-only change reruns only the evaluation; a rollout change everything after the
    # conversion
    assert [k for k, v in _decisions(ov + ["eval.n=2"]).items() if v != "skip"] == ["eval"]
    assert [k for k, v in _decisions(ov + ["rollout.temperature=0.7"]).items() if v == "skip"] == [
        "policy_mcore"
    ]
    with pytest.raises(ConfigError) as e:  # refused before any step, naming the step and the key
        run_rounds(str(RECIPE), ov + ["stage1.epochs=3"])
    assert "'s1_teacher'" in str(e.value) and "stage1.epochs: 2 -> 3" in str(e.value)
    assert "--rerun-changed" in str(e.value)
    # a deleted (unfinished) upstream step makes its finished downstream steps stale too
    (load_path(ov) / "cache/manifest.json").unlink()
    d = _decisions(ov)
    assert d["cache"] == "run" and d["s2_student"] == "changed" and d["s1_teacher"] == "skip", d


def load_path(ov: list[str]):
    from pathlib import Path

    return Path(load_config(RECIPE, ov).output_dir) / "round_0"


def test_report_flags_a_teacher_at_zero_kl(tmp_path):
    from erpd_megatron.eval.report import write_report

    common = {
        "dataset": "heldout",
        "prompts": 8,
        "n": 2,
        "temperature": 1.0,
        "pass@1": 0.3,
        "accuracy_se": 0.1,
        "entropy": 1.0,
        "drift_pos": 0.0,
        "drift_neg": 0.0,
        "acc_gain_per_nat": None,
    }
    rows = [
        {
            "model": "base",
            "is_base": True,
            "accuracy": 0.3,
            "kl_to_base": 0.0,
            "kl_to_base_se": 0.0,
            **common,
        },
        {
            "model": "t_flat",
            "is_base": False,
            "accuracy": 0.3,
            "kl_to_base": 2e-4,
            "kl_to_base_se": 1e-4,
            **common,
        },
        {
            "model": "student",
            "is_base": False,
            "accuracy": 0.4,
            "kl_to_base": 0.8,
            "kl_to_base_se": 0.1,
            **common,
        },
    ]
    md = write_report(rows, tmp_path)["results_md"].read_text()
    warn = [line for line in md.splitlines() if "KL ≈ 0" in line]
    assert len(warn) == 1 and "**t_flat**" in warn[0], md


def test_progress_to_a_file_is_plain_lines(tmp_path):
    """stderr is not a terminal (a log file): no tqdm carriage returns, a few plain lines."""
    import subprocess
    import sys

    code = (
        "import logging, time\nfrom erpd_megatron.utils.progress import progress_bar\n"
        "bar = progress_bar(500, enabled=True, desc='stage1')\n"
        "for i in range(500):\n    bar.update(1); bar.set_postfix(loss='0.1', tok_s='7')\n"
        "    time.sleep(0.002)\nbar.close()\n"
    )
    log_file = tmp_path / "log.txt"
    with open(log_file, "w") as f:
        subprocess.run(
            [sys.executable, "-c", code],
            stderr=f,
            check=True,
            timeout=120,
            env={"ERPD_PROGRESS_INTERVAL": "0.5", "PATH": "/usr/bin:/bin"},
            cwd=ROOT,
        )
    text = log_file.read_text()
    assert "\r" not in text, text[:500]
    lines = [x for x in text.splitlines() if "stage1:" in x]
    assert 1 <= len(lines) <= 6 and "500/500 (100%)" in lines[-1] and "loss=0.1" in lines[-1], text
