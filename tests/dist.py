"""Run a function on N gloo processes on this machine, for multi-process CPU tests.

``run_gloo(fn, world_size, *args)`` spawns ``world_size`` processes, initialises
``torch.distributed`` with gloo, calls ``fn(rank, world_size, *args)`` in each, and returns
the list of their return values (which must be picklable). An exception in any rank fails
the call with that rank's traceback.

The rendezvous is a ``FileStore`` in a fresh temporary directory (``init_method=file://``),
not a TCP port: no port is picked and bound later, so concurrent tests (or other jobs on the
machine) can never race for it. ``MASTER_PORT`` is deliberately not set in the workers, so
that code which wrongly starts a second TCP rendezvous fails loudly instead of racing.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import traceback
from collections.abc import Callable
from typing import Any

import torch.multiprocessing as mp


def free_port() -> int:
    """Ask the OS for a free TCP port on localhost (racy: prefer :func:`run_gloo`'s store)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, store: str, fn: Callable, args: tuple, queue: Any) -> None:
    import torch.distributed as dist

    os.environ.pop("MASTER_PORT", None)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    try:
        dist.init_process_group(
            "gloo", init_method=f"file://{store}", rank=rank, world_size=world_size
        )
        out = fn(rank, world_size, *args)
        queue.put((rank, True, out))
    except BaseException:  # noqa: BLE001 - reported to the parent
        queue.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_gloo(fn: Callable, world_size: int, *args: Any, timeout: float = 600) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo processes; return results by
    rank."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    tmp = tempfile.mkdtemp(prefix="erpd-gloo-")
    store = os.path.join(tmp, "store")  # must not exist yet: one fresh FileStore per call
    procs = [
        ctx.Process(target=_worker, args=(r, world_size, store, fn, args, queue))
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors = []
    try:
        for _ in range(world_size):
            rank, ok, out = queue.get(timeout=timeout)
            if ok:
                results[rank] = out
            else:
                errors.append(f"rank {rank} failed:\n{out}")
                break
    finally:
        for p in procs:
            p.join(timeout=5 if errors else 60)
            if p.is_alive():
                p.kill()
        shutil.rmtree(tmp, ignore_errors=True)
    if errors:
        raise RuntimeError("\n".join(errors))
    return [results[r] for r in range(world_size)]
