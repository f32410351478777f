"""The project's own collectives, on the communication device of their process group.

NCCL only takes CUDA tensors (a CPU tensor raises ``No backend type associated with device
type cpu`` at the first call); gloo takes CPU tensors. Every ``torch.distributed``
collective the package makes for itself (signal agreement, metric sums, the non-finite
guard, the cache tool's resume agreement, barriers) goes through this module, which asks
the group for its backend (``torch.distributed.get_backend(group)``), moves the tensor to
that backend's device, and hands the result back on the caller's device. Without an
initialised process group every function is the identity (or a no-op).

The one exception is :mod:`erpd_megatron.ops.vocab_parallel`: its TP collectives reduce
tensors derived from the logits, which already sit on the GPU of the NCCL group
(``tests/runtime/test_comm.py`` whitelists it and checks that nothing else calls
``torch.distributed`` collectives directly).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.distributed as dist

Op = Literal["sum", "max", "min"]

_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


def is_distributed() -> bool:
    """Whether a default process group exists (``torch.distributed`` initialised)."""
    return dist.is_available() and dist.is_initialized()


def collective_device(backend: str, cuda_device: int | None) -> torch.device:
    """The device a collective of a group with ``backend`` takes its tensors on (pure).

    ``backend`` is what ``torch.distributed.get_backend(group)`` answers: ``"nccl"``,
    ``"gloo"``, or a per-device list such as ``"cpu:gloo,cuda:nccl"``. Any NCCL backend means
    the CUDA device ``cuda_device`` (the process's current device); everything else
    (gloo, mpi) works on CPU tensors. NCCL without a CUDA device is an error.
    """
    b = backend.lower()
    if "nccl" in b:
        if cuda_device is None:
            raise RuntimeError(
                f"process group backend '{backend}' needs CUDA tensors but this process has no "
                "CUDA device (torch.cuda.is_available() is False); install the CUDA build of torch "
                "(`make install` on the GPU node) or run on gloo"
            )
        return torch.device("cuda", cuda_device)
    return torch.device("cpu")


def group_device(group: Any = None) -> torch.device:
    """The communication device of ``group`` (default: the world) in this process."""
    cuda = torch.cuda.current_device() if torch.cuda.is_available() else None
    return collective_device(str(dist.get_backend(group)), cuda)


def all_reduce(tensor: torch.Tensor, op: Op = "sum", group: Any = None) -> torch.Tensor:
    """The element-wise reduction of ``tensor`` over ``group``, as a new tensor on
    ``tensor``'s device (``tensor`` itself is not modified). Identity without a process group."""
    if not is_distributed():
        return tensor.clone()
    dev = group_device(group)
    buf = tensor.detach().to(dev, copy=True)
    dist.all_reduce(buf, op=_OPS[op], group=group)
    return buf.to(tensor.device)


def all_reduce_floats(values: list[float], op: Op = "sum", group: Any = None) -> list[float]:
    """:func:`all_reduce` of a list of Python floats (float64, one small collective)."""
    if not values:
        return []
    out = all_reduce(torch.tensor(values, dtype=torch.float64), op, group)
    return [float(v) for v in out.tolist()]


def any_rank(flag: bool, group: Any = None) -> bool:
    """True on every rank when ``flag`` is True on at least one rank of ``group``."""
    return bool(all_reduce(torch.tensor([1.0 if flag else 0.0]), "max", group).item() > 0)


def all_gather(tensor: torch.Tensor, group: Any = None) -> list[torch.Tensor]:
    """Every rank's ``tensor`` (same shape and dtype on all ranks), by rank in ``group``, on
    ``tensor``'s device. For small tensors (counts, flags). ``[tensor]`` without a group."""
    if not is_distributed():
        return [tensor.clone()]
    dev = group_device(group)
    buf = tensor.detach().to(dev, copy=True).contiguous()
    out = [torch.empty_like(buf) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, buf, group=group)
    return [t.to(tensor.device) for t in out]


def all_gather_object(obj: Any, group: Any = None) -> list[Any]:
    """Every rank's picklable ``obj``, by rank in ``group`` (``[obj]`` without a group).
    torch serialises it into a tensor on the group's device itself."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def broadcast_object(obj: Any, src: int = 0, group: Any = None) -> Any:
    """Rank ``src``'s picklable ``obj`` on every rank (``obj`` itself without a group, or in a
    world of one); other ranks' ``obj`` is ignored."""
    if not is_distributed() or dist.get_world_size(group) == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


def broadcast(tensor: torch.Tensor, src: int, group: Any = None) -> torch.Tensor:
    """Rank ``src``'s ``tensor`` (``src`` a global rank) on every rank, as a new tensor on the
    caller's device; all ranks pass a tensor of the same shape and dtype."""
    if not is_distributed():
        return tensor.clone()
    buf = tensor.detach().to(group_device(group), copy=True).contiguous()
    dist.broadcast(buf, src=src, group=group)
    return buf.to(tensor.device)


def barrier(group: Any = None) -> None:
    """Wait for every rank of ``group``; nothing without a process group. On NCCL the barrier
    runs on this process's current device (``device_ids``), not on a guessed one."""
    if not is_distributed():
        return
    dev = group_device(group)
    if dev.type == "cuda":
        dist.barrier(group=group, device_ids=[dev.index])
    else:
        dist.barrier(group=group)
