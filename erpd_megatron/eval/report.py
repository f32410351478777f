"""The evaluation report: a Markdown table, CSV, JSON and the accuracy-vs-KL plot.

Rows are the dicts of :func:`erpd_megatron.eval.evaluate.evaluate_models` (one per model and
held-out set). Plots use matplotlib's object API with the Agg canvas (no display, no pyplot
global state).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path
from typing import Any

from erpd_megatron.utils.files import atomic_write_bytes

COLUMN_DOCS: dict[str, str] = {
    "model": "row name (eval.models[].name)",
    "dataset": "held-out set",
    "is_base": "whether this is pi_base, the KL reference",
    "prompts": "held-out prompts evaluated",
    "n": "samples per prompt",
    "accuracy": "avg@n: mean reward over the n samples of a prompt, averaged over prompts",
    "accuracy_se": "standard error of accuracy over prompts",
    "pass@k": (
        "unbiased pass@k (1 - C(n-c,k)/C(n,k), c = samples with reward > 0.5), averaged over "
        "prompts"
    ),
    "kl_to_base": (
        "sequence KL(pi || pi_base) in nats: mean over samples y ~ pi of sum_t log pi(y_t) - "
        "log pi_base(y_t)"
    ),
    "kl_to_base_se": "standard error of kl_to_base over sequences",
    "kl_to_base_per_token": "the same sum divided by the number of response tokens (nats/token)",
    "kl_note": "how the KL was obtained (the base's is 0 by construction)",
    "acc_gain_per_nat": (
        "(accuracy - base accuracy) / kl_to_base; empty for the base or KL < 1e-3 nats"
    ),
    "entropy": "mean over pi's response tokens of the exact full-distribution entropy (nats/token)",
    "drift": (
        "mean over the base's samples of sum_t log pi - log pi_base (nats/seq; "
        "= -KL(pi_base || pi))"
    ),
    "drift_pos": "drift on base samples with reward > 0.5",
    "drift_neg": "drift on base samples with reward <= 0.5",
    "response_tokens_mean": "mean response length in tokens (EOS included)",
    "finish_stop": "samples that ended on an EOS token",
    "finish_length": "samples cut at max_new_tokens",
    "truncated_frac": "finish_length / samples",
    "logprob_mismatch": (
        "mean |engine log-prob - teacher-forced log-prob| per token (numerics check)"
    ),
}


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "—"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _pm(v: Any, se: Any, digits: int = 4) -> str:
    if v is None:
        return "—"
    return f"{_fmt(v, digits)} ± {_fmt(se, digits)}" if se is not None else _fmt(v, digits)


def _pass_keys(rows: list[dict[str, Any]]) -> list[str]:
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k.startswith("pass@") and k not in keys]
    return sorted(keys, key=lambda k: int(k.split("@")[1]))


def _datasets(rows: list[dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(str(r.get("dataset", "")) for r in rows))


def format_table(rows: list[dict[str, Any]]) -> str:
    """Markdown: one table per held-out set, one row per model (mean ± standard error where
    one is known; — where a value does not apply)."""
    parts = []
    for ds in _datasets(rows):
        sub = [r for r in rows if str(r.get("dataset", "")) == ds]
        n = sub[0].get("n", "n")
        pk = [k for k in _pass_keys(sub) if any(r.get(k) is not None for r in sub)]
        head = [
            "model",
            f"avg@{n}",
            *pk,
            "KL to base (nats/seq)",
            "entropy (nats/tok)",
            "drift +/- (nats/seq)",
            "length (tok)",
            "truncated",
            "acc gain / nat",
        ]
        lines = [
            f"#### {ds}: {sub[0].get('prompts', '?')} prompts x {n} samples, "
            f"temperature {sub[0].get('temperature', '?')}",
            "",
            "| " + " | ".join(head) + " |",
            "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|",
        ]
        for r in sub:
            kl = (
                "0 (base)" if r.get("is_base") else _pm(r.get("kl_to_base"), r.get("kl_to_base_se"))
            )
            drift = (
                "0 (base)"
                if r.get("is_base")
                else f"{_fmt(r.get('drift_pos'), 3)} / {_fmt(r.get('drift_neg'), 3)}"
            )
            cells = [
                str(r.get("model")),
                _pm(r.get("accuracy"), r.get("accuracy_se")),
                *[_fmt(r.get(k)) for k in pk],
                kl,
                _fmt(r.get("entropy")),
                drift,
                _fmt(r.get("response_tokens_mean"), 1),
                f"{100 * (r.get('truncated_frac') or 0):.1f}%",
                _fmt(r.get("acc_gain_per_nat"), 3),
            ]
            lines.append("| " + " | ".join(cells) + " |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


def _flat(row: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in row.items():
        if isinstance(v, dict):
            out.update({f"{k}_{kk}": vv for kk, vv in v.items()})
        elif isinstance(v, (list, tuple)):
            out[k] = json.dumps(v)
        else:
            out[k] = "" if v is None else v
    return out


def format_csv(rows: list[dict[str, Any]]) -> str:
    """CSV with one line per row; nested values flattened (``seconds_generate``), None empty."""
    flat = [_flat(r) for r in rows]
    cols: list[str] = []
    for r in flat:
        cols += [k for k in r if k not in cols]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    w.writeheader()
    w.writerows(flat)
    return buf.getvalue()


def _json_safe(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_safe(x) for x in v]
    if hasattr(v, "item"):
        return _json_safe(v.item())
    return v


NOTES = """\
Notes
- avg@n is the mean reward over n samples per prompt (± standard error over prompts); pass@k is the
  unbiased estimator averaged over prompts.
- KL to base is the sequence KL(pi || pi_base) in nats per response, estimated on fresh samples
  of pi as the mean of sum_t (log pi(y_t) - log pi_base(y_t)) (± standard error over sequences);
  pi_base's log-probs come from a teacher-forced pass. The base's own KL (and drift) is
  0 by construction, not estimated.
- Entropy is exact: the mean over pi's response tokens of the full next-token distribution's entropy
  (teacher-forced pass of pi on its own samples).
- Drift is sum_t (log pi - log pi_base) on the *base's* samples, split by their reward (+ / -),
  like the training logs' drift_pos / drift_neg; its mean is -KL(pi_base || pi).
- Accuracy gained per nat is (accuracy - base accuracy) / KL; empty for the base or KL < 1e-3 nats.
"""


KL_ZERO = 1e-2
"""Nats per sequence under which a trained model counts as not moved from the base."""


def kl_zero_warnings(rows: list[dict[str, Any]]) -> list[str]:
    """One line per non-base model whose KL to the base is ≈ 0 (below :data:`KL_ZERO` nats, or
    within two standard errors of 0): training did not move it, so a teacher there has nothing
    to teach (typically a Stage-1 run without signal: see its log's 'groups have signal')."""
    out = []
    for r in rows:
        kl, se = r.get("kl_to_base"), r.get("kl_to_base_se") or 0.0
        if r.get("is_base") or kl is None or not math.isfinite(float(kl)):
            continue
        if abs(float(kl)) < max(KL_ZERO, 2.0 * float(se)):
            out.append(
                f"- **{r.get('model')}** ({r.get('dataset', '')}) is at KL ≈ 0 to the base "
                f"({float(kl):.4g} ± {float(se):.2g} nats/seq): it did not move from pi_base. A "
                "teacher here gives Stage 2 no signal; check its Stage-1 run (rollout groups "
                "with signal, loss, learning rate, epochs)."
            )
    return out


def write_report(
    rows: list[dict[str, Any]], out_dir: str | os.PathLike, *, meta: dict[str, Any] | None = None
) -> dict[str, Path]:
    """Write ``results.md``, ``results.csv``, ``results.json`` and ``accuracy_vs_kl.png`` to
    ``out_dir``; returns their paths keyed ``results_md``, ``results_csv``, ``results_json``,
    ``accuracy_vs_kl``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "results_md": out / "results.md",
        "results_csv": out / "results.csv",
        "results_json": out / "results.json",
        "accuracy_vs_kl": out / "accuracy_vs_kl.png",
    }
    warn = kl_zero_warnings(rows)
    warn_md = ("Warnings\n" + "\n".join(warn) + "\n\n") if warn else ""
    md = (
        "# Evaluation\n\n"
        + format_table(rows)
        + "\n"
        + warn_md
        + NOTES
        + "\n![accuracy vs KL](accuracy_vs_kl.png)\n"
    )
    atomic_write_bytes(paths["results_md"], md.encode())
    atomic_write_bytes(paths["results_csv"], format_csv(rows).encode())
    plot_accuracy_vs_kl(rows, paths["accuracy_vs_kl"])
    # last: its presence marks a finished evaluation (erpd round skips the step when it exists)
    doc = {"rows": _json_safe(rows), "columns": COLUMN_DOCS, "meta": _json_safe(meta or {})}
    atomic_write_bytes(paths["results_json"], (json.dumps(doc, indent=2) + "\n").encode())
    return paths


def _marker(row: dict[str, Any]) -> str:
    name = str(row.get("model", "")).lower()
    if row.get("is_base"):
        return "*"
    if "teacher" in name or "stage1" in name:
        return "^"
    if "student" in name or "stage2" in name:
        return "o"
    return "s"


def plot_accuracy_vs_kl(rows: list[dict[str, Any]], path: str | os.PathLike) -> Path:
    """Accuracy (avg@n) against sequence KL to the base, one panel per held-out set: a labelled
    point per model with ±1 standard-error bars (KL over sequences, accuracy over prompts).
    Models without a KL (temperature 0) are left out."""
    from matplotlib.figure import Figure

    sets = _datasets(rows)
    fig = Figure(figsize=(6.4 * len(sets), 4.8), dpi=120, layout="constrained")
    axes = fig.subplots(1, len(sets), squeeze=False)[0]
    names = list(dict.fromkeys(str(r["model"]) for r in rows))
    colors = {m: f"C{i % 10}" for i, m in enumerate(names)}
    for ax, ds in zip(axes, sets):
        sub = [
            r for r in rows if str(r.get("dataset", "")) == ds and r.get("kl_to_base") is not None
        ]
        pts = [(float(r["kl_to_base"]), float(r["accuracy"])) for r in sub]
        xs, ys = [p[0] for p in pts] or [0.0], [p[1] for p in pts] or [0.0]
        xr, yr = (max(xs) - min(xs)) or 1.0, (max(ys) - min(ys)) or 1.0
        for i, (r, (x, y)) in enumerate(zip(sub, pts)):
            base = bool(r.get("is_base"))
            ax.errorbar(
                x,
                y,
                xerr=r.get("kl_to_base_se") or 0.0,
                yerr=r.get("accuracy_se") or 0.0,
                fmt=_marker(r),
                color=colors[str(r["model"])],
                markersize=13 if base else 8,
                markeredgecolor="k" if base else "white",
                capsize=4,
                elinewidth=1.2,
                zorder=4 if base else 3,
                label=str(r["model"]),
            )
            # stack the labels of points that (nearly) coincide
            near = sum(abs(x - px) / xr < 0.04 and abs(y - py) / yr < 0.04 for px, py in pts[:i])
            ax.annotate(
                str(r["model"]),
                (x, y),
                xytext=(7, 5 - 12 * near),
                textcoords="offset points",
                fontsize=9,
            )
        n = sub[0]["n"] if sub else "n"
        ax.set_xlabel("KL(π ‖ π_base) per sequence [nats]")
        ax.set_ylabel(f"accuracy avg@{n} [fraction correct]")
        ax.set_title(f"{ds}: accuracy vs KL to base")
        ax.grid(True, alpha=0.3)
        ax.axvline(0.0, color="0.6", linewidth=0.8, zorder=0)
        ax.margins(x=0.15, y=0.15)
        if sub:
            ax.legend(title="model (bars: ±1 s.e.)", fontsize=8, title_fontsize=8, loc="best")
    path = Path(path)
    fig.savefig(path)
    return path


__all__ = ["COLUMN_DOCS", "format_csv", "format_table", "plot_accuracy_vs_kl", "write_report"]
