"""`erpd round --config RECIPE [--rounds R] [a.b=c ...]`: whole ERPD rounds on one node.

Round ``r`` lives in ``<output_dir>/round_<r>/`` and runs, each step as its own process
(``torchrun`` when ``round.nproc_per_node > 1``)::

    policy_mcore   HF pi_r -> Megatron            (round 0 only; later rounds reuse the student)
    rollouts       fixed data from pi_r           rollouts/manifest.json
    s1_<run>       Stage-1 runs (teachers, U)     s1_<run>/checkpoints/manifest.json
    cache          teacher cache                  cache/manifest.json
    s2_<student>   Stage-2 students               s2_<student>/checkpoints/manifest.json
    hf/<model>     exports for evaluation         hf/<model>/config.json (atomic rename)
    eval           table, JSON, plots             eval/results.json

Every step checks its output's manifest first and is skipped when complete, so a rerun
after a crash or a kill redoes only unfinished steps. The student named by
``round.next_policy`` is the policy of round ``r + 1``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from erpd_megatron.config.loader import load_config
from erpd_megatron.config.schema import Config
from erpd_megatron.utils.log import get_logger

log = get_logger(__name__)


class StepFailed(RuntimeError):
    """A step's process exited non-zero."""


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


class Runner:
    """Starts the steps' processes with the recipe, the user's overrides and the step's own."""

    def __init__(self, config: str, overrides: list[str], nproc: int) -> None:
        self.config, self.overrides, self.nproc = config, list(overrides), nproc

    def module(self, module: str, step_overrides: list[str], *, distributed: bool = True) -> None:
        """``python -m module --config RECIPE overrides...`` (under torchrun when distributed)."""
        if distributed and self.nproc > 1:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                   str(self.nproc), "-m", module]
        else:
            cmd = [sys.executable, "-m", module]
        self.run(cmd + ["--config", self.config, *self.overrides, *step_overrides])

    def run(self, cmd: list[str]) -> None:
        """Run a command, inheriting the console; a non-zero exit is a StepFailed."""
        env = dict(os.environ)
        env.setdefault("PYTHONWARNINGS", "ignore")
        t0 = time.time()
        code = subprocess.call(cmd, env=env)
        if code != 0:
            raise StepFailed(f"step exited with code {code}: {' '.join(cmd)}")
        log.debug("step took %.1fs", time.time() - t0)


def _done(path: Path) -> bool:
    return path.exists()


def _step(name: str, done: bool, fn: Callable[[], None]) -> None:
    if done:
        log.info("[skip] %s (complete)", name)
        return
    log.info("[run ] %s", name)
    t0 = time.time()
    fn()
    log.info("[done] %s in %.0fs", name, time.time() - t0)


def teacher_checkpoint(paths: RoundPaths, run: str, epoch: int | None) -> Path:
    """The checkpoint directory of a teacher: a run's final model or an epoch snapshot."""
    root = paths.stage1(run) / "stage1" / "checkpoints"
    return root / "final" if epoch is None else root / f"epoch_{epoch:04d}"


def export_hf(runner: Runner, pairs: list[tuple[Path, Path]]) -> None:
    """Export Megatron checkpoints to HF in one process (skipping finished exports)."""
    todo = [(s, d) for s, d in pairs if not (d / "config.json").exists()]
    if todo:
        runner.run([sys.executable, "-m", "erpd_megatron.pipeline.export",
                    *[f"{s}={d}" for s, d in todo]])


def run_round(cfg: Config, runner: Runner, r: int, policy_hf: Path, policy_mcore: Path | None,
              base_hf: Path | None = None) -> tuple[Path, Path]:
    """One round; returns the next policy as (HF dir, Megatron checkpoint)."""
    rc = cfg.round
    paths = RoundPaths(Path(cfg.output_dir) / f"round_{r}")
    paths.root.mkdir(parents=True, exist_ok=True)
    if policy_mcore is None:
        policy_mcore = paths.policy_mcore
        _step(f"round {r}: convert pi_r to Megatron", _done(policy_mcore / "model_config.yaml"),
              lambda: runner.run([sys.executable, "-m", "erpd_megatron.cli", "convert", "hf-to-mcore",
                                  "--hf-dir", str(policy_hf), "--out", str(policy_mcore),
                                  "--tp", str(cfg.parallel.tensor_model_parallel_size),
                                  "--make-vocab-size-divisible-by", str(cfg.model.make_vocab_size_divisible_by)]))
    common = [f"checkpoint.load={policy_mcore}", f"data.rollout_dir={paths.rollouts}"]
    _step(f"round {r}: rollouts from pi_r", _done(paths.rollouts / "manifest.json"),
          lambda: runner.module("erpd_megatron.rollout.generate",
                                [f"rollout.model_path={policy_hf}", f"rollout.output_dir={paths.rollouts}",
                                 f"rollout.seed={cfg.rollout.seed + r}"], distributed=False))
    for run in rc.stage1_runs:
        out = paths.stage1(run.name)
        _step(f"round {r}: stage 1 '{run.name}'", _done(out / "stage1/checkpoints/manifest.json"),
              lambda run=run, out=out: runner.module("erpd_megatron.stage1",
                                                     common + [f"output_dir={out}", "checkpoint.save=null",
                                                               *run.overrides]))
    models = ", ".join(
        f"{{name: {t.name}, checkpoint: {teacher_checkpoint(paths, t.run, t.epoch)}, topk: {str(t.topk).lower()}}}"
        for t in rc.teachers)
    cache_models = f"cache.models=[{models}]"
    _step(f"round {r}: teacher cache", _done(paths.cache / "manifest.json"),
          lambda: runner.module("erpd_megatron.cache.tool", common + [f"cache.dir={paths.cache}", cache_models,
                                                                     f"output_dir={paths.root}"]))
    for st in rc.students:
        out = paths.stage2(st.name)
        _step(f"round {r}: stage 2 '{st.name}'", _done(out / "stage2/checkpoints/manifest.json"),
              lambda st=st, out=out: runner.module("erpd_megatron.stage2",
                                                   common + [f"output_dir={out}", "checkpoint.save=null",
                                                             f"stage2.cache_dir={paths.cache}", cache_models,
                                                             *st.overrides]))
    exports = [(teacher_checkpoint(paths, t.run, t.epoch), paths.hf(t.name)) for t in rc.teachers if t.evaluate]
    exports += [(paths.stage2(s.name) / "stage2/checkpoints/final", paths.hf(s.name)) for s in rc.students]
    _step(f"round {r}: export models to HF", all((d / "config.json").exists() for _, d in exports),
          lambda: export_hf(runner, exports))
    if rc.evaluate:
        # KL is always to the round-0 base; from round 1 on, this round's pi_r is a row too
        base_hf = base_hf or policy_hf
        names = [("base", base_hf)] + ([(f"pi_{r}", policy_hf)] if policy_hf != base_hf else [])
        names += [(p.name, p) for _, p in exports]
        models_ov = "eval.models=[" + ", ".join(f"{{name: {n}, path: {p}}}" for n, p in names) + "]"
        metrics = [str(paths.stage1(x.name) / "stage1/stage1_metrics.jsonl") for x in rc.stage1_runs]
        metrics += [str(paths.stage2(s.name) / "stage2/stage2_metrics.jsonl") for s in rc.students]
        _step(f"round {r}: evaluate", _done(paths.eval / "results.json"),
              lambda: runner.module("erpd_megatron.eval.evaluate",
                                    [models_ov, f"eval.output_dir={paths.eval}",
                                     "eval.metrics_files=[" + ", ".join(metrics) + "]"], distributed=False))
    nxt = rc.next_policy or rc.students[0].name
    return paths.hf(nxt), paths.stage2(nxt) / "stage2/checkpoints/final"


def check_round(config: str, overrides: list[str], cfg: Config) -> None:
    """Catch a bad round before any step runs: every student's signals must name cached
    teachers, every snapshot epoch must be saved by its Stage-1 run."""
    from erpd_megatron.config.loader import ConfigError
    from erpd_megatron.config.validate import check_stage2_teachers

    rc = cfg.round
    runs = {r.name: r for r in rc.stage1_runs}
    for t in rc.teachers:
        if t.run not in runs:
            raise ConfigError(f"round.teachers '{t.name}': run '{t.run}' is not in round.stage1_runs {sorted(runs)}")
        if t.epoch is not None:
            run_cfg = load_config(config, overrides + runs[t.run].overrides)
            if t.epoch not in run_cfg.stage1.save_epochs or t.epoch >= run_cfg.stage1.epochs:
                raise ConfigError(f"round.teachers '{t.name}': epoch {t.epoch} is not a snapshot of run '{t.run}' "
                                  f"(stage1.save_epochs={run_cfg.stage1.save_epochs}, epochs={run_cfg.stage1.epochs})")
    cached = [t.name for t in rc.teachers]
    for s in rc.students:
        check_stage2_teachers(load_config(config, overrides + s.overrides), cached,
                              where=f"round.students '{s.name}': stage2.teachers")
    if rc.next_policy and rc.next_policy not in {s.name for s in rc.students}:
        raise ConfigError(f"round.next_policy='{rc.next_policy}' is not a student")


def run_rounds(config: str, overrides: list[str], rounds: int | None = None) -> Path:
    """Run ``rounds`` rounds (default ``round.rounds``); returns the last round's directory."""
    cfg = load_config(config, overrides)
    check_round(config, overrides, cfg)
    if not cfg.round.base_hf:
        raise ValueError("round.base_hf is not set: the HF checkpoint of the round-0 policy")
    runner = Runner(config, overrides, cfg.round.nproc_per_node)
    policy_hf, policy_mcore = Path(cfg.round.base_hf), None
    n = rounds or cfg.round.rounds
    for r in range(n):
        policy_hf, policy_mcore = run_round(cfg, runner, r, policy_hf, policy_mcore, base_hf=Path(cfg.round.base_hf))
    return Path(cfg.output_dir) / f"round_{n - 1}"


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    p = argparse.ArgumentParser(prog="erpd round", description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    try:
        last = run_rounds(args.config, args.overrides, args.rounds)
    except StepFailed as e:
        log.error("%s\nfix the cause and rerun the same command: finished steps are skipped", e)
        return 1
    table = last / "eval" / "results.md"
    if table.exists():
        print(table.read_text())
    return 0
