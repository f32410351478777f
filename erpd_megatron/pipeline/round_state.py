"""Step fingerprints of `erpd round`: a rerun never silently reuses a step whose inputs changed.

Each step's fingerprint is a SHA-256 over its inputs: the resolved config sections the step
reads (flattened to ``a.b.c`` keys, paths the round sets itself left out) and the
fingerprints of the steps it reads from, so that a change propagates downstream. A finished
step records its fingerprint and inputs in ``<round>/round_state.json``.

On a rerun, a finished step is

* skipped when its fingerprint is unchanged;
* **changed** when it differs, or when a step it reads from will run again: the round
  refuses before any step runs, naming each such step and the keys that changed, unless
  ``--rerun-changed`` is given, which deletes the changed steps' outputs and redoes them;
* adopted (recorded, then skipped) when it finished before fingerprints were recorded.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from erpd_megatron.utils.files import atomic_write_json

STATE_FILE = "round_state.json"


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as ``{"a.b.c": leaf}`` (lists stay leaves, as JSON)."""
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: obj}


def fingerprint(inputs: dict[str, Any]) -> str:
    """SHA-256 of a step's flattened inputs (order-independent)."""
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()


def changed_keys(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Keys whose values differ (or exist on one side only), as ``key: old -> new``."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k, "<unset>"), new.get(k, "<unset>")
        if json.dumps(a, sort_keys=True, default=str) != json.dumps(b, sort_keys=True, default=str):
            out.append(f"{k}: {a} -> {b}")
    return out


@dataclass
class StepPlan:
    """One planned step: its name (key in the state file), inputs, outputs and decision."""

    name: str
    inputs: dict[str, Any]
    outputs: list[Path]
    done: bool
    upstream: list[str] = field(default_factory=list)
    decision: str = "run"
    """run (not finished), skip (finished, same inputs), adopt (finished before fingerprints
    were recorded) or changed (finished with other inputs, or an upstream step runs again)."""
    why: list[str] = field(default_factory=list)

    @property
    def fingerprint(self) -> str:  # noqa: D102
        return fingerprint(self.inputs)


class RoundState:
    """``<round>/round_state.json``: fingerprint and inputs of every finished step."""

    def __init__(self, root: Path) -> None:
        self.path = Path(root) / STATE_FILE
        self.steps: dict[str, dict[str, Any]] = {}
        if self.path.exists():
            self.steps = json.loads(self.path.read_text()).get("steps", {})

    def record(self, step: StepPlan) -> None:
        """Mark ``step`` finished with its current inputs (atomic rewrite)."""
        self.steps[step.name] = {"fingerprint": step.fingerprint, "inputs": step.inputs}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.path, {"steps": self.steps})


def decide(steps: list[StepPlan], state: RoundState) -> list[StepPlan]:
    """Fill each step's ``decision`` (steps in execution order; ``upstream`` names earlier ones)."""
    by_name: dict[str, StepPlan] = {}
    for s in steps:
        rerun_up = [
            u for u in s.upstream if u in by_name and by_name[u].decision in ("run", "changed")
        ]
        rec = state.steps.get(s.name)
        if not s.done:
            s.decision = "run"
        elif rec is not None and rec.get("fingerprint") != s.fingerprint:
            s.decision, s.why = "changed", changed_keys(rec.get("inputs", {}), s.inputs)
        elif rerun_up:
            s.decision, s.why = "changed", [f"upstream step '{u}' runs again" for u in rerun_up]
        else:
            s.decision = "skip" if rec is not None else "adopt"
        by_name[s.name] = s
    return steps


def changed_message(steps: list[StepPlan]) -> str | None:
    """The refusal for finished steps whose inputs changed (None when there are none)."""
    bad = [s for s in steps if s.decision == "changed"]
    if not bad:
        return None
    lines = [
        f"'{s.name}' ({', '.join(str(p) for p in s.outputs)}): "
        + "; ".join(s.why[:6])
        + (f"; and {len(s.why) - 6} more" if len(s.why) > 6 else "")
        for s in bad
    ]
    return (
        "these finished steps ran with other inputs than now, so their outputs do not match "
        "this command: " + " | ".join(lines) + ". Rerun with --rerun-changed to delete their "
        "outputs and redo them, restore the old overrides, or choose a new output_dir"
    )
