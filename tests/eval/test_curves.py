"""Training-curve figures from synthetic metrics JSONL files, discovery and labels."""

from __future__ import annotations

import json
import math
from pathlib import Path

from PIL import Image

from erpd_megatron.eval.curves import (
    discover_metrics_files,
    plot_training_curves,
    run_labels,
    stage_of,
)


def write_synthetic_metrics(
    path: Path,
    stage: str,
    *,
    epochs: int = 3,
    steps_per_epoch: int = 4,
    accuracy: bool = True,
    cut_last_line: bool = False,
) -> Path:
    """A metrics file shaped like the training loop's: per-step records, an epoch record at each
    epoch's last step, held-out accuracy at epoch ends; entropy falls and drift grows."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines, step = [], 0
    for e in range(epochs):
        sums: dict[str, float] = {}
        for _ in range(steps_per_epoch):
            step += 1
            v = {
                "loss": 1.0 / step,
                "entropy": 2.0 * math.exp(-step / 6),
                "drift_pos": 0.3 * step,
                "drift_neg": -0.2 * step,
                "seq_kl_k3": 0.05 * step**1.5,
                "kl_k3": 0.01 * step,
            }
            if stage == "stage2":
                v["kl_to_base"] = v["seq_kl_k3"]
            rec = {
                "step": step,
                "epoch": e,
                **{f"{stage}/{k}": x for k, x in v.items()},
                f"{stage}/grad_norm": 1.0 + 0.1 * step,
                f"{stage}/lr": 1e-3,
            }
            lines.append(rec)
            for k, x in v.items():
                sums[k] = sums.get(k, 0.0) + x / steps_per_epoch
        if accuracy:
            lines.append({"step": step, "epoch": e, f"{stage}/eval/accuracy": 0.2 + 0.1 * e})
        lines.append(
            {"step": step, "epoch": e, **{f"{stage}/epoch/{k}": x for k, x in sums.items()}}
        )
    text = "".join(json.dumps(r) + "\n" for r in lines)
    if cut_last_line:
        text += '{"step": 99, "stage1/lo'  # a line cut by a kill
    path.write_text(text)
    return path


def test_plot_training_curves_one_figure_per_stage(tmp_path):
    run = tmp_path / "run"
    teacher = write_synthetic_metrics(
        run / "teacher" / "stage1" / "stage1_metrics.jsonl", "stage1", cut_last_line=True
    )
    unlearned = write_synthetic_metrics(
        run / "unlearned" / "stage1" / "stage1_metrics.jsonl", "stage1", accuracy=False, epochs=2
    )
    student = write_synthetic_metrics(run / "stage2" / "stage2_metrics.jsonl", "stage2", epochs=2)
    empty = run / "other" / "stage1" / "stage1_metrics.jsonl"
    empty.parent.mkdir(parents=True)
    empty.write_text("")
    found = discover_metrics_files(run)
    assert set(found) == {teacher, unlearned, student, empty}
    paths = plot_training_curves(found, tmp_path / "plots")
    assert [p.name for p in paths] == ["stage1_curves.png", "stage2_curves.png"]
    for p in paths:
        with Image.open(p) as im:
            w, h = im.size
            colours = len(im.convert("RGB").resize((200, 200)).getcolors(maxcolors=200 * 200))
        assert w >= 1200 and h >= 900, (p, w, h)
        assert p.stat().st_size > 50_000 and colours > 50  # drawn, not blank


def test_labels_and_stage_detection(tmp_path):
    paths = [
        Path("/r/teacher/stage1/stage1_metrics.jsonl"),
        Path("/r/unlearned/stage1/stage1_metrics.jsonl"),
    ]
    assert run_labels(paths) == ["teacher", "unlearned"]
    same_leaf = [
        Path("/r/a/x/stage1/stage1_metrics.jsonl"),
        Path("/r/b/x/stage1/stage1_metrics.jsonl"),
    ]
    assert run_labels(same_leaf) == ["a/x", "b/x"]
    assert stage_of([{"step": 1, "stage2/loss": 0.1}], Path("whatever.jsonl")) == "stage2"
    assert stage_of([{"step": 1}], Path("stage1_metrics.jsonl")) == "stage1"
    assert plot_training_curves([], tmp_path / "none") == [] and not (tmp_path / "none").exists()
