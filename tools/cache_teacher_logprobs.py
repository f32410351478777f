#!/usr/bin/env python
"""Score pi_r, the teachers (and U) on the fixed rollouts and write the teacher cache.

    torchrun --nproc-per-node N tools/cache_teacher_logprobs.py --config RECIPE [a.b=c ...]

Same as `erpd cache`; see erpd_megatron/train/cache_pass.py and docs/cache_format.md.
"""

import sys

from erpd_megatron.train.cache_pass import main

if __name__ == "__main__":
    sys.exit(main())
