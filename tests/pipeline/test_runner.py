"""The in-process step runner (pipeline/runner.py): exit codes, exceptions and ``sys.exit``
become StepFailed like a child's exit code, and what a step leaves in the process (argv, env,
signal handlers, torch modes, a process group) is put back or named."""

from __future__ import annotations

import os
import signal
import sys

import pytest
import torch

from erpd_megatron.pipeline.runner import Runner, StepFailed, module_of

STEP = "tests.pipeline.inprocess_steps"


def _cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", STEP, *args]


def test_in_process_step_puts_the_process_back():
    before = (
        dict(os.environ),
        list(sys.argv),
        signal.getsignal(signal.SIGTERM),
        torch.get_num_threads(),
        torch.is_grad_enabled(),
    )
    r = Runner("recipe.yaml", [], 1, in_process=True)
    r.run(_cmd("exit", "0"))
    after = (
        dict(os.environ),
        list(sys.argv),
        signal.getsignal(signal.SIGTERM),
        torch.get_num_threads(),
        torch.is_grad_enabled(),
    )
    assert after == before


@pytest.mark.parametrize(
    "args, code",
    [
        (("exit", "3"), r"code 3 \(in process\)"),
        (("sysexit", "4"), "code 4"),
        (("raise",), "code 1"),
    ],
)
def test_failures_are_step_failures(args, code):
    with pytest.raises(StepFailed, match=code):
        Runner("recipe.yaml", [], 1, in_process=True).run(_cmd(*args))
    assert "ERPD_TEST_LEFT_BEHIND" not in os.environ


def test_a_leaked_process_group_is_named_and_torn_down():
    import torch.distributed as dist

    with pytest.raises(StepFailed, match="left a torch.distributed process group"):
        Runner("recipe.yaml", [], 1, in_process=True).run(_cmd("leak"))
    assert not dist.is_initialized()


def test_subprocess_path_and_what_runs_in_process():
    with pytest.raises(StepFailed, match="code 5: "):
        Runner("recipe.yaml", [], 1).run(_cmd("exit", "5"))
    assert module_of(_cmd("a")) == (STEP, ["a"])
    assert module_of([sys.executable, "-m", "torch.distributed.run", "-m", STEP]) is None
    assert module_of(["srun", sys.executable]) is None
    with pytest.raises(ValueError, match="one process per step"):
        Runner("recipe.yaml", [], 2, in_process=True)
