"""`erpd study --slurm` for real on the local one-node cluster: a 2-point study on the tiny
recipe whose points differ only in Stage 2 (so they share the conversion, rollouts, Stage 1
and the cache), one point's Stage-2 job cancelled, the study resubmitted (finished and queued
steps kept, the cancelled chain submitted again), and a report with both points evaluated."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from erpd_megatron.pipeline.study import job_states
from tests.pipeline.readme_fixtures import save_tiny_qwen3, write_prompts
from tests.slurm.cluster import ROOT, SLURM_CONF, run, slurm_env

pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.usefixtures("slurm_cluster")]
# 9 jobs, then 3 resubmitted (a one-slot rollout fleet needs no finalize job): about 70 s here
# at load 4-6 (88 s at load 13), nearly all of it the steps' Python start-up (a megatron import
# per step); the two points' chains run side by side on the 2 CPUs after the shared cache
TIMEOUT_S = 600


def _study(tmp: Path) -> Path:
    save_tiny_qwen3(tmp / "base")
    write_prompts(tmp / "train.parquet", 8)
    write_prompts(tmp / "heldout.parquet", 4, offset=3)
    p = tmp / "study.yaml"
    p.write_text(f"""name: slurm-pair
recipe: {ROOT / "configs/recipes/tiny-cpu.yaml"}
output_dir: {tmp / "study"}
overrides: [round.base_hf={tmp / "base"}, rollout.dataset={tmp / "train.parquet"},
  "eval.datasets=[{tmp / "heldout.parquet"}]", rollout.num_prompts=8, rollout.samples_per_prompt=2,
  rollout.max_new_tokens=8, eval.num_prompts=4, eval.n=2, "eval.pass_k=[1]", eval.max_new_tokens=8,
  stage1.epochs=1, stage2.epochs=1, stage1.force=true, logging.progress_bar=false,
  "round.teachers=[{{name: teacher0, run: teacher, evaluate: false}}]"]
axes:
  - {{name: eps, key: stage2.eps, values: [0.1, 0.3]}}
""")
    return p


def _erpd(args: list[str], env: dict[str, str]) -> str:
    p = run([sys.executable, "-m", "erpd_megatron.cli", *args], env=env, timeout=300)
    return p.stdout


def _jobs(study_dir: Path) -> dict[str, dict]:
    return json.loads((study_dir / "study_jobs.json").read_text())["jobs"]


@pytest.fixture
def cancel_after(tmp_path):
    """Cancels every job the study in ``tmp_path/study`` recorded when the test ends (a failed
    test leaves nothing queued on the shared cluster)."""
    yield
    d = tmp_path / "study"
    if (d / "study_jobs.json").exists():
        run(["scancel", *sorted({j["job"] for j in _jobs(d).values()})], check=False)


def _wait_all(ids: list[str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = run(["squeue", "-h", "-o", "%i", "-j", ",".join(ids)], check=False).stdout.split()
        if not out:
            return
        time.sleep(2)
    raise AssertionError(
        f"jobs {ids} still queued after {timeout} s: {run(['squeue'], check=False).stdout}"
    )


def test_study_on_slurm_survives_a_cancelled_point(tmp_path, monkeypatch, cancel_after):
    monkeypatch.setenv("SLURM_CONF", str(SLURM_CONF))  # for job_states in this process
    study = _study(tmp_path)
    logs = tmp_path / "logs"
    env = slurm_env(
        SBATCH_ARGS="--time=00:20:00 --exclusive=user --mem=3G",
        ROLLOUT_ARRAY="0",
        LOG_DIR=str(logs),
        OMP_NUM_THREADS="1",
        ERPD_PROGRESS_INTERVAL="60",
    )
    t0 = time.monotonic()
    _erpd(["study", "--config", str(study), "--slurm"], env)
    jobs = _jobs(tmp_path / "study")
    b = "eps-0.3"
    by = {(j["point"], j["step"]): j["job"] for j in jobs.values()}
    # the second point submitted only what differs: its student, export and evaluation
    assert sorted(s for p, s in by if p == b) == ["eval", "export", "s2_student"], by
    assert (tmp_path / "study" / b / "round_0" / "s1_teacher").is_symlink()
    # cancelled while it waits for the cache; Slurm cancels its afterok dependants (export,
    # eval: --kill-on-invalid-dep) only at its next scheduling pass, so the rerun below may
    # still find them PENDING: they must be resubmitted with the student, not kept
    run(["scancel", by[(b, "s2_student")]])
    status = _erpd(["study", "status", "--config", str(study)], env)
    assert "cancelled" in status.lower(), status
    # resubmit at once: the first point's queued jobs are kept, the second's chain submitted anew
    _erpd(["study", "--config", str(study), "--slurm"], env)
    again = {(j["point"], j["step"]): j["job"] for j in _jobs(tmp_path / "study").values()}
    for step in ("policy_mcore", "rollouts", "s1_teacher", "cache", "s2_student", "eval"):
        assert again[("eps-0.1", step)] == by[("eps-0.1", step)], (step, by, again)
    for step in ("s2_student", "export", "eval"):
        assert again[(b, step)] != by[(b, step)], (step, by, again)
    old = [by[(b, s)] for s in ("s2_student", "export", "eval")]
    _wait_all(sorted(set(again.values()) | set(old)), TIMEOUT_S)
    assert set(job_states(old).values()) == {"CANCELLED"}, job_states(old)
    report = _erpd(["study", "report", "--config", str(study)], env)
    if "2 of 2 points evaluated" not in report:
        status = _erpd(["study", "status", "--config", str(study)], env)
        logs_tail = "\n".join(
            f"--- {p.name}\n{p.read_text()[-1500:]}" for p in sorted(logs.glob("*.out"))
        )
        raise AssertionError(f"{status}\n{report}\n{logs_tail}")
    doc = json.loads((tmp_path / "study/report/study.json").read_text())
    models = {(r["point"], r["model"]) for r in doc["rows"] if r["status"] == "ok"}
    assert {("eps-0.1", "student"), (b, "student"), ("eps-0.1", "base")} <= models, models
    steps = {c["step"] for c in doc["compute"]}
    assert {"s1_teacher", "cache", "s2_student"} <= steps, doc["compute"]
    s1 = next(c for c in doc["compute"] if c["step"] == "s1_teacher" and not c["shared"])
    assert s1["trained_tokens"] > 0 and s1["model_flops"] > 0 and s1["gpus"] == 1, s1
    print(
        f"study on Slurm: {time.monotonic() - t0:.0f} s; {len(set(again.values()))} jobs",
        file=sys.stderr,
    )


def test_rerun_resubmits_what_waits_for_a_resubmitted_job(tmp_path, monkeypatch, cancel_after):
    """Deterministically, without running a step (every job submitted held): a point's Stage-2
    job that Slurm no longer knows (UNKNOWN, as after MinJobAge) is resubmitted, and so are the
    export and eval still queued after the old one (kept, they would wait for it, or be
    cancelled with it); their old jobs are cancelled, the other point's jobs kept."""
    monkeypatch.setenv("SLURM_CONF", str(SLURM_CONF))
    study = _study(tmp_path)
    env = slurm_env(
        SBATCH_ARGS="--hold --time=00:05:00 --mem=1G",
        ROLLOUT_ARRAY="0",
        LOG_DIR=str(tmp_path / "logs"),
    )
    _erpd(["study", "--config", str(study), "--slurm"], env)
    path = tmp_path / "study" / "study_jobs.json"
    doc = json.loads(path.read_text())
    b = "eps-0.3"
    by = {(j["point"], j["step"]): j["job"] for j in doc["jobs"].values()}
    key = next(k for k, j in doc["jobs"].items() if (j["point"], j["step"]) == (b, "s2_student"))
    doc["jobs"][key]["job"] = "99999999"  # forgotten by Slurm
    path.write_text(json.dumps(doc))
    try:
        _erpd(["study", "--config", str(study), "--slurm"], env)
        again = {(j["point"], j["step"]): j["job"] for j in _jobs(tmp_path / "study").values()}
        assert again[(b, "s2_student")] not in (by[(b, "s2_student")], "99999999"), again
        for step in ("export", "eval"):
            assert again[(b, step)] != by[(b, step)], (step, by, again)
        assert {k: v for k, v in again.items() if k[0] != b} == {
            k: v for k, v in by.items() if k[0] != b
        }
        old = [by[(b, "export")], by[(b, "eval")]]
        assert set(job_states(old).values()) == {"CANCELLED"}, job_states(old)
        dep = run(["scontrol", "show", "job", "-o", again[(b, "export")]]).stdout
        assert f"afterok:{again[(b, 's2_student')]}" in dep, dep
    finally:
        run(["scancel", *by.values()], check=False)  # the forgotten one among them
