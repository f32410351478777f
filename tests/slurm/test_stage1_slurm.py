"""Stage 1 for real through scripts/slurm/stage1.sh on the local cluster: 2 gloo ranks (TP=2)
from SLURM_PROCID, then a run preempted by USR1 that requeues, resumes and ends with the
same metrics and weights as the uninterrupted one, and a run hard-stopped by a plain
`scancel` that loses at most checkpoint.save_interval steps and, resubmitted, ends with the
same weights too."""

from __future__ import annotations

import filecmp
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.slurm.cluster import CPU_JOB, ROOT, run, sbatch, slurm_env
from tests.train.fixtures import make_tiny_round

pytestmark = [pytest.mark.slurm, pytest.mark.usefixtures("slurm_cluster")]

# 32 samples / 4 per step x 3 epochs = 24 optimizer steps on TP=2.
LAYOUT = ["parallel.tensor_model_parallel_size=2", "data.global_batch_size=4", "stage1.epochs=3"]
STEPS = 24
SAVE_INTERVAL = 4
JOB_TIMEOUT_S = 420


def _steps(metrics: Path) -> list[dict]:
    if not metrics.exists():
        return []
    recs = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return [r for r in recs if "stage1/loss" in r]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_round(tmp_path_factory.mktemp("slurm-tiny"))


@pytest.fixture(scope="module")
def reference(tiny, tmp_path_factory):
    """The uninterrupted 2-rank run: (output dir, job, scontrol info)."""
    cfg, ov = tiny
    out = tmp_path_factory.mktemp("slurm-stage1")
    job = sbatch(
        "stage1.sh",
        [*ov, *LAYOUT, f"output_dir={out}"],
        log_dir=out / "logs",
        sbatch_args=CPU_JOB,
        env=slurm_env(CONFIG=str(cfg)),
    )
    return out, job, job.wait(JOB_TIMEOUT_S)


def test_stage1_two_ranks_writes_checkpoint_and_metrics(reference):
    out, job, info = reference
    log = job.log_text()
    assert info["ExitCode"] == "0:0" and info["Restarts"] == "0", job.describe()
    assert "gloo backend, world 2 (slurm launch" in log and "TP=2 PP=1 DP=1" in log, job.describe()
    ckpt = out / "stage1/checkpoints"
    manifest = json.loads((ckpt / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["steps"] == STEPS, manifest
    assert (ckpt / "final/metadata.json").exists() or any((ckpt / "final").iterdir())
    steps = _steps(out / "stage1/stage1_metrics.jsonl")
    assert [r["step"] for r in steps] == list(range(1, STEPS + 1)), job.describe()
    assert steps[-1]["stage1/kl_k3"] > 0, steps[-1]


def test_stage1_preempted_requeues_and_matches_uninterrupted_run(tiny, reference, tmp_path):
    cfg, ov = tiny
    ref_out = reference[0]
    out = tmp_path / "preempted"
    job = sbatch(
        "stage1.sh",
        [*ov, *LAYOUT, f"output_dir={out}"],
        log_dir=tmp_path / "logs",
        sbatch_args=CPU_JOB,
        env=slurm_env(CONFIG=str(cfg)),
    )
    metrics = out / "stage1/stage1_metrics.jsonl"
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while len(_steps(metrics)) < 3:
        assert time.monotonic() < deadline, f"no 3 steps in {JOB_TIMEOUT_S} s\n{job.describe()}"
        assert job.info().get("JobState") in ("PENDING", "RUNNING"), job.describe()
        time.sleep(0.05)
    signalled_at = len(_steps(metrics))
    run(["scancel", "--signal=USR1", "--batch", job.id])
    info = job.wait(JOB_TIMEOUT_S)
    log = job.log_text()
    assert signalled_at < STEPS, f"the run finished before the signal\n{job.describe()}"
    assert info["Restarts"] == "1" and info["ExitCode"] == "0:0", job.describe()
    assert "exiting with code 17" in log and "requeueing job" in log, job.describe()
    assert "stage1: resumed from" in log, job.describe()

    assert _steps(metrics) == _steps(ref_out / "stage1/stage1_metrics.jsonl")
    a, b = ref_out / "stage1/checkpoints/final", out / "stage1/checkpoints/final"
    if _same_tensor_files(a, b):
        return
    cmp = subprocess.run(
        [sys.executable, "-m", "tests.slurm.ckpt_compare", str(a), str(b)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr[-3000:]


def test_stage1_plain_scancel_loses_at_most_save_interval_and_resubmit_matches(
    tiny, reference, tmp_path
):
    """A plain `scancel` is a hard stop (srun turns the job's SIGTERM into SIGKILL for every
    task): no requeue, and the periodic checkpoints bound the loss. Cancelled right after
    the save at step SAVE_INTERVAL, the resubmitted job resumes there and ends with the
    uninterrupted run's weights and metrics."""
    cfg, ov = tiny
    ref_out = reference[0]
    out = tmp_path / "cancelled"
    args = [*ov, *LAYOUT, f"output_dir={out}", f"checkpoint.save_interval={SAVE_INTERVAL}"]
    env = slurm_env(CONFIG=str(cfg))
    job = sbatch("stage1.sh", args, log_dir=tmp_path / "logs", sbatch_args=CPU_JOB, env=env)
    latest = out / "stage1/checkpoints/latest"
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not (latest.exists() and latest.read_text().strip() == str(SAVE_INTERVAL)):
        assert time.monotonic() < deadline, (
            f"no checkpoint at step {SAVE_INTERVAL}\n{job.describe()}"
        )
        assert job.info().get("JobState") in ("PENDING", "RUNNING"), job.describe()
        time.sleep(0.05)
    run(["scancel", job.id])
    info = job.wait(JOB_TIMEOUT_S, states=("CANCELLED",))
    log = job.log_text()
    done = max(r["step"] for r in _steps(out / "stage1/stage1_metrics.jsonl"))
    saved = int(latest.read_text())
    assert done < STEPS and done - saved <= SAVE_INTERVAL, (done, saved, job.describe())
    assert info["Restarts"] == "0" and "SIGTERM received" in log, job.describe()
    assert "forwarding to srun" not in log and "requeueing" not in log, job.describe()

    again = sbatch("stage1.sh", args, log_dir=tmp_path / "logs", sbatch_args=CPU_JOB, env=env)
    again.wait(JOB_TIMEOUT_S)
    assert "stage1: resumed from" in again.log_text(), again.describe()
    last = {r["step"]: r for r in _steps(out / "stage1/stage1_metrics.jsonl")}
    assert last == {r["step"]: r for r in _steps(ref_out / "stage1/stage1_metrics.jsonl")}
    a, b = ref_out / "stage1/checkpoints/final", out / "stage1/checkpoints/final"
    if _same_tensor_files(a, b):
        return
    cmp = subprocess.run(
        [sys.executable, "-m", "tests.slurm.ckpt_compare", str(a), str(b)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr[-3000:]


def _same_tensor_files(a: Path, b: Path) -> bool:
    """Whether two torch.distributed.checkpoint directories hold byte-identical shard files laid
    out by the same index (then every tensor is equal; the index differs only in save ids).
    Otherwise the caller compares tensor by tensor."""
    import pickle

    ma, mb = (pickle.loads((d / ".metadata").read_bytes()) for d in (a, b))
    if (ma.state_dict_metadata, ma.storage_data) != (mb.state_dict_metadata, mb.storage_data):
        return False
    names = sorted(p.name for p in a.glob("*.distcp"))
    return (
        bool(names)
        and names == sorted(p.name for p in b.glob("*.distcp"))
        and all(filecmp.cmp(a / n, b / n, shallow=False) for n in names)
    )
