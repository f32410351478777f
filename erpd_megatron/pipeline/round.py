"""`erpd round --config RECIPE [--rounds R] [--rerun-changed] [a.b=c ...]`: whole ERPD rounds on
one node.

Round ``r`` lives in ``<output_dir>/round_<r>/`` and runs, each step as its own process
(``torchrun`` when ``round.nproc_per_node > 1``; with ``--in-process``, one after another in
this process, see :mod:`erpd_megatron.pipeline.runner`)::

    policy_mcore   HF pi_r -> Megatron            (round 0 only; later rounds reuse the student)
    rollouts       fixed data from pi_r           rollouts/manifest.json
    s1_<run>       Stage-1 runs (teachers, U)     s1_<run>/checkpoints/manifest.json
    cache          teacher cache                  cache/manifest.json
    s2_<student>   Stage-2 students               s2_<student>/checkpoints/manifest.json
    hf/<model>     exports for evaluation         hf/<model>/config.json (atomic rename)
    eval           table, JSON, plots             eval/results.json

Before step 1 the whole round is checked (every step's config, ``round.base_hf``,
``rollout.dataset``, ``eval.datasets``, every teacher and student reference) and all problems
are reported in one message. Every step checks its output's manifest and is skipped when
complete and its inputs are unchanged (step fingerprints in ``round_<r>/round_state.json``,
see :mod:`erpd_megatron.pipeline.round_state`): a rerun after a crash or a kill redoes only
unfinished steps, and a rerun with changed overrides refuses (naming the steps and keys) unless
``--rerun-changed``. The student named by ``round.next_policy`` is the policy of round ``r + 1``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from erpd_megatron.config.loader import ConfigError, load_config, to_dict
from erpd_megatron.config.schema import Config
from erpd_megatron.pipeline.round_state import (
    RoundState,
    StepPlan,
    changed_message,
    decide,
    flatten,
)
from erpd_megatron.pipeline.runner import Runner, StepFailed  # noqa: F401 (re-exported)
from erpd_megatron.utils.log import get_logger

log = get_logger(__name__)


@dataclass
class RoundPaths:
    """Where the steps of one round write."""

    root: Path

    @property
    def policy_mcore(self) -> Path:  # noqa: D102
        return self.root / "policy_mcore"

    @property
    def rollouts(self) -> Path:  # noqa: D102
        return self.root / "rollouts"

    @property
    def cache(self) -> Path:  # noqa: D102
        return self.root / "cache"

    @property
    def eval(self) -> Path:  # noqa: D102
        return self.root / "eval"

    def stage1(self, run: str) -> Path:
        """Output dir of a Stage-1 run."""
        return self.root / f"s1_{run}"

    def stage2(self, student: str) -> Path:
        """Output dir of a Stage-2 student."""
        return self.root / f"s2_{student}"

    def hf(self, name: str) -> Path:
        """HF export of a model (for evaluation and the next round's rollouts)."""
        return self.root / "hf" / name


def _done(path: Path) -> bool:
    return path.exists()


def _step(name: str, done: bool, fn: Callable[[], None]) -> bool:
    """Run ``fn`` unless ``done``; returns whether it ran."""
    if done:
        log.info("[skip] %s (complete)", name)
        return False
    log.info("[run ] %s", name)
    t0 = time.time()
    fn()
    log.info("[done] %s in %.0fs", name, time.time() - t0)
    return True


def teacher_checkpoint(paths: RoundPaths, run: str, epoch: int | None) -> Path:
    """The checkpoint directory of a teacher: a run's final model or an epoch snapshot."""
    root = paths.stage1(run) / "stage1" / "checkpoints"
    return root / "final" if epoch is None else root / f"epoch_{epoch:04d}"


def export_hf(runner: Runner, pairs: list[tuple[Path, Path]]) -> None:
    """Export Megatron checkpoints to HF in one process (skipping finished exports)."""
    todo = [(s, d) for s, d in pairs if not (d / "config.json").exists()]
    if todo:
        runner.run(
            [sys.executable, "-m", "erpd_megatron.pipeline.export", *[f"{s}={d}" for s, d in todo]]
        )


@dataclass
class Step:
    """A planned step: its fingerprint plan and the function that runs it."""

    plan: StepPlan
    title: str
    fn: Callable[[], None]


def _sections(cfg: Config, *names: str, drop: tuple[str, ...] = ()) -> dict:
    """Flattened resolved config sections (``drop``: dotted keys the round sets itself)."""
    d = to_dict(cfg)
    flat: dict = {}
    for n in names:
        flat.update(flatten({n: d[n]}) if isinstance(d[n], dict) else {n: d[n]})
    return {k: v for k, v in flat.items() if k not in drop}


TRAIN_SECTIONS = ("model", "data", "optimizer", "precision", "seed")
PATH_KEYS = (
    "stage1.force",
    "data.rollout_dir",
    "rollout.output_dir",
    "rollout.model_path",
    "cache.dir",
    "cache.models",
    "stage2.cache_dir",
    "eval.models",
    "eval.output_dir",
    "eval.metrics_files",
    # how the work is laid out, not what it computes (the same table and curves)
    "eval.cpu_workers",
    "stage1.eval_async",
)


def plan_round(
    config: str,
    overrides: list[str],
    cfg: Config,
    runner: Runner,
    r: int,
    policy_hf: Path,
    policy_mcore: Path | None,
    base_hf: Path,
    policy_fp: str = "",
) -> tuple[list[Step], Path, Path, str]:
    """The steps of round ``r`` in order, with their inputs (nothing runs); returns them and
    the next policy as (HF dir, Megatron checkpoint, name of the step that makes it).
    ``policy_fp``: fingerprint of the step that made pi_r (the previous round's student)."""
    rc = cfg.round
    paths = RoundPaths(Path(cfg.output_dir) / f"round_{r}")
    steps: list[Step] = []
    prefix = f"round {r}: "

    fps: dict[str, str] = {}

    def add(
        name: str,
        title: str,
        inputs: dict,
        outputs: list[Path],
        done: bool,
        upstream: list[str],
        fn: Callable[[], None],
    ) -> None:
        # the fingerprints of the steps read from are inputs too: a change propagates downstream
        inputs = (
            inputs | {f"upstream.{u}": fps[u] for u in upstream} | {"upstream.policy": policy_fp}
        )
        plan = StepPlan(name, inputs, outputs, done, list(upstream))
        fps[name] = plan.fingerprint
        steps.append(Step(plan, prefix + title, fn))

    ups: list[str] = []
    if policy_mcore is None:
        policy_mcore = paths.policy_mcore
        cmd = [
            sys.executable,
            "-m",
            "erpd_megatron.cli",
            "convert",
            "hf-to-mcore",
            "--hf-dir",
            str(policy_hf),
            "--out",
            str(policy_mcore),
            "--tp",
            str(cfg.parallel.tensor_model_parallel_size),
            "--make-vocab-size-divisible-by",
            str(cfg.model.make_vocab_size_divisible_by),
        ]
        add(
            "policy_mcore",
            "convert pi_r to Megatron",
            {
                "policy_hf": str(policy_hf),
                "tp": cfg.parallel.tensor_model_parallel_size,
                "divisible_by": cfg.model.make_vocab_size_divisible_by,
            },
            [policy_mcore],
            _done(policy_mcore / "model_config.yaml"),
            ups,
            lambda: runner.run(cmd),
        )
        ups = ["policy_mcore"]
    common = [f"checkpoint.load={policy_mcore}", f"data.rollout_dir={paths.rollouts}"]
    seed = cfg.rollout.seed + r
    add(
        "rollouts",
        "rollouts from pi_r",
        _sections(cfg, "rollout", drop=PATH_KEYS)
        | {"rollout.model_path": str(policy_hf), "rollout.seed": seed},
        [paths.rollouts],
        _done(paths.rollouts / "manifest.json"),
        [],
        lambda: runner.module(
            "erpd_megatron.rollout.generate",
            [
                f"rollout.model_path={policy_hf}",
                f"rollout.output_dir={paths.rollouts}",
                f"rollout.seed={seed}",
            ],
            distributed=False,
        ),
    )
    data_ups = ups + ["rollouts"]
    for run in rc.stage1_runs:
        out = paths.stage1(run.name)
        run_cfg = load_config(config, overrides + run.overrides)
        add(
            f"s1_{run.name}",
            f"stage 1 '{run.name}'",
            _sections(run_cfg, "stage1", *TRAIN_SECTIONS, drop=PATH_KEYS),
            [out],
            _done(out / "stage1/checkpoints/manifest.json"),
            data_ups,
            lambda run=run, out=out: runner.module(
                "erpd_megatron.stage1",
                common + [f"output_dir={out}", "checkpoint.save=null", *run.overrides],
            ),
        )
    models = ", ".join(
        f"{{name: {t.name}, checkpoint: {teacher_checkpoint(paths, t.run, t.epoch)}, "
        f"topk: {str(t.topk).lower()}}}"
        for t in rc.teachers
    )
    cache_models = f"cache.models=[{models}]"
    add(
        "cache",
        "teacher cache",
        _sections(cfg, "cache", drop=PATH_KEYS) | {"round.teachers": to_dict(rc.teachers)},
        [paths.cache],
        _done(paths.cache / "manifest.json"),
        data_ups + sorted({f"s1_{t.run}" for t in rc.teachers}),
        lambda: runner.module(
            "erpd_megatron.train.cache_pass",
            common + [f"cache.dir={paths.cache}", cache_models, f"output_dir={paths.root}"],
        ),
    )
    for st in rc.students:
        out = paths.stage2(st.name)
        st_cfg = load_config(config, overrides + st.overrides)
        add(
            f"s2_{st.name}",
            f"stage 2 '{st.name}'",
            _sections(st_cfg, "stage2", *TRAIN_SECTIONS, drop=PATH_KEYS),
            [out],
            _done(out / "stage2/checkpoints/manifest.json"),
            data_ups + ["cache"],
            lambda st=st, out=out: runner.module(
                "erpd_megatron.stage2",
                common
                + [
                    f"output_dir={out}",
                    "checkpoint.save=null",
                    f"stage2.cache_dir={paths.cache}",
                    cache_models,
                    *st.overrides,
                ],
            ),
        )
    exports = [
        (teacher_checkpoint(paths, t.run, t.epoch), paths.hf(t.name))
        for t in rc.teachers
        if t.evaluate
    ]
    exports += [
        (paths.stage2(s.name) / "stage2/checkpoints/final", paths.hf(s.name)) for s in rc.students
    ]
    add(
        "export",
        "export models to HF",
        {"exports": [f"{s}={d}" for s, d in exports]},
        [d for _, d in exports],
        all((d / "config.json").exists() for _, d in exports),
        sorted({f"s1_{t.run}" for t in rc.teachers if t.evaluate})
        + [f"s2_{s.name}" for s in rc.students],
        lambda: export_hf(runner, exports),
    )
    if rc.evaluate:
        # KL is always to the round-0 base; from round 1 on, this round's pi_r is a row too
        names = [("base", base_hf)] + ([(f"pi_{r}", policy_hf)] if policy_hf != base_hf else [])
        names += [(p.name, p) for _, p in exports]
        models_ov = "eval.models=[" + ", ".join(f"{{name: {n}, path: {p}}}" for n, p in names) + "]"
        metrics = [
            str(paths.stage1(x.name) / "stage1/stage1_metrics.jsonl") for x in rc.stage1_runs
        ]
        metrics += [str(paths.stage2(s.name) / "stage2/stage2_metrics.jsonl") for s in rc.students]
        add(
            "eval",
            "evaluate",
            _sections(cfg, "eval", drop=PATH_KEYS)
            | {
                "models": [f"{n}={p}" for n, p in names],
                "rollout.reward_fn": cfg.rollout.reward_fn,
            },
            [paths.eval],
            _done(paths.eval / "results.json"),
            ["export"],
            lambda: runner.module(
                "erpd_megatron.eval.evaluate",
                [
                    models_ov,
                    f"eval.output_dir={paths.eval}",
                    "eval.metrics_files=[" + ", ".join(metrics) + "]",
                ],
                distributed=False,
            ),
        )
    nxt = rc.next_policy or rc.students[0].name
    return steps, paths.hf(nxt), paths.stage2(nxt) / "stage2/checkpoints/final", f"s2_{nxt}"


def _looks_local(name: str) -> bool:
    """A path rather than a hub dataset name (``org/name``)."""
    return (
        name.startswith((".", "/", "~"))
        or Path(name).suffix in (".parquet", ".jsonl", ".json", ".csv", ".arrow")
        or name.count("/") > 1
    )


def round_problems(config: str, overrides: list[str], cfg: Config) -> list[str]:
    """Everything wrong with a round that can be seen before any step runs."""
    from erpd_megatron.config.checks import eval_length_problems
    from erpd_megatron.config.validate import check_stage2_teachers

    rc, problems = cfg.round, []
    if not rc.base_hf:
        problems.append("round.base_hf is not set: the HF checkpoint of the round-0 policy")
    elif not (Path(rc.base_hf) / "config.json").exists():
        problems.append(f"round.base_hf={rc.base_hf}: no HF checkpoint there (config.json)")
    ds = cfg.rollout.dataset
    if not ds:
        problems.append("rollout.dataset is not set: the prompt set of the rollouts")
    elif _looks_local(ds) and not Path(ds).exists():
        problems.append(f"rollout.dataset={ds}: no such file or directory")
    if rc.evaluate:
        if not cfg.eval.datasets:
            problems.append(
                "eval.datasets is empty: the held-out sets of the round's evaluation "
                "(or round.evaluate=false)"
            )
        problems += [
            f"eval.datasets: {d}: no such file or directory"
            for d in cfg.eval.datasets
            if _looks_local(d) and not Path(d).exists()
        ]
        from erpd_megatron.config.schema import EvalModelConfig

        probe = load_config(config, overrides, validate=False)  # the base's positions, the recipe's
        probe.eval.models = [EvalModelConfig(name="base", path=rc.base_hf)] if rc.base_hf else []
        problems += eval_length_problems(probe)
    for what, items in (
        ("round.stage1_runs", rc.stage1_runs),
        ("round.teachers", rc.teachers),
        ("round.students", rc.students),
    ):
        names = [x.name for x in items]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            problems.append(f"{what}: duplicate names {dup}")
    if not rc.students:
        problems.append("round.students is empty: a round distils at least one student")
    runs: dict[str, Config] = {}
    for run in rc.stage1_runs:
        try:
            runs[run.name] = load_config(config, overrides + run.overrides)
        except ConfigError as e:
            problems.append(f"round.stage1_runs '{run.name}': {e}")
    for t in rc.teachers:
        if t.name == "base":
            problems.append("round.teachers: the name 'base' is reserved for pi_r")
        if t.run not in {r.name for r in rc.stage1_runs}:
            problems.append(
                f"round.teachers '{t.name}': run '{t.run}' is not in round.stage1_runs "
                f"{sorted(r.name for r in rc.stage1_runs)}"
            )
        elif t.epoch is not None and t.run in runs:
            s1 = runs[t.run].stage1
            if t.epoch not in s1.save_epochs or t.epoch >= s1.epochs:
                problems.append(
                    f"round.teachers '{t.name}': epoch {t.epoch} is not a snapshot of run "
                    f"'{t.run}' (stage1.save_epochs={s1.save_epochs}, epochs={s1.epochs})"
                )
    cached = [t.name for t in rc.teachers]
    for s in rc.students:
        try:
            check_stage2_teachers(
                load_config(config, overrides + s.overrides),
                cached,
                where=f"round.students '{s.name}': stage2.teachers",
            )
        except ConfigError as e:
            problems.append(str(e))
    if rc.next_policy and rc.next_policy not in {s.name for s in rc.students}:
        problems.append(f"round.next_policy='{rc.next_policy}' is not a student")
    return problems


def check_round(config: str, overrides: list[str], cfg: Config) -> None:
    """Catch a bad round before any step runs: one ConfigError naming every problem."""
    from erpd_megatron.config.checks import raise_problems

    raise_problems(round_problems(config, overrides, cfg), "the round")


def plan_rounds(
    config: str, overrides: list[str], cfg: Config, runner: Runner, rounds: int
) -> list[tuple[RoundState, list[Step]]]:
    """Every round's steps with their decisions (see round_state.decide); runs nothing."""
    base_hf = Path(cfg.round.base_hf)
    policy_hf, policy_mcore, policy_fp, policy_again = base_hf, None, "", False
    out = []
    for r in range(rounds):
        steps, policy_hf, policy_mcore, nxt = plan_round(
            config, overrides, cfg, runner, r, policy_hf, policy_mcore, base_hf, policy_fp
        )
        state = RoundState(Path(cfg.output_dir) / f"round_{r}")
        decide([s.plan for s in steps], state)
        if policy_again:  # this round's pi_r is made again: every finished step of it is stale
            for s in steps:
                if s.plan.done:
                    s.plan.decision, s.plan.why = (
                        "changed",
                        [f"round {r - 1}'s pi_{r} ('{nxt}') runs again"],
                    )
        made = next(s.plan for s in steps if s.plan.name == nxt)
        policy_fp, policy_again = made.fingerprint, made.decision in ("run", "changed")
        out.append((state, steps))
    return out


def run_rounds(
    config: str,
    overrides: list[str],
    rounds: int | None = None,
    *,
    rerun_changed: bool = False,
    report: dict | None = None,
    in_process: bool = False,
) -> Path:
    """Run ``rounds`` rounds (default ``round.rounds``); returns the last round's directory.
    ``report["evaluated"]`` (when given) says whether an evaluation step ran in this call;
    ``in_process``: run the steps in this process (see :mod:`erpd_megatron.pipeline.runner`)."""
    cfg = load_config(config, overrides)
    check_round(config, overrides, cfg)
    if in_process and cfg.round.nproc_per_node != 1:
        raise ConfigError(
            f"round.nproc_per_node: {cfg.round.nproc_per_node} processes per step cannot run in "
            "process; drop --in-process or set round.nproc_per_node=1"
        )
    runner = Runner(config, overrides, cfg.round.nproc_per_node, in_process=in_process)
    n = rounds or cfg.round.rounds
    plans = plan_rounds(config, overrides, cfg, runner, n)
    msg = changed_message([s.plan for _, steps in plans for s in steps])
    if msg and not rerun_changed:
        raise ConfigError(msg)
    evaluated = False
    for state, steps in plans:
        for s in steps:
            p = s.plan
            if p.decision == "changed":
                log.warning(
                    "[redo] %s: inputs changed (%s); deleting %s",
                    s.title,
                    "; ".join(p.why[:3]),
                    ", ".join(map(str, p.outputs)),
                )
                for o in p.outputs:
                    shutil.rmtree(o, ignore_errors=True)
            elif p.decision == "adopt":
                log.info("[skip] %s (complete; inputs recorded now)", s.title)
            ran = _step(s.title, p.decision in ("skip", "adopt"), s.fn)
            state.record(p)
            evaluated = evaluated or (ran and p.name == "eval")
    if report is not None:
        report["evaluated"] = evaluated
    return Path(cfg.output_dir) / f"round_{n - 1}"


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    from erpd_megatron.config.checks import print_config_error

    p = argparse.ArgumentParser(prog="erpd round", description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument(
        "--rerun-changed",
        action="store_true",
        help="redo finished steps whose inputs changed (their outputs are deleted first)",
    )
    p.add_argument(
        "--in-process",
        action="store_true",
        help="run every step inside this process instead of one process per step (one-process "
        "CPU rounds: saves a megatron import and set-up per step; round.nproc_per_node=1)",
    )
    p.add_argument("overrides", nargs="*")
    args = p.parse_intermixed_args(argv)  # options may follow the a.b=c overrides
    try:
        report: dict = {}
        last = run_rounds(
            args.config,
            args.overrides,
            args.rounds,
            rerun_changed=args.rerun_changed,
            report=report,
            in_process=args.in_process,
        )
    except ConfigError as e:
        return print_config_error("round", e)
    except StepFailed as e:
        log.error("%s\nfix the cause and rerun the same command: finished steps are skipped", e)
        return 1
    table = last / "eval" / "results.md"
    if table.exists() and not report.get(
        "evaluated"
    ):  # the evaluation step printed it already when it ran
        print(table.read_text())
    elif table.exists():
        log.info("round finished; table and plots in %s", table.parent)
    return 0
