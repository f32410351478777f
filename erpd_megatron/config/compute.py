"""Compute accounting of a step: parameters, tokens, model FLOPs, GPU-hours.

Model FLOPs follow the usual dense estimate (Kaplan et al. 2020; Megatron-LM's MFU): a trained
token costs ``6 * N`` (forward 2N, backward 4N), a forward-only scored token ``2 * N``, where N
counts the parameters a token passes through: for MoE only the router's top-k routed experts
(plus shared experts), not all of them. Attention's sequence-quadratic term is left out, so
achieved TFLOP/s from these figures is a lower bound on the hardware's (MFU convention).
"""

from __future__ import annotations

from typing import Any

from erpd_megatron.config.memory import moe_shape, params_total
from erpd_megatron.config.schema import Config


def param_counts(cfg: Config) -> tuple[int, int]:
    """(all parameters, parameters active per token) of ``cfg.model``."""
    total = params_total(cfg)
    moe = moe_shape(cfg)
    if moe is None:
        return total, total
    idle = sum(moe.pattern) * 3 * cfg.model.hidden_size * moe.ffn * (moe.experts - moe.topk)
    return total, total - idle


def compute_record(
    cfg: Config,
    *,
    trained_tokens: float = 0,
    scored_tokens: float = 0,
    wall_s: float,
    gpus: int,
    **extra: Any,
) -> dict[str, Any]:
    """The ``compute`` block of a step's manifest: tokens, wall time, GPU count, model FLOPs
    (6 N per trained token + 2 N per scored token, N = active parameters)."""
    total, active = param_counts(cfg)
    flops = 6.0 * active * trained_tokens + 2.0 * active * scored_tokens
    return {
        "trained_tokens": int(trained_tokens),
        "scored_tokens": int(scored_tokens),
        "wall_s": round(float(wall_s), 3),
        "gpus": int(gpus),
        "params": total,
        "active_params": active,
        "model_flops": flops,
        **extra,
    }


def gpu_hours(rec: dict[str, Any]) -> float:
    """GPU-hours of a ``compute`` record: GPU count x the longer of the steps' summed time
    (``wall_s``, over resumes) and the last process's wall time (start-up, loads and saves)."""
    return rec.get("gpus", 0) * max(rec.get("wall_s", 0.0), rec.get("process_wall_s", 0.0)) / 3600.0


def tflops_per_gpu(rec: dict[str, Any]) -> float | None:
    """Achieved model TFLOP/s per GPU of a ``compute`` record during its steps (None without
    time)."""
    den = rec.get("gpus", 0) * rec.get("wall_s", 0.0)
    return rec.get("model_flops", 0.0) / den / 1e12 if den > 0 else None


def eval_compute(
    cfg: Config, rows: list[dict[str, Any]], *, wall_s: float, gpus: int
) -> dict[str, Any]:
    """The ``compute`` block of an evaluation from its result rows.

    Per row (a model on a dataset): ``prompts * n`` samples of ``response_tokens_mean`` tokens
    were generated (2 N each); a model other than the base also scores them under the base for
    its KL (2 N more each, twice when the KL uses teacher-forced log-probs of the model too).
    N is the active parameter count of ``cfg.model``: a round's models share its architecture.
    """
    generated = scored = 0.0
    for r in rows:
        toks = float(r.get("prompts") or 0) * float(r.get("n") or 0)
        toks *= float(r.get("response_tokens_mean") or 0.0)
        generated += toks
        if not r.get("is_base"):
            teacher_forced = cfg.eval.kl_logprobs == "teacher_forced"
            scored += toks * (2 if teacher_forced else 1)
    return compute_record(
        cfg,
        scored_tokens=generated + scored,
        wall_s=wall_s,
        gpus=gpus,
        generated_tokens=int(generated),
        step="eval",
    )
