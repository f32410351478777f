"""The mixture-of-experts part of ``erpd dryrun``: active parameters, experts over EP and the
expert-data-parallel sharding of their optimizer states.

megatron-core 0.16.1 ``parallel_state.initialize_model_parallel`` builds the expert groups
of each pipeline stage as ETP x EP x expert-DP over the ``world / PP`` ranks of the stage, so
the distributed optimizer shards an expert parameter's fp32 master copy and Adam states over
``expert-DP = world / (ETP * EP * PP)`` ranks, the dense parameters' over
``DP = world / (TP * CP * PP)`` (``config/memory.py`` does the accounting).
"""

from __future__ import annotations

from typing import Any

from erpd_megatron.config.memory import Layout, moe_shape, params_active, stage_params
from erpd_megatron.config.schema import Config


def moe_report(cfg: Config, lay: Layout) -> dict[str, Any]:
    """MoE figures of the dry run (empty for a dense model)."""
    moe = moe_shape(cfg)
    if moe is None:
        return {}
    expert_rank = max(stage_params(cfg, lay, k)[1] for k in range(lay.pp))
    return {
        "params_active": params_active(cfg, lay.tp),
        "num_experts": moe.experts,
        "moe_router_topk": moe.topk,
        "moe_layers": sum(moe.pattern),
        "etp": lay.etp,
        "experts_per_ep_rank": moe.experts // lay.ep,
        "expert_dp": max(1, lay.world // (lay.etp * lay.ep * lay.pp)),
        "expert_params_per_rank": int(expert_rank),
    }


def moe_report_lines(d: dict[str, Any]) -> list[str]:
    """The dry-run report's MoE lines for :func:`moe_report`'s figures (none if dense)."""
    if "num_experts" not in d:
        return []
    edp, dp = d["expert_dp"], d["dp"]
    return [
        f"MoE: {d['num_experts']} experts, top-{d['moe_router_topk']}, "
        f"{d['moe_layers']} sparse layers; active parameters {d['params_active'] / 1e9:.3f} B "
        f"of {d['params_total'] / 1e9:.3f} B",
        f"  experts over EP={d['ep']} (ETP={d['etp']}): {d['experts_per_ep_rank']} experts of "
        f"each layer per rank, {d['expert_params_per_rank'] / 1e9:.3f} B expert parameters on "
        "the most loaded rank",
        f"  optimizer states: experts sharded over expert-DP={edp} "
        f"(world / (ETP*EP*PP)), dense parameters over DP={dp}",
    ]
