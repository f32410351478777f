"""`erpd data inspect DIR`: accuracy, pass@k per prompt, lengths and finish reasons of a rollout
set."""

from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    from erpd_megatron.data.rollouts import inspect_rollouts

    p = argparse.ArgumentParser(prog="erpd data")
    sub = p.add_subparsers(dest="cmd", required=True)
    ins = sub.add_parser("inspect", help="summarise a rollout directory")
    ins.add_argument("dir")
    ins.add_argument("--correct-threshold", type=float, default=0.5)
    args = p.parse_args(argv)
    print(inspect_rollouts(args.dir, correct_threshold=args.correct_threshold))
    return 0
