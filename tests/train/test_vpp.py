"""Interleaved pipeline (parallel.virtual_pipeline_model_parallel_size) for real on CPU.

A 4-layer tiny model trains 4 optimizer steps at PP=1, and at PP=2 with two model chunks per
pipeline rank (VPP=2, megatron's interleaved schedule, micro-batch counts padded to a multiple
of PP): the metrics of every step and the final weights agree. The VPP checkpoint then seeds a
single-process Stage-1 run, whose first step sits at those weights (ratio 1).
"""

from __future__ import annotations

import pytest

from tests.train.fixtures import RECIPE as TINY
from tests.train.fixtures import (
    VOCAB,
    assert_same_run,
    make_base_checkpoint,
    read_jsonl,
    run_module,
    write_random_rollouts,
)

KEYS = ["stage1/loss", "stage1/entropy", "stage1/grad_norm", "stage1/kl_k3", "stage1/tokens"]


@pytest.fixture(scope="module")
def four_layers(tmp_path_factory):
    root = tmp_path_factory.mktemp("vpp")
    rollouts = write_random_rollouts(root / "rollouts", vocab=VOCAB, seed=3)
    base = make_base_checkpoint(root / "base", [f"model.vocab_size={VOCAB}", "model.num_layers=4"])
    ov = [
        f"data.rollout_dir={rollouts}",
        f"checkpoint.load={base}",
        f"model.vocab_size={VOCAB}",
        "model.num_layers=4",
        "data.global_batch_size=16",
        "data.max_tokens_per_microbatch=64",
        "stage1.epochs=2",
        "logging.progress_bar=false",
    ]
    return root, ov


def test_pp2_vpp2_equals_pp1_and_its_checkpoint_loads_without_vpp(four_layers):
    root, ov = four_layers
    ref_dir, vpp_dir, re_dir = root / "pp1", root / "pp2vpp2", root / "reload"
    run_module("erpd_megatron.stage1", TINY, ov + [f"output_dir={ref_dir}"])
    run_module(
        "erpd_megatron.stage1",
        TINY,
        ov
        + [
            f"output_dir={vpp_dir}",
            "parallel.pipeline_model_parallel_size=2",
            "parallel.virtual_pipeline_model_parallel_size=2",
        ],
        nproc=2,
    )
    got = assert_same_run(ref_dir, vpp_dir, "stage1", KEYS, 4)
    assert got[-1]["stage1/kl_k3"] > 0  # the weights moved
    final = vpp_dir / "stage1/checkpoints/final"
    # the VPP=2 checkpoint in one process (PP=1): step 1 is at its weights
    run_module(
        "erpd_megatron.stage1",
        TINY,
        ov + [f"output_dir={re_dir}", f"checkpoint.load={final}", "stage1.epochs=1"],
    )
    first = next(
        r for r in read_jsonl(re_dir / "stage1/stage1_metrics.jsonl") if "stage1/loss" in r
    )
    assert first["stage1/ratio_mean"] == pytest.approx(1.0, abs=1e-6)
    assert first["stage1/kl_k3"] == pytest.approx(0.0, abs=1e-7)
