"""`erpd dryrun`: check a recipe for its target cluster without the cluster.

Pure arithmetic over the config (no torch, no megatron): the layout is validated for
``parallel.num_nodes * parallel.gpus_per_node`` ranks, then the parameters and the memory of
the most loaded rank are printed (weights, gradients, optimizer states, activations of the
1F1B micro-batches in flight, logits, the ERPD passes' buffers), with the largest micro-batch
token budget that fits. The accounting is in :mod:`erpd_megatron.config.memory`; it is
checked against Megatron-LM's theoretical memory formula and against measured CPU steps
(``tests/config/test_dryrun.py``, ``benchmarks/bench_dryrun_memory.py``). ``--json`` prints
the same figures machine-readably.
"""

from __future__ import annotations

import argparse
import json
from typing import Optional

from erpd_megatron.config.loader import load_config
from erpd_megatron.config.memory import (
    FIT_FRACTION,
    MemoryEstimate,
    estimate_layout,
    layout_of,
    max_tokens_that_fit,
)
from erpd_megatron.config.moe_dryrun import moe_report, moe_report_lines
from erpd_megatron.config.schema import Config
from erpd_megatron.config.validate import validate_config, validate_layout

RankEstimate = MemoryEstimate  # the name earlier releases used


def estimate(
    cfg: Config, world_size: Optional[int] = None, tokens: Optional[int] = None
) -> MemoryEstimate:
    """Parameters and memory of the most loaded rank for the target layout (on GPUs)."""
    world = world_size or cfg.parallel.num_nodes * cfg.parallel.gpus_per_node
    validate_layout(cfg.model, cfg.parallel, world)
    return estimate_layout(cfg, layout_of(cfg, world), tokens)


def report_dict(cfg: Config, world_size: Optional[int] = None) -> dict:
    """Every figure of the dry run (what ``--json`` prints)."""
    world = world_size or cfg.parallel.num_nodes * cfg.parallel.gpus_per_node
    lay = layout_of(cfg, world)
    est = estimate(cfg, world)
    d = {
        "recipe": cfg.name,
        **est.to_dict(),
        "tp": lay.tp,
        "pp": lay.pp,
        "cp": lay.cp,
        "ep": lay.ep,
        "vpp": lay.vpp,
        "sequence_parallel": lay.sp,
        "recompute": lay.recompute,
        "flash_attention": lay.flash,
        "max_tokens_per_microbatch_that_fits": max_tokens_that_fit(cfg, lay),
        "fit_fraction": FIT_FRACTION,
    }
    d.update(moe_report(cfg, lay))
    return d


def format_report(cfg: Config, d: dict) -> str:
    """Human-readable dry-run report of :func:`report_dict`'s figures."""
    par, m = cfg.parallel, cfg.model
    budget = d["budget_gib"]
    knobs = (
        f"SP={'on' if d['sequence_parallel'] else 'off'} recompute={d['recompute'] or 'none'} "
        f"attention={'flash (TE)' if d['flash_attention'] else 'materialised scores (local)'}"
    )
    lines = [
        f"recipe {cfg.name}: {m.family} {m.num_layers} layers, hidden {m.hidden_size}",
        f"layout: {par.num_nodes} nodes x {par.gpus_per_node} GPUs = {d['world_size']} ranks; "
        f"TP={d['tp']} PP={d['pp']} CP={d['cp']} DP={d['dp']}; {knobs}",
        f"parameters: {d['params_total'] / 1e9:.3f} B total, {d['params_per_rank'] / 1e9:.3f} B on "
        f"the most loaded rank ({d['stage']} pipeline stage)",
        *moe_report_lines(d),
        f"memory per GPU (GiB, estimate; micro-batch {d['tokens_per_microbatch']} tokens):",
        f"  weights {d['weights_gib']:7.2f}   grads {d['grads_gib']:7.2f}   "
        f"optimizer {d['optimizer_gib']:7.2f}",
        f"  activations {d['activations_gib']:7.2f}   logits {d['logits_gib']:7.2f}   "
        f"ERPD buffers {d['erpd_buffers_gib']:6.2f}   runtime {d['runtime_gib']:5.2f}",
        f"  forward-only passes: anchor scoring {d['scoring_gib']:.2f}, "
        f"cache tool {d['cache_tool_gib']:.2f}",
        f"  total {d['total_gib']:7.2f} of {budget:.1f} GiB (fits within {FIT_FRACTION:.0%}) -> "
        + (
            "fits"
            if d["fits"]
            else "DOES NOT FIT: raise TP/PP, lower data.max_tokens_per_microbatch, or add nodes"
        ),
        "largest data.max_tokens_per_microbatch that fits: "
        f"{d['max_tokens_per_microbatch_that_fits']}",
    ]
    seq = cfg.data.max_seq_length or m.max_position_embeddings
    if d["max_tokens_per_microbatch_that_fits"] < seq:
        lines.append(
            f"  a single sequence of data.max_seq_length={seq} tokens does not fit: "
            "raise TP, enable recompute/SP/CP, or shorten the sequences"
        )
    return "\n".join(lines)


TABLE_HEADER = (
    "| recipe | GPUs | TP / PP / DP | micro-batch tokens | weights + grads + optimizer | "
    "activations | logits | total per GPU (GiB) | pipeline stage | largest micro-batch that fits |"
    "\n|---|---|---|---|---|---|---|---|---|---|"
)


def table_row(cfg: Config, d: dict) -> str:
    """One markdown row of the recipes table (README "Sizing a run")."""
    states = d["weights_gib"] + d["grads_gib"] + d["optimizer_gib"]
    verdict = "fits" if d["fits"] else "DOES NOT FIT"
    return (
        f"| `{cfg.name}` | {d['world_size']} x {cfg.parallel.gpu_memory_gb:g} GB | "
        f"{d['tp']} / {d['pp']} / {d['dp']} | {d['tokens_per_microbatch']} | {states:.1f} | "
        f"{d['activations_gib']:.1f} | {d['logits_gib']:.1f} | "
        f"{d['total_gib']:.1f} of {d['budget_gib']:.1f} ({verdict}) | {d['stage']} | "
        f"{d['max_tokens_per_microbatch_that_fits']} |"
    )


def main(argv: list[str] | None = None) -> int:
    """CLI: ``erpd dryrun --config RECIPE [--json] [a.b=c ...]``; exit 0 if it fits, else 3."""
    p = argparse.ArgumentParser(prog="erpd dryrun", description=__doc__.splitlines()[0])
    p.add_argument("--config", help="the recipe (required unless --table)")
    p.add_argument(
        "--table",
        nargs="+",
        metavar="RECIPE",
        help="print the markdown table of these recipes (README 'Sizing a run')",
    )
    p.add_argument("--world-size", type=int, default=None, help="override num_nodes*gpus_per_node")
    p.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    if args.table:
        rows = []
        for path in args.table:
            cfg = load_config(path, args.overrides)
            rows.append(table_row(cfg, report_dict(cfg)))
        print(TABLE_HEADER + "\n" + "\n".join(rows))
        return 0
    if not args.config:
        p.error("--config is required")
    cfg = load_config(args.config, args.overrides, validate=False)
    world = args.world_size or cfg.parallel.num_nodes * cfg.parallel.gpus_per_node
    validate_config(cfg, world_size=world)
    d = report_dict(cfg, world)
    print(json.dumps(d, indent=1, sort_keys=True) if args.json else format_report(cfg, d))
    return 0 if d["fits"] else 3
