"""Run megatron-core on a machine without a GPU (tests, the tiny demo, dry runs).

megatron-core assumes CUDA in many places: ``torch.cuda.current_device()`` as a device,
literal ``device="cuda"`` tensors (pipeline schedules, causal masks, the optimizer, grad
clipping, dist_checkpointing's exchange utilities), the CUDA RNG tracker, CUDA streams
in DDP and ``Tensor.type()`` checks in the optimizer wrappers. :func:`install_cpu_harness`
patches exactly those assumptions so that the same code paths run on CPU + gloo:

1. ``torch.cuda.current_device`` returns the CPU device; ``device_count`` returns 1.
2. The CUDA RNG calls (``torch.cuda.get_rng_state/set_rng_state/manual_seed/seed``,
   ``torch.cuda.random.*`` and megatron's ``_get_cuda_rng_state/_set_cuda_rng_state``) use
   the CPU generator. ``manual_seed_all`` is left alone: ``torch.manual_seed`` calls it and
   redirecting it would recurse.
3. ``torch.cuda.synchronize`` / ``empty_cache`` / memory statistics are no-ops; streams and
   events are dummies whose context managers do nothing.
4. A :class:`torch.overrides.TorchFunctionMode`, entered once for the process, rewrites
   every ``device=`` argument that names CUDA (or a bare GPU index) to ``cpu``, makes
   ``Tensor.cuda()`` / ``Tensor.to("cuda")`` stay on CPU, and makes ``Tensor.type()`` (no
   argument) answer ``torch.cuda.FloatTensor``-style names, which the fp16 / distributed
   optimizer wrappers check.
5. The distributed optimizer's checkpoint load copes with torch's Adam (the fallback
   without Apex / TE): the per-parameter ``step`` and fp32 main params that are views of
   leaf parameters, and one ``step`` tensor shared by all parameters (see
   :func:`patch_torch_adam_distributed_optimizer`).

``torch.cuda.is_available()`` keeps answering False, so code can still tell a CPU run.
The harness is process-wide and idempotent; it must never be installed on a GPU run
(:func:`install_cpu_harness` refuses when CUDA is available).
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from erpd_megatron.utils.log import get_logger

log = get_logger(__name__)

_INSTALLED = False
_LOCK = threading.Lock()
_MODE: TorchFunctionMode | None = None
_CPU = torch.device("cpu")


def is_installed() -> bool:
    """Whether :func:`install_cpu_harness` has run in this process."""
    return _INSTALLED


def _to_cpu_device(dev: Any) -> Any:
    """Map a CUDA device spec (``"cuda"``, ``"cuda:1"``, ``torch.device("cuda")``, ``0``) to cpu."""
    if isinstance(dev, bool):
        return dev
    if isinstance(dev, int):
        return _CPU
    if isinstance(dev, str) and dev.startswith("cuda"):
        return _CPU
    if isinstance(dev, torch.device) and dev.type == "cuda":
        return _CPU
    return dev


def _is_cuda_device(dev: Any) -> bool:
    return _to_cpu_device(dev) is _CPU and not (isinstance(dev, torch.device) and dev.type == "cpu")


def _cuda_type_name(name: str) -> str:
    """``torch.FloatTensor`` -> ``torch.cuda.FloatTensor``."""
    if name.startswith("torch.") and not name.startswith("torch.cuda."):
        return "torch.cuda." + name[len("torch.") :]
    return name


def _cpu_type_name(name: Any) -> Any:
    if isinstance(name, str) and name.startswith("torch.cuda."):
        return "torch." + name[len("torch.cuda.") :]
    return name


class _CpuDeviceMode(TorchFunctionMode):
    """Rewrite CUDA device arguments to CPU for every torch function and tensor method."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: D105
        kwargs = dict(kwargs or {})
        if "device" in kwargs:
            kwargs["device"] = _to_cpu_device(kwargs["device"])
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type:
            if len(args) == 1 and not kwargs:
                return _cuda_type_name(func(args[0]))
            if len(args) > 1:
                args = (args[0], _cpu_type_name(args[1]), *args[2:])
            if "dtype" in kwargs:
                kwargs["dtype"] = _cpu_type_name(kwargs["dtype"])
            return func(*args, **kwargs)
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], _CPU, *args[2:])
        if func is torch.Tensor.pin_memory:
            return args[0]
        return func(*args, **kwargs)


class _DummyStream:
    """A stand-in for ``torch.cuda.Stream`` / ``Event``: every method is a no-op, except
    ``record_event`` which returns another dummy (megatron's MoE token dispatcher calls
    ``stream.record_event().synchronize()``, ``token_dispatcher.py`` in 0.16.1)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.device = _CPU

    def __getattr__(self, name: str) -> Any:
        return lambda *a, **k: None

    def record_event(self, event: Any = None) -> _DummyStream:
        return event if isinstance(event, _DummyStream) else _DummyStream()

    def query(self) -> bool:
        return True

    def elapsed_time(self, other: Any) -> float:
        return 0.0


def _noop(name: str) -> Any:
    """A distinct no-op per patched name (torch.compile's trace rules reject one object
    registered under several names)."""

    def noop(*args: Any, **kwargs: Any) -> None:
        return None

    noop.__name__ = noop.__qualname__ = name
    return noop


def _patch_torch_cuda() -> None:
    cuda = torch.cuda

    def cpu_get_rng_state(device: Any = "cuda") -> torch.Tensor:
        return torch.get_rng_state()

    def cpu_set_rng_state(new_state: torch.Tensor, device: Any = "cuda") -> None:
        torch.set_rng_state(new_state)

    def cpu_manual_seed(seed: int) -> None:
        torch.default_generator.manual_seed(int(seed))

    def cpu_seed() -> None:
        torch.default_generator.seed()

    rng = {
        "get_rng_state": cpu_get_rng_state,
        "set_rng_state": cpu_set_rng_state,
        "manual_seed": cpu_manual_seed,
        "seed": cpu_seed,
        "initial_seed": lambda: torch.initial_seed(),
        "get_rng_state_all": lambda: [torch.get_rng_state()],
        "set_rng_state_all": lambda states: torch.set_rng_state(states[0]),
    }
    for name, fn in rng.items():
        setattr(cuda, name, fn)
        if hasattr(cuda, "random"):
            setattr(cuda.random, name, fn)

    cuda.current_device = lambda: _CPU
    cuda.device_count = lambda: 1
    cuda.set_device = _noop("set_device")
    cuda.synchronize = _noop("synchronize")
    cuda.empty_cache = _noop("empty_cache")
    cuda.reset_peak_memory_stats = _noop("reset_peak_memory_stats")
    cuda.memory_allocated = lambda *a, **k: 0
    cuda.max_memory_allocated = lambda *a, **k: 0
    cuda.memory_reserved = lambda *a, **k: 0
    cuda.max_memory_reserved = lambda *a, **k: 0
    cuda.Stream = _DummyStream
    cuda.Event = _DummyStream
    cuda.current_stream = lambda *a, **k: _DummyStream()
    cuda.default_stream = lambda *a, **k: _DummyStream()
    cuda.stream = lambda *a, **k: contextlib.nullcontext()
    cuda.device = lambda *a, **k: contextlib.nullcontext()
    cuda.get_device_capability = lambda *a, **k: (0, 0)
    cuda.get_device_name = lambda *a, **k: "cpu"


def _patch_megatron() -> None:
    """Megatron's own CUDA RNG helpers (imported by name in several modules)."""
    from megatron.core.tensor_parallel import random as mrandom

    def get_state(
        device: Any = "cuda", clone: bool = False, graph_safe: bool = False
    ) -> torch.Tensor:
        state = torch.get_rng_state()
        return state.clone() if clone else state

    def set_state(new_state: torch.Tensor, device: int = -1, graph_safe: bool = False) -> None:
        torch.set_rng_state(new_state)

    mrandom._get_cuda_rng_state = get_state
    mrandom._set_cuda_rng_state = set_state
    import sys

    for mod in list(sys.modules.values()):
        name = getattr(mod, "__name__", "")
        if not name.startswith("megatron.") or mod is mrandom:
            continue
        d = getattr(mod, "__dict__", {})
        if d.get("_get_cuda_rng_state") is not None:
            mod._get_cuda_rng_state = get_state  # type: ignore[attr-defined]
        if d.get("_set_cuda_rng_state") is not None:
            mod._set_cuda_rng_state = set_state  # type: ignore[attr-defined]


def _patch_backward_engine() -> None:
    """Run every autograd backward under the device mode.

    torch pops a mode off the stack while its ``__torch_function__`` runs, and
    ``Tensor.backward`` / ``torch.autograd.backward`` / ``grad`` go through that handler, so
    the backward they start would run without the mode: recomputed forwards (megatron's
    activation checkpointing, ``tensor_parallel/random.py`` ``CheckpointFunction.backward``)
    then build the causal mask on ``device="cuda"`` (``transformer/utils.py``). The engine
    entry point itself is not a torch function; it re-enters the mode when it is off.
    (megatron's schedules call the engine directly, with the mode on.)
    """
    import torch.autograd
    import torch.autograd.graph as graph

    orig = graph._engine_run_backward
    if getattr(orig, "_erpd_patched", False):
        return

    def run_backward(*args: Any, **kwargs: Any) -> Any:
        if _MODE is not None and _MODE not in torch.overrides._get_current_function_mode_stack():
            with _MODE:
                return orig(*args, **kwargs)
        return orig(*args, **kwargs)

    run_backward._erpd_patched = True  # type: ignore[attr-defined]
    graph._engine_run_backward = run_backward
    torch.autograd._engine_run_backward = run_backward  # imported by name there


def _split_list(splits: Any) -> Any:
    """Split sizes as a list of ints (gloo's ``all_to_all_single`` rejects tensors)."""
    if splits is None or isinstance(splits, list):
        return splits
    if torch.is_tensor(splits):
        return [int(x) for x in splits.tolist()]
    return [int(x) for x in splits]


def _patch_moe() -> None:
    """What megatron-core's MoE layers need on CPU + gloo (measured with 0.16.1):

    * ``moe_utils.router_gating_linear`` tests ``te_general_gemm is not None``, a name that
      is only bound when Transformer Engine imports (NameError otherwise): bind it to None,
      so the router takes its plain ``torch.matmul`` path.
    * The alltoall token dispatcher hands its split sizes to ``all_to_all_single`` as
      tensors (on a GPU megatron first moves them to host numpy arrays, which NCCL's
      binding takes); gloo wants lists of ints: convert them.
    """
    import torch.distributed as dist

    try:
        from megatron.core.transformer.moe import moe_utils
    except ImportError:  # an install without MoE support
        moe_utils = None
    if moe_utils is not None and "te_general_gemm" not in vars(moe_utils):
        moe_utils.te_general_gemm = None
    orig = dist.all_to_all_single
    if getattr(orig, "_erpd_patched", False):
        return

    def all_to_all_single(
        output: torch.Tensor,
        input: torch.Tensor,
        output_split_sizes: Any = None,
        input_split_sizes: Any = None,
        group: Any = None,
        async_op: bool = False,
    ) -> Any:
        return orig(
            output,
            input,
            _split_list(output_split_sizes),
            _split_list(input_split_sizes),
            group=group,
            async_op=async_op,
        )

    all_to_all_single._erpd_patched = True  # type: ignore[attr-defined]
    dist.all_to_all_single = all_to_all_single


def _patch_sequence_parallel() -> None:
    """Sequence parallelism with megatron's torch norms (no Apex / TE), measured with 0.16.1.

    ``WrappedTorchNorm.__new__`` (``transformer/torch_norm.py``) asserts
    ``not config.sequence_parallel``. Under SP a norm sees only its rank's slice of the
    sequence, so its weight gradient is partial; Transformer Engine's norms mark their
    parameters ``sequence_parallel = True`` (``extensions/transformer_engine.py``,
    ``TENorm``/``TELayerNormColumnParallelLinear``) and ``finalize_model_grads`` then sums
    those gradients over TP (``_allreduce_non_tensor_model_parallel_grads``). The harness
    builds the same torch norm and marks its parameters the same way: exact, not an
    approximation. ``reduce_scatter_tensor`` / ``all_gather_into_tensor`` run on gloo with
    torch 2.13, so megatron's SP mappings need nothing more.
    """
    from megatron.core.transformer import torch_norm

    cls = torch_norm.WrappedTorchNorm
    orig = cls.__new__
    if getattr(orig, "_erpd_patched", False):
        return

    def new(klass: Any, config: Any, hidden_size: int, eps: float = 1e-5, **kwargs: Any) -> Any:
        if not config.sequence_parallel:
            return orig(klass, config, hidden_size, eps, **kwargs)
        import dataclasses

        norm = orig(
            klass, dataclasses.replace(config, sequence_parallel=False), hidden_size, eps, **kwargs
        )
        for p in norm.parameters():
            p.sequence_parallel = True
        return norm

    new._erpd_patched = True  # type: ignore[attr-defined]
    cls.__new__ = new  # type: ignore[method-assign]


def patch_torch_adam_distributed_optimizer() -> None:
    """Make DistributedOptimizer checkpoint loads work with torch's Adam (no Apex / TE).

    Without Apex/TE megatron falls back to ``torch.optim.Adam``, whose per-parameter state
    holds a ``step`` that the checkpoint's parameter state does not contain: the copy in
    ``_set_main_param_and_optimizer_states`` raises ``KeyError: 'step'`` (the step is
    restored from the param groups already). It also copies into fp32 main params, which
    are views of leaf parameters, outside ``no_grad`` (dp_reshardable), and after a load
    every parameter shares one ``step`` tensor. All three fixed here. Idempotent; also
    applied by :func:`erpd_megatron.models.checkpoint.load_checkpoint` on a GPU machine
    without Apex / Transformer Engine (the same torch-Adam fallback).
    """
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    orig = DistributedOptimizer._set_main_param_and_optimizer_states
    if getattr(orig, "_erpd_patched", False):
        return

    def set_states(self: Any, model_param: Any, tensors: dict) -> None:
        if not self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            group_index, group_order = self.model_param_group_index_map[model_param]
            main_param = self.optimizer.param_groups[group_index]["params"][group_order]
            state = self.optimizer.state[main_param]
            # "step" comes from the param groups (dp_reshardable hands back the *current*
            # step as a non-persistent object, which would reset it): keep the state's own.
            tensors = {
                **{k: v for k, v in tensors.items() if k != "step"},
                **{k: v for k, v in state.items() if k == "step" or k not in tensors},
            }
        with torch.no_grad():
            orig(self, model_param, tensors)

    set_states._erpd_patched = True  # type: ignore[attr-defined]
    DistributedOptimizer._set_main_param_and_optimizer_states = set_states

    orig_load = DistributedOptimizer.load_state_dict

    def load_state_dict(self: Any, state_dict: dict) -> None:
        orig_load(self, state_dict)
        # megatron gives every parameter the SAME step tensor; torch's Adam increments it
        # in place once per parameter, corrupting the bias correction after a resume.
        for st in self.optimizer.state.values():
            if isinstance(st.get("step"), torch.Tensor):
                st["step"] = st["step"].clone()

    DistributedOptimizer.load_state_dict = load_state_dict


def install_cpu_harness() -> None:
    """Patch torch.cuda / megatron-core so that megatron runs on CPU; idempotent.

    Raises RuntimeError when a GPU is available: the harness is for GPU-less machines only.
    """
    global _INSTALLED, _MODE
    with _LOCK:
        if _INSTALLED:
            return
        if torch.cuda.is_available():
            raise RuntimeError(
                "install_cpu_harness() called on a machine with a GPU; it is for CPU runs only"
            )
        _patch_torch_cuda()
        _patch_megatron()
        _patch_moe()
        _patch_sequence_parallel()
        _patch_backward_engine()
        patch_torch_adam_distributed_optimizer()
        _MODE = _CpuDeviceMode()
        _MODE.__enter__()
        _INSTALLED = True
        log.debug("CPU harness installed (torch.cuda redirected to CPU)")
