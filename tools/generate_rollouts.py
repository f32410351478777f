#!/usr/bin/env python
"""Generate the fixed rollout data of a round (P prompts x G samples, rewards, log-probs).

    python tools/generate_rollouts.py --config configs/recipes/tiny-cpu.yaml \
        rollout.model_path=... rollout.dataset=... [--shard-index I --num-shards N] [--finalize]

Same as `erpd rollout`; the logic is in erpd_megatron/rollout/generate.py.
"""

import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(
        0, str(Path(__file__).resolve().parents[1])
    )  # run from a checkout without install
    from erpd_megatron.rollout.generate import main

    sys.exit(main())
