"""Fault injection on a tiny `erpd round` (CPU): kills with reruns, and artefact corruption.

    python tools/fault_injection.py kill --k 10 --seed 1 --work /tmp/faults \
        --kinds eval,export,stage2,cache,stage1,rollout,convert,stage2,stage1,cache
    python tools/fault_injection.py corrupt --work /tmp/faults     # reuses <work>/ref when there

The round is configs/recipes/tiny-cpu.yaml made smaller (8 prompts x 4 samples, 2 Stage-1
epochs, 1 Stage-2 epoch, a checkpoint every 2 steps), on a random tiny HF Qwen3 and one-digit
GSM8K-style prompts (tests/pipeline/readme_fixtures.py). Figures go to <work>/*.json and the
console. See erpd_megatron/pipeline/faults.py for what is done and how it is classified.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RECIPE = ROOT / "configs/recipes/tiny-cpu.yaml"
SMALL = [
    "rollout.num_prompts=8",
    "rollout.samples_per_prompt=4",
    "rollout.max_new_tokens=16",
    "rollout.prompts_per_shard=4",
    "data.global_batch_size=8",
    "stage1.epochs=2",
    "stage1.force=true",
    "stage2.epochs=1",
    "checkpoint.save_interval=2",
    "cache.max_shard_bytes=8192",
    "eval.num_prompts=4",
    "eval.n=2",
    "eval.pass_k=[1,2]",
    "eval.max_new_tokens=16",
    "logging.progress_bar=false",
]


def prepare(work: Path) -> list[str]:
    """The tiny base and prompt files under ``work/inputs``; returns the round's command."""
    from tests.pipeline.readme_fixtures import save_tiny_qwen3, write_prompts

    inp = work / "inputs"
    if not (inp / "base_hf/config.json").exists():
        save_tiny_qwen3(inp / "base_hf")
        write_prompts(inp / "train.jsonl", 8)
        write_prompts(inp / "heldout.jsonl", 4, offset=3)
    return [
        sys.executable,
        "-m",
        "erpd_megatron.cli",
        "round",
        "--config",
        str(RECIPE),
        *SMALL,
        f"output_dir={work / 'run'}",
        f"round.base_hf={inp / 'base_hf'}",
        f"rollout.dataset={inp / 'train.jsonl'}",
        f"eval.datasets=[{inp / 'heldout.jsonl'}]",
    ]


def child_env() -> dict[str, str]:
    """One thread per process (deterministic and light), the repo on the path."""
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS="1",
        PYTHONWARNINGS="ignore",
        ERPD_PROGRESS_INTERVAL="60",
        PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""),
    )
    return env


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    from erpd_megatron.pipeline import faults

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=["kill", "corrupt"])
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--k", type=int, default=10, help="kill trials (step kinds in turn)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kinds", default=",".join(faults.KINDS), help="step kinds to kill in")
    args = p.parse_args(argv)
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    cmd = prepare(work)
    if args.what == "kill":
        res = faults.kill_campaign(
            work, cmd, child_env(), ROOT, k=args.k, seed=args.seed, kinds=args.kinds.split(",")
        )
        (work / "kill.json").write_text(json.dumps(res, indent=1))
        print(
            f"K={res['K']} (seed {res['seed']}): {res['identical']}/{res['K']} reruns "
            f"bit-identical; kills per step: {res['hits']}; {res['minutes']} min"
        )
        return 0 if res["identical"] == res["K"] else 1
    ref = work / "ref" / "round_0"
    if not (ref / "eval").exists():
        run = faults.run_round(cmd, child_env(), ROOT, work / "reference.log")
        if run.returncode != 0:
            print(run.log_tail)
            return 1
        (work / "run").rename(work / "ref")
    res = faults.corruption_campaign(ref, work / "corrupt", seed=args.seed)
    (work / "corrupt.json").write_text(json.dumps(res, indent=1))
    for kind, c in res["counts"].items():
        print(
            f"{kind:18s} named {c['named']:3d}  unnamed {c['unnamed']:3d}  silent {c['silent']:3d}"
        )
    return 0 if all(c["silent"] == 0 for c in res["counts"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
