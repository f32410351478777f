"""Progress bars for long loops (training steps, the cache pass, generation): tqdm with ETA on
a terminal, plain log lines (:class:`LineProgress`) when stderr is a file or pipe."""

from __future__ import annotations

import os
import sys
import time
from typing import Any

from erpd_megatron.utils.log import get_logger

log = get_logger(__name__)


def progress_bar(
    total: int, *, enabled: bool, desc: str, initial: int = 0, unit: str = "it"
) -> Any:
    """A tqdm bar with ETA on rank 0 when stderr is a terminal; a :class:`LineProgress` (plain
    log lines, no carriage returns) when stderr goes to a file or pipe; a no-op elsewhere."""
    if not enabled:
        return _NoBar()
    if not sys.stderr.isatty():
        return LineProgress(total, desc=desc, initial=initial, unit=unit)
    from tqdm import tqdm

    return tqdm(
        total=total, initial=initial, desc=desc, dynamic_ncols=True, mininterval=1.0, unit=unit
    )


class LineProgress:
    """Progress as plain log lines for non-terminal stderr (Slurm logs, ``> file``): at most
    one line per ``interval`` seconds (``ERPD_PROGRESS_INTERVAL``, default 60) and one at the
    end, each with the count, rate, ETA and the last postfix."""

    def __init__(
        self,
        total: int,
        *,
        desc: str,
        initial: int = 0,
        unit: str = "it",
        interval: float | None = None,
    ) -> None:
        self.total, self.desc, self.n, self.unit = total, desc, initial, unit
        self.start_n = initial
        self.interval = (
            float(os.environ.get("ERPD_PROGRESS_INTERVAL", "60")) if interval is None else interval
        )
        self.t0 = self.last = time.monotonic()
        self.postfix = ""
        self.closed = False

    def _line(self) -> str:
        dt = time.monotonic() - self.t0
        rate = (self.n - self.start_n) / dt if dt > 0 else 0.0
        eta = (self.total - self.n) / rate if rate > 0 else float("nan")
        pct = 100.0 * self.n / self.total if self.total else 100.0
        tail = f", {self.postfix}" if self.postfix else ""
        return (
            f"{self.desc}: {self.n}/{self.total} ({pct:.0f}%) {dt:.0f}s, {rate:.2f} {self.unit}/s, "
            f"eta {eta:.0f}s{tail}"
        )

    def update(self, n: int = 1) -> None:  # noqa: D102
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.interval and self.n < self.total:
            self.last = now
            log.info("%s", self._line())

    def set_postfix(self, *a: Any, **k: Any) -> None:  # noqa: D102
        self.postfix = ", ".join(f"{key}={v}" for key, v in k.items())

    def close(self) -> None:  # noqa: D102
        if not self.closed:
            self.closed = True
            log.info("%s", self._line())


class _NoBar:
    def update(self, n: int = 1) -> None:  # noqa: D102
        pass

    def set_postfix(self, *a: Any, **k: Any) -> None:  # noqa: D102
        pass

    def close(self) -> None:  # noqa: D102
        pass
