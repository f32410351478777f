"""Stage 1 and Stage 2 on the tiny Qwen3-MoE for real (``python -m erpd_megatron.stage1`` /
``stage2``, the cache tool in between): 2 processes at
EP=2 (alltoall dispatcher, each rank holding 2 of the 4 experts; DP=2 for the dense part)
give the same per-step metrics and final weights as one process, router aux loss on.

megatron's "aux_loss" load balancing is computed per micro-batch over that micro-batch's
tokens and weighted 1/num_microbatches (``MoEAuxLossAutoScaler``), so it equals across layouts
only when the micro-batches hold the same sequences: here every sequence has the same length
and the token budget fits one per micro-batch. (With random lengths the single process packs
other micro-batches than each DP rank does: measured, the step-2 loss then differs by 7e-4
relative, the step-1 gradient norm by 6e-5.)"""

from __future__ import annotations

import os

import pytest

from tests.train.fixtures import RECIPE as CFG
from tests.train.fixtures import (
    VOCAB,
    assert_same_run,
    make_base_checkpoint,
    read_jsonl,
    run_module,
    write_random_rollouts,
)

MOE = [
    "model.family=qwen3_moe",
    "model.num_layers=2",
    "model.num_experts=4",
    "model.moe_router_topk=2",
    "model.moe_ffn_hidden_size=32",
    "model.moe_aux_loss_coeff=0.01",
    f"model.vocab_size={VOCAB}",
]
KEYS = ["stage1/loss", "stage1/entropy", "stage1/grad_norm", "stage1/kl_k3", "stage1/tokens"]


def _fixed_length_rollouts(out, *, prompts: int = 6, group: int = 4, seed: int = 0):
    """Random tokens, every prompt 4 and every response 6 tokens long; reward 1 for an even
    first response token."""
    write_random_rollouts(
        out,
        prompts=prompts,
        group=group,
        vocab=VOCAB,
        seed=seed,
        prompt_len=(4, 4),
        response_len=(6, 6),
    )


S2_KEYS = [
    "stage2/loss",
    "stage2/grad_norm",
    "stage2/teacher0/topk_kl",
    "stage2/teacher1/signal_mean",
    # models/router_replay.py: summed over the EP ranks, equal to one process's (measured)
    "stage2/moe/imbalance",
    "stage2/moe/aux_loss",
    "stage2/moe/routing_diff",
]
TEACHERS = (
    "[{model: teacher0, signal: topk_kl, alpha: 0.5}, "
    "{model: teacher0, signal: logratio, weight: 0.5}]"
)


@pytest.mark.slow
@pytest.mark.timeout(1800)  # 7 processes: past the suite's 900 s on a shared 2-core machine
@pytest.mark.skipif(
    os.environ.get("ERPD_LONG_TESTS") != "1",
    reason="about 200 s and one unexplained torchrun exit in 3 runs: set ERPD_LONG_TESTS=1",
)
def test_stage1_and_stage2_at_ep2_match_single_process(tmp_path):
    """Stage 1 (3 steps), then the cache of its result as teacher0 (one process), then Stage 2
    (3 steps, top-k KL + log-ratio signals): EP=2 equals one process in both stages."""
    _fixed_length_rollouts(tmp_path / "rollouts")
    make_base_checkpoint(tmp_path / "base", MOE)
    ov = MOE + [
        f"data.rollout_dir={tmp_path / 'rollouts'}",
        f"checkpoint.load={tmp_path / 'base'}",
        "data.global_batch_size=8",
        "data.max_tokens_per_microbatch=16",
        "stage1.epochs=1",
        "logging.progress_bar=false",
    ]
    run_module("erpd_megatron.stage1", CFG, ov + [f"output_dir={tmp_path / 'one'}"])
    run_module(
        "erpd_megatron.stage1",
        CFG,
        ov + [f"output_dir={tmp_path / 'ep2'}", "parallel.expert_model_parallel_size=2"],
        nproc=2,
    )
    # 24 samples / 8 per step
    assert_same_run(tmp_path / "one", tmp_path / "ep2", "stage1", KEYS, 3)
    last = read_jsonl(tmp_path / "ep2/stage1/stage1_metrics.jsonl")
    assert [r for r in last if "stage1/loss" in r][-1]["stage1/kl_k3"] > 0  # the weights moved
    models = f"[{{name: teacher0, checkpoint: {tmp_path}/one/stage1/checkpoints/final}}]"
    s2 = ov + [
        f"cache.models={models}",
        f"stage2.cache_dir={tmp_path / 'cache'}",
        "stage2.epochs=1",
        f"stage2.teachers={TEACHERS}",
    ]
    run_module(
        "erpd_megatron.train.cache_pass",
        CFG,
        ov + [f"cache.dir={tmp_path / 'cache'}", f"cache.models={models}"],
    )
    run_module("erpd_megatron.stage2", CFG, s2 + [f"output_dir={tmp_path / 'one'}"])
    run_module(
        "erpd_megatron.stage2",
        CFG,
        s2 + [f"output_dir={tmp_path / 'ep2'}", "parallel.expert_model_parallel_size=2"],
        nproc=2,
    )
    assert_same_run(tmp_path / "one", tmp_path / "ep2", "stage2", S2_KEYS, 3)
