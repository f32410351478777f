"""The project's one logger. Rank 0 prints INFO; other ranks print WARNING and above.

Importing this module (``erpd_megatron/__init__.py`` does) also folds megatron-core's
"Transformer Engine / Apex is not installed, falling back to ..." warnings, one per module
that megatron imports (about 40% of a CPU step's output), into ONE info line per process.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import warnings

_CONFIGURED = False
FALLBACK_WARNING = re.compile(
    r"(Transformer Engine|Apex)( and Apex)? (is|are) not installed", re.IGNORECASE
)
"""Messages of megatron-core's optional-dependency fallbacks (expected on CPU)."""
_fallback_seen = False
_showwarning = warnings.showwarning


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """``warnings.showwarning`` that logs the TE/Apex fallbacks once, at info."""
    global _fallback_seen
    if FALLBACK_WARNING.search(str(message)):
        if not _fallback_seen:
            _fallback_seen = True
            get_logger("erpd.runtime").info(
                "Transformer Engine / Apex not installed: megatron-core uses its local and torch "
                "fallbacks (expected on CPU; further fallback warnings are not shown)"
            )
        return
    _showwarning(message, category, filename, lineno, file, line)


def quiet_fallback_warnings() -> None:
    """Install :func:`_show_warning` (idempotent)."""
    if warnings.showwarning is not _show_warning:
        warnings.showwarning = _show_warning


quiet_fallback_warnings()


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
            logging.Formatter(
                f"%(asctime)s {prefix}%(levelname)s %(name)s: %(message)s", "%H:%M:%S"
            )
        )
        root.addHandler(handler)
        level = os.environ.get("ERPD_LOG_LEVEL", "INFO").upper()
        root.setLevel(level if rank == 0 else max(logging.WARNING, logging.getLevelName(level)))
        root.propagate = False
        _CONFIGURED = True
    if name == "erpd" or name.startswith("erpd."):
        return logging.getLogger(name)
    return logging.getLogger(f"erpd.{name.removeprefix('erpd_megatron.')}")
