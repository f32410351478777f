"""Held-out accuracy during Stage 1 (``stage1.eval_every_epochs``), for real on the toy task."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.train.fixtures import ROOT, env, read_jsonl, run_module

RECIPE = ROOT / "configs/recipes/demo-cpu.yaml"


@pytest.fixture(scope="module")
def toy_round(tmp_path_factory):
    """Toy splits, tokenizer, supervised data as a rollout set, and a random-init base."""
    from erpd_megatron.data.rollouts import write_rollout_set
    from erpd_megatron.pipeline import toy

    d = tmp_path_factory.mktemp("toy")
    paths = toy.write_splits(d / "data", train=32, heldout=8, seed=3)
    tok = toy.build_tokenizer(d / "tok")
    write_rollout_set(d / "sft", toy.sft_records(paths["train"], tok), prompts_per_shard=16)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "erpd_megatron.pipeline.init_checkpoint",
            "--config",
            str(RECIPE),
            "--out",
            str(d / "base"),
            "--tokenizer-dir",
            str(d / "tok"),
        ],
        check=True,
        env=env(),
        cwd=ROOT,
        capture_output=True,
        timeout=300,
    )
    overrides = [
        f"data.rollout_dir={d / 'sft'}",
        f"checkpoint.load={d / 'base'}",
        "checkpoint.save=null",
        "data.global_batch_size=16",
        "stage1.loss=ce",
        "optimizer.lr=3e-3",
        "stage1.epochs=2",
        "stage1.save_epochs=[1]",
        "stage1.eval_every_epochs=1",
        f"eval.datasets=[{paths['heldout']}]",
        "eval.num_prompts=8",
        "eval.n=2",
        "eval.pass_k=[1,2]",
        "eval.max_new_tokens=12",
        "logging.progress_bar=false",
    ]
    return d, overrides


def test_heldout_accuracy_is_logged_before_training_and_every_epoch(toy_round, tmp_path):
    from erpd_megatron.config.loader import load_config
    from erpd_megatron.eval.heldout import heldout_metrics

    d, ov = toy_round
    # under torchrun at TP=2: rank 0 evaluates in a child process that runs while both ranks
    # train on (stage1.eval_async; the synchronous path is the same start and an immediate wait)
    run_module(
        "erpd_megatron.stage1",
        RECIPE,
        ov
        + [
            f"output_dir={tmp_path}",
            "parallel.tensor_model_parallel_size=2",
            "stage1.eval_async=true",
        ],
        nproc=2,
    )
    st = tmp_path / "stage1"
    recs = [r for r in read_jsonl(st / "stage1_metrics.jsonl") if "stage1/eval/accuracy" in r]
    # pi_r before the first step, then after epochs 1 and 2 (2 steps each)
    assert [r["step"] for r in recs] == [0, 2, 4]
    assert [r["epoch"] for r in recs] == [0, 1, 2]
    # pi_r's evaluation ran while epoch 1 trained: its record is written after those steps'
    lines = read_jsonl(st / "stage1_metrics.jsonl")
    first = next(i for i, r in enumerate(lines) if "stage1/eval/accuracy" in r)
    assert {r.get("step") for r in lines[:first]} >= {1, 2}
    for r in recs:
        assert 0.0 <= r["stage1/eval/accuracy"] <= 1.0
        assert r["stage1/eval/pass@2"] >= r["stage1/eval/pass@1"]
        assert 0 < r["stage1/eval/response_length"] <= 12
    ckpts = st / "checkpoints"
    assert (ckpts / "epoch_0001").exists() and not (ckpts / ".heldout_model").exists()

    # the logged number is the evaluation of that epoch's weights: export the snapshot, re-evaluate
    hf = tmp_path / "hf_epoch1"
    subprocess.run(
        [sys.executable, "-m", "erpd_megatron.pipeline.export", f"{ckpts / 'epoch_0001'}={hf}"],
        check=True,
        env=env(),
        cwd=ROOT,
        capture_output=True,
        timeout=300,
    )
    cfg = load_config(str(RECIPE), ov + [f"output_dir={tmp_path}"])
    again = heldout_metrics(cfg, hf)
    assert again["accuracy"] == pytest.approx(recs[1]["stage1/eval/accuracy"])
    assert again["response_length"] == pytest.approx(recs[1]["stage1/eval/response_length"])


def test_heldout_without_datasets_is_a_config_error():
    from erpd_megatron.config.loader import ConfigError, load_config

    with pytest.raises(
        ConfigError, match="stage1.eval_every_epochs is set but eval.datasets is empty"
    ):
        load_config(str(RECIPE), ["stage1.eval_every_epochs=2", "eval.datasets=[]"])
    with pytest.raises(ConfigError, match="eval_every_epochs must be >= 0"):
        load_config(str(RECIPE), ["stage1.eval_every_epochs=-1"])


def test_child_is_not_a_member_of_the_launching_job(monkeypatch):
    """Under torchrun or srun the evaluation child must start as a single process (torchrun's
    agent-store flag left set made its rendezvous wait forever)."""
    from erpd_megatron.runtime.distributed import parse_launch_env
    from erpd_megatron.train.heldout import child_env

    job = {
        "RANK": "0",
        "WORLD_SIZE": "2",
        "LOCAL_RANK": "0",
        "LOCAL_WORLD_SIZE": "2",
        "GROUP_RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "29500",
        "TORCHELASTIC_USE_AGENT_STORE": "True",
        "TORCHELASTIC_RUN_ID": "x",
        "SLURM_PROCID": "0",
        "SLURM_NTASKS": "8",
        "CUDA_VISIBLE_DEVICES": "0",
    }
    for k, v in job.items():
        monkeypatch.setenv(k, v)
    env = child_env()
    assert not any(k.startswith("TORCHELASTIC_") for k in env)
    assert env["CUDA_VISIBLE_DEVICES"] == "0"  # the child keeps rank 0's device
    launch = parse_launch_env(env)
    assert (launch.launcher, launch.world_size) == ("single", 1)
