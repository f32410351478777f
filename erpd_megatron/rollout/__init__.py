"""Rollout generation: engines (hf, vllm) behind one interface, the math verifier and its
worker pool, and `erpd rollout` (generate.py). Submodules are imported on use so that
importing the package stays cheap."""
