"""Training curves of Stage 1 and Stage 2 from their metrics JSONL files.

A metrics file (``<out>/stage1/stage1_metrics.jsonl``, written by the training loop) holds one
record per optimizer step (``step``, ``epoch``, ``stage1/loss``, ``stage1/entropy``,
``stage1/drift_pos``, ``stage1/seq_kl_k3``, ...) and one per finished epoch
(``stage1/epoch/<name>``, at the epoch's last step). One figure per stage, one panel per
quantity: loss, token entropy, sequence log-prob drift (reward-1 solid, reward-0 dashed),
sequence KL to pi_r (k3), gradient norm and, where the file has it, held-out accuracy (any
key of the stage whose name contains ``accuracy``, ``avg@`` or ``pass@``, e.g.
``stage1/eval/accuracy``). Per-step values are thin lines, epoch means are dots at the end of
each epoch, epoch boundaries are dotted vertical lines. Several files of the same stage (a
teacher and an unlearned run, several teachers) are overlaid, one colour each.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any

from erpd_megatron.train.metrics import read_metrics
from erpd_megatron.utils.log import get_logger

log = get_logger(__name__)

_ACC = re.compile(r"accuracy|avg@|pass@")
PANELS: list[tuple[str, list[tuple[str, str]], str]] = [
    ("loss", [("loss", "-")], "loss"),
    ("token entropy", [("entropy", "-")], "entropy [nats/token]"),
    (
        "log-prob drift vs π_r (by reward of the response)",
        [("drift_pos", "-"), ("drift_neg", "--")],
        "Σ_t log π − log π_r [nats/seq]",
    ),
    ("KL(π ‖ π_r), k3 estimator", [("seq_kl_k3", "-")], "KL [nats/seq]"),
    ("gradient norm", [("grad_norm", "-")], "‖g‖₂ (log scale)"),
]


def discover_metrics_files(output_dir: str | os.PathLike) -> list[Path]:
    """``stage1_metrics.jsonl`` / ``stage2_metrics.jsonl`` files in ``output_dir`` or one or two
    folders below it (``<out>/stage1/``, ``<out>/teacher/stage1/``), sorted."""
    root = Path(output_dir)
    found: set[Path] = set()
    for pattern in (
        "stage[12]_metrics.jsonl",
        "*/stage[12]_metrics.jsonl",
        "*/*/stage[12]_metrics.jsonl",
    ):
        found.update(root.glob(pattern))
    return sorted(found)


def _num(v: Any) -> float:
    try:
        return float(v)  # "nan"/"inf" strings as the metrics logger writes them
    except (TypeError, ValueError):
        return math.nan


def stage_of(records: list[dict[str, Any]], path: Path) -> str:
    """The stage name a metrics file belongs to: the prefix of its namespaced keys
    (``stage1/loss`` -> ``stage1``), else the file name (``stage2_metrics.jsonl``)."""
    for r in records:
        for k in r:
            if "/" in k:
                return k.split("/", 1)[0]
    return path.name.removesuffix("_metrics.jsonl")


def run_labels(paths: list[Path]) -> list[str]:
    """Short distinct labels of metrics files: the folder above the stage folder
    (``.../teacher/stage1/stage1_metrics.jsonl`` -> ``teacher``), longer where needed."""
    depth = 1
    while True:
        labels = []
        for p in paths:
            parts = [x for x in p.parent.parts if not re.fullmatch(r"stage\d", x)]
            labels.append("/".join(parts[-depth:]) if parts else p.stem)
        if len(set(labels)) == len(labels) or depth > 8:
            return labels
        depth += 1


def _series(records: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for r in records:
        if key in r and "step" in r:
            xs.append(float(r["step"]))
            ys.append(_num(r[key]))
    return xs, ys


def _plot_stage(stage: str, runs: list[tuple[str, list[dict[str, Any]]]], path: Path) -> Path:
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    acc_keys = sorted(
        {
            k
            for _, recs in runs
            for r in recs
            for k in r
            if k.startswith(f"{stage}/")
            and _ACC.search(k)
            and "/epoch/" not in k
            and not k.endswith(("_se", "pass@1"))
        }
    )  # s.e. as error bars; pass@1 = accuracy
    styles = ["-", "--", "-.", ":"]
    panels = list(PANELS) + (
        [
            (
                "held-out accuracy",
                [(k.split("/", 1)[1], styles[i % 4]) for i, k in enumerate(acc_keys)],
                "accuracy [fraction correct]",
            )
        ]
        if acc_keys
        else []
    )
    ncols = 2
    nrows = math.ceil(len(panels) / ncols)
    fig = Figure(figsize=(12, 3.3 * nrows + 0.6), dpi=110, layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).reshape(-1)
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    bounds: set[float] = set()
    drawn = [False] * len(panels)
    for ri, (_label, recs) in enumerate(runs):
        color = f"C{ri % 10}"
        steps = [r for r in recs if not any("/epoch/" in k for k in r)]
        epochs = [r for r in recs if any("/epoch/" in k for k in r)]
        last = max((float(r.get("step", 0)) for r in steps), default=0.0)
        bounds.update(
            float(r["step"]) + 0.5 for r in epochs if "step" in r and float(r["step"]) < last
        )
        for pi, (ax, (_title, series, _ylabel)) in enumerate(zip(axes, panels)):
            for name, style in series:
                xs, ys = _series(steps, f"{stage}/{name}")
                if not xs:
                    continue
                drawn[pi] = True
                sparse = len(xs) < 0.5 * max(len(steps), 1)  # e.g. accuracy every few epochs
                ax.plot(
                    xs,
                    ys,
                    style,
                    color=color,
                    linewidth=1.0,
                    alpha=0.9 if sparse else 0.5,
                    marker="o" if sparse else None,
                    markersize=4,
                )
                sx, se = _series(steps, f"{stage}/{name}_se")
                if sx == xs:
                    ax.errorbar(
                        xs, ys, yerr=se, fmt="none", ecolor=color, elinewidth=0.8, capsize=2
                    )
                ex, ey = _series(epochs, f"{stage}/epoch/{name}")
                if ex:
                    ax.plot(ex, ey, style, color=color, marker="o", markersize=4, linewidth=1.8)
    for ax, (title, series, ylabel), ok in zip(axes, panels, drawn):
        if title.startswith("KL") and stage == "stage2":
            title += " (= stage2/kl_to_base)"
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("optimizer step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        if title == "gradient norm" and ok:
            ax.set_yscale("log")  # one spike would otherwise flatten every other step
        for b in sorted(bounds):
            ax.axvline(b, color="0.5", linestyle=":", linewidth=0.9)
        if len(series) > 1:  # which line style is which quantity
            ax.legend(
                [Line2D([], [], color="0.2", linestyle=st) for _, st in series],
                [n for n, _ in series],
                fontsize=8,
                loc="best",
            )
        if not ok:
            ax.text(
                0.5,
                0.5,
                "not logged",
                transform=ax.transAxes,
                ha="center",
                va="center",
                color="0.5",
            )
    handles = [Line2D([], [], color=f"C{i % 10}", linewidth=2.5) for i in range(len(runs))]
    labels = [label for label, _ in runs]
    handles += [
        Line2D([], [], color="0.3", linewidth=1.0, alpha=0.5),
        Line2D([], [], color="0.3", linewidth=1.8, marker="o", markersize=4),
        Line2D([], [], color="0.5", linestyle=":", linewidth=0.9),
    ]
    labels += ["per step", "epoch mean (at epoch end)", "epoch boundary"]
    fig.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 6), fontsize=9)
    fig.suptitle(f"{stage} training curves", fontsize=12)
    fig.savefig(path)
    return path


def plot_training_curves(
    metrics_files: list[str | os.PathLike], out_dir: str | os.PathLike
) -> list[Path]:
    """One figure per stage (``<out_dir>/<stage>_curves.png``) from metrics JSONL files (see
    the module doc); returns the written paths. Empty or unreadable files are skipped with a
    warning."""
    out = Path(out_dir)
    by_stage: dict[str, list[tuple[Path, list[dict[str, Any]]]]] = {}
    for f in map(Path, metrics_files):
        try:
            recs = read_metrics(f)
        except OSError as e:
            log.warning("metrics file %s cannot be read (%s); skipped", f, e)
            continue
        if not recs:
            log.warning("metrics file %s has no records; skipped", f)
            continue
        by_stage.setdefault(stage_of(recs, f), []).append((f, recs))
    paths = []
    if by_stage:
        out.mkdir(parents=True, exist_ok=True)
    for stage in sorted(by_stage):
        files = by_stage[stage]
        labels = run_labels([p for p, _ in files])
        paths.append(
            _plot_stage(
                stage, list(zip(labels, [r for _, r in files])), out / f"{stage}_curves.png"
            )
        )
    return paths


__all__ = ["discover_metrics_files", "plot_training_curves", "run_labels", "stage_of"]
