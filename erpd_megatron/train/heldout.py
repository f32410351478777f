"""Held-out accuracy during training (``stage1.eval_every_epochs``): the launcher.

Every N epochs (and once before the first step, for pi_r) the loop saves a model-only
checkpoint (or reuses that epoch's snapshot); rank 0 then starts the evaluation child
``python -m erpd_megatron.eval.heldout`` (:mod:`erpd_megatron.eval.heldout`: export to HF,
sample, reward, write JSON) and logs its result as ``stage1/eval/...``. The child is started
by module name: the trainer imports nothing of the evaluation layer above it.

A child process keeps the training job's parallel layout out of it: the export always
gathers the whole model (any TP/PP) on one process. The other ranks wait at a barrier, so an
evaluation must finish within the process-group timeout (30 minutes). With
``stage1.eval_async`` the child runs while every rank trains on; rank 0 waits for it before
the next evaluation, a resumable checkpoint or the end, and logs its result at the step it
evaluated. On large models this
costs a full export per evaluation; evaluate the epoch snapshots offline (``erpd evaluate``)
instead.

The child never uses vLLM on a GPU: the trainer's processes keep their GPU memory while it
runs, and vLLM sizes its KV cache as a fraction of the whole GPU (see
:func:`heldout_engine_problem`). With ``rollout.engine=vllm`` (the GPU recipes' default)
evaluate the snapshots offline with ``erpd evaluate`` as its own job, where each model's vLLM
worker exits before the next starts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import yaml

from erpd_megatron.config.loader import ConfigError, to_dict
from erpd_megatron.config.schema import Config
from erpd_megatron.utils.log import get_logger

log = get_logger(__name__)

# a launcher's variables: the child is a single process, not a member of the training job
# (with torchrun's TORCHELASTIC_USE_AGENT_STORE left set, its store would wait for a server forever)
_LAUNCH_VARS = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "GROUP_WORLD_SIZE",
    "ROLE_RANK",
    "ROLE_NAME",
    "ROLE_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "SLURM_PROCID",
    "SLURM_NTASKS",
    "SLURM_LOCALID",
)


def child_env() -> dict[str, str]:
    """This process's environment without the launcher's rank/rendezvous variables."""
    return {
        k: v
        for k, v in os.environ.items()
        if k not in _LAUNCH_VARS and not k.startswith("TORCHELASTIC_")
    }


def heldout_engine_problem(engine: str, eval_every_epochs: int, on_gpu: bool) -> Optional[str]:
    """Why Stage 1's in-training held-out eval cannot use ``rollout.engine=engine`` (or None).

    The eval child runs while the trainer's processes keep their GPU memory (weights, optimizer
    state, the allocator's cache). vLLM sizes its KV cache as ``gpu_memory_utilization`` of the
    *whole* GPU and refuses to start when that much is not free, so a vLLM engine there either
    fails or competes with the trainer. The hf engine allocates only what it uses."""
    if eval_every_epochs and engine == "vllm" and on_gpu:
        return (
            "stage1.eval_every_epochs with rollout.engine=vllm would start a vLLM engine on "
            "GPUs whose memory the trainer holds: set stage1.eval_every_epochs=0 and evaluate "
            "the epoch snapshots (stage1.save_epochs, converted with "
            "tools/convert_checkpoint.py mcore-to-hf) offline with `erpd evaluate` as its own "
            "job, or set rollout.engine=hf for the in-training eval"
        )
    return None


class HeldoutChild:
    """A started evaluation child (:func:`start_heldout_child`); :meth:`wait` for its metrics."""

    def __init__(self, proc: subprocess.Popen, checkpoint: Path, work_dir: Path, log_f) -> None:
        self.proc, self.checkpoint, self.work_dir, self._log_f = proc, checkpoint, work_dir, log_f
        self.t0 = time.perf_counter()

    def wait(self) -> dict[str, float]:
        """Wait for the child; its metrics, or RuntimeError naming its log when it failed."""
        code = self.proc.wait()
        self._log_f.close()
        result, logfile = self.work_dir / "result.json", self.work_dir / "heldout.log"
        if code != 0 or not result.exists():
            raise RuntimeError(
                f"held-out evaluation of {self.checkpoint} failed (exit code {code}); see "
                f"{logfile}. Fix the eval/rollout settings or set stage1.eval_every_epochs=0, "
                "then resume."
            )
        metrics = json.loads(result.read_text())
        log.info(
            "held-out accuracy of %s: %s (%.0fs)",
            self.checkpoint.name,
            ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()),
            time.perf_counter() - self.t0,
        )
        return metrics

    def kill(self) -> None:
        """Stop the child (the run is ending without its result)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._log_f.close()


def start_heldout_child(cfg: Config, checkpoint: Path, work_dir: Path) -> HeldoutChild:
    """Start evaluating ``checkpoint`` in a child process (rank 0 only) and return at once.

    Raises :class:`ConfigError` before starting one that would run vLLM next to the trainer
    (:func:`heldout_engine_problem`; the first evaluation runs before the first step)."""
    problem = heldout_engine_problem(
        cfg.rollout.engine, max(cfg.stage1.eval_every_epochs, 1), _has_cuda()
    )
    if problem:
        raise ConfigError(problem)
    work_dir.mkdir(parents=True, exist_ok=True)
    resolved = work_dir / "config.yaml"
    resolved.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    (work_dir / "result.json").unlink(missing_ok=True)
    env = child_env()
    env.setdefault("PYTHONWARNINGS", "ignore")
    env["PYTHONUNBUFFERED"] = "1"  # the log shows where a slow evaluation is
    f = open(work_dir / "heldout.log", "a")  # noqa: SIM115 - closed by HeldoutChild
    try:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "erpd_megatron.eval.heldout",
                "--config",
                str(resolved),
                "--checkpoint",
                str(checkpoint),
                "--out",
                str(work_dir / "result.json"),
            ],
            env=env,
            stdout=f,
            stderr=subprocess.STDOUT,
        )
    except BaseException:
        f.close()
        raise
    return HeldoutChild(proc, checkpoint, work_dir, f)


def run_heldout_child(cfg: Config, checkpoint: Path, work_dir: Path) -> dict[str, float]:
    """Evaluate ``checkpoint`` in a child process (rank 0 only) and wait; returns its metrics
    (see :func:`start_heldout_child` and :meth:`HeldoutChild.wait` for the errors)."""
    return start_heldout_child(cfg, checkpoint, work_dir).wait()


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()
