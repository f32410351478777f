"""gloo workers for tests/train/test_dp_edges.py: the shared training loop at DP=2 on a data
set whose last global batch has one row (DP rank 1 gets none), then, in the same rank-0
process, the same epoch at DP=1; one step's loss is made non-finite on purpose."""

from __future__ import annotations

import math
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "configs/recipes/tiny-cpu.yaml"
DATA_SEED = 20261201
"""Fixed seed of the random rows (printed by the test)."""
ROWS, GLOBAL_BATCH, BUDGET = 13, 4, 24
"""13 rows in batches of 4: the last global batch has one row; 24-token micro-batches."""
POISONED_STEP = 1
"""0-based step of the epoch whose loss (and loss_sum metric) is made NaN."""


def make_table(vocab: int):
    """A random SampleTable, fixed by DATA_SEED."""
    from erpd_megatron.data.batching import SampleTable, group_advantages

    rng = np.random.default_rng(DATA_SEED)
    prompts = [rng.integers(1, vocab, rng.integers(2, 6)) for _ in range(ROWS)]
    resps = [rng.integers(1, vocab, rng.integers(2, 9)) for _ in range(ROWS)]
    rewards = rng.integers(0, 2, ROWS).astype(np.float32)
    t = SampleTable(
        sample_ids=np.arange(ROWS),
        group_ids=np.arange(ROWS) // 3,
        prompt_ids=prompts,
        response_ids=resps,
        rewards=rewards,
    )
    t.advantages = group_advantages(t.rewards, t.group_ids)
    ref = [(-rng.random(len(r)) * 3).astype(np.float32) for r in resps]
    return t, ref


def _epoch(cfg, out: Path) -> dict:
    """One epoch of the shared loop with Stage 1's loss; returns weights and what was run."""
    from erpd_megatron.train.engine import Engine
    from erpd_megatron.train.loop import StageSpec, TrainLoop
    from erpd_megatron.train.stage1 import (
        finalize_stage1_metrics,
        make_stage1_loss,
        stage1_metric_keys,
    )

    engine = Engine(cfg, train=True, total_steps=4)
    table, ref = make_table(cfg.model.vocab_size)
    run = SimpleNamespace(engine=engine)
    holder: dict = {}

    def make_loss(rows: np.ndarray):
        fn = make_stage1_loss(cfg, run, table, rows)
        if not np.array_equal(rows, holder["poison"]):
            return fn

        def poisoned(logits, mb):
            loss, m = fn(logits, mb)
            nan = torch.tensor(float("nan"), dtype=loss.dtype)
            m["loss_sum"] = m["loss_sum"] * nan.to(m["loss_sum"].dtype)
            return loss * nan, m

        return poisoned

    spec = StageSpec(
        name="stage1",
        table=table,
        epochs=1,
        make_loss=make_loss,
        metric_keys=stage1_metric_keys(cfg),
        finalize_metrics=finalize_stage1_metrics(cfg),
        token_arrays=lambda epoch: {"ref_logp": ref},
    )
    loop = TrainLoop(cfg, engine, spec, out)
    initial = {k: v.detach().clone() for k, v in engine.model[0].named_parameters()}
    batches = loop.batches(0)
    holder["poison"] = batches[POISONED_STEP]
    counts = [len(loop.micro_batches(b, {"ref_logp": ref})) for b in batches]
    real = [len(r) for r in (_mine(loop, b) for b in batches)]
    loop._run_epoch(SimpleNamespace(update=lambda n: None, set_postfix=lambda **kw: None))
    loop.metrics.close()
    # numpy, pickled by value: a torch tensor would travel as a shared-memory handle that dies
    # with the worker process
    weights = {k: v.detach().float().numpy().copy() for k, v in engine.model[0].named_parameters()}
    moved = max(
        float((v.detach() - initial[k]).abs().max()) for k, v in engine.model[0].named_parameters()
    )
    return {
        "weights": weights,
        "counts": counts,
        "rows": real,
        "batch_sizes": [len(b) for b in batches],
        "skipped": loop.state.skipped_steps,
        "moved": moved,
        "steps": loop.state.global_step,
    }


def _mine(loop, rows):
    from erpd_megatron.data.batching import dp_shard

    return dp_shard(rows, loop.lengths, loop.engine.dp_rank, loop.engine.dp_size)


def dp2_then_dp1(rank: int, world: int, tmp: str) -> dict:
    """DP=2 epoch on both ranks; then rank 0 alone re-initialises a world of one and runs the
    same epoch at DP=1. Returns both results (DP=1 only on rank 0)."""
    import torch.distributed as dist

    from erpd_megatron.config.loader import load_config
    from erpd_megatron.runtime.distributed import destroy_distributed, init_distributed

    overrides = [
        f"data.global_batch_size={GLOBAL_BATCH}",
        f"data.max_tokens_per_microbatch={BUDGET}",
        "logging.progress_bar=false",
        "optimizer.max_nonfinite_steps=3",
    ]
    cfg = load_config(RECIPE, overrides, validate=False)
    init_distributed(cfg, world_size_hint=world)
    out = {"dp2": _epoch(cfg, Path(tmp) / "dp2")}
    destroy_distributed(destroy_process_group=False)
    dist.destroy_process_group()
    if rank != 0:
        return out
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    store = f"file://{Path(tmp) / 'store1'}"
    dist.init_process_group("gloo", init_method=store, rank=0, world_size=1)
    init_distributed(cfg, world_size_hint=1)
    out["dp1"] = _epoch(cfg, Path(tmp) / "dp1")
    destroy_distributed(destroy_process_group=False)
    return out


def finite(x: float) -> bool:
    """math.isfinite for metric values read from JSON."""
    return isinstance(x, (int, float)) and math.isfinite(x)
