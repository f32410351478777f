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
LAUNCHERS = ["rollout.sh", "stage1.sh", "cache_teacher.sh", "stage2.sh", "evaluate.sh", "convert.sh"]


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
    p = subprocess.run(["shellcheck", "-x", *map(str, SCRIPTS)], capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 0, p.stdout + p.stderr


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launchers_are_thin(name):
    """#SBATCH lines, environment, one srun through common.sh; no hyperparameters, no pkill."""
    text = (ROOT / "scripts/slurm" / name).read_text()
    code = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    assert len(code) <= 12, code
    assert sum("erpd_srun" in ln for ln in code) == 1, code
    assert not re.search(r"\b[a-z_0-9]+\.[a-z_0-9]+=\S", "\n".join(code)), "a config override in a launcher"
    for s in ("--signal=B:USR1@", "--requeue", "--open-mode=append", "--output=logs/"):
        assert s in text or name == "convert.sh", (name, s)


def test_no_pkill_anywhere():
    for p in SCRIPTS:
        assert not re.search(r"\b(pkill|killall)\b", p.read_text()), p


def _fake_sbatch(tmp_path: Path) -> dict[str, str]:
    fake = tmp_path / "sbatch"
    fake.write_text('#!/usr/bin/env bash\necho "$*" >>"$FAKE_DIR/sbatch.calls"\necho "$((RANDOM + 100));cluster"\n')
    fake.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(FAKE_DIR=str(tmp_path), PATH=f"{tmp_path}:{os.environ['PATH']}", LOG_DIR=str(tmp_path / "logs"))
    return env


def test_round_submits_an_afterok_chain(tmp_path):
    env = _fake_sbatch(tmp_path) | {"CONFIG": "configs/recipes/llama3-8b-2node.yaml"}
    p = subprocess.run(["bash", "scripts/slurm/erpd_round.sh", "stage1.epochs=2"], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    ids = [line.split() for line in p.stdout.splitlines()]
    assert [s for s, _ in ids] == ["rollout", "stage1", "cache", "stage2", "evaluate"], p.stdout
    calls = (tmp_path / "sbatch.calls").read_text().splitlines()
    assert "--dependency" not in calls[0] and "--array=0-3" in calls[0], calls
    for (_, prev), call in zip(ids, calls[1:]):
        assert f"--dependency=afterok:{prev} " in call and "--kill-on-invalid-dep=yes" in call, call
    # the recipe's parallel.num_nodes (2) and 8 GPUs per node for the trainers
    assert "--nodes=2 --ntasks-per-node=8 --gpus-per-node=8" in calls[1], calls
    assert calls[1].endswith("scripts/slurm/stage1.sh stage1.epochs=2"), calls
    assert calls[2].split()[-2].endswith("cache_teacher.sh"), calls


def test_round_unknown_step_is_an_error(tmp_path):
    env = _fake_sbatch(tmp_path) | {"CONFIG": "configs/recipes/tiny-cpu.yaml", "STEPS": "stage1 stage3", "NODES": "1"}
    p = subprocess.run(["bash", "scripts/slurm/erpd_round.sh"], env=env, cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 2 and "unknown step 'stage3'" in p.stderr, p.stderr
