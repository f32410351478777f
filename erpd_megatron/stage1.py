"""`python -m erpd_megatron.stage1`: see :mod:`erpd_megatron.train.stage1`."""

import sys

from erpd_megatron.train.stage1 import main

if __name__ == "__main__":
    sys.exit(main())
