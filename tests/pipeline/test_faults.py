"""Fault injection, reduced (tools/fault_injection.py runs the full campaign on `erpd round`):
a SIGKILLed Stage 1 resumes to bit-identical weights, and damaged artefacts (two damages per
kind) are refused with an error naming the damaged file."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import pytest

from erpd_megatron.pipeline import faults
from erpd_megatron.utils.files import read_json
from tests.train.fixtures import ROOT, env, make_tiny_round, run_module

SEED = 12


def test_read_json_names_a_file_that_is_not_utf8(tmp_path):
    p = tmp_path / "manifest.json"
    p.write_bytes(b'{"a": "\xff"}')
    with pytest.raises(ValueError, match="manifest.json: not valid JSON"):
        read_json(p)


@pytest.mark.slow
def test_kill_rerun_is_bit_identical_and_damage_is_named(tmp_path):
    print(f"fault-injection seed {SEED}")
    rng = random.Random(SEED)
    config, ov = make_tiny_round(tmp_path)
    ov = ov + ["checkpoint.save_interval=1"]
    ref = tmp_path / "ref"
    run_module("erpd_megatron.stage1", config, ov + [f"output_dir={ref}"])
    # SIGKILL the trainer's process group after its first periodic checkpoint, rerun
    out = tmp_path / "killed"
    cmd = [
        sys.executable,
        "-m",
        "erpd_megatron.stage1",
        "--config",
        str(config),
        *ov,
        f"output_dir={out}",
    ]
    proc = subprocess.Popen(
        cmd,
        env=env(),
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.time() + 300
    while (
        time.time() < deadline
        and proc.poll() is None
        and not (out / "stage1/checkpoints/latest").exists()
    ):
        time.sleep(0.05)
    time.sleep(rng.uniform(0.0, 1.0))
    alive = proc.poll() is None
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert alive, "Stage 1 finished before the kill"
    assert not (out / "stage1/checkpoints/manifest.json").exists()
    run_module("erpd_megatron.stage1", config, ov + [f"output_dir={out}"])
    a, b = faults.checkpoint_digests(
        [ref / "stage1/checkpoints/final", out / "stage1/checkpoints/final"]
    )
    assert len(a) >= 10 and a == b, sorted(k for k in a if a[k] != b.get(k))

    # damage: a round-shaped folder of real artefacts (the Stage-1 checkpoint above)
    from tests.cache.helpers import FINGERPRINT, build_cache, token_counts

    rnd = tmp_path / "round"
    (rnd / "s1_teacher/stage1/checkpoints").mkdir(parents=True)
    (rnd / "rollouts").symlink_to(tmp_path / "rollouts")
    (rnd / "s1_teacher/stage1/checkpoints/final").symlink_to(ref / "stage1/checkpoints/final")
    data = build_cache(rnd / "cache", list(range(12)), vocab_size=256, max_shard_bytes=4096)
    expect = {
        "expect_vocab_size": 256,
        "expect_rollout_fingerprint": FINGERPRINT,
        "expect_token_counts": token_counts(data),
    }
    res = faults.corruption_campaign(
        rnd, tmp_path / "damaged", seed=SEED, flips=1, truncations=1, digits=0, cache_expect=expect
    )
    by_kind = res["counts"]
    assert set(by_kind) == {k for k, _, _ in faults.ARTEFACTS}, by_kind
    for kind, c in by_kind.items():
        assert c["silent"] == 0 and c["unnamed"] == 0 and c["named"] + c["no-op"] == 2, (
            kind,
            c,
            [x for x in res["cases"] if x["kind"] == kind],
        )
