"""scripts/slurm/rollout.sh for real (hf engine on CPU, tiny random model).

- A 4-task job array writes one shard per slot and rollout_finalize.sh (afterok on the array)
  the manifest; two shards deleted, `--array=1,3` reruns only their slots (slots 1 and 3 of
  4: the fleet size is the array's maximum + 1), the finalize job writes the same manifest.
- Opt-in (ERPD_SLURM_LONG=1, about 3 minutes on 2 CPUs): a 2-task array deals the shards,
  a USR1 mid-run requeues and the rerun skips the finished shards, ending with the same set.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pytest

from tests.rollout.conftest import GSM_ROWS, make_tiny_model, write_jsonl
from tests.slurm.cluster import run, sbatch, slurm_env

pytestmark = [pytest.mark.slurm, pytest.mark.usefixtures("slurm_cluster")]
LONG = pytest.mark.skipif(
    os.environ.get("ERPD_SLURM_LONG") != "1", reason="long Slurm test: set ERPD_SLURM_LONG=1"
)

# --exclusive=user --mem=3G (the script asks for whole nodes): the array tasks share the one
# local node, 2 at a time on its 2 CPUs
ARRAY_JOB = ["--ntasks-per-node=1", "--time=00:15:00", "--exclusive=user", "--mem=3G"]


def _overrides(
    tmp: Path, out: Path, *, prompts: int = 6, samples: int = 4, new_tokens: int = 16
) -> list[str]:
    return [
        f"rollout.model_path={tmp / 'model'}",
        f"rollout.dataset={tmp / 'prompts.jsonl'}",
        f"rollout.output_dir={out}",
        f"rollout.num_prompts={prompts}",
        f"rollout.samples_per_prompt={samples}",
        "rollout.prompts_per_shard=2",
        f"rollout.max_new_tokens={new_tokens}",
        "rollout.max_prompt_tokens=64",
        "rollout.batch_size=8",
        "rollout.verifier_workers=1",
        "rollout.seed=7",
        "logging.progress_bar=false",
        "rollout.prompt_template='{question} Answer in \\boxed{}.'",
    ]


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
        if tasks and all(
            t.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT") for t in tasks
        ):
            return tasks
        time.sleep(1)
    run(["scancel", job_id], check=False)
    raise AssertionError(f"array {job_id} not done after {timeout} s: {_array_tasks(job_id)}")


@LONG
def test_rollout_array_deals_shards_and_a_usr1_requeue_resumes(inputs, tmp_path):
    env = slurm_env(CONFIG="configs/recipes/tiny-cpu.yaml")
    full = tmp_path / "full"
    job = sbatch(
        "rollout.sh",
        _overrides(inputs, full),
        log_dir=tmp_path / "logs",
        sbatch_args=[*ARRAY_JOB, "--array=0-1"],
        env=env,
    )
    tasks = _wait_array(job.id, 300)
    logs = "\n".join(p.read_text() for p in sorted((tmp_path / "logs").glob("*.out")))
    assert all(t["JobState"] == "COMPLETED" for t in tasks), logs[-6000:]
    assert "slot 0/2 owns 2 shards" in logs and "slot 1/2 owns 1 shards" in logs, logs[-6000:]
    manifest = json.loads((full / "manifest.json").read_text())

    part = tmp_path / "part"
    job = sbatch(
        "rollout.sh",
        _overrides(inputs, part),
        log_dir=tmp_path / "logs1",
        sbatch_args=[*ARRAY_JOB, "--array=0"],
        env=env,
    )
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
    assert (
        json.loads((part / "manifest.json").read_text())["fingerprint"] == manifest["fingerprint"]
    )


def _fleet(inputs: Path, out: Path, array: str, log_dir: Path) -> str:
    """Submit the rollout array and its finalize job (afterok); wait for both; the finalize log."""
    env = slurm_env(CONFIG="configs/recipes/tiny-cpu.yaml")
    args = _overrides(inputs, out, prompts=8, samples=2, new_tokens=8)
    job = sbatch(
        "rollout.sh", args, log_dir=log_dir, sbatch_args=[*ARRAY_JOB, f"--array={array}"], env=env
    )
    fin = sbatch(
        "rollout_finalize.sh",
        args,
        log_dir=log_dir,
        env=env,
        sbatch_args=[
            f"--dependency=afterok:{job.id}",
            "--kill-on-invalid-dep=yes",
            "--time=00:10:00",
        ],
    )
    tasks = _wait_array(job.id, 300)
    logs = "\n".join(p.read_text() for p in sorted(log_dir.glob("erpd-rollout-[0-9]*.out")))
    assert all(t["JobState"] == "COMPLETED" for t in tasks), logs[-6000:]
    fin.wait(120)
    return logs + fin.log_text()


def test_rollout_fleet_reruns_failed_slots_and_finalize_writes_the_same_manifest(inputs, tmp_path):
    out = tmp_path / "fleet"
    logs = _fleet(inputs, out, "0-3", tmp_path / "logs")
    for slot in range(4):
        assert f"slot {slot}/4 owns 1 shards, 1 to generate" in logs, logs[-6000:]
    assert f"wrote {out / 'manifest.json'}" in logs, logs[-6000:]
    full = json.loads((out / "manifest.json").read_text())
    assert full["num_shards"] == 4 and full["num_samples"] == 16, full

    for s in (1, 3):  # two slots "failed": their shards are gone
        (out / f"shard-{s:05d}.parquet").unlink()
    logs = _fleet(inputs, out, "1,3", tmp_path / "logs1")
    assert (
        "slot 1/4 owns 1 shards, 1 to generate" in logs
        and "slot 3/4 owns 1 shards, 1 to generate" in logs
    ), logs[-6000:]
    again = json.loads((out / "manifest.json").read_text())
    # generation seconds differ (timing, the compute record's wall time, hence the self
    # digest); the data and the token counts do not
    for key in ("scored_tokens", "generated_tokens", "model_flops"):
        assert again["compute"][key] == full["compute"][key], key
    for m in (full, again):
        for key in ("timing", "compute", "self_sha256"):
            m.pop(key)
    assert again == full
