"""`erpd study`: a grid of ERPD rounds (a scaling study), run locally or on Slurm.

::

    erpd study --config STUDY.yaml [--slurm] [--rerun-changed]   run / submit every point
    erpd study status --config STUDY.yaml                          points x steps table
    erpd study report --config STUDY.yaml                          table, CSV, JSON, plots
    erpd study plan   --config STUDY.yaml [--mfu 0.35]             dry run + GPU-hours

The study file (:mod:`erpd_megatron.pipeline.study_spec`) expands to one round per grid
point, each in its own folder. Steps are planned with `erpd round`'s own planner
(:func:`erpd_megatron.pipeline.round.plan_rounds`), so every step has the fingerprint of the
resolved config sections it reads and of the steps it reads from. A step of a later point
whose fingerprint equals an earlier point's is **shared**: its output folder becomes a
symbolic link to the first point's, and it runs once (points that differ only after the
rollouts share them; points that differ only in Stage 2 share the Stage-1 runs and the
cache). Sharing follows fingerprints, never names.

Locally the points run one after another through :func:`run_rounds` (as `erpd round`). With
``--slurm`` each step not yet finished is submitted through ``scripts/slurm/erpd_round.sh``
(``STEPS=`` one step, ``AFTER=`` the job ids of the steps it reads from); the conversion and
export steps, which that script does not have, are ``sbatch --wrap`` jobs running the same
command as locally. Job ids are kept in ``<output_dir>/study_jobs.json`` keyed by
fingerprint: a rerun skips finished steps, keeps waiting on queued or running jobs and
resubmits failed or cancelled ones, and with them every step that waits for a resubmitted one
(its old job, queued behind a dependency that can never be satisfied, is cancelled: Slurm
would cancel it only at its next scheduling pass, after the rerun may have kept it).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from erpd_megatron.config.loader import ConfigError, load_config
from erpd_megatron.config.schema import Config
from erpd_megatron.pipeline.round import (
    Runner,
    Step,
    StepFailed,
    changed_message,
    check_round,
    plan_rounds,
    run_rounds,
)
from erpd_megatron.pipeline.round_state import RoundState
from erpd_megatron.pipeline.study_spec import Point, Study, load_study
from erpd_megatron.utils.files import atomic_write_json
from erpd_megatron.utils.log import get_logger

log = get_logger(__name__)

ROOT = Path(__file__).resolve().parents[2]
ROUND_SH = ROOT / "scripts" / "slurm" / "erpd_round.sh"
JOBS_FILE = "study_jobs.json"
LOCAL_FILE = "study_local.json"
SLURM_STEP = {
    "erpd_megatron.rollout.generate": "rollout finalize",
    "erpd_megatron.stage1": "stage1",
    "erpd_megatron.train.cache_pass": "cache",
    "erpd_megatron.stage2": "stage2",
    "erpd_megatron.eval.evaluate": "evaluate",
}
ACTIVE = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "RESIZING", "SUSPENDED"}


class RecordingRunner(Runner):
    """A :class:`Runner` that records the command of a step instead of running it."""

    def __init__(self, config: str, overrides: list[str], nproc: int) -> None:
        super().__init__(config, overrides, nproc)
        self.calls: list[tuple[str, str | None, list[str]]] = []

    def module(self, module: str, step_overrides: list[str], *, distributed: bool = True) -> None:  # noqa: D102
        self.calls.append(("module", module, [*self.overrides, *step_overrides]))

    def run(self, cmd: list[str]) -> None:  # noqa: D102
        self.calls.append(("cmd", None, list(cmd)))


@dataclass
class PointPlan:
    """A point with its resolved config and its rounds' planned steps."""

    point: Point
    cfg: Config
    rounds: list[tuple[RoundState, list[Step]]]
    runner: RecordingRunner
    error: str | None = None

    def steps(self) -> list[tuple[int, Step]]:
        """(round, step) in execution order."""
        return [(r, s) for r, (_, steps) in enumerate(self.rounds) for s in steps]


def demo_base(study: Study, point: Point) -> tuple[Point, Path | None, list[str]]:
    """With ``prepare: demo``: the point with its base's overrides (``round.base_hf``, the task
    files), the base's folder and the overrides that make it (:func:`demo.prepare`). The folder
    is named by a fingerprint of what the base depends on, so points that differ only in the
    round share one base."""
    if study.prepare != "demo":
        return point, None, []
    from erpd_megatron.config.loader import to_dict
    from erpd_megatron.pipeline.round_state import fingerprint

    cfg = load_config(str(point.recipe), point.overrides, validate=False)
    d = to_dict(cfg)
    fp = fingerprint({k: d[k] for k in ("model", "demo", "seed", "data", "precision", "optimizer")})
    m = cfg.model
    root = study.output_dir / "bases" / f"L{m.num_layers}-H{m.hidden_size}-{fp[:10]}"
    task = [
        f"rollout.dataset={root / 'data/train.jsonl'}",
        f"eval.datasets=[{root / 'data/heldout.jsonl'}]",
    ]
    make = [*point.overrides, *task, f"output_dir={root}"]
    point = dataclasses.replace(
        point, overrides=[*point.overrides, *task, f"round.base_hf={root / 'base_hf'}"]
    )
    return point, root, make


def study_points(study: Study) -> list[Point]:
    """The study's points, with their demo bases' overrides when ``prepare: demo``."""
    return [demo_base(study, p)[0] for p in study.points()]


def plan_point(study: Study, point: Point, *, check: bool = True) -> PointPlan:
    """Plan a point's rounds (nothing runs); a bad point keeps its error instead of raising."""
    rec = str(point.recipe)
    try:
        cfg = load_config(rec, point.overrides)
        if check:
            check_round(rec, point.overrides, cfg)
        runner = RecordingRunner(rec, point.overrides, cfg.round.nproc_per_node)
        rounds = plan_rounds(rec, point.overrides, cfg, runner, study.rounds or cfg.round.rounds)
    except ConfigError as e:
        return PointPlan(point, None, [], RecordingRunner(rec, point.overrides, 1), str(e))  # type: ignore[arg-type]
    return PointPlan(point, cfg, rounds, runner)


def plan_study(study: Study, *, check: bool = True) -> list[PointPlan]:
    """Every point's plan, in the study's order."""
    return [plan_point(study, p, check=check) for p in study_points(study)]


def owners(
    plans: list[PointPlan], *, require_done: bool, replace_stale: bool = False
) -> dict[tuple[str, int, str], tuple[str, Path]]:
    """For each (point, round, step) whose fingerprint an earlier point has: that point's
    name and output folder. Steps with several outputs (the exports, whose inputs name the
    point's own paths) are never shared; ``require_done``: only owners whose step finished.
    A point's own finished output with the same recorded fingerprint is kept (not shared);
    its own output made with other inputs (stale) is shared only with ``replace_stale``
    (``--rerun-changed``: :func:`link_shared` deletes it), else the point redoes or refuses
    it as `erpd round` does."""
    first: dict[str, tuple[str, Path, bool]] = {}
    out: dict[tuple[str, int, str], tuple[str, Path]] = {}
    for pp in plans:
        for r, s in pp.steps():
            if len(s.plan.outputs) != 1:
                continue
            fp, path = s.plan.fingerprint, s.plan.outputs[0]
            own = first.get(fp)
            if own is None:
                if not path.is_symlink():
                    first[fp] = (pp.point.name, path, s.plan.done)
                continue
            if own[0] == pp.point.name or not (own[2] or not require_done):
                continue
            if path.exists() and not path.is_symlink():
                rec = pp.rounds[r][0].steps.get(s.plan.name)
                valid = s.plan.done and (rec is None or rec.get("fingerprint") == fp)
                if valid or not replace_stale:
                    continue
            out[(pp.point.name, r, s.plan.name)] = (own[0], own[1])
    return out


def link_shared(
    shared: dict[tuple[str, int, str], tuple[str, Path]], plans: list[PointPlan]
) -> int:
    """Make each shared step's output folder a relative link to its owner's; returns how many
    links were made."""
    made = 0
    for pp in plans:
        for r, s in pp.steps():
            own = shared.get((pp.point.name, r, s.plan.name))
            if own is None:
                continue
            path = s.plan.outputs[0]
            if path.is_symlink():
                if Path(os.path.realpath(path)) == Path(os.path.realpath(own[1])):
                    continue
                path.unlink()
            elif path.exists():  # stale own output (owners(replace_stale=True))
                log.warning(
                    "%s: %s made with other inputs; deleting it for the shared one of %s",
                    pp.point.name,
                    path,
                    own[0],
                )
                shutil.rmtree(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.symlink_to(os.path.relpath(own[1], path.parent), target_is_directory=True)
            log.info(
                "%s: %s shared with point %s (same fingerprint)", pp.point.name, s.plan.name, own[0]
            )
            made += 1
    return made


def drop_dangling(plans: list[PointPlan]) -> None:
    """Remove links to outputs that do not exist (a Slurm owner that never finished), so that
    a local run makes them itself."""
    for pp in plans:
        for _, s in pp.steps():
            for o in s.plan.outputs:
                if o.is_symlink() and not o.exists():
                    o.unlink()


# ---- local -----------------------------------------------------------------------------------
def run_local(study: Study, *, rerun_changed: bool = False) -> dict[str, str]:
    """Run the points one after another; returns each point's outcome (done / failed: why)."""
    outcome: dict[str, str] = {}
    points = study_points(study)
    for i, point in enumerate(points):
        log.info("study %s: point %d/%d %s", study.name, i + 1, len(points), point.name)
        try:
            _, root, make = demo_base(study, study.points()[i])
            if root is not None:
                from erpd_megatron.pipeline.demo import prepare

                prepare(str(point.recipe), make)
            plans = [plan_point(study, p, check=False) for p in points[: i + 1]]
            drop_dangling(plans[-1:])
            link_shared(owners(plans, require_done=True, replace_stale=rerun_changed), plans)
            run_rounds(
                str(point.recipe), point.overrides, study.rounds, rerun_changed=rerun_changed
            )
            outcome[point.name] = "done"
        except (ConfigError, StepFailed) as e:
            log.error("point %s failed: %s", point.name, e)
            outcome[point.name] = f"failed: {e}"
        study.output_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(study.output_dir / LOCAL_FILE, {"outcome": outcome})  # read by the report
    return outcome


# ---- Slurm -----------------------------------------------------------------------------------
def job_states(ids: list[str]) -> dict[str, str]:
    """Slurm state of each job id (``scontrol show job``; UNKNOWN once Slurm forgot it).

    A job still PENDING whose dependency can never be satisfied (Reason
    DependencyNeverSatisfied: a job it waits for with afterok failed or was cancelled) is
    reported CANCELLED: every job of a study is submitted with ``--kill-on-invalid-dep=yes``,
    so Slurm cancels it at its next scheduling pass, which comes a second or more after the
    cancelled job (longer on a loaded controller); it will never run either way."""
    out = {}
    for j in ids:
        p = subprocess.run(["scontrol", "show", "job", "-o", j], capture_output=True, text=True)
        state = "UNKNOWN"
        for line in p.stdout.splitlines():  # an array has a line per task: the worst one wins
            f = dict(re.findall(r"(\w+)=(\S*)", line))
            s = f.get("JobState")
            if s is None:
                continue
            if s == "PENDING" and f.get("Reason") == "DependencyNeverSatisfied":
                s = "CANCELLED"
            state = s if state in ("UNKNOWN", "COMPLETED") or s in ACTIVE else state
        out[j] = state
    return out


def cancel_jobs(ids: list[str]) -> None:
    """``scancel`` jobs superseded by a resubmission (a job still queued behind a dependency
    that was resubmitted would otherwise wait for, or be cancelled with, the old one)."""
    if ids:
        subprocess.run(["scancel", *ids], capture_output=True, text=True)


def _read_jobs(study: Study) -> dict[str, dict]:
    p = study.output_dir / JOBS_FILE
    return json.loads(p.read_text()).get("jobs", {}) if p.exists() else {}


def _sbatch_round(
    cfg: Config, recipe: str, steps: str, after: list[str], overrides: list[str]
) -> str:
    """Submit ``steps`` through erpd_round.sh; returns the job id of the last one."""
    env = dict(os.environ, CONFIG=recipe, STEPS=steps, AFTER=":".join(after))
    env.setdefault("NODES", str(cfg.parallel.num_nodes))
    if not after:
        env.pop("AFTER")
    p = subprocess.run(
        ["bash", str(ROUND_SH), *overrides], capture_output=True, text=True, env=env, cwd=ROOT
    )
    if p.returncode != 0:
        raise StepFailed(
            f"erpd_round.sh STEPS='{steps}' failed ({p.returncode}): {p.stderr.strip()[-2000:]}"
        )
    ids = [line.split()[1] for line in p.stdout.splitlines() if len(line.split()) == 2]
    if not ids:
        raise StepFailed(f"erpd_round.sh STEPS='{steps}' printed no job id: {p.stdout!r}")
    return ids[-1]


def _sbatch_wrap(name: str, cmd: list[str], after: list[str]) -> str:
    """A one-task job running ``cmd`` (steps erpd_round.sh does not have)."""
    import shlex

    log_dir = Path(os.environ.get("LOG_DIR", "logs"))
    (ROOT / log_dir).mkdir(parents=True, exist_ok=True)
    args = [
        "sbatch",
        "--parsable",
        f"--job-name=erpd-{name}",
        "--nodes=1",
        "--ntasks=1",
        f"--output={log_dir}/%x-%j.out",
        "--kill-on-invalid-dep=yes",
        *os.environ.get("SBATCH_ARGS", "").split(),
    ]
    if after:
        args.append(f"--dependency=afterok:{':'.join(after)}")
    py = os.environ.get("PYTHON", sys.executable)
    line = (
        " ".join(shlex.quote(x) for x in [py, *cmd[1:]])
        if cmd[0] == sys.executable
        else shlex.join(cmd)
    )
    p = subprocess.run(
        [*args, f"--wrap=cd {shlex.quote(str(ROOT))} && {line}"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    if p.returncode != 0:
        raise StepFailed(f"sbatch of '{name}' failed: {p.stderr.strip()}")
    return p.stdout.strip().split(";")[0]


def submit_slurm(study: Study, *, rerun_changed: bool = False) -> dict[str, dict[str, str]]:
    """Submit every unfinished step of every point; returns {point: {step: job id or state}}."""
    if study.prepare == "demo":  # the toy bases are small: made here, before the jobs
        from erpd_megatron.pipeline.demo import prepare

        for p in study.points():
            _, root, make = demo_base(study, p)
            prepare(str(p.recipe), make)
    plans = plan_study(study)
    bad = [f"{pp.point.name}: {pp.error}" for pp in plans if pp.error]
    if bad:
        raise ConfigError("study points with problems: " + " | ".join(bad))
    link_shared(owners(plans, require_done=False, replace_stale=rerun_changed), plans)
    plans = plan_study(study, check=False)  # decisions see the links
    msg = changed_message([s.plan for pp in plans for _, s in pp.steps()])
    if msg and not rerun_changed:
        raise ConfigError(msg)
    jobs = _read_jobs(study)
    states = job_states(sorted({j["job"] for j in jobs.values()}))
    by_fp: dict[str, str] = {}
    fresh: set[str] = set()  # submitted by this call: whatever waits on one is resubmitted too
    summary: dict[str, dict[str, str]] = {}
    for pp in plans:
        row: dict[str, str] = {}
        ids: dict[tuple[int, str], str] = {}
        for r, (state, steps) in enumerate(pp.rounds):
            for s in steps:
                p = s.plan
                if p.decision in ("skip", "adopt"):
                    state.record(p)
                    row[p.name] = "done"
                    continue
                if p.decision == "changed":
                    for o in p.outputs:
                        if o.is_symlink():
                            o.unlink()
                        shutil.rmtree(o, ignore_errors=True)
                fp = p.fingerprint
                old = jobs.get(fp)
                after = [ids[(r, u)] for u in p.upstream if (r, u) in ids]
                if r > 0:
                    after += [j for (rr, _), j in ids.items() if rr == r - 1]
                after = sorted(set(after))
                queued = old is not None and states.get(old["job"]) in ACTIVE
                if fp in by_fp:
                    jid = by_fp[fp]
                elif queued and p.decision != "changed" and not fresh & set(after):
                    jid = old["job"]  # still queued or running, after the same jobs as now
                else:
                    if queued:  # its inputs changed, or a job it waits for was resubmitted
                        log.info(
                            "%s round %d %s: job %s superseded",
                            pp.point.name,
                            r,
                            p.name,
                            old["job"],
                        )
                        cancel_jobs([old["job"]])
                    pp.runner.calls.clear()
                    s.fn()
                    kind, module, args = pp.runner.calls[-1]
                    if kind == "module" and module in SLURM_STEP:
                        chain = SLURM_STEP[module]  # erpd_round.sh drops a needless finalize
                        jid = _sbatch_round(pp.cfg, str(pp.point.recipe), chain, after, args)
                    else:
                        jid = _sbatch_wrap(f"{p.name}", args, after)
                    jobs[fp] = {
                        "job": jid,
                        "point": pp.point.name,
                        "round": r,
                        "step": p.name,
                        "outputs": [str(o) for o in p.outputs],
                        "after": after,
                    }
                    fresh.add(jid)
                    log.info(
                        "%s round %d %s: job %s (after %s)",
                        pp.point.name,
                        r,
                        p.name,
                        jid,
                        after or "-",
                    )
                by_fp[fp] = jid
                ids[(r, p.name)] = jid
                row[p.name] = jid
        summary[pp.point.name] = row
        study.output_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(study.output_dir / JOBS_FILE, {"jobs": jobs})
    return summary


# ---- status ----------------------------------------------------------------------------------
def status_rows(study: Study) -> tuple[list[str], list[dict[str, str]]]:
    """(step columns, one row per point): each step done / shared:<point> / a Slurm state /
    changed / todo."""
    plans = plan_study(study, check=False)
    jobs = _read_jobs(study)
    states = (
        job_states(sorted({j["job"] for j in jobs.values()}))
        if jobs and shutil.which("scontrol")
        else {}
    )
    cols: list[str] = []
    rows = []
    for pp in plans:
        row = {"point": pp.point.name}
        if pp.error:
            row["error"] = pp.error
        for r, s in pp.steps():
            col = s.plan.name if len(pp.rounds) == 1 else f"r{r}:{s.plan.name}"
            if col not in cols:
                cols.append(col)
            out = s.plan.outputs[0] if s.plan.outputs else None
            shared = out is not None and out.is_symlink()
            if s.plan.decision in ("skip", "adopt"):
                cell = "done"
            elif s.plan.decision == "changed":
                cell = "changed"
            else:
                j = jobs.get(s.plan.fingerprint)
                cell = f"{states.get(j['job'], 'UNKNOWN').lower()} ({j['job']})" if j else "todo"
            if shared:
                owner = Path(os.path.realpath(out)).parent
                owner = owner.parent.name if owner.name.startswith("round_") else owner.name
                cell += f" [shared: {owner}]"
            row[col] = cell
        rows.append(row)
    return cols, rows


def format_status(cols: list[str], rows: list[dict[str, str]]) -> str:
    """The status table as Markdown."""
    head = ["point", *cols]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['point']} | config error: {row['error']} |")
            continue
        lines.append("| " + " | ".join(row.get(c, "") for c in head) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point (see the module docstring)."""
    from erpd_megatron.config.checks import print_config_error

    argv = list(sys.argv[1:] if argv is None else argv)
    action = argv.pop(0) if argv and argv[0] in ("run", "status", "report", "plan") else "run"
    p = argparse.ArgumentParser(
        prog=f"erpd study{'' if action == 'run' else ' ' + action}",
        description=__doc__.splitlines()[0],
    )
    p.add_argument("--config", required=True, help="the study YAML (configs/studies/*.yaml)")
    if action == "run":
        p.add_argument(
            "--slurm",
            action="store_true",
            help="submit the steps through scripts/slurm/erpd_round.sh",
        )
        p.add_argument(
            "--rerun-changed",
            action="store_true",
            help="redo finished steps whose inputs changed (their outputs are deleted first)",
        )
    if action == "plan":
        p.add_argument(
            "--mfu", type=float, default=0.35, help="model-FLOPs utilisation of training/scoring"
        )
        p.add_argument(
            "--rollout-mfu",
            type=float,
            default=0.05,
            help="model-FLOPs utilisation of generation (decode is memory-bound)",
        )
        p.add_argument(
            "--peak-tflops",
            type=float,
            default=989.0,
            help="dense bf16 peak per GPU (H100/H200 SXM: 989)",
        )
    args = p.parse_args(argv)
    try:
        study = load_study(args.config)
        if action == "status":
            print(format_status(*status_rows(study)))
            return 0
        if action == "report":
            from erpd_megatron.pipeline.study_report import write_study_report

            paths = write_study_report(study)
            print(paths["md"].read_text())
            return 0
        if action == "plan":
            from erpd_megatron.pipeline.study_plan import format_plan, plan_rows

            print(
                format_plan(
                    plan_rows(
                        study,
                        mfu=args.mfu,
                        rollout_mfu=args.rollout_mfu,
                        peak_tflops=args.peak_tflops,
                    ),
                    mfu=args.mfu,
                    rollout_mfu=args.rollout_mfu,
                    peak_tflops=args.peak_tflops,
                )
            )
            return 0
        if args.slurm:
            summary = submit_slurm(study, rerun_changed=args.rerun_changed)
            for point, row in summary.items():
                print(f"{point}: " + " ".join(f"{k}={v}" for k, v in row.items()))
            print(f"watch with: erpd study status --config {args.config}")
            return 0
        outcome = run_local(study, rerun_changed=args.rerun_changed)
        from erpd_megatron.pipeline.study_report import write_study_report

        paths = write_study_report(study)
        print(paths["md"].read_text())
        return 0 if all(v == "done" for v in outcome.values()) else 1
    except ConfigError as e:
        return print_config_error("study", e)
    except StepFailed as e:
        log.error("%s", e)
        return 1
