"""Reward functions for the pool tests, importable by dotted path from worker processes."""

from __future__ import annotations

import os
import time


def hang(response: str, reference: str) -> float:
    """Never returns (busy loop) when the response says 'hang'."""
    if response == "hang":
        while True:
            time.sleep(0.01)
    return 1.0


def crash(response: str, reference: str) -> float:
    """Kills its own process when the response says 'crash' (like a segfault would)."""
    if response == "crash":
        os._exit(139)
    return 1.0


def boom(response: str, reference: str) -> float:
    """Raises when the response says 'boom'; NaN for 'nan'."""
    if response == "boom":
        raise RuntimeError("boom")
    if response == "nan":
        return float("nan")
    return 0.5


def has_digit(response: str, reference: str) -> float:
    """1 when the response contains a digit (a reward with both outcomes on random text)."""
    return float(any(c.isdigit() for c in response))
