"""Export several Megatron checkpoints to HF in one process (a round's teachers and students).

``python -m erpd_megatron.pipeline.export SRC=DST [SRC=DST ...]``; each export is atomic
(written beside DST and renamed), so a killed run leaves no half-written model.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    from erpd_megatron.models.convert import mcore_to_hf
    from erpd_megatron.runtime.distributed import destroy_distributed

    pairs = [a.split("=", 1) for a in (sys.argv[1:] if argv is None else argv)]
    bad = [a for a in pairs if len(a) != 2]
    if bad or not pairs:
        print(
            "usage: python -m erpd_megatron.pipeline.export SRC=DST [SRC=DST ...]", file=sys.stderr
        )
        return 2
    try:
        for src, dst in pairs:
            mcore_to_hf(src, dst)
    finally:
        destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
