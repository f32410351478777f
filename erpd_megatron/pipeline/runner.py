"""How a round's steps are started: each as its own process (the default, and the only way
under ``torchrun``), or, for one-process rounds on a CPU (``erpd demo``, ``erpd round
--in-process``), one after another inside the caller's process.

A step is ``python -m <module> args...``; every step module has ``main(argv) -> int``, so the
in-process path calls that ``main`` with the same arguments and treats its return code (or a
``SystemExit``) exactly as the child's exit code. What a step may leave behind in the process
is put back after it: ``sys.argv``, the environment (``init_distributed`` writes
``MASTER_ADDR``/``MASTER_PORT``), the signal handlers (the training loop's SIGTERM/SIGUSR1
handlers would otherwise swallow a later SIGTERM), torch's thread count and grad mode;
torch.distributed and megatron's parallel state are torn down by the step itself
(``StageRun.launch``: ``destroy_distributed``) and checked here. What it saves: a megatron
import, a model build and a process-group set-up per step (about 20 steps in the demo).
"""

from __future__ import annotations

import gc
import importlib
import os
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

from erpd_megatron.utils.log import get_logger

log = get_logger(__name__)

_SIGNALS = tuple(
    getattr(signal, n)
    for n in ("SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2", "SIGHUP")
    if hasattr(signal, n)
)


class StepFailed(RuntimeError):
    """A step's process exited non-zero (or, in process, returned non-zero or raised)."""


def python_command(nproc: int = 1) -> list[str]:
    """This interpreter, under ``torchrun --standalone`` when ``nproc`` > 1 (the rendezvous
    store binds port 0 itself: no free-port race); append ``-m module ...`` or a script."""
    if nproc <= 1:
        return [sys.executable]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        str(nproc),
    ]


def module_of(cmd: list[str]) -> tuple[str, list[str]] | None:
    """``(module, argv)`` of a ``[python, -m, module, *argv]`` command for this interpreter,
    else None (torchrun, other programs)."""
    if len(cmd) >= 3 and cmd[0] == sys.executable and cmd[1] == "-m":
        if cmd[2] not in ("torch.distributed.run", "torch.distributed.launch"):
            return cmd[2], list(cmd[3:])
    return None


@contextmanager
def _process_state() -> Iterator[None]:
    """Put back argv, the environment, signal handlers and torch's global modes on exit."""
    import torch

    argv, environ = list(sys.argv), dict(os.environ)
    handlers = {s: signal.getsignal(s) for s in _SIGNALS}
    threads, grad = torch.get_num_threads(), torch.is_grad_enabled()
    try:
        with warnings.catch_warnings():
            if "PYTHONWARNINGS" not in os.environ:  # what a child step gets (Runner.run)
                warnings.simplefilter("ignore")
            yield
    finally:
        sys.argv[:] = argv
        for k in set(os.environ) - set(environ):
            del os.environ[k]
        os.environ.update(environ)
        for s, h in handlers.items():
            if h is not None:
                signal.signal(s, h)
        torch.set_num_threads(threads)
        torch.set_grad_enabled(grad)
        gc.collect()


def _check_torn_down(module: str) -> None:
    """A step must leave no process group or megatron state behind (the next step builds its
    own layout); a leak is a bug in the step, named here."""
    import torch.distributed as dist

    left = []
    if dist.is_available() and dist.is_initialized():
        left.append("a torch.distributed process group")
    ps = sys.modules.get("megatron.core.parallel_state")
    if ps is not None and ps.model_parallel_is_initialized():
        left.append("megatron's model-parallel groups")
    if left:
        from erpd_megatron.runtime.distributed import destroy_distributed

        destroy_distributed(destroy_process_group=True)
        raise StepFailed(
            f"in-process step {module} left {' and '.join(left)} initialised (it must call "
            "destroy_distributed); run the round without --in-process"
        )


def call_in_process(module: str, argv: list[str]) -> int:
    """Run ``python -m module argv...`` as ``module.main(argv)`` here; returns its exit code.
    An exception is logged with its traceback and counts as exit code 1."""
    mod = importlib.import_module(module)
    main = getattr(mod, "main", None)
    if main is None:
        raise StepFailed(f"{module} has no main(argv): it cannot run in process")
    with _process_state():
        sys.argv[:] = [module, *argv]
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except Exception:  # noqa: BLE001 - reported like a child's traceback, then a StepFailed
            log.exception("step %s raised", module)
            code = 1
        _check_torn_down(module)
    return int(code or 0)


class Runner:
    """Starts the steps with the recipe, the user's overrides and the step's own.

    ``in_process``: run ``python -m`` steps by calling their ``main`` here (one-process rounds
    only: ``nproc`` must be 1)."""

    def __init__(
        self, config: str, overrides: list[str], nproc: int, *, in_process: bool = False
    ) -> None:
        if in_process and nproc != 1:
            raise ValueError(f"in-process steps need one process per step, not {nproc}")
        self.config, self.overrides, self.nproc = config, list(overrides), nproc
        self.in_process = in_process

    def module(self, module: str, step_overrides: list[str], *, distributed: bool = True) -> None:
        """``python -m module --config RECIPE overrides...`` (under torchrun when distributed)."""
        cmd = python_command(self.nproc if distributed else 1) + ["-m", module]
        self.run(cmd + ["--config", self.config, *self.overrides, *step_overrides])

    def run(self, cmd: list[str]) -> None:
        """Run a command (in process when possible and asked for); a non-zero exit is a
        StepFailed."""
        t0 = time.time()
        target = module_of(cmd) if self.in_process else None
        if target is not None:
            code = call_in_process(*target)
        else:
            env = dict(os.environ)
            env.setdefault("PYTHONWARNINGS", "ignore")
            code = subprocess.call(cmd, env=env)
        if code != 0:
            where = " (in process)" if target is not None else ""
            raise StepFailed(f"step exited with code {code}{where}: {' '.join(cmd)}")
        if target is not None:  # what the steps leave in this process adds up over a demo
            import psutil

            rss = psutil.Process().memory_info().rss / 2**30
            log.debug("step took %.1fs; this process holds %.2f GiB", time.time() - t0, rss)
        else:
            log.debug("step took %.1fs", time.time() - t0)
