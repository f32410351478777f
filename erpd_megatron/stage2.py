"""`python -m erpd_megatron.stage2`: see :mod:`erpd_megatron.train.stage2`."""

import sys

from erpd_megatron.train.stage2 import main

if __name__ == "__main__":
    sys.exit(main())
