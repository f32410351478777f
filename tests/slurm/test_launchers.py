"""The launchers on the local cluster with stand-in programs (no trainer needed): a 2-task
srun, time limit -> USR1 -> forward -> exit 17 -> requeue -> resume, scancel (TERM, not
forwarded) without requeue, a job submitted with --export (recipe as argument, computed
rendezvous), evaluation as one task, and a round's afterok chain."""

from __future__ import annotations

import os
import re
import stat
import time
from pathlib import Path

import pytest

from tests.slurm.cluster import CPU_JOB, run, sbatch, slurm_env

pytestmark = [pytest.mark.slurm, pytest.mark.usefixtures("slurm_cluster")]

# Stands in for `python -m erpd_megatron.cli stage1 ...`: steps of 0.2 s until USR1/TERM, then
# saves its step and exits 17 like the trainer; a resumed run (a saved step) does 10 more steps.
FAKE_TRAINER = r"""#!/usr/bin/env bash
state=$FAKE_DIR/step.$SLURM_PROCID
step=$(cat "$state" 2>/dev/null || echo 0)
echo "fake rank $SLURM_PROCID/$SLURM_NTASKS start at $step: $*"
got=
trap 'got=1' USR1 TERM
end=$((step > 0 ? step + 10 : 3000))
while ((step < end)); do
  sleep 0.2
  step=$((step + 1))
  echo "$step" >"$state.progress"
  if [[ -n $got ]]; then
    echo "$step" >"$state"
    echo "fake rank $SLURM_PROCID checkpointed at $step"
    exit 17
  fi
done
echo "fake rank $SLURM_PROCID done"
"""

# Records its arguments; fails for the command in FAKE_FAIL.
FAKE_RECORDER = r"""#!/usr/bin/env bash
echo "$(date +%s.%N) array=${SLURM_ARRAY_TASK_ID:-}" \
  "rank=$SLURM_PROCID/$SLURM_NTASKS $*" >>"$FAKE_DIR/calls"
[[ " $* " != *" ${FAKE_FAIL:-none} "* ]]
"""


def _executable(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def _wait_for(cond, timeout: float, what: str, job=None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}" + (f"\n{job.describe()}" if job else ""))


def test_status_and_two_task_srun(tmp_path):
    st = run(["bash", "scripts/slurm/local_cluster.sh", "status"])
    assert "slurmctld: running" in st.stdout and "slurmd: running" in st.stdout, st.stdout
    script = _executable(
        tmp_path / "hello.sh",
        "#!/usr/bin/env bash\n#SBATCH --ntasks=2\n"
        'srun python3 -c \'import os; print("rank", os.environ["SLURM_PROCID"], '
        '"of", os.environ["SLURM_NTASKS"])\'\n',
    )
    job = sbatch(script, [], log_dir=tmp_path)
    job.wait(60)
    assert sorted(re.findall(r"rank \d of 2", job.log_text())) == ["rank 0 of 2", "rank 1 of 2"], (
        job.describe()
    )


def test_time_limit_usr1_checkpoints_requeues_and_resumes(tmp_path):
    """#SBATCH --signal=B:USR1@45 with a 1-minute limit: Slurm signals the batch shell 15-45 s
    in (it checks limits every ~30 s), the script forwards, the fake exits 17, the script
    requeues, the second run resumes and finishes."""
    fake = _executable(tmp_path / "fake_trainer", FAKE_TRAINER)
    env = slurm_env(
        PYTHON=str(fake), FAKE_DIR=str(tmp_path), CONFIG="configs/recipes/tiny-cpu.yaml"
    )
    job = sbatch(
        "stage1.sh",
        ["output_dir=/nowhere", "stage1.epochs=3"],
        log_dir=tmp_path / "logs",
        sbatch_args=[*CPU_JOB, "--time=1", "--signal=B:USR1@45"],
        env=env,
    )
    # an afterok dependent waits through the requeue and starts after the second run
    after = _executable(tmp_path / "after.sh", "#!/usr/bin/env bash\n#SBATCH --ntasks=1\ntrue\n")
    dep = sbatch(
        after,
        [],
        log_dir=tmp_path / "logs",
        env=env,
        sbatch_args=[f"--dependency=afterok:{job.id}", "--kill-on-invalid-dep=yes"],
    )
    info = job.wait(150)
    started = dep.wait(60)["StartTime"]
    assert started >= info["EndTime"], (started, info["EndTime"], dep.describe())  # ISO times
    log = job.log_text()
    assert info["Restarts"] == "1", job.describe()
    assert "SIGUSR1 received: forwarding to srun" in log, job.describe()
    assert "srun exited with 17 after SIGUSR1" in log and "requeueing job" in log, job.describe()
    assert "requeue failed" not in log, job.describe()
    resumed = [int(s) for s in re.findall(r"start at (\d+)", log)]
    assert len(resumed) == 4 and resumed[:2] == [0, 0] and min(resumed[2:]) > 0, job.describe()
    assert log.count(" done") == 2 and "(restart 1)" in log, job.describe()
    assert (
        "-m erpd_megatron.cli stage1 --config configs/recipes/tiny-cpu.yaml output_dir=/nowhere "
        "stage1.epochs=3" in log
    ), job.describe()


def test_scancel_stops_without_requeue(tmp_path):
    fake = _executable(tmp_path / "fake_trainer", FAKE_TRAINER)
    env = slurm_env(
        PYTHON=str(fake), FAKE_DIR=str(tmp_path), CONFIG="configs/recipes/tiny-cpu.yaml"
    )
    job = sbatch("stage2.sh", [], log_dir=tmp_path / "logs", sbatch_args=CPU_JOB, env=env)
    progress = tmp_path / "step.0.progress"
    _wait_for(
        lambda: progress.exists() and int(progress.read_text() or 0) >= 2,
        120,
        "the fake's 2nd step",
        job,
    )
    run(["scancel", job.id])
    info = job.wait(120, states=("CANCELLED",))
    log = job.log_text()
    assert info["Restarts"] == "0", job.describe()
    assert "requeueing" not in log and "SIGTERM received" in log, job.describe()
    assert "forwarding to srun" not in log, job.describe()  # srun would SIGKILL the tasks


# Records its arguments and the rendezvous it was given.
FAKE_ENV_RECORDER = r"""#!/usr/bin/env bash
echo "rank=$SLURM_PROCID/$SLURM_NTASKS master=$MASTER_ADDR:$MASTER_PORT args=$*" >>"$FAKE_DIR/calls"
"""


def test_export_none_recipe_argument_and_computed_rendezvous(tmp_path):
    """sbatch --export=<only a few variables> (like SBATCH_EXPORT=NONE: nothing of the submit
    shell but those): the recipe comes as the first argument, srun still passes the computed
    MASTER_ADDR/MASTER_PORT to the tasks (it would inherit SLURM_EXPORT_ENV and start them
    without), and the inherited bogus MASTER_* lose."""
    fake = _executable(tmp_path / "fake_python", FAKE_ENV_RECORDER)
    env = slurm_env(MASTER_ADDR="bogus-host", MASTER_PORT="1")
    exports = f"--export=PYTHON={fake},FAKE_DIR={tmp_path},GPUS_PER_NODE=0,MASTER_ADDR,MASTER_PORT"
    job = sbatch(
        "stage1.sh",
        ["configs/recipes/tiny-cpu.yaml", "output_dir=/nowhere"],
        log_dir=tmp_path / "logs",
        sbatch_args=[*CPU_JOB, exports],
        env=env,
    )
    job.wait(120)
    calls = sorted((tmp_path / "calls").read_text().splitlines())
    host = run(["hostname", "-s"]).stdout.strip()
    assert [c.split()[0] for c in calls] == ["rank=0/2", "rank=1/2"], calls
    for c in calls:
        addr, port = re.search(r"master=(\S*):(\d*)", c).groups()
        assert addr == host and port and 1024 < int(port) < 32768, (c, job.describe())
        assert c.endswith(
            "args=-m erpd_megatron.cli stage1 --config configs/recipes/tiny-cpu.yaml "
            "output_dir=/nowhere"
        )


def test_evaluate_is_one_task(tmp_path):
    """evaluate.sh starts one process (it drives all the node's GPUs) even on a job with 2
    tasks per node: evaluation does not split its work, 2 tasks would do it twice."""
    fake = _executable(tmp_path / "fake_python", FAKE_RECORDER)
    env = slurm_env(PYTHON=str(fake), FAKE_DIR=str(tmp_path))
    job = sbatch(
        "evaluate.sh",
        ["configs/recipes/tiny-cpu.yaml"],
        log_dir=tmp_path / "logs",
        sbatch_args=CPU_JOB,
        env=env,
    )
    job.wait(120)
    calls = (tmp_path / "calls").read_text().splitlines()
    assert len(calls) == 1 and "rank=0/1 -m erpd_megatron.cli evaluate --config" in calls[0], calls


def test_round_chain_runs_in_order_and_stops_at_a_failure(tmp_path):
    fake = _executable(tmp_path / "fake_python", FAKE_RECORDER)
    env = slurm_env(
        PYTHON=str(fake),
        FAKE_DIR=str(tmp_path),
        FAKE_FAIL="cache",
        CONFIG="configs/recipes/tiny-cpu.yaml",
        NODES="1",
        GPUS_PER_NODE="0",
        TASKS_PER_NODE="2",
        ROLLOUT_ARRAY="0-1",
        LOG_DIR=str(tmp_path / "logs"),
        SBATCH_ARGS="--time=00:10:00",
    )
    p = run(["bash", "scripts/slurm/erpd_round.sh", "output_dir=/nowhere"], env=env)
    ids = dict(line.split() for line in p.stdout.splitlines())
    assert list(ids) == ["rollout", "finalize", "stage1", "cache", "stage2", "evaluate"], p.stdout
    for step in ("stage2", "evaluate"):
        deps = run(["scontrol", "show", "job", "-o", ids[step]]).stdout
        assert "Dependency=afterok:" in deps or "JobState=CANCELLED" in deps, deps

    def state(job_id: str) -> str:
        out = run(["scontrol", "show", "job", "-o", job_id], check=False).stdout
        return " ".join(sorted(set(re.findall(r"JobState=(\S+)", out))))

    _wait_for(
        lambda: state(ids["evaluate"]) == "CANCELLED",
        180,
        f"the chain to stop; states { {k: state(v) for k, v in ids.items()} }",
    )
    assert state(ids["rollout"]) == "COMPLETED" and state(ids["stage1"]) == "COMPLETED"
    assert state(ids["cache"]) == "FAILED" and state(ids["stage2"]) == "CANCELLED"
    # a dependent cancelled for a failed job stays cancelled when that job is requeued later
    # (docs/cluster.md, "Dependencies": resubmit the rest with STEPS=... AFTER=...)
    run(["scontrol", "requeue", ids["cache"]])
    _wait_for(
        lambda: (
            "Restarts=1" in run(["scontrol", "show", "job", "-o", ids["cache"]]).stdout
            and state(ids["cache"]) == "FAILED"
        ),
        90,
        "the requeued cache job to fail again",
    )
    assert state(ids["stage2"]) == "CANCELLED" and state(ids["evaluate"]) == "CANCELLED"
    calls = sorted((tmp_path / "calls").read_text().splitlines(), key=lambda s: float(s.split()[0]))
    steps = [re.search(r"erpd_megatron\.cli (\w+)", c).group(1) for c in calls]
    assert steps == ["rollout"] * 3 + ["stage1"] * 2 + ["cache"] * 4, calls  # cache: 2 runs
    assert sorted(re.search(r"array=(\d*)", c).group(1) for c in calls[:2]) == ["0", "1"], calls
    assert calls[2].endswith("--finalize") and "array= rank=0/1" in calls[2], (
        calls
    )  # after the array
    assert all("--config configs/recipes/tiny-cpu.yaml output_dir=/nowhere" in c for c in calls), (
        calls
    )
    assert {re.search(r"rank=(\S+)", c).group(1) for c in calls[3:5]} == {"0/2", "1/2"}, calls
    assert os.path.exists(tmp_path / "logs" / f"erpd-stage1-{ids['stage1']}.out")
