"""Runtime: launcher environment parsing, single-process init without any env, a real
2-process init from Slurm variables (no Slurm needed), the CPU harness."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from erpd_megatron.runtime.distributed import expand_nodelist, parse_launch_env

SCRIPT = Path(__file__).with_name("launch_check.py")
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _clean_env(**extra: str) -> dict:
    env = {
        k: v for k, v in os.environ.items() if k not in LAUNCH_VARS and not k.startswith("SLURM_")
    }
    env.update(extra)
    return env


def _result(stdout: str) -> dict:
    lines = [ln for ln in stdout.splitlines() if ln.startswith("RESULT ")]
    assert lines, stdout[-3000:]
    return json.loads(lines[-1][len("RESULT ") :])


def test_parse_torchrun_env():
    env = parse_launch_env(
        {
            "RANK": "5",
            "WORLD_SIZE": "16",
            "LOCAL_RANK": "1",
            "MASTER_ADDR": "node7",
            "MASTER_PORT": "29555",
            "SLURM_PROCID": "0",
            "SLURM_NTASKS": "2",
        }
    )
    assert (
        env.rank,
        env.world_size,
        env.local_rank,
        env.master_addr,
        env.master_port,
        env.launcher,
    ) == (5, 16, 1, "node7", 29555, "torchrun")


def test_parse_slurm_env():
    base = {
        "SLURM_PROCID": "9",
        "SLURM_NTASKS": "16",
        "SLURM_LOCALID": "1",
        "SLURM_JOB_NODELIST": "gpu[007-008,10],login1",
        "SLURM_JOB_ID": "123456",
    }
    env = parse_launch_env(base)
    assert (env.rank, env.world_size, env.local_rank, env.launcher) == (9, 16, 1, "slurm")
    assert env.master_addr == "gpu007"
    assert env.master_port == 20000 + 123456 % 10000  # below the ephemeral range 32768-60999
    restarted = parse_launch_env({**base, "SLURM_RESTART_COUNT": "1"}).master_port
    assert restarted == 20000 + (123456 + 7919) % 10000
    # MASTER_* inherited from the submit shell are ignored; those the scripts set for this job
    # (ERPD_MASTER_JOB=$SLURM_JOB_ID) and the explicit ERPD_MASTER_* are used
    inherited = {**base, "MASTER_PORT": "4242", "MASTER_ADDR": "localhost"}
    env = parse_launch_env(inherited)
    assert (env.master_addr, env.master_port) == ("gpu007", 20000 + 123456 % 10000)
    env = parse_launch_env({**inherited, "ERPD_MASTER_JOB": "999"})
    assert (env.master_addr, env.master_port) == ("gpu007", 20000 + 123456 % 10000)
    env = parse_launch_env({**inherited, "MASTER_ADDR": "head", "ERPD_MASTER_JOB": "123456"})
    assert (env.master_addr, env.master_port) == ("head", 4242)
    env = parse_launch_env({**inherited, "ERPD_MASTER_ADDR": "other", "ERPD_MASTER_PORT": "2555"})
    assert (env.master_addr, env.master_port) == ("other", 2555)
    with pytest.raises(RuntimeError, match="NODELIST"):
        parse_launch_env({k: v for k, v in base.items() if k != "SLURM_JOB_NODELIST"})


def test_parse_single_process_env():
    env = parse_launch_env({})
    assert (env.rank, env.world_size, env.launcher) == (0, 1, "single") and env.master_port > 0
    # a one-task Slurm allocation (python run inside salloc) is a single process too
    assert parse_launch_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}).launcher == "single"


def test_expand_nodelist():
    assert expand_nodelist("a1") == ["a1"]
    assert expand_nodelist("gpu[01-03,7]") == ["gpu01", "gpu02", "gpu03", "gpu7"]
    assert expand_nodelist("n[1-2]-ib,x") == ["n1-ib", "n2-ib", "x"]


def test_harness_refuses_with_gpu(monkeypatch):
    from erpd_megatron.runtime import cpu_harness

    if cpu_harness.is_installed():
        pytest.skip("harness already installed in this process")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(RuntimeError, match="GPU"):
        cpu_harness.install_cpu_harness()
    assert not cpu_harness.is_installed()


@pytest.mark.slow
def test_init_single_process_without_env():
    proc = subprocess.run(
        [sys.executable, str(SCRIPT)], env=_clean_env(), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = _result(proc.stdout)
    assert (r["rank"], r["world_size"], r["launcher"], r["tp_size"], r["dp_size"]) == (
        0,
        1,
        "single",
        1,
        1,
    )
    assert r["cpu_harness"] == r["harness_installed"] == (not r["cuda_available"])
    assert r["logits_shape"] == [2, 8, 256]
    assert (
        "world size 1 is not divisible" in r["layout_error"] or "must divide" in r["layout_error"]
    )
    assert r["pg_destroyed"]
    if r["cpu_harness"]:
        assert r["pg_timeout_s"] == 7 * 60  # parallel.distributed_timeout_minutes
        assert r["backend"] == "gloo" and r["device"] == "cpu"
        assert r["harness"] == {
            "zeros_device": "cpu",
            "cuda_noop": True,
            "to_cuda": "cpu",
            "type": "torch.cuda.FloatTensor",
            "current_device": "cpu",
            "rng_len": r["harness"]["rng_len"],
            "int_device": "cpu",
        }


@pytest.mark.slow
def test_init_two_processes_from_slurm_env():
    job = str(random.randint(1, 10**6))
    procs = [
        subprocess.Popen(
            [sys.executable, str(SCRIPT), "2"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_clean_env(
                SLURM_PROCID=str(r),
                SLURM_NTASKS="2",
                SLURM_LOCALID=str(r),
                SLURM_JOB_NODELIST="localhost",
                SLURM_JOB_ID=job,
            ),
        )
        for r in range(2)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    results = [_result(out) for out, _ in outs]
    for rank, r in enumerate(results):
        assert (r["rank"], r["world_size"], r["local_rank"], r["launcher"]) == (
            rank,
            2,
            rank,
            "slurm",
        )
        assert (r["tp_rank"], r["tp_size"], r["dp_size"]) == (rank, 2, 1)
        assert r["logits_shape"] == [2, 8, 128]  # vocabulary 256 split over TP=2
        assert r["pg_destroyed"]
