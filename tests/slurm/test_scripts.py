"""Static checks of the Slurm scripts (no cluster needed): syntax, shellcheck, thinness, and
the job chain erpd_round.sh submits (with a stand-in sbatch)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = sorted((ROOT / "scripts/slurm").glob("*.sh"))
LAUNCHERS = [
    "rollout.sh",
    "rollout_finalize.sh",
    "stage1.sh",
    "cache_teacher.sh",
    "stage2.sh",
    "evaluate.sh",
    "convert.sh",
]
REQUEUED = ["rollout.sh", "stage1.sh", "cache_teacher.sh", "stage2.sh"]
"""The launchers that stop gracefully on USR1 and requeue (the others would only start over)."""


def test_all_scripts_exist():
    names = {p.name for p in SCRIPTS}
    assert set(LAUNCHERS) | {"common.sh", "erpd_round.sh", "local_cluster.sh"} <= names, names


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_bash_syntax(script):
    p = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr


def test_shellcheck_clean():
    if not shutil.which("shellcheck"):
        pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
    p = subprocess.run(
        ["shellcheck", "-x", *map(str, SCRIPTS)], capture_output=True, text=True, cwd=ROOT
    )
    assert p.returncode == 0, p.stdout + p.stderr


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launchers_are_thin(name):
    """#SBATCH lines, environment, one srun through common.sh; no hyperparameters, no pkill."""
    text = (ROOT / "scripts/slurm" / name).read_text()
    code = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    assert len(code) <= 12, code
    assert sum("erpd_srun" in ln for ln in code) == 1, code
    assert not re.search(r"\b[a-z_0-9]+\.[a-z_0-9]+=\S", "\n".join(code)), (
        "a config override in a launcher"
    )
    assert "--open-mode=append" in text and "--output=logs/" in text, name
    for s in ("--signal=B:USR1@", "--requeue"):
        assert (f"#SBATCH {s}" in text) == (name in REQUEUED), (name, s)
    # GPUs are the job's (--gpus-per-node=N or --gres=gpu:N on the command line), not a
    # hard-coded request that --gres sites would have to edit out
    assert not re.search(r"^#SBATCH --(gpus|gres)", text, re.M), name


def test_evaluate_refuses_more_than_one_node():
    """evaluate.sh runs one process; on 2 nodes it says so before any srun."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(SLURM_JOB_NUM_NODES="2", SLURM_JOB_ID="7", ERPD_ROOT=str(ROOT), PYTHON="/bin/false")
    p = subprocess.run(
        ["bash", "scripts/slurm/evaluate.sh", "configs/recipes/tiny-cpu.yaml"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (
        p.returncode == 2 and "one process on one node" in p.stdout and "--nodes=1" in p.stdout
    ), p


def test_master_port_is_outside_the_ephemeral_range():
    """common.sh derives MASTER_PORT from the job id and restart count, outside the node's
    ip_local_port_range (the kernel's pool of source ports)."""
    rng = Path("/proc/sys/net/ipv4/ip_local_port_range")
    lo, hi = map(int, rng.read_text().split()) if rng.exists() else (32768, 60999)
    ports = set()
    for job, restart in ((1, 0), (123456, 0), (123456, 1), (99999999, 3)):
        p = subprocess.run(
            ["bash", "-c", "source scripts/slurm/common.sh && erpd_master_port"],
            cwd=ROOT,
            env={**os.environ, "SLURM_JOB_ID": str(job), "SLURM_RESTART_COUNT": str(restart)},
            capture_output=True,
            text=True,
            timeout=30,
        )
        port = int(p.stdout)
        assert 1024 <= port <= 65535 and not lo <= port <= hi, (port, lo, hi)
        ports.add(port)
    assert len(ports) == 4, ports  # a requeue (restart) gets another port


def test_no_pkill_anywhere():
    for p in SCRIPTS:
        assert not re.search(r"\b(pkill|killall)\b", p.read_text()), p


def _fake_sbatch(tmp_path: Path) -> dict[str, str]:
    fake = tmp_path / "sbatch"
    fake.write_text(
        '#!/usr/bin/env bash\necho "$*" >>"$FAKE_DIR/sbatch.calls"\n'
        'echo "$((RANDOM + 100));cluster"\n'
    )
    fake.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(
        FAKE_DIR=str(tmp_path),
        PATH=f"{tmp_path}:{os.environ['PATH']}",
        LOG_DIR=str(tmp_path / "logs"),
    )
    return env


def test_round_submits_an_afterok_chain(tmp_path):
    env = _fake_sbatch(tmp_path) | {"CONFIG": "configs/recipes/llama3-8b-2node.yaml"}
    p = subprocess.run(
        ["bash", "scripts/slurm/erpd_round.sh", "stage1.epochs=2"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 0, p.stderr
    ids = [line.split() for line in p.stdout.splitlines()]
    assert [s for s, _ in ids] == [
        "rollout",
        "finalize",
        "stage1",
        "cache",
        "stage2",
        "evaluate",
    ], p.stdout
    calls = (tmp_path / "sbatch.calls").read_text().splitlines()
    assert "--dependency" not in calls[0] and "--array=0-3" in calls[0], calls
    for (_, prev), call in zip(ids, calls[1:]):
        assert f"--dependency=afterok:{prev} " in call and "--kill-on-invalid-dep=yes" in call, call
    # the manifest is written by one job after the whole array, not by a fleet member
    assert calls[1].split()[-3].endswith("rollout_finalize.sh"), calls
    # the recipe's parallel.num_nodes (2) and 8 GPUs per node for the trainers
    assert "--nodes=2 --ntasks-per-node=8 --gpus-per-node=8" in calls[2], calls
    # the recipe goes as the first argument: SBATCH_EXPORT=NONE jobs get it too
    assert calls[2].endswith(
        "scripts/slurm/stage1.sh configs/recipes/llama3-8b-2node.yaml stage1.epochs=2"
    ), calls
    assert calls[3].split()[-3].endswith("cache_teacher.sh"), calls
    assert "--nodes=1 --gpus-per-node=8" in calls[5] and "evaluate.sh" in calls[5], calls


def test_round_with_a_one_slot_fleet_submits_no_finalize_job(tmp_path):
    env = _fake_sbatch(tmp_path) | {
        "CONFIG": "configs/recipes/llama3-8b-2node.yaml",
        "ROLLOUT_ARRAY": "0",
        "STEPS": "rollout finalize stage1",
    }

    def submit(extra: dict) -> tuple[list[list[str]], str]:
        p = subprocess.run(
            ["bash", "scripts/slurm/erpd_round.sh"],
            env=env | extra,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert p.returncode == 0, p.stderr
        return [line.split() for line in p.stdout.splitlines()], p.stderr

    ids, err = submit({})
    assert [s for s, _ in ids] == ["rollout", "stage1"], ids
    assert "no finalize job" in err, err
    calls = (tmp_path / "sbatch.calls").read_text().splitlines()
    assert f"--dependency=afterok:{ids[0][1]} " in calls[1], calls
    # a rerun of slot 0 of four, or a finalize submitted on its own, still gets the job
    for extra in ({"FLEET_SIZE": "4"}, {"STEPS": "finalize stage1"}):
        ids, _ = submit(extra)
        assert "finalize" in [s for s, _ in ids], (extra, ids)


def test_round_gres_sites_and_fleet_size(tmp_path):
    """GRES=gpu:4 requests --gres instead of --gpus-per-node; the fleet size of a partial rerun
    (ROLLOUT_ARRAY=1,3) is the highest slot + 1 and reaches the rollout job as FLEET_SIZE."""
    env = _fake_sbatch(tmp_path) | {
        "CONFIG": "configs/recipes/tiny-cpu.yaml",
        "NODES": "1",
        "GRES": "gpu:4",
        "GPUS_PER_NODE": "4",
        "ROLLOUT_ARRAY": "1,3",
        "STEPS": "rollout stage1",
    }
    (tmp_path / "sbatch").write_text(
        '#!/usr/bin/env bash\necho "FLEET_SIZE=$FLEET_SIZE $*" >>"$FAKE_DIR/sbatch.calls"'
        "\necho 101\n"
    )
    p = subprocess.run(
        ["bash", "scripts/slurm/erpd_round.sh"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 0, p.stderr
    calls = (tmp_path / "sbatch.calls").read_text().splitlines()
    assert calls[0].startswith("FLEET_SIZE=4 ") and "--array=1,3 --gres=gpu:4" in calls[0], calls
    assert "--ntasks-per-node=4 --gres=gpu:4" in calls[1] and "gpus-per-node" not in " ".join(
        calls
    ), calls


def test_round_unknown_step_is_an_error(tmp_path):
    env = _fake_sbatch(tmp_path) | {
        "CONFIG": "configs/recipes/tiny-cpu.yaml",
        "STEPS": "stage1 stage3",
        "NODES": "1",
    }
    p = subprocess.run(
        ["bash", "scripts/slurm/erpd_round.sh"], env=env, cwd=ROOT, capture_output=True, text=True
    )
    assert p.returncode == 2 and "unknown step 'stage3'" in p.stderr, p.stderr


@pytest.mark.parametrize(
    "args, config",
    [
        (["configs/recipes/a.yaml", "x.y=1"], "configs/recipes/a.yaml x.y=1"),
        (["--config", "b.yml", "x.y=1"], "b.yml x.y=1"),
        (["--config=c.yaml"], "c.yaml"),
        (["data.path=d.yaml"], "env.yaml data.path=d.yaml"),  # an override is not a recipe
        ([], "env.yaml"),
    ],
)
def test_recipe_is_the_first_argument_else_config(args, config):
    """erpd_srun_cli takes the recipe from the first argument (SBATCH_EXPORT=NONE jobs), else
    CONFIG."""
    script = (
        'source scripts/slurm/common.sh; erpd_srun() { echo "srun: $*"; }; '
        'erpd_srun_cli stage1 "$@"'
    )
    p = subprocess.run(
        ["bash", "-c", script, "_", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "CONFIG": "env.yaml"},
    )
    assert (
        p.returncode == 0
        and p.stdout.strip() == f"srun: -m erpd_megatron.cli stage1 --config {config}"
    ), p


def test_no_recipe_is_a_clear_error():
    script = "source scripts/slurm/common.sh; erpd_srun_cli stage1 a.b=c"
    env = {k: v for k, v in os.environ.items() if k != "CONFIG"}
    p = subprocess.run(
        ["bash", "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=30, env=env
    )
    assert p.returncode == 2 and "no recipe: sbatch" in p.stdout, p
