"""Fixtures for the ops tests: a fresh random seed per test, printed for reproduction."""

from __future__ import annotations

import os
import random

import pytest
import torch

from erpd_megatron.ops.common import set_debug_nonfinite


@pytest.fixture
def gen() -> torch.Generator:
    """A torch generator seeded freshly (``ERPD_TEST_SEED`` pins it); the seed is printed."""
    seed = int(os.environ.get("ERPD_TEST_SEED", random.SystemRandom().randrange(2**31)))
    print(f"seed={seed} (rerun with ERPD_TEST_SEED={seed})")
    return torch.Generator().manual_seed(seed)


@pytest.fixture(autouse=True)
def _debug_off():
    """Every test starts with the non-finite debug switch off and leaves it that way."""
    set_debug_nonfinite(False)
    yield
    set_debug_nonfinite(None)
