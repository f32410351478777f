"""Fixtures for the ops tests: a fixed seed per test, printed for reproduction."""

from __future__ import annotations

import os
import random
import zlib

import pytest
import torch

from erpd_megatron.ops.common import set_debug_nonfinite

DEFAULT_SEED = 20261201


@pytest.fixture
def gen(request) -> torch.Generator:
    """A torch generator with a fixed seed per test (its name hashed with DEFAULT_SEED), so a
    failure reproduces; ``ERPD_TEST_SEED`` overrides it (``random`` draws a fresh one). The
    seed is printed."""
    env = os.environ.get("ERPD_TEST_SEED")
    if env == "random":
        seed = random.SystemRandom().randrange(2**31)
    elif env:
        seed = int(env)
    else:
        seed = (DEFAULT_SEED + zlib.crc32(request.node.nodeid.encode())) % 2**31
    print(f"seed={seed} (rerun with ERPD_TEST_SEED={seed})")
    return torch.Generator().manual_seed(seed)


@pytest.fixture(autouse=True)
def _debug_off():
    """Every test starts with the non-finite debug switch off and leaves it that way."""
    set_debug_nonfinite(False)
    yield
    set_debug_nonfinite(None)
