#!/usr/bin/env python
"""Evaluate a round's checkpoints: accuracy (avg@n, pass@k), sequence KL to the base, token
entropy, drift, response length; writes results.md/.csv/.json and plots.

    python tools/evaluate.py --config configs/recipes/demo-cpu.yaml \
        'eval.models=[{name: base, path: runs/demo/base_hf}, {name: student, path: ...}]' \
        'eval.datasets=[runs/demo/data/heldout.jsonl]' [--curves-only]

Same as `erpd evaluate`; the logic is in erpd_megatron/eval/evaluate.py.
"""

import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(
        0, str(Path(__file__).resolve().parents[1])
    )  # run from a checkout without install
    from erpd_megatron.eval.evaluate import main

    sys.exit(main())
