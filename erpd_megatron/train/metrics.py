"""Metrics sinks of a training run: a JSONL file always, wandb when configured (progress
bars: erpd_megatron.utils.progress).

Only rank 0 writes. Metric names are namespaced (``stage1/entropy``, ``stage2/kl_to_base``).
wandb sits behind :class:`NullRun` when off, so the trainer never branches on it; it runs
``offline`` when no API key is present (``logging.wandb_mode: auto``).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from erpd_megatron.utils.files import atomic_write_bytes
from erpd_megatron.utils.log import get_logger

log = get_logger(__name__)


class NullRun:
    """Stands in for a wandb run when wandb is off."""

    def log(self, data: dict, step: int | None = None) -> None:  # noqa: D102
        pass

    def finish(self) -> None:  # noqa: D102
        pass


def _clean(v: Any) -> Any:
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/Inf; keep them visible as strings
    return v


class MetricsLogger:
    """Append-only JSONL metrics (one record per call) plus optional wandb.

    On resume, records with ``step`` beyond the restored step are dropped first, so that the
    file of a resumed run is identical to an uninterrupted one.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        enabled: bool,
        wandb_cfg: Any = None,
        run_name: str | None = None,
        config: dict | None = None,
    ) -> None:
        self.path = Path(path)
        self.enabled = enabled
        self.run: Any = NullRun()
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if wandb_cfg is not None and wandb_cfg.wandb_project and wandb_cfg.wandb_mode != "disabled":
            self.run = _start_wandb(wandb_cfg, run_name, config, self.path.parent)

    def truncate_after(self, step: int) -> None:
        """Drop records whose ``step`` is greater than ``step`` (resume)."""
        if self.enabled:
            truncate_jsonl(self.path, step)

    def log(self, record: dict[str, Any], step: int, *, wandb_step: int | None = None) -> None:
        """Write one record (``step`` included) to the JSONL file and wandb. ``wandb_step``:
        the step wandb files it under when it is logged late (wandb's steps only increase; a
        late record, e.g. an asynchronous held-out evaluation, goes under the current step
        and keeps its own ``step`` and ``epoch`` as values)."""
        if not self.enabled:
            return
        rec = {"step": step, **{k: _clean(v) for k, v in record.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(rec, sort_keys=True) + "\n")
        values = {k: v for k, v in rec.items() if isinstance(v, (int, float))}
        if wandb_step is not None and wandb_step != step:
            values = {k if k != "step" else "logged_for_step": v for k, v in values.items()}
        self.run.log(values, step=step if wandb_step is None else wandb_step)

    def close(self) -> None:
        """Finish the wandb run."""
        self.run.finish()


def _start_wandb(cfg: Any, run_name: str | None, config: dict | None, out_dir: Path) -> Any:
    try:
        import wandb
    except ImportError:
        log.warning("wandb is not installed; metrics go to the JSONL file only")
        return NullRun()
    mode = cfg.wandb_mode
    if mode == "auto":
        mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
    return wandb.init(
        project=cfg.wandb_project,
        name=run_name,
        config=config,
        mode=mode,
        dir=str(out_dir),
        resume="allow",
        group=getattr(cfg, "wandb_group", None),
    )


def truncate_jsonl(path: str | os.PathLike, step: int) -> None:
    """Keep only the records of a JSONL file whose ``step`` is at most ``step`` (and drop a
    last line cut by a kill); rewritten atomically."""
    path = Path(path)
    if not path.exists():
        return
    keep = [json.dumps(r, sort_keys=True) for r in read_metrics(path) if r.get("step", 0) <= step]
    atomic_write_bytes(path, "".join(k + "\n" for k in keep).encode())


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read a metrics JSONL file (skipping a last line cut by a kill)."""
    out = []
    for line in Path(path).read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out
