"""A process pool that computes rewards with a hard per-answer timeout.

Each worker imports the reward function once, then scores one ``(response, reference)`` at a
time. The parent gives every task a deadline; a worker past it is killed (SIGKILL, so even a
C-level big-integer power cannot hold it) and replaced, and the task scores 0. A worker that
dies (segfault, out of memory) is replaced the same way; the task scores 0. A reward that
raises or returns a non-finite number scores 0. Counts of each are kept in :attr:`stats`.

Workers start from a fork server that has math-verify preloaded (cheap replacements, and
safe after CUDA was initialised in the parent); each caps its address space
(``memory_mb`` above its start-up size) so a runaway answer raises MemoryError instead of
taking the node down. Nothing in the pool ever evaluates model output.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any

from erpd_megatron.rollout.verifier import RewardFnError, resolve_reward_fn
from erpd_megatron.utils.log import get_logger

log = get_logger(__name__)


class RewardPoolError(RuntimeError):
    """The pool cannot work at all (workers fail to start); not raised for bad answers."""


def _limit_memory(memory_mb: int) -> None:
    if memory_mb <= 0:
        return
    try:
        import resource

        with open("/proc/self/statm") as f:
            current = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        limit = current + memory_mb * 1024 * 1024
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        if hard != resource.RLIM_INFINITY:
            limit = min(limit, hard)
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    except (OSError, ValueError, ImportError):  # not Linux: no cap
        pass


def _worker_main(conn: Connection, fn_path: str, memory_mb: int) -> None:
    """Worker loop: import the reward, report ready, then score tasks until told to stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    try:
        fn = resolve_reward_fn(fn_path)
        _limit_memory(memory_mb)
    except BaseException as e:  # report any start-up failure to the parent
        conn.send(("fatal", f"{type(e).__name__}: {e}"))
        return
    conn.send(("ready", os.getpid()))
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        task_id, response, reference = msg
        try:
            value = float(fn(response, reference))
            status = "ok" if math.isfinite(value) else "error"
        except BaseException:  # MemoryError, RecursionError, anything the reward raises
            value, status = 0.0, "error"
        try:
            conn.send((task_id, value if status == "ok" else 0.0, status))
        except (OSError, ValueError):
            return


@dataclass
class _Worker:
    proc: Any
    conn: Connection
    ready: bool = False
    task: tuple[int, float, float] | None = None  # (task id, deadline, start)


def _default_context() -> Any:
    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        return ctx
    return mp.get_context("spawn")


class RewardPool:
    """Score ``(response, reference)`` pairs with ``reward_fn`` in worker processes.

    Use as a context manager (or call :meth:`close`). ``timeout`` is the hard limit per
    answer in seconds; ``num_workers=0`` means ``min(8, cpu count)``.
    """

    def __init__(
        self,
        reward_fn: str,
        *,
        timeout: float = 5.0,
        num_workers: int = 0,
        memory_mb: int = 4096,
        start_method: str | None = None,
    ) -> None:
        resolve_reward_fn(reward_fn)  # fail fast, in the parent, with a clear message
        if timeout <= 0:
            raise ValueError(f"verifier timeout must be positive, got {timeout}")
        self.reward_fn = reward_fn
        self.timeout = float(timeout)
        self.memory_mb = memory_mb
        self.num_workers = num_workers or max(1, min(8, os.cpu_count() or 1))
        if start_method is None:
            self._ctx = _default_context()
            if self._ctx.get_start_method() == "forkserver":
                module = (
                    reward_fn.partition(":")[0]
                    if ":" in reward_fn
                    else reward_fn.rpartition(".")[0]
                )
                self._ctx.set_forkserver_preload(
                    ["math_verify", "erpd_megatron.rollout.verifier", module]
                )
        else:
            self._ctx = mp.get_context(start_method)
        self.stats = {"calls": 0, "timeouts": 0, "errors": 0, "crashes": 0, "restarts": 0}
        self.last_durations: list[float] = []
        self._workers: list[_Worker] = [self._start() for _ in range(self.num_workers)]
        self._start_failures = 0

    @classmethod
    def from_config(cls, rc: Any) -> RewardPool:
        """The pool a ``RolloutConfig`` asks for (its reward_fn and verifier_* fields)."""
        return cls(
            rc.reward_fn,
            timeout=rc.verifier_timeout,
            num_workers=rc.verifier_workers,
            memory_mb=rc.verifier_memory_mb,
        )

    # ------------------------------------------------------------------ workers

    def _start(self) -> _Worker:
        parent, child = self._ctx.Pipe(duplex=True)
        proc = self._ctx.Process(
            target=_worker_main,
            args=(child, self.reward_fn, self.memory_mb),
            daemon=True,
            name="erpd-reward",
        )
        proc.start()
        child.close()
        return _Worker(proc=proc, conn=parent)

    def _replace(self, w: _Worker) -> None:
        try:
            w.proc.kill()
        except (OSError, ValueError):
            pass
        w.proc.join(timeout=5)
        w.conn.close()
        self._workers[self._workers.index(w)] = self._start()
        self.stats["restarts"] += 1

    def close(self) -> None:
        """Stop all workers."""
        for w in self._workers:
            try:
                w.conn.send(None)
            except (OSError, ValueError):
                pass
        for w in self._workers:
            w.proc.join(timeout=1)
            if w.proc.is_alive():
                w.proc.kill()
                w.proc.join(timeout=5)
            w.conn.close()
        self._workers = []

    def __enter__(self) -> RewardPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ scoring

    def map(
        self, responses: Sequence[str], references: Sequence[str], *, progress: bool = False
    ) -> list[float]:
        """Rewards of ``responses[i]`` against ``references[i]``, in order.

        Never raises for a bad answer: a timeout, a crash or an exception gives 0.0 (counted in
        :attr:`stats`). :attr:`last_durations` holds each task's seconds from dispatch to result.
        """
        if len(responses) != len(references):
            raise ValueError(f"{len(responses)} responses but {len(references)} references")
        if not self._workers:
            raise RewardPoolError("the reward pool is closed")
        n = len(responses)
        results = [0.0] * n
        durations = [0.0] * n
        next_task, done = 0, 0
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=n, desc="verify", unit="ans", leave=False)
        while done < n:
            for w in self._workers:
                if w.ready and w.task is None and next_task < n:
                    now = time.monotonic()
                    try:
                        w.conn.send((next_task, responses[next_task], references[next_task]))
                        w.task = (next_task, now + self.timeout, now)
                    except (OSError, ValueError):
                        w.task = (next_task, now, now)  # handled below as a crash
                        self._finish_crashed(w, results, durations)
                        done += 1
                    next_task += 1
            busy = [w.task[1] for w in self._workers if w.task is not None]
            wait_s = max(0.0, min(busy) - time.monotonic()) if busy else 1.0
            objs = [w.conn for w in self._workers] + [w.proc.sentinel for w in self._workers]
            ready = set(wait(objs, timeout=min(wait_s, 1.0)))
            for w in list(self._workers):
                if w.conn in ready or w.proc.sentinel in ready:
                    done += self._drain(w, results, durations)
            now = time.monotonic()
            for w in list(self._workers):
                if w.task is not None and now >= w.task[1]:
                    tid, _, start = w.task
                    results[tid], durations[tid] = 0.0, now - start
                    self.stats["timeouts"] += 1
                    log.debug(
                        "reward task %d timed out after %.1fs; replacing worker %d",
                        tid,
                        now - start,
                        w.proc.pid,
                    )
                    self._replace(w)
                    done += 1
            if bar is not None and done != bar.n:
                bar.update(done - bar.n)
        if bar is not None:
            bar.close()
        self.stats["calls"] += n
        self.last_durations = durations
        return results

    def _finish_crashed(self, w: _Worker, results: list[float], durations: list[float]) -> None:
        tid, _, start = w.task  # type: ignore[misc]
        results[tid], durations[tid] = 0.0, time.monotonic() - start
        self.stats["crashes"] += 1
        self._replace(w)

    def _drain(self, w: _Worker, results: list[float], durations: list[float]) -> int:
        """Read what a worker sent (or notice it died); returns the number of tasks finished."""
        finished = 0
        try:
            while w.conn.poll():
                msg = w.conn.recv()
                if msg[0] == "ready":
                    w.ready = True
                    self._start_failures = 0
                elif msg[0] == "fatal":
                    raise RewardPoolError(f"reward worker failed to start: {msg[1]}")
                elif w.task is not None and msg[0] == w.task[0]:
                    tid, value, status = msg
                    results[tid], durations[tid] = value, time.monotonic() - w.task[2]
                    if status != "ok":
                        self.stats["errors"] += 1
                    w.task = None
                    finished += 1
        except (EOFError, OSError):
            pass
        if not w.proc.is_alive() and w in self._workers:
            if w.task is not None:
                self._finish_crashed(w, results, durations)
                return finished + 1
            if not w.ready:
                self._start_failures += 1
                if self._start_failures > 3:
                    raise RewardPoolError(
                        f"reward workers keep dying at start-up (exit code {w.proc.exitcode}); "
                        f"check rollout.reward_fn '{self.reward_fn}' and verifier memory"
                    )
            self._replace(w)
        return finished


def score(
    reward_fn: str,
    responses: Sequence[str],
    references: Sequence[str],
    *,
    timeout: float = 5.0,
    num_workers: int = 0,
) -> list[float]:
    """One-shot helper: start a pool, score, stop it."""
    with RewardPool(reward_fn, timeout=timeout, num_workers=num_workers) as pool:
        return pool.map(responses, references)


__all__ = ["RewardFnError", "RewardPool", "RewardPoolError", "score"]
