"""`erpd demo` (`make demo`): one real ERPD round on the embedded arithmetic task, on a CPU.

1. the task: train / validation / test splits (disjoint) and a character-level tokenizer
   (toy.py); every evaluation of a run is on ``demo.eval_split`` (test for the reported run,
   validation for runs that choose settings: docs/demo_protocol.md);
2. the base: a tiny Llama trained from scratch on the reference solutions, through the same
   Stage-1 trainer with the ``ce`` loss (supervised), then exported to HF;
3. one ERPD round (round.py): rollouts of the base, Stage-1 teachers (an over-trained run and
   the same under a tighter constraint, with held-out curves), a weak teacher and an unlearned
   U, the teacher cache, a student distilled from the over-trained teacher and students from
   the weak one (one per signal), the exports, and the evaluation table and plots;
4. the claims (claims.py): ``claims.md`` / ``claims.json`` and their figures.

``--seeds N`` repeats 1-3 for N independent seeds (``<output_dir>/seed_<S>``; task sample,
base init, rollouts, training and evaluation sampling all follow the seed) and computes the
claims over them. Every step runs inside this one process (pipeline/runner.py: one megatron
import for the whole demo) and is resumable (rerun the same command). ``--quick`` shrinks every
size (used by the integration test). The recipe is ``configs/recipes/demo-cpu.yaml``; the
round's teachers and students are in its ``round:`` section.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from erpd_megatron.config.loader import load_config
from erpd_megatron.pipeline.round import Runner, StepFailed, _step, run_rounds
from erpd_megatron.utils.log import get_logger

log = get_logger(__name__)

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "configs" / "recipes" / "demo-cpu.yaml"

# Smaller everything, for the integration test. The quick base must be trained enough to solve
# some problems for any seed (with 400 problems x 3 epochs it solved ~2%, and a seed whose
# rollouts had no reward failed Stage 1): 1000 problems x 10 epochs. It always boxes its
# answer and its teacher is the re-anchored pg run (which also learns from the wrong samples).
QUICK = [
    "demo.train_problems=1000",
    "demo.pretrain_epochs=10",
    "demo.validation_problems=50",
    "demo.heldout_problems=100",
    "demo.unboxed_fraction=0",
    "rollout.num_prompts=32",
    "rollout.samples_per_prompt=4",
    "stage1.loss=pg",
    "stage1.anchor=epoch",
    "stage1.epochs=8",
    "stage1.save_epochs=[2]",
    "eval.num_prompts=48",
    "eval.n=4",
    "eval.pass_k=[1,4]",
    "round.teachers=[{name: t_ep2, run: pg, epoch: 2}, {name: t_ep8, run: pg},"
    " {name: unlearned, run: unlearned, topk: false, evaluate: false}]",
    "round.students=[{name: student, overrides: ['stage2.teachers=[{model: t_ep8,"
    " signal: topk_kl, alpha: 0.5}]']},"
    " {name: student_weak, overrides: ['stage2.teachers=[{model: t_ep2, signal: contrast,"
    " contrast_model: unlearned}]']}]",
    "round.stage1_runs=[{name: pg}, {name: unlearned, overrides: [stage1.loss=unlearned,"
    " stage1.epochs=2,"
    " 'stage1.save_epochs=[]']}]",
]


def prepare(config: str, overrides: list[str]) -> Path:
    """Task files, tokenizer, supervised base trained from scratch, exported to HF; returns
    the base's HF directory. Each piece is skipped when already complete."""
    from erpd_megatron.pipeline import toy

    cfg = load_config(config, overrides)
    d = cfg.demo
    out = Path(cfg.output_dir)
    data, tok_dir = out / "data", out / "tokenizer"
    runner = Runner(config, overrides, 1, in_process=True)

    def make_task() -> None:
        paths = toy.write_splits(
            data,
            train=d.train_problems,
            validation=d.validation_problems,
            test=d.heldout_problems,
            seed=cfg.seed,
        )
        tok = toy.build_tokenizer(tok_dir)
        from erpd_megatron.data.rollouts import write_rollout_set

        write_rollout_set(
            out / "sft",
            toy.sft_records(
                paths["train"], tok, unboxed_fraction=d.unboxed_fraction, seed=cfg.seed
            ),
            prompts_per_shard=1000,
        )

    _step(
        "task: splits, tokenizer, supervised data",
        (out / "sft" / "manifest.json").exists(),
        make_task,
    )
    init = out / "base_init"
    _step(
        "base: random initialisation",
        (init / "model_config.yaml").exists(),
        lambda: runner.run(
            [
                sys.executable,
                "-m",
                "erpd_megatron.pipeline.init_checkpoint",
                "--config",
                config,
                *overrides,
                "--out",
                str(init),
                "--tokenizer-dir",
                str(tok_dir),
            ]
        ),
    )
    pre = out / "base_sft"
    _step(
        "base: supervised training from scratch",
        (pre / "stage1/checkpoints/manifest.json").exists(),
        lambda: runner.module(
            "erpd_megatron.stage1",
            [
                f"data.rollout_dir={out / 'sft'}",
                f"checkpoint.load={init}",
                f"output_dir={pre}",
                "checkpoint.save=null",
                "stage1.loss=ce",
                f"stage1.epochs={d.pretrain_epochs}",
                f"optimizer.lr={d.pretrain_lr}",
                "optimizer.lr_warmup_steps=10",
                "optimizer.lr_decay_style=cosine",
                "stage1.save_epochs=[]",
                "stage1.eval_every_epochs=0",
            ],
        ),
    )
    base_hf = out / "base_hf"
    _step(
        "base: export to HF",
        (base_hf / "config.json").exists(),
        lambda: runner.run(
            [
                sys.executable,
                "-m",
                "erpd_megatron.pipeline.export",
                f"{pre / 'stage1/checkpoints/final'}={base_hf}",
            ]
        ),
    )
    return base_hf


def run_seed(config: str, overrides: list[str]) -> Path:
    """The task, the base and one round for the seed in ``overrides``; returns the round's
    directory. Every evaluation of the run (Stage-1 curves, the table) is on
    ``demo.eval_split``."""
    cfg = load_config(config, overrides, validate=False)
    data = Path(cfg.output_dir) / "data"
    # the task files are made by prepare(); every step (Stage-1 held-out evaluation included)
    # reads them
    overrides = [
        f"rollout.dataset={data / 'train.jsonl'}",
        f"eval.datasets=[{data / (cfg.demo.eval_split + '.jsonl')}]",
    ] + overrides
    base_hf = prepare(config, overrides)
    report: dict = {}
    last = run_rounds(
        config, overrides + [f"round.base_hf={base_hf}"], report=report, in_process=True
    )
    if not report.get("evaluated"):  # the evaluation step printed the table when it ran
        print("\n" + (last / "eval" / "results.md").read_text())
    return last


def seed_overrides(seed: int, out: Path) -> list[str]:
    """One independent seed: task sample, base init and training (``seed``), rollouts
    (``rollout.seed``) and evaluation sampling (``eval.seed``), in its own directory."""
    return [f"seed={seed}", f"rollout.seed={seed}", f"eval.seed={seed}", f"output_dir={out}"]


def seed_list(first: int, n: int) -> list[int]:
    """``n`` seeds from ``first``, 1000 apart: the task splits use ``seed``, ``seed + 1`` and
    ``seed + 2``, so neighbouring seeds would share problem generators."""
    return [first + 1000 * i for i in range(n)]


def git_commit() -> dict:
    """The commit the run is made from, and whether tracked files differed from it."""
    import subprocess

    def git(*a: str) -> str:
        r = subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True)
        return r.stdout.strip() if r.returncode == 0 else ""

    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "-uno"))}


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: ``erpd demo [--quick] [--seeds N] [a.b=c ...]``."""
    import json

    from erpd_megatron.pipeline import claims

    p = argparse.ArgumentParser(prog="erpd demo", description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(RECIPE))
    p.add_argument("--quick", action="store_true", help="a much smaller run (integration test)")
    p.add_argument(
        "--seeds",
        type=int,
        default=1,
        help="independent seeds (task sample, base init, rollouts, training), each in "
        "<output_dir>/seed_<S>; claims.md / claims.json over all of them (default 1: "
        "<output_dir> itself)",
    )
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    overrides = (QUICK if args.quick else []) + list(args.overrides)
    t0 = time.time()
    cfg = load_config(args.config, overrides, validate=False)
    root = Path(cfg.output_dir)
    seeds = seed_list(cfg.seed, max(args.seeds, 1))
    runs = []
    try:
        for s in seeds:
            ov = overrides + (seed_overrides(s, root / f"seed_{s}") if args.seeds > 1 else [])
            log.info("seed %d (%d of %d)", s, len(runs) + 1, len(seeds))
            last = run_seed(args.config, ov)
            runs.append({"seed": s, "round_dir": str(last.resolve()), "overrides": ov})
    except StepFailed as e:
        log.error("%s\nfix the cause and rerun `make demo`: finished steps are skipped", e)
        return 1
    spec = {
        "config": args.config,
        "command": "erpd demo " + " ".join(argv if argv is not None else sys.argv[1:]),
        "seeds": seeds,
        "runs": runs,
        "roles": claims_roles(args.config, overrides),
        "eval_split": cfg.demo.eval_split,
        **git_commit(),
    }
    root.mkdir(parents=True, exist_ok=True)
    (root / "claims_spec.json").write_text(json.dumps(spec, indent=2) + "\n")
    written = claims.main([str(root)])
    if written:
        return written
    print((root / "claims.md").read_text())
    plots = sorted(Path(runs[-1]["round_dir"], "eval").glob("*.png")) + sorted(root.glob("*.png"))
    print("plots:\n" + "\n".join(f"  {p}" for p in plots))
    print(f"demo finished in {(time.time() - t0) / 60:.1f} min; outputs under {root}")
    return 0


def claims_roles(config: str, overrides: list[str]) -> dict:
    """Which models and Stage-1 runs play which part in the claims (by the round's names):
    ``student`` and its teacher (the final, over-trained one), the ``student_weak*`` students
    and their teacher, the teacher's Stage-1 run (curve) and ``<run>_tight`` (claim 2)."""
    cfg = load_config(config, overrides, validate=False)
    rc = cfg.round
    teacher_of = {}
    for st in rc.students:
        s2 = load_config(config, overrides + st.overrides, validate=False).stage2
        teacher_of[st.name] = s2.teachers[0].model
    by_name = {t.name: t for t in rc.teachers}
    final = teacher_of.get("student")
    run = by_name[final].run if final in by_name else None
    snaps = sorted(
        (t for t in rc.teachers if t.run == run and t.epoch is not None), key=lambda t: t.epoch
    )
    weak = [n for n in teacher_of if n.startswith("student_weak")]
    runs = {r.name: r for r in rc.stage1_runs}
    epochs = {}
    for name in runs:
        s1 = load_config(config, overrides + runs[name].overrides, validate=False).stage1
        epochs[name] = s1.epochs
    return {
        "base": "base",
        "student": "student",
        "teacher_final": final,
        "teacher_first": snaps[0].name if snaps else None,
        "snapshots": [[0, "base"]]
        + [[t.epoch, t.name] for t in snaps]
        + ([[epochs[run], final]] if run else []),
        "weak_teacher": teacher_of[weak[0]] if weak else None,
        "weak_students": weak,
        "curve_weak": run,
        "curve_tight": f"{run}_tight" if f"{run}_tight" in runs else None,
    }
