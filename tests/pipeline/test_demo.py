"""The embedded demo, shortened: one real round end to end, then a killed-and-rerun round."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.train.fixtures import ROOT, env


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    cmd = [
        sys.executable,
        "-m",
        "erpd_megatron.cli",
        "demo",
        "--quick",
        f"output_dir={out}",
        "logging.progress_bar=false",
    ]
    p = subprocess.run(cmd, env=env(), cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-6000:]
    return out, p.stdout


def test_quick_demo_writes_table_and_plots(demo):
    out, stdout = demo
    ev = out / "round_0" / "eval"
    rows = json.loads((ev / "results.json").read_text())
    rows = rows["rows"] if isinstance(rows, dict) else rows
    names = [r["model"] for r in rows]
    assert names[:1] == ["base"] and {"t_ep2", "t_ep8", "student", "student_weak"} <= set(names)
    assert (ev / "results.md").read_text().count("|") > 20 and "| student |" in stdout
    for png in ("accuracy_vs_kl.png", "stage1_curves.png", "stage2_curves.png"):
        assert (ev / png).stat().st_size > 20_000, png
    by = {r["model"]: r for r in rows}
    # the over-trained (final) teacher drifted further from the base than the student distilled from it
    assert by["student"]["kl_to_base"] < by["t_ep8"]["kl_to_base"], (by["student"], by["t_ep8"])


def test_round_rerun_after_kill_skips_finished_steps(demo, tmp_path):
    """Kill `erpd round` in Stage 2, rerun: the finished steps are skipped, the round completes."""
    out, _ = demo
    from erpd_megatron.pipeline.demo import QUICK

    run = tmp_path / "run"
    # reuse the demo's base and data; a fresh round directory
    ov = QUICK + [
        f"output_dir={run}",
        "logging.progress_bar=false",
        f"round.base_hf={out / 'base_hf'}",
        f"rollout.dataset={out / 'data/train.jsonl'}",
        f"eval.datasets=[{out / 'data/test.jsonl'}]",
        "round.evaluate=false",
    ]
    cmd = [
        sys.executable,
        "-m",
        "erpd_megatron.cli",
        "round",
        "--config",
        str(ROOT / "configs/recipes/demo-cpu.yaml"),
        *ov,
    ]
    proc = subprocess.Popen(
        cmd,
        env=env(),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    s2 = run / "round_0" / "s2_student"
    deadline = time.time() + 900
    while time.time() < deadline and proc.poll() is None and not s2.exists():
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole step tree, as a node failure would
    proc.wait()
    assert s2.exists(), "the round never reached Stage 2"
    done_before = {p.name for p in (run / "round_0").iterdir()}
    assert {"rollouts", "s1_pg", "s1_unlearned", "cache"} <= done_before
    p = subprocess.run(cmd, env=env(), cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-6000:]
    log = p.stdout + p.stderr
    for step in ("rollouts from pi_r", "stage 1 'pg'", "stage 1 'unlearned'", "teacher cache"):
        assert f"[skip] round 0: {step}" in log, step
    assert "[run ] round 0: stage 2 'student'" in log
    assert (run / "round_0/s2_student/stage2/checkpoints/manifest.json").exists()
    assert (run / "round_0/hf/student/config.json").exists()
