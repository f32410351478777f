"""erpd_megatron: Extreme Region Policy Distillation (ERPD) on megatron-core."""

__version__ = "0.1.0"

from erpd_megatron.utils import log as _log  # noqa: E402,F401  (TE/Apex fallback warnings: one info line)
