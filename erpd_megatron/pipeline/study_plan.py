"""`erpd study plan`: the dry run of every point and its estimated GPU-hours, before any compute.

Memory per GPU is `erpd dryrun`'s estimate (:func:`erpd_megatron.config.dryrun.report_dict`).
GPU-hours come from model FLOPs (:mod:`erpd_megatron.config.compute`: 6 N per trained token,
2 N per scored or generated token, N = active parameters) divided by an assumed throughput,
``peak_tflops x mfu`` per GPU (``rollout_mfu`` for generation, which is memory-bound). Token
counts are upper bounds from the recipe's sizes: every sequence at
``rollout.max_prompt_tokens + rollout.max_new_tokens`` (capped by ``data.max_seq_length``).

Per point and round: rollouts (prompts x samples, generated), each Stage-1 run (its epochs x
the rollout tokens, trained), the cache (the base and every teacher score every token), each
Stage-2 student (its epochs, trained, plus the base's anchor scores) and the evaluation (every
model generates ``eval.num_prompts x eval.n`` answers and scores them). Steps a point shares
with an earlier one (same fingerprint, :func:`erpd_megatron.pipeline.study.owners`) are not
counted again.
"""

from __future__ import annotations

from typing import Any

from erpd_megatron.config.compute import param_counts
from erpd_megatron.config.loader import load_config
from erpd_megatron.config.schema import Config
from erpd_megatron.pipeline.study_spec import Study


def _seq_tokens(cfg: Config) -> int:
    r = cfg.rollout
    seq = r.max_prompt_tokens + r.max_new_tokens
    return min(seq, cfg.data.max_seq_length) if cfg.data.max_seq_length else seq


def step_flops(
    kind: str, cfg: Config, run_cfg: Config | None = None, *, models: int = 1
) -> tuple[float, bool]:
    """(model FLOPs, is generation) of one step of a round with resolved config ``cfg``
    (``run_cfg``: the Stage-1 run's or student's own config)."""
    _, n = param_counts(cfg)
    r = cfg.rollout
    rollout_tokens = r.num_prompts * r.samples_per_prompt * _seq_tokens(cfg)
    if kind == "rollouts":
        return 2.0 * n * rollout_tokens, True
    if kind == "stage1":
        return 6.0 * n * rollout_tokens * (run_cfg or cfg).stage1.epochs, False
    if kind == "cache":
        return 2.0 * n * rollout_tokens * models, False
    if kind == "stage2":
        return (6.0 * (run_cfg or cfg).stage2.epochs + 2.0) * n * rollout_tokens, False
    if kind == "eval":
        e = cfg.eval
        return 4.0 * n * e.num_prompts * e.n * e.max_new_tokens * models, True  # generate + score
    return 0.0, False


def plan_rows(
    study: Study, *, mfu: float = 0.35, rollout_mfu: float = 0.05, peak_tflops: float = 989.0
) -> list[dict[str, Any]]:
    """One row per point: layout, memory per GPU, fits, GPU-hours per step kind and total."""
    from erpd_megatron.config.dryrun import report_dict
    from erpd_megatron.pipeline.study import owners, plan_study

    plans = plan_study(study, check=False)
    shared = owners(plans, require_done=False)
    rows = []
    for pp in plans:
        row: dict[str, Any] = {"point": pp.point.name, **pp.point.axes}
        if pp.error:
            rows.append(row | {"error": pp.error})
            continue
        cfg = pp.cfg
        try:
            d = report_dict(cfg)
            row.update(
                memory_gib=d["total_gib"],
                budget_gib=d["budget_gib"],
                fits=d["fits"],
                gpus=d["world_size"],
                layout=f"TP{d['tp']} PP{d['pp']} DP{d['dp']}",
            )
        except Exception as e:  # noqa: BLE001 - a layout the dry run rejects is a row, not a crash
            row.update(
                memory_gib=None,
                fits=False,
                gpus=cfg.parallel.num_nodes * cfg.parallel.gpus_per_node,
                layout=f"dry run failed: {e}",
            )
        total, active = param_counts(cfg)
        row.update(params_b=total / 1e9, active_params_b=active / 1e9)
        hours: dict[str, float] = {}
        rc = cfg.round
        for r, s in pp.steps():
            name = s.plan.name
            if (pp.point.name, r, name) in shared:
                continue
            kind = (
                name
                if name in ("rollouts", "cache", "eval")
                else {"s1": "stage1", "s2": "stage2"}.get(name.split("_", 1)[0])
            )
            if kind is None:
                continue
            run_cfg, models = None, 1
            if kind == "stage1":
                run = next(x for x in rc.stage1_runs if f"s1_{x.name}" == name)
                run_cfg = load_config(
                    str(pp.point.recipe), pp.point.overrides + run.overrides, validate=False
                )
            elif kind == "stage2":
                st = next(x for x in rc.students if f"s2_{x.name}" == name)
                run_cfg = load_config(
                    str(pp.point.recipe), pp.point.overrides + st.overrides, validate=False
                )
            elif kind == "cache":
                models = 1 + len(rc.teachers)
            elif kind == "eval":
                models = 1 + sum(1 for t in rc.teachers if t.evaluate) + len(rc.students)
            flops, gen = step_flops(kind, cfg, run_cfg, models=models)
            gpu_s = flops / (peak_tflops * 1e12 * (rollout_mfu if gen else mfu))
            hours[kind] = hours.get(kind, 0.0) + gpu_s / 3600.0
        row.update({f"gpu_h_{k}": v for k, v in hours.items()})
        row["gpu_hours"] = sum(hours.values())
        row["wall_hours"] = row["gpu_hours"] / max(row["gpus"], 1)
        rows.append(row)
    return rows


def format_plan(
    rows: list[dict[str, Any]], *, mfu: float, rollout_mfu: float, peak_tflops: float
) -> str:
    """The plan as Markdown: one row per point, the throughput assumption, the total."""
    kinds = ["rollouts", "stage1", "cache", "stage2", "eval"]
    head = [
        "point",
        "params (B, active)",
        "GPUs",
        "layout",
        "memory / GPU (GiB)",
        *[f"GPU-h {k}" for k in kinds],
        "GPU-h total",
        "wall h",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['point']} | config error: {r['error']} |")
            continue
        mem = (
            "?"
            if r.get("memory_gib") is None
            else (
                f"{r['memory_gib']:.1f} of {r['budget_gib']:.0f} "
                f"({'fits' if r['fits'] else 'DOES NOT FIT'})"
            )
        )
        cells = [
            r["point"],
            f"{r['params_b']:.2f} ({r['active_params_b']:.2f})",
            str(r["gpus"]),
            r["layout"],
            mem,
        ]
        cells += [f"{r.get(f'gpu_h_{k}', 0.0):.3g}" for k in kinds]
        cells += [f"{r['gpu_hours']:.3g}", f"{r['wall_hours']:.3g}"]
        lines.append("| " + " | ".join(cells) + " |")
    total = sum(r.get("gpu_hours", 0.0) for r in rows)
    lines += [
        "",
        f"total: {total:.1f} GPU-hours over {len(rows)} points (shared steps counted once)",
        f"assumption: {peak_tflops:g} TFLOP/s peak per GPU x MFU {mfu:g} for training and "
        f"scoring, x {rollout_mfu:g} for generation; 6 N FLOPs per trained token, 2 N per scored "
        "or generated token (N = active parameters); every sequence at max_prompt_tokens + "
        "max_new_tokens (an upper bound)",
    ]
    return "\n".join(lines)
