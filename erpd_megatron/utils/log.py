"""The project's one logger. Rank 0 prints INFO; other ranks print WARNING and above."""

from __future__ import annotations

import logging
import os
import sys

_CONFIGURED = False


def _rank() -> int:
    for key in ("RANK", "SLURM_PROCID"):
        if key in os.environ:
            try:
                return int(os.environ[key])
            except ValueError:
                pass
    return 0


def get_logger(name: str = "erpd") -> logging.Logger:
    """Return a child of the ``erpd`` logger, configuring the root handler once.

    Messages from ranks other than 0 are shown only at WARNING and above, prefixed with
    the rank, so that multi-process runs print one copy of progress.
    """
    global _CONFIGURED
    if not _CONFIGURED:
        root = logging.getLogger("erpd")
        handler = logging.StreamHandler(sys.stderr)
        rank = _rank()
        prefix = f"[rank{rank}] " if rank else ""
        handler.setFormatter(
            logging.Formatter(f"%(asctime)s {prefix}%(levelname)s %(name)s: %(message)s", "%H:%M:%S")
        )
        root.addHandler(handler)
        level = os.environ.get("ERPD_LOG_LEVEL", "INFO").upper()
        root.setLevel(level if rank == 0 else max(logging.WARNING, logging.getLevelName(level)))
        root.propagate = False
        _CONFIGURED = True
    if name == "erpd" or name.startswith("erpd."):
        return logging.getLogger(name)
    return logging.getLogger(f"erpd.{name.removeprefix('erpd_megatron.')}")
