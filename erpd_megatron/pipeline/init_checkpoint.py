"""Write a freshly initialised Megatron checkpoint for a model config (random weights).

The embedded demo trains its tiny base from scratch starting from such a checkpoint, and
tests use it as a pi_r. ``python -m erpd_megatron.pipeline.init_checkpoint --config R
--out DIR [--tokenizer-dir T] [a.b=c ...]`` (single process or torchrun).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from erpd_megatron.config.loader import load_config
from erpd_megatron.config.schema import Config


def init_checkpoint(cfg: Config, out: str | Path, tokenizer_dir: str | Path | None = None) -> Path:
    """Build the model with ``cfg.seed`` and save it model-only to ``out`` (all ranks call)."""
    from erpd_megatron.models.builder import build_model
    from erpd_megatron.models.checkpoint import save_checkpoint

    model = build_model(cfg)
    return save_checkpoint(
        out,
        model,
        model_cfg=cfg.model,
        tokenizer_dir=tokenizer_dir,
        extra={"init": "random", "seed": cfg.seed},
    )


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    from erpd_megatron.runtime.distributed import destroy_distributed, init_distributed

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--tokenizer-dir", default=None)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    init_distributed(cfg)
    try:
        init_checkpoint(cfg, args.out, args.tokenizer_dir)
    finally:
        destroy_distributed()
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
