"""`erpd study report`: every point's evaluation in one table, compute per step, and plots.

Writes to ``<study output_dir>/report/``:

* ``study.md``, ``study.csv``, ``study.json``: one row per point x evaluated model x held-out
  set, the axes as columns; a point without results is a row with ``status`` missing (never
  ran or still running) or failed (a step's manifest or job says so), never dropped; seeds
  are averaged into ``seeds.*`` rows (mean +- standard error over seeds);
* ``compute.csv`` and a compute table in ``study.md``: per point and step, tokens, wall time,
  GPUs, model FLOPs, GPU-hours and achieved TFLOP/s per GPU (from the manifests' ``compute``
  blocks, :mod:`erpd_megatron.config.compute`); shared steps are marked and counted once;
* ``accuracy_vs_kl.png`` (frontier per model size), ``accuracy_vs_epochs.png`` (teachers and
  students per model size), ``gain_per_axis.png`` (accuracy gained per nat and per GPU-hour).

Plots use matplotlib's object API on the Agg canvas. With ``wandb_project`` set, every point
is a wandb run (group = the study's name, config = its axes) holding its rows' metrics.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path
from typing import Any

from erpd_megatron.config.compute import gpu_hours, tflops_per_gpu
from erpd_megatron.pipeline.study_spec import Study
from erpd_megatron.utils.files import atomic_write_bytes
from erpd_megatron.utils.log import get_logger

log = get_logger(__name__)

METRICS = ("accuracy", "accuracy_se", "kl_to_base", "acc_gain_per_nat", "entropy")


def _read(p: Path) -> dict:
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return {}


def _step_compute(name: str, out: Path) -> dict | None:
    """The ``compute`` block of a step's manifest, if it recorded one."""
    if name.startswith("s1_"):
        return _read(out / "stage1/checkpoints/manifest.json").get("compute")
    if name.startswith("s2_"):
        return _read(out / "stage2/checkpoints/manifest.json").get("compute")
    if name in ("cache", "rollouts"):
        m = _read(out / "manifest.json")
        return m.get("compute") or (m.get("extra") or {}).get("compute")
    if name == "eval":
        return (_read(out / "results.json").get("meta") or {}).get("compute")
    return None


def _failed_marker(out: Path) -> bool:
    return any(_read(m).get("status") == "failed" for m in out.glob("*/checkpoints/manifest.json"))


def collect(study: Study) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(result rows, compute rows) of every point."""
    import shutil

    from erpd_megatron.config.compute import param_counts
    from erpd_megatron.pipeline.study import JOBS_FILE, LOCAL_FILE, job_states, plan_study

    plans = plan_study(study, check=False)
    jobs = _read(study.output_dir / JOBS_FILE).get("jobs", {})
    local = _read(study.output_dir / LOCAL_FILE).get("outcome", {})
    states = (
        job_states(sorted({j["job"] for j in jobs.values()}))
        if jobs and shutil.which("scontrol")
        else {}
    )
    rows, comp = [], []
    for pp in plans:
        base = {"point": pp.point.name, **pp.point.axes}
        if pp.error:
            rows.append(base | {"status": "failed", "why": f"config error: {pp.error}"})
            continue
        total, _ = param_counts(pp.cfg)
        base |= {"params_b": round(total / 1e9, 4), "stage1_epochs": pp.cfg.stage1.epochs}
        point_h, why = 0.0, []
        for r, s in pp.steps():
            out = s.plan.outputs[0] if s.plan.outputs else None
            j = jobs.get(s.plan.fingerprint)
            st = states.get(j["job"]) if j else None
            if not s.plan.done and st in (
                "FAILED",
                "CANCELLED",
                "TIMEOUT",
                "NODE_FAIL",
                "OUT_OF_MEMORY",
            ):
                why.append(f"{s.plan.name}: job {j['job']} {st}")
            if out is None:
                continue
            rec = _step_compute(s.plan.name, out)
            if rec is None:
                continue
            shared = out.is_symlink()
            h = gpu_hours(rec)
            comp.append(
                {
                    "point": pp.point.name,
                    "round": r,
                    "step": s.plan.name,
                    "shared": shared,
                    "trained_tokens": rec.get("trained_tokens"),
                    "scored_tokens": rec.get("scored_tokens"),
                    "wall_s": rec.get("wall_s"),
                    "gpus": rec.get("gpus"),
                    "model_flops": rec.get("model_flops"),
                    "gpu_hours": h,
                    "tflops_per_gpu": tflops_per_gpu(rec),
                }
            )
            if not shared:
                point_h += h
        base["gpu_hours"] = point_h
        last = pp.rounds[-1][1] if pp.rounds else []
        ev = next((s for s in last if s.plan.name == "eval"), None)
        res = _read(ev.plan.outputs[0] / "results.json") if ev else {}
        if not res.get("rows"):
            if str(local.get(pp.point.name, "")).startswith("failed"):
                why.append(local[pp.point.name][:300])
            status = "failed" if why or _failed_marker(pp.point.output_dir) else "missing"
            rows.append(
                base | {"status": status, "why": "; ".join(why) or "no eval/results.json yet"}
            )
            continue
        for row in res["rows"]:
            rows.append(
                base
                | {
                    "status": "ok",
                    "model": row.get("model"),
                    "dataset": row.get("dataset"),
                    "is_base": bool(row.get("is_base")),
                    "eval_epoch": _model_epoch(pp.cfg, row),
                    **{k: row.get(k) for k in METRICS},
                }
            )
        base_acc = {
            r["dataset"]: r["accuracy"]
            for r in rows
            if r["point"] == pp.point.name and r.get("is_base")
        }
        for r_ in rows:
            if r_["point"] == pp.point.name and r_.get("status") == "ok" and not r_.get("is_base"):
                b = base_acc.get(r_["dataset"])
                gain = (
                    (r_["accuracy"] - b) if (b is not None and r_["accuracy"] is not None) else None
                )
                r_["acc_gain"] = gain
                r_["acc_gain_per_gpu_hour"] = (
                    gain / point_h if gain is not None and point_h > 0 else None
                )
    return rows, comp


def _model_epoch(cfg: Any, row: dict) -> int | None:
    """Stage-1 epochs behind an evaluated model: a teacher's snapshot epoch or its run's epochs;
    a student's teacher's; None for the base."""
    rc = cfg.round
    name = row.get("model")
    teachers = {t.name: t for t in rc.teachers}
    t = teachers.get(name)
    if t is None:
        return None
    return t.epoch if t.epoch is not None else cfg.stage1.epochs


def _axes(study: Study) -> list[str]:
    return [a.name for a in study.axes]


def seed_rows(study: Study, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows averaged over the seed axis: mean and standard error of each metric."""
    if "seed" not in _axes(study):
        return []
    keep = [a for a in _axes(study) if a != "seed"]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r.get("status") != "ok":
            continue
        groups.setdefault(tuple(r.get(a) for a in keep) + (r["model"], r["dataset"]), []).append(r)
    out = []
    for key, rs in groups.items():
        row: dict[str, Any] = dict(zip(keep + ["model", "dataset"], key))
        row["seeds"] = len(rs)
        for m in ("accuracy", "kl_to_base", "acc_gain", "acc_gain_per_gpu_hour"):
            vals = [r[m] for r in rs if isinstance(r.get(m), (int, float))]
            if vals:
                mu = sum(vals) / len(vals)
                sd = (
                    math.sqrt(sum((v - mu) ** 2 for v in vals) / (len(vals) - 1))
                    if len(vals) > 1
                    else 0.0
                )
                row[m], row[f"{m}_seed_se"] = mu, sd / math.sqrt(len(vals))
        out.append(row)
    return out


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}"
    return str(v)


def _md(rows: list[dict[str, Any]], cols: list[str]) -> str:
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def _csv(rows: list[dict[str, Any]], cols: list[str]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({c: r.get(c) for c in cols})
    return buf.getvalue()


def _frontier(pts: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Upper-left frontier: points with no other point at lower-or-equal KL and higher accuracy."""
    out, best = [], -math.inf
    for x, y in sorted(pts):
        if y > best:
            out.append((x, y))
            best = y
    return out


def _figure(w: float = 6.4, h: float = 4.4, ncols: int = 1, nrows: int = 1) -> tuple[Any, Any]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w * ncols, h * nrows))
    FigureCanvasAgg(fig)
    axs = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axs


def _save(fig: Any, path: Path) -> Path:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    atomic_write_bytes(path, buf.getvalue())
    return path


def _size_label(r: dict) -> str:
    p = r.get("params_b") or 0
    return f"{p:.2f}B" if p >= 0.1 else f"{p * 1e3:.2f}M"


def plot_accuracy_vs_kl(rows: list[dict], path: Path) -> Path:
    """Every evaluated model of every point; the frontier (best accuracy at most this KL) per
    model size; error bars are the evaluation's standard errors."""
    fig, axs = _figure()
    ax = axs[0][0]
    ok = [r for r in rows if r.get("status") == "ok" and r.get("kl_to_base") is not None]
    sizes = sorted({_size_label(r) for r in ok})
    for i, size in enumerate(sizes):
        color = f"C{i}"
        rs = [r for r in ok if _size_label(r) == size]
        for r in rs:
            ax.errorbar(
                r["kl_to_base"],
                r["accuracy"],
                yerr=r.get("accuracy_se") or 0,
                fmt="o" if not r["is_base"] else "*",
                color=color,
                ms=6 if not r["is_base"] else 11,
                alpha=0.8,
                capsize=2,
            )
        front = _frontier([(r["kl_to_base"], r["accuracy"]) for r in rs])
        ax.plot(
            [x for x, _ in front], [y for _, y in front], "-", color=color, label=f"{size} frontier"
        )
    missing = sorted({r["point"] for r in rows if r.get("status") != "ok"})
    title = "accuracy vs KL to the base (* = base)"
    if missing:
        title += f"\nno results: {', '.join(missing)}"
    ax.set(xlabel="KL(pi || pi_base) per sequence (nats)", ylabel="accuracy (avg@n)", title=title)
    if sizes:
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_accuracy_vs_epochs(rows: list[dict], path: Path) -> Path:
    """Accuracy against Stage-1 epochs: teachers at their epochs, students at the point's
    ``stage1.epochs``; a line per model size and role (mean and s.e. over points)."""
    fig, axs = _figure()
    ax = axs[0][0]
    ok = [r for r in rows if r.get("status") == "ok" and not r.get("is_base")]
    series: dict[tuple[str, str], dict[int, list[float]]] = {}
    for r in ok:
        role = "teacher" if r.get("eval_epoch") is not None else "student"
        x = r["eval_epoch"] if role == "teacher" else r["stage1_epochs"]
        series.setdefault((_size_label(r), role), {}).setdefault(x, []).append(r["accuracy"])
    sizes = sorted({k[0] for k in series})
    for (size, role), pts in sorted(series.items()):
        xs = sorted(pts)
        mu = [sum(pts[x]) / len(pts[x]) for x in xs]
        se = [_se(pts[x]) for x in xs]
        ax.errorbar(
            xs,
            mu,
            yerr=se,
            fmt="-o" if role == "student" else "--^",
            capsize=3,
            color=f"C{sizes.index(size)}",
            label=f"{size} {role}s",
        )
    bases: dict[str, list[float]] = {}
    for r in rows:
        if r.get("status") == "ok" and r.get("is_base") and r.get("accuracy") is not None:
            bases.setdefault(_size_label(r), []).append(r["accuracy"])
    for size, accs in sorted(bases.items()):  # one dotted line per size's base
        ax.axhline(
            sum(accs) / len(accs),
            color=f"C{sizes.index(size)}" if size in sizes else "grey",
            ls=":",
            label=f"{size} base",
        )
    ax.set(xlabel="Stage-1 epochs", ylabel="accuracy (avg@n)", title="accuracy vs Stage-1 epochs")
    if series:
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def _se(v: list[float]) -> float:
    if len(v) < 2:
        return 0.0
    mu = sum(v) / len(v)
    return math.sqrt(sum((x - mu) ** 2 for x in v) / (len(v) - 1)) / math.sqrt(len(v))


def plot_gain_per_axis(study: Study, rows: list[dict], path: Path) -> Path:
    """Per axis (columns): students' accuracy gained per nat of KL and per GPU-hour of the
    point, by the axis's value (mean +- s.e. over the other axes and seeds); points without
    results are marked ``missing`` on the axis."""
    axes = _axes(study) or ["point"]
    fig, axs = _figure(4.2, 3.4, ncols=len(axes), nrows=2)
    ok = [
        r
        for r in rows
        if r.get("status") == "ok" and not r.get("is_base") and r.get("eval_epoch") is None
    ]
    for j, a in enumerate(axes):
        labels = []
        for r in rows:
            if str(r.get(a)) not in labels:
                labels.append(str(r.get(a)))
        for i, (metric, ylabel) in enumerate(
            (
                ("acc_gain_per_nat", "accuracy gain per nat"),
                ("acc_gain_per_gpu_hour", "accuracy gain per GPU-hour"),
            )
        ):
            ax = axs[i][j]
            mus, ses, names = [], [], []
            for lab in labels:
                v = [
                    r[metric]
                    for r in ok
                    if str(r.get(a)) == lab and isinstance(r.get(metric), (int, float))
                ]
                names.append(lab if v else f"{lab}\n(missing)")
                mus.append(sum(v) / len(v) if v else 0.0)
                ses.append(_se(v))
            ax.bar(
                range(len(labels)),
                mus,
                yerr=ses,
                capsize=3,
                color=[f"C{k}" for k in range(len(labels))],
            )
            ax.set_xticks(range(len(labels)), names, fontsize=8)
            ax.set(xlabel=a, ylabel=ylabel)
            ax.axhline(0, color="black", lw=0.6)
            ax.grid(alpha=0.3, axis="y")
    fig.suptitle("students: accuracy gained per nat and per GPU-hour, per axis")
    return _save(fig, path)


def _wandb_runs(study: Study, rows: list[dict]) -> None:
    """One wandb run per point (group = study name, config = axes); offline without a key."""
    if not study.wandb_project:
        return
    try:
        import wandb
    except ImportError:
        log.warning("wandb is not installed; no study runs logged")
        return
    mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
    for p in study.points():
        rs = [r for r in rows if r["point"] == p.name]
        run = wandb.init(
            project=study.wandb_project,
            group=study.name,
            name=p.name,
            config=p.axes,
            mode=mode,
            dir=str(p.output_dir),
            reinit=True,
            job_type="study-point",
        )
        summary = {"status": rs[0].get("status") if rs else "missing"}
        for r in rs:
            if r.get("status") == "ok":
                for m in ("accuracy", "kl_to_base", "acc_gain", "acc_gain_per_gpu_hour"):
                    if isinstance(r.get(m), (int, float)):
                        summary[f"{r['model']}/{r['dataset']}/{m}"] = r[m]
        run.summary.update(summary)
        run.finish()
    # run.finish() can return before wandb's service has written an offline run's records
    # (a fresh-clone suite read a header-only .wandb file right after it, wandb 0.31.0);
    # teardown waits for the service to write everything and exit (every run here is finished)
    wandb.teardown()


def write_study_report(study: Study) -> dict[str, Path]:
    """Collect, write the tables and plots; returns their paths (keys md, csv, json, compute_csv
    and the plots')."""
    rows, comp = collect(study)
    out = study.output_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    axes = _axes(study)
    cols = [
        "point",
        *axes,
        "status",
        "model",
        "dataset",
        "accuracy",
        "accuracy_se",
        "kl_to_base",
        "acc_gain",
        "acc_gain_per_nat",
        "acc_gain_per_gpu_hour",
        "entropy",
        "gpu_hours",
        "params_b",
        "why",
    ]
    seeds = seed_rows(study, rows)
    scols = [a for a in axes if a != "seed"] + [
        "model",
        "dataset",
        "seeds",
        "accuracy",
        "accuracy_seed_se",
        "kl_to_base",
        "kl_to_base_seed_se",
        "acc_gain",
        "acc_gain_seed_se",
    ]
    ccols = [
        "point",
        "round",
        "step",
        "shared",
        "trained_tokens",
        "scored_tokens",
        "wall_s",
        "gpus",
        "model_flops",
        "gpu_hours",
        "tflops_per_gpu",
    ]
    paths = {
        "md": out / "study.md",
        "csv": out / "study.csv",
        "json": out / "study.json",
        "compute_csv": out / "compute.csv",
    }
    paths["accuracy_vs_kl"] = plot_accuracy_vs_kl(rows, out / "accuracy_vs_kl.png")
    paths["accuracy_vs_epochs"] = plot_accuracy_vs_epochs(rows, out / "accuracy_vs_epochs.png")
    paths["gain_per_axis"] = plot_gain_per_axis(study, rows, out / "gain_per_axis.png")
    n_ok = len({r["point"] for r in rows if r.get("status") == "ok"})
    n = len({r["point"] for r in rows})
    md = [f"# Study {study.name}", "", f"{n_ok} of {n} points evaluated.", "", _md(rows, cols), ""]
    if seeds:
        md += ["## Over seeds (mean, standard error over seeds)", "", _md(seeds, scols), ""]
    md += [
        "## Compute per step",
        "",
        "GPU-hours = GPUs x wall time of the steps' optimizer/scoring loops; TFLOP/s per GPU "
        "from model FLOPs (6 N per trained token, 2 N per scored token). Rollouts and "
        "evaluation record no compute block.",
        "",
        _md(comp, ccols),
        "",
        "![accuracy vs KL](accuracy_vs_kl.png)",
        "![accuracy vs epochs](accuracy_vs_epochs.png)",
        "![gain per axis](gain_per_axis.png)",
        "",
    ]
    atomic_write_bytes(paths["md"], "\n".join(md).encode())
    atomic_write_bytes(paths["csv"], _csv(rows, cols).encode())
    atomic_write_bytes(paths["compute_csv"], _csv(comp, ccols).encode())
    doc = {"study": study.name, "axes": axes, "rows": rows, "seeds": seeds, "compute": comp}
    atomic_write_bytes(paths["json"], (json.dumps(doc, indent=2, default=str) + "\n").encode())
    _wandb_runs(study, rows)
    return paths
