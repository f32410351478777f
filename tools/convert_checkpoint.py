#!/usr/bin/env python
"""Convert checkpoints between Hugging Face and megatron-core.

    python tools/convert_checkpoint.py hf-to-mcore --hf-dir HF_DIR --out CKPT_DIR --tp 2 --pp 1
    python tools/convert_checkpoint.py mcore-to-hf --ckpt CKPT_DIR --out HF_DIR

One process is enough for any TP/PP (a login node without GPUs works); under
``torchrun --nproc-per-node N`` each rank converts its own shard. Both directions stream
tensor by tensor (memory: a few tensors, not the model; ``--in-memory`` builds the whole
model instead). Same as `erpd convert`; the logic is in erpd_megatron/models/convert.py and
convert_stream.py.
"""

import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(
        0, str(Path(__file__).resolve().parents[1])
    )  # run from a checkout without install
    from erpd_megatron.models.convert import main

    sys.exit(main())
