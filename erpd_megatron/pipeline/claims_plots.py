"""The claims' figures over seeds (``python -m erpd_megatron.pipeline.claims`` draws them).

- ``claims_accuracy_vs_kl.png``: test accuracy against KL to the base, every seed's point
  (small) and each model's mean over seeds with its SE bars (large);
- ``claims_stage1.png``: the Stage-1 held-out curves of the weak (``ce``) and the tight
  (``ce_tight``) constraint, mean over seeds with a band of one SE.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from erpd_megatron.pipeline.claims import curve, mean_se


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_accuracy_vs_kl(records: list[dict], path: Path) -> Path:
    """Every seed's (KL, accuracy) per model and the per-model mean ± SE."""
    plt = _plt()
    names: list[str] = []
    for r in records:
        names += [n for n in r["models"] if n not in names]
    fig, ax = plt.subplots(figsize=(7.5, 5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, n in enumerate(names):
        pts = [
            (r["models"][n].get("kl_to_base"), r["models"][n].get("accuracy"))
            for r in records
            if n in r["models"]
        ]
        pts = [(k, a) for k, a in pts if k is not None and a is not None]
        if not pts:
            continue
        c = colors[i % len(colors)]
        ks, accs = zip(*pts)
        ax.scatter(ks, accs, s=14, alpha=0.45, color=c)
        mk, ma = mean_se(list(ks)), mean_se(list(accs))
        ax.errorbar(
            mk["mean"],
            ma["mean"],
            xerr=mk["se"] or 0,
            yerr=ma["se"] or 0,
            fmt="o",
            ms=8,
            color=c,
            capsize=3,
            label=f"{n} (n={len(pts)})",
        )
    ax.set_xlabel("KL to base (nats / sequence)")
    ax.set_ylabel("test accuracy (avg@n)")
    ax.set_title(f"accuracy vs KL: every seed (small) and the mean ± SE ({len(records)} seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_stage1(records: list[dict], roles: dict, path: Path) -> Path | None:
    """The weak and tight Stage-1 curves: mean over seeds and a ±1 SE band."""
    runs = [r for r in (roles.get("curve_weak"), roles.get("curve_tight")) if r]
    if not runs:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    drawn = False
    for run, label in zip(runs, ("weak constraint", "tight constraint")):
        by_epoch: dict[int, list[float]] = {}
        for r in records:
            for e, a in curve(r, run, roles):
                by_epoch.setdefault(e, []).append(a)
        if not by_epoch:
            continue
        es = sorted(by_epoch)
        stats = [mean_se(by_epoch[e]) for e in es]
        m = np.array([s["mean"] for s in stats])
        se = np.array([s["se"] or 0.0 for s in stats])
        (line,) = ax.plot(es, m, marker="o", label=f"{run} ({label})")
        ax.fill_between(es, m - se, m + se, alpha=0.2, color=line.get_color())
        for r in records:  # every seed, thin
            c = curve(r, run, roles)
            if c:
                ax.plot(*zip(*c), lw=0.6, alpha=0.4, color=line.get_color())
        drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel("Stage-1 epoch")
    ax.set_ylabel("held-out accuracy (avg@n)")
    ax.set_title(f"Stage 1: mean ± SE over {len(records)} seeds (thin: each seed)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_all(records: list[dict], roles: dict, out_dir: Path) -> list[Path]:
    """Both figures into ``out_dir``; returns the written paths."""
    out = [plot_accuracy_vs_kl(records, Path(out_dir) / "claims_accuracy_vs_kl.png")]
    st = plot_stage1(records, roles, Path(out_dir) / "claims_stage1.png")
    return out + ([st] if st else [])
