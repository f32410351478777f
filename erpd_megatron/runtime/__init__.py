"""Process start-up: torch.distributed from torchrun / Slurm / a single process, megatron's
parallel_state (in :mod:`erpd_megatron.runtime.distributed`, the one place that touches it),
seeds, and the CPU harness used only without a GPU (:mod:`erpd_megatron.runtime.cpu_harness`).

Nothing is imported here so that ``import erpd_megatron.runtime`` stays cheap.
"""
