"""Fixtures of the evaluation tests: two tiny random Llamas (the rollout tests' helper) and a
GSM8K-style held-out file; one torch thread (tiny models, shared machine)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.rollout.conftest import GSM_ROWS, make_tiny_model, write_jsonl


@pytest.fixture(scope="session")
def tiny_pair(tmp_path_factory) -> tuple[Path, Path]:
    """Two tiny models with the same tokenizer and different random weights."""
    root = tmp_path_factory.mktemp("eval-models")
    return make_tiny_model(root / "a", seed=0), make_tiny_model(root / "b", seed=1)


@pytest.fixture(scope="session")
def heldout_file(tmp_path_factory) -> Path:
    """A GSM8K-style jsonl held-out set with 10 rows."""
    return write_jsonl(tmp_path_factory.mktemp("eval-data") / "heldout.jsonl", GSM_ROWS)


@pytest.fixture(autouse=True)
def _one_torch_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
