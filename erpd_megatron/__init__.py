"""erpd_megatron: Extreme Region Policy Distillation (ERPD) on megatron-core."""

__version__ = "0.1.0"
