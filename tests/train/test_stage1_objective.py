"""Stage 1's logged ``loss`` is the objective the optimiser minimises (same normaliser).

The real Stage-1 loss closure (:func:`make_stage1_loss`) runs on a hand-made table split into
several micro-batches, with logits from a small parameter tensor on one rank (the
vocab-parallel ops with no group); the micro-batch losses are summed as the engine sums
them, and the summed metrics go through :func:`finalize_stage1_metrics`.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from erpd_megatron.config.schema import Config
from erpd_megatron.data.batching import SampleTable, collate, group_advantages, micro_batches
from erpd_megatron.train.engine import VocabShard
from erpd_megatron.train.stage1 import finalize_stage1_metrics, make_stage1_loss, stage1_metric_keys

SEED = 1414
V = 23


def _table(rng: np.random.Generator) -> SampleTable:
    n = 12
    lens = rng.integers(1, 9, n)
    lens[3] = 0  # an empty response: no tokens, and not a sequence of the mse mean
    table = SampleTable(
        sample_ids=np.arange(n, dtype=np.int64),
        group_ids=np.arange(n, dtype=np.int64) // 4,
        prompt_ids=[rng.integers(1, V, rng.integers(2, 5)) for _ in range(n)],
        response_ids=[rng.integers(1, V, k) for k in lens],
        rewards=rng.integers(0, 2, n).astype(np.float32),
    )
    table.advantages = group_advantages(table.rewards, table.group_ids)
    return table


@pytest.mark.parametrize(
    "loss,kl_coef", [("ce", 0.0), ("ce", 0.1), ("pg", 0.1), ("mse", 0.1), ("unlearned", 0.0)]
)
def test_logged_loss_is_the_optimised_loss(loss, kl_coef):
    print(f"seed={SEED}")
    rng = np.random.default_rng(SEED)
    torch.manual_seed(SEED)
    table = _table(rng)
    cfg = Config()
    cfg.stage1.loss, cfg.stage1.kl_coef, cfg.stage1.unlearned_base = loss, kl_coef, "ce"
    run = SimpleNamespace(engine=SimpleNamespace(vocab_shard=lambda: VocabShard(None, 0, V)))
    rows = np.arange(len(table))
    ref = [rng.normal(-3.0, 0.5, len(r)).astype(np.float32) for r in table.response_ids]
    w = torch.randn(V, V, dtype=torch.float32, requires_grad=True)
    loss_fn = make_stage1_loss(cfg, run, table, rows)
    optimised = torch.zeros(())
    sums = dict.fromkeys(stage1_metric_keys(cfg), 0.0)
    mbs = micro_batches(rows, table.lengths, 24)
    assert len(mbs) >= 3
    for mb_rows in mbs:
        mb = collate(table, mb_rows, {"ref_logp": ref})
        logits = w[mb.input_ids]  # [b, s, V]
        value, m = loss_fn(logits, mb)
        optimised = optimised + value  # the engine sums the micro-batch losses
        for k, v in m.items():
            sums[k] += float(v)
    logged = finalize_stage1_metrics(cfg)(sums)["loss"]
    assert logged == pytest.approx(optimised.item(), rel=1e-6, abs=1e-7), (logged, optimised.item())
    assert abs(optimised.item()) > 1e-3  # a real objective, not an empty one
