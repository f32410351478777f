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
    # the protocol's one-seed properties (docs/demo_protocol.md, "Quick-demo test")
    from erpd_megatron.pipeline import claims

    spec = json.loads((out / "claims_spec.json").read_text())
    rec = claims.collect_seed(spec["seeds"][0], ev.parent, spec["roles"])
    assert spec["roles"]["teacher_final"] == "t_ep8" and spec["roles"]["student"] == "student"
    checks = claims.quick_checks(rec, spec["roles"])
    failed = {k: why for k, (ok, why) in checks.items() if not ok}
    assert not failed, failed
    assert (out / "claims.md").read_text().count("| 3 |") == 2
    # every evaluated split is test; the splits are disjoint
    splits = {
        n: {json.loads(x)["problem"] for x in (out / f"data/{n}.jsonl").read_text().splitlines()}
        for n in ("train", "validation", "test")
    }
    assert not (splits["train"] & splits["validation"] or splits["train"] & splits["test"])
    assert not splits["validation"] & splits["test"] and all(splits.values())
    assert {r["dataset"] for r in rows} == {"test"}


def _digests(root, pattern: str) -> dict:
    import hashlib

    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.glob(pattern))
        if p.is_file()
    }


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
    # determinism: the same seed in a fresh directory gives bit-identical rollouts, Stage-1
    # and Stage-2 weights (exported to HF) as the demo's own round (the evaluation step and the
    # base's preparation are not rerun here: each would cost a minute of the suite)
    for pattern in ("rollouts/*.parquet", "hf/*/model.safetensors"):
        mine, theirs = _digests(run / "round_0", pattern), _digests(out / "round_0", pattern)
        assert mine and mine == {k: v for k, v in theirs.items() if k in mine}, pattern
