"""Step modules for tests/pipeline/test_runner.py: each ``main(argv)`` leaves something behind
that the in-process runner must put back or report (a step is ``python -m <module> argv``)."""

from __future__ import annotations

import os
import signal
import sys


def main(argv: list[str] | None = None) -> int:
    """``exit N`` returns N; ``raise`` raises; ``sysexit N`` calls sys.exit(N); ``leak`` leaves
    a gloo process group up. Every call sets an env var, a SIGTERM handler and torch threads."""
    import torch

    argv = list(argv or [])
    os.environ["ERPD_TEST_LEFT_BEHIND"] = " ".join(sys.argv)
    signal.signal(signal.SIGTERM, lambda *_: None)
    torch.set_num_threads(1)
    torch.set_grad_enabled(False)
    if argv[:1] == ["raise"]:
        raise RuntimeError("step failed on purpose")
    if argv[:1] == ["sysexit"]:
        sys.exit(int(argv[1]))
    if argv[:1] == ["leak"]:
        import torch.distributed as dist

        from erpd_megatron.runtime.distributed import free_port

        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
        dist.init_process_group("gloo", rank=0, world_size=1)
    return int(argv[1]) if argv[:1] == ["exit"] else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
