"""scripts/slurm/rollout.sh for real (hf engine on CPU, tiny random model): a 2-task job
array deals the shards and writes the manifest; a USR1 mid-run requeues and the rerun skips
the finished shards, ending with the same rollout set. About 3 minutes on 2 CPUs, so opt-in:
ERPD_SLURM_LONG=1."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pytest

from tests.rollout.conftest import GSM_ROWS, make_tiny_model, write_jsonl
from tests.slurm.cluster import run, sbatch, slurm_env

pytestmark = [
    pytest.mark.slurm,
    pytest.mark.usefixtures("slurm_cluster"),
    pytest.mark.skipif(os.environ.get("ERPD_SLURM_LONG") != "1", reason="long Slurm test: set ERPD_SLURM_LONG=1"),
]

ARRAY_JOB = ["--gpus-per-node=0", "--ntasks-per-node=1", "--time=00:15:00"]


def _overrides(tmp: Path, out: Path) -> list[str]:
    return [f"rollout.model_path={tmp / 'model'}", f"rollout.dataset={tmp / 'prompts.jsonl'}",
            f"rollout.output_dir={out}", "rollout.num_prompts=6", "rollout.samples_per_prompt=4",
            "rollout.prompts_per_shard=2", "rollout.max_new_tokens=16", "rollout.max_prompt_tokens=64",
            "rollout.batch_size=8", "rollout.verifier_workers=1", "rollout.seed=7", "logging.progress_bar=false",
            "rollout.prompt_template='{question} Answer in \\boxed{}.'"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("slurm-rollout")
    make_tiny_model(tmp / "model")
    write_jsonl(tmp / "prompts.jsonl", GSM_ROWS)
    return tmp


def _array_tasks(job_id: str) -> list[dict[str, str]]:
    out = run(["scontrol", "show", "job", "-o", job_id], check=False).stdout
    return [dict(re.findall(r"(\w+)=(\S*)", line)) for line in out.splitlines() if line.strip()]


def _wait_array(job_id: str, timeout: float) -> list[dict[str, str]]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        tasks = _array_tasks(job_id)
        if tasks and all(t.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT") for t in tasks):
            return tasks
        time.sleep(1)
    run(["scancel", job_id], check=False)
    raise AssertionError(f"array {job_id} not done after {timeout} s: {_array_tasks(job_id)}")


def test_rollout_array_deals_shards_and_a_usr1_requeue_resumes(inputs, tmp_path):
    env = slurm_env(CONFIG="configs/recipes/tiny-cpu.yaml")
    full = tmp_path / "full"
    job = sbatch("rollout.sh", _overrides(inputs, full), log_dir=tmp_path / "logs",
                 sbatch_args=[*ARRAY_JOB, "--array=0-1"], env=env)
    tasks = _wait_array(job.id, 300)
    logs = "\n".join(p.read_text() for p in sorted((tmp_path / "logs").glob("*.out")))
    assert all(t["JobState"] == "COMPLETED" for t in tasks), logs[-6000:]
    assert "slot 0/2 owns 2 shards" in logs and "slot 1/2 owns 1 shards" in logs, logs[-6000:]
    manifest = json.loads((full / "manifest.json").read_text())

    part = tmp_path / "part"
    job = sbatch("rollout.sh", _overrides(inputs, part), log_dir=tmp_path / "logs1",
                 sbatch_args=[*ARRAY_JOB, "--array=0"], env=env)
    deadline = time.monotonic() + 300
    while not list(part.glob("shard-*.parquet")):
        assert time.monotonic() < deadline, f"no shard after 300 s: {_array_tasks(job.id)}"
        time.sleep(0.2)
    run(["scancel", "--signal=USR1", "--batch", f"{job.id}_0"])
    (task,) = _wait_array(job.id, 300)
    log = "\n".join(p.read_text() for p in (tmp_path / "logs1").glob("*.out"))
    assert task["JobState"] == "COMPLETED" and task["Restarts"] == "1", log[-6000:]
    assert "stopped on USR1: requeueing job" in log and "3 to generate" in log, log[-6000:]
    assert re.search(r"owns 3 shards, [12] to generate", log.split("(restart 1)")[1]), log[-6000:]
    assert json.loads((part / "manifest.json").read_text())["fingerprint"] == manifest["fingerprint"]
