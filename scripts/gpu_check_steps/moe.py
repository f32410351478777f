"""The MoE step of scripts/gpu_check.py: Stage 1 on a small Qwen3-MoE with pi_r router replay.

On the GPU: 8 experts, top-2, Transformer Engine spec (grouped GEMM: ``parallel.moe_grouped_gemm``
resolves to on with TE on a GPU), the alltoall dispatcher, bf16, EP=2 when two GPUs are
visible (else EP=1). ``--cpu-dry``: the tiny MoE (4 experts) in fp32 on the local spec.
It checks what models/router_replay.py promises: with ``model.moe_router_replay: pi_r`` the
routing difference to pi_r is 0 at every step, the step-1 ratio mean is 1 (exactly on CPU
with one sequence a micro-batch; within 1e-3 in bf16 on the GPU, where the scoring and the
training forwards batch other sequences together), and the router aux loss and the expert
imbalance are logged for every MoE layer.
"""

from __future__ import annotations

import math
import sys
from typing import Any

from gpu_check_steps.common import TINY, Check, StepFailed, read_jsonl, run, write_random_rollouts

MOE_CPU = [
    "model.family=qwen3_moe",
    "model.num_layers=2",
    "model.num_experts=4",
    "model.moe_router_topk=2",
    "model.moe_ffn_hidden_size=32",
    "model.moe_aux_loss_coeff=0.01",
    "precision.params_dtype=fp32",
    "precision.transformer_impl=local",
]
MOE_GPU = [
    "model.family=qwen3_moe",
    "model.num_layers=4",
    "model.hidden_size=512",
    "model.ffn_hidden_size=1024",
    "model.num_attention_heads=8",
    "model.num_query_groups=4",
    "model.kv_channels=64",
    "model.num_experts=8",
    "model.moe_router_topk=2",
    "model.moe_ffn_hidden_size=256",
    "model.moe_aux_loss_coeff=0.001",
    "precision.params_dtype=bf16",
    "precision.transformer_impl=transformer_engine",
    "parallel.moe_token_dispatcher_type=alltoall",
]


def step_moe(ck: Check) -> tuple[str, dict[str, Any]]:
    """Stage 1 (1 epoch) on the MoE with replay on; see the module doc for the checks."""
    import torch

    work = ck.out / "moe"
    vocab = 256
    rollouts = write_random_rollouts(work / "rollouts", vocab=vocab, prompts=8, group=4, max_len=24)
    ep = 2 if not ck.cpu_dry and torch.cuda.device_count() >= 2 else 1
    ov = (MOE_CPU if ck.cpu_dry else MOE_GPU) + [
        f"model.vocab_size={vocab}",
        f"data.rollout_dir={rollouts}",
        "data.global_batch_size=8",
        # one sequence a micro-batch: the scoring pass batches like training (exact ratio 1)
        "data.max_tokens_per_microbatch=24",
        "data.packing=false",
        "optimizer.lr=1e-3",
        f"parallel.expert_model_parallel_size={ep}",
        f"parallel.gpus_per_node={ep}",
    ]
    base = work / "base"
    init = [sys.executable, "-m", "erpd_megatron.pipeline.init_checkpoint"]
    run(
        init + ["--config", str(TINY), "--out", str(base), *ov],
        ck.out / "logs/moe_init.log",
        600,
    )
    out = work / "stage1"
    run(
        [
            sys.executable,
            "-m",
            "erpd_megatron.stage1",
            "--config",
            str(TINY),
            *ov,
            f"checkpoint.load={base}",
            f"output_dir={out}",
            "stage1.epochs=1",
            "stage1.eval_every_epochs=0",
            "logging.progress_bar=false",
            "model.moe_router_replay=pi_r",
        ],
        ck.out / "logs/moe_stage1.log",
        900,
        nproc=ep,
    )
    steps = [r for r in read_jsonl(out / "stage1/stage1_metrics.jsonl") if "stage1/loss" in r]
    if not steps:
        raise StepFailed("no Stage-1 step logged")
    diff = max(r.get("stage1/moe/routing_diff", float("nan")) for r in steps)
    ratio = steps[0]["stage1/ratio_mean"]
    aux = steps[0].get("stage1/moe/aux_loss", float("nan"))
    imb = steps[0].get("stage1/moe/imbalance", float("nan"))
    tol = 0.0 if ck.cpu_dry else 1e-3
    if not diff == 0.0:
        raise StepFailed(f"routing difference to pi_r {diff} with replay on (expected 0)")
    if not abs(ratio - 1.0) <= tol:
        raise StepFailed(f"step-1 ratio mean {ratio} (expected 1 within {tol})")
    if not (math.isfinite(aux) and aux > 0 and imb >= 1.0):
        raise StepFailed(f"aux loss {aux}, imbalance {imb}")
    losses = [r["stage1/loss"] for r in steps]
    if not all(math.isfinite(x) for x in losses):
        raise StepFailed(f"losses {losses}")
    return (
        f"EP={ep}, {len(steps)} steps, routing diff 0, step-1 ratio {ratio:.6f}, "
        f"aux loss {aux:.3f}, imbalance {imb:.2f}",
        {"ep": ep, "ratio_step1": ratio, "aux_loss": aux, "imbalance": imb, "losses": losses},
    )
