"""``python -m tests.slurm.ckpt_compare A B``: compare two megatron-core checkpoints tensor by
tensor (whatever their TP/PP sharding); prints one line, exit 0 when every tensor is equal."""

from __future__ import annotations

import os
import socket
import sys


def main(a: str, b: str) -> int:
    import torch
    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        from megatron.core import dist_checkpointing

        ta = {
            k: v
            for k, v in dist_checkpointing.load_plain_tensors(a).items()
            if isinstance(v, torch.Tensor)
        }
        tb = {
            k: v
            for k, v in dist_checkpointing.load_plain_tensors(b).items()
            if isinstance(v, torch.Tensor)
        }
    finally:
        dist.destroy_process_group()
    if ta.keys() != tb.keys():
        print(
            f"different tensors: only in A {sorted(ta.keys() - tb.keys())}, only in B "
            f"{sorted(tb.keys() - ta.keys())}"
        )
        return 1
    diff = {
        k: (ta[k].double() - tb[k].double()).abs().max().item()
        for k in ta
        if not torch.equal(ta[k], tb[k])
    }
    if diff:
        print(f"{len(diff)} of {len(ta)} tensors differ: {dict(sorted(diff.items())[:8])}")
        return 1
    print(f"equal: {len(ta)} tensors")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
