"""The steps of scripts/gpu_check.py, split out of it (each module under 600 lines)."""
