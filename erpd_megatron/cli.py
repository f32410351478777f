"""`erpd <command>`: a thin dispatcher to each command's ``main(argv)``.

Imports are lazy so that ``erpd dryrun`` or ``erpd data inspect`` never pay for
megatron-core or torch.distributed start-up.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "rollout": (
        "erpd_megatron.rollout.generate",
        "generate fixed rollout data (vLLM or HF engine)",
    ),
    "stage1": (
        "erpd_megatron.train.stage1",
        "Stage 1: weakly constrained multi-epoch training -> teacher",
    ),
    "cache": ("erpd_megatron.train.cache_pass", "score teachers and write the teacher cache"),
    "stage2": ("erpd_megatron.train.stage2", "Stage 2: trust-region distillation from the cache"),
    "convert": ("erpd_megatron.models.convert", "HF <-> Megatron checkpoint conversion"),
    "evaluate": ("erpd_megatron.eval.evaluate", "accuracy / KL / entropy table and plots"),
    "round": ("erpd_megatron.pipeline.round", "one or more full ERPD rounds"),
    "study": (
        "erpd_megatron.pipeline.study",
        "a grid of rounds: run, --slurm, status, report, plan",
    ),
    "demo": ("erpd_megatron.pipeline.demo", "the embedded CPU demo"),
    "dryrun": ("erpd_megatron.config.dryrun", "validate a recipe for its cluster, memory per GPU"),
    "data": ("erpd_megatron.data.cli", "inspect rollout data: erpd data inspect DIR"),
    "config": ("erpd_megatron.config.show", "print a resolved recipe: erpd config --config RECIPE"),
}


def usage() -> str:
    """The command list."""
    width = max(map(len, COMMANDS))
    rows = "\n".join(f"  {name:<{width}}  {desc}" for name, (_, desc) in COMMANDS.items())
    return f"usage: erpd <command> [args]\n\ncommands:\n{rows}\n"


def main(argv: list[str] | None = None) -> int:
    """Dispatch ``argv[0]`` to its module's ``main``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        import difflib

        close = difflib.get_close_matches(name, COMMANDS, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        print(f"erpd: unknown command '{name}'{hint}\n\n{usage()}", file=sys.stderr)
        return 2
    from erpd_megatron.config.loader import ConfigError

    module = importlib.import_module(COMMANDS[name][0])
    try:
        return int(module.main(rest) or 0)
    except ConfigError as e:  # a recipe or override problem: the message says what to fix
        print(f"erpd {name}: config error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
