"""torch.distributed + megatron ``parallel_state`` initialisation: the ONE place that does it.

:func:`init_distributed` reads the launcher's environment (torchrun, Slurm ``srun``, or a
plain single process), initialises ``torch.distributed`` (NCCL on GPU, gloo on CPU; an
existing process group is reused), installs the CPU harness when there is no GPU, checks
the parallel layout against the real world size, calls megatron's
``initialize_model_parallel`` and seeds every RNG. :func:`destroy_distributed` undoes it.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import socket
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from erpd_megatron.config.loader import ConfigError
from erpd_megatron.config.schema import Config
from erpd_megatron.config.validate import validate_layout
from erpd_megatron.utils.log import get_logger

log = get_logger(__name__)

_OWNS_PROCESS_GROUP = False


@dataclass(frozen=True)
class LaunchEnv:
    """Where this process sits, as the launcher described it (before any init)."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str
    """"torchrun", "slurm" or "single"."""


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the run, after :func:`init_distributed`."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str
    tp_rank: int
    tp_size: int
    pp_rank: int
    pp_size: int
    dp_rank: int
    dp_size: int
    launcher: str
    cpu_harness: bool
    """True when running on CPU through :mod:`erpd_megatron.runtime.cpu_harness`."""

    @property
    def is_main(self) -> bool:
        """Global rank 0."""
        return self.rank == 0

    @property
    def is_first_stage(self) -> bool:
        """First pipeline stage (holds the embedding)."""
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        """Last pipeline stage (holds the output layer, produces logits)."""
        return self.pp_rank == self.pp_size - 1


def free_port() -> int:
    """A free TCP port on this host."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _split_top_level(text: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    if cur:
        parts.append(cur)
    return parts


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand a Slurm nodelist (``gpu[01-03,7],login1``) into host names, in order."""
    hosts: list[str] = []
    for item in _split_top_level(nodelist.strip()):
        m = re.match(r"^([^\[]*)\[([^\]]+)\](.*)$", item)
        if not m:
            hosts.append(item)
            continue
        prefix, ranges, suffix = m.groups()
        for rng in ranges.split(","):
            lo, _, hi = rng.partition("-")
            width = len(lo)
            for i in range(int(lo), int(hi or lo) + 1):
                for tail in expand_nodelist(suffix) if "[" in suffix else [suffix]:
                    hosts.append(f"{prefix}{i:0{width}d}{tail}")
    return hosts


def first_slurm_host(nodelist: str) -> str:
    """First host of a Slurm nodelist: ``scontrol show hostnames`` when present, else a parse."""
    if shutil.which("scontrol"):
        try:
            out = subprocess.run(
                ["scontrol", "show", "hostnames", nodelist],
                capture_output=True,
                text=True,
                timeout=30,
                check=True,
            ).stdout.split()
            if out:
                return out[0]
        except (subprocess.SubprocessError, OSError):
            pass
    return expand_nodelist(nodelist)[0]


def parse_launch_env(env: Optional[Mapping[str, str]] = None) -> LaunchEnv:
    """Read rank / world size / master address from a launcher's environment variables.

    torchrun (``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``/``MASTER_PORT``) wins
    over Slurm (``SLURM_PROCID``/``SLURM_NTASKS``/``SLURM_LOCALID``); without either it is a
    single process on a free localhost port.

    Slurm's master: ``MASTER_ADDR``/``MASTER_PORT`` only when they were set for this job
    (scripts/slurm/common.sh exports them with ``ERPD_MASTER_JOB=$SLURM_JOB_ID``); otherwise
    they were inherited from the submit shell (sbatch exports its whole environment by
    default) and may name another host: they are ignored. ``ERPD_MASTER_ADDR`` /
    ``ERPD_MASTER_PORT`` are explicit overrides. Else the first host of
    ``SLURM_JOB_NODELIST`` and port ``20000 + (job_id + 7919 * restart) % 10000``: the same
    on every node, and below Linux's default ephemeral range (32768-60999) whose ports any
    outgoing connection may hold (the scripts also read the node's actual range).
    """
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        return LaunchEnv(
            rank=int(env["RANK"]),
            world_size=int(env["WORLD_SIZE"]),
            local_rank=int(env.get("LOCAL_RANK", "0")),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", "29500")),
            launcher="torchrun",
        )
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        job = env.get("SLURM_JOB_ID", "")
        ours = bool(job) and env.get("ERPD_MASTER_JOB") == job
        addr = env.get("ERPD_MASTER_ADDR") or (env.get("MASTER_ADDR") if ours else None)
        port_s = env.get("ERPD_MASTER_PORT") or (env.get("MASTER_PORT") if ours else None)
        if (
            not ours
            and ("MASTER_ADDR" in env or "MASTER_PORT" in env)
            and env["SLURM_PROCID"] == "0"
        ):
            log.warning(
                "ignoring MASTER_ADDR=%s MASTER_PORT=%s: not set for Slurm job %s (inherited from "
                "the submit shell?); set ERPD_MASTER_ADDR / ERPD_MASTER_PORT to choose the master",
                env.get("MASTER_ADDR"),
                env.get("MASTER_PORT"),
                job or "?",
            )
        if not addr:
            if not nodelist:
                raise RuntimeError(
                    "Slurm launch without SLURM_JOB_NODELIST or ERPD_MASTER_ADDR: cannot find "
                    "the master"
                )
            addr = first_slurm_host(nodelist)
        if port_s:
            port = int(port_s)
        else:
            restart = int(env.get("SLURM_RESTART_COUNT", "0") or 0)
            port = 20000 + (int(job) + 7919 * restart) % 10000 if job.isdigit() else 29500
        return LaunchEnv(
            rank=int(env["SLURM_PROCID"]),
            world_size=int(env["SLURM_NTASKS"]),
            local_rank=int(env.get("SLURM_LOCALID", "0")),
            master_addr=addr,
            master_port=port,
            launcher="slurm",
        )
    return LaunchEnv(
        rank=0,
        world_size=1,
        local_rank=0,
        master_addr="127.0.0.1",
        master_port=free_port(),
        launcher="single",
    )


ALLOW_CPU_ENV = "ERPD_ALLOW_CPU"
"""Set to 1 to run on CPU (gloo) although the environment reports GPUs."""


_NO_GPU_VALUES = ("", "-1", "nodevfiles", "none", "n/a")
"""Values by which CUDA_VISIBLE_DEVICES / Slurm say "no GPU" (an empty variable, CUDA's -1,
Slurm's NoDevFiles)."""


def _reported_gpus(env: Mapping[str, str]) -> Optional[str]:
    """The first launcher/driver variable that says this process was given GPUs, as
    ``NAME=value``; None when none does."""
    for name in ("SLURM_GPUS_ON_NODE", "SLURM_JOB_GPUS", "SLURM_STEP_GPUS", "CUDA_VISIBLE_DEVICES"):
        value = env.get(name, "").strip()
        if value.lower() in _NO_GPU_VALUES or (name == "SLURM_GPUS_ON_NODE" and value == "0"):
            continue
        return f"{name}={value}"
    return None


def check_cuda_available(env: Mapping[str, str], cuda_available: bool) -> None:
    """Fail fast when the environment reports GPUs but torch cannot use CUDA (a CPU build
    of torch in the venv, or a driver problem): otherwise the job would silently train on
    CPU through the gloo harness. ``ERPD_ALLOW_CPU=1`` in ``env`` accepts the CPU run."""
    if cuda_available or env.get(ALLOW_CPU_ENV, "").strip().lower() in ("1", "true", "yes"):
        return
    reported = _reported_gpus(env)
    if reported is None:
        return
    raise RuntimeError(
        f"the environment reports GPUs ({reported}) but torch {torch.__version__} has no CUDA "
        f"(torch.cuda.is_available() is False, torch.version.cuda={torch.version.cuda}): this "
        "would train on CPU. Install the CUDA build of torch in this environment (`make install` "
        "on the GPU node), or check the driver with nvidia-smi; to run on CPU on purpose, set "
        f"{ALLOW_CPU_ENV}=1."
    )


def local_device_index(local_rank: int, device_count: int) -> int:
    """The CUDA device of a process with ``local_rank`` among ``device_count`` visible GPUs:
    ``local_rank % device_count``, so that one GPU per task (Slurm ``--gpus-per-task``, where
    each task sees only device 0) and all GPUs per node (device = local rank) both work."""
    if device_count < 1:
        raise RuntimeError("no CUDA device visible to this process")
    return local_rank % device_count


def _init_process_group(launch: LaunchEnv, timeout_minutes: int) -> str:
    global _OWNS_PROCESS_GROUP
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    os.environ["MASTER_ADDR"] = launch.master_addr
    os.environ["MASTER_PORT"] = str(launch.master_port)
    if torch.cuda.is_available():
        torch.cuda.set_device(local_device_index(launch.local_rank, torch.cuda.device_count()))
    dist.init_process_group(
        backend=backend,
        rank=launch.rank,
        world_size=launch.world_size,
        timeout=timedelta(minutes=timeout_minutes),
    )
    _OWNS_PROCESS_GROUP = True
    log.info(
        "torch.distributed up: %s backend, world %d (%s launch, master %s:%d)",
        backend,
        launch.world_size,
        launch.launcher,
        launch.master_addr,
        launch.master_port,
    )
    return backend


def seed_everything(seed: int) -> None:
    """Seed python, numpy, torch and megatron's model-parallel RNG tracker.

    Pipeline stages get different seeds (``seed + 100 * pp_rank``), TP ranks different
    tracker streams (megatron's convention); needs ``initialize_model_parallel`` first.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    seed = seed + 100 * ps.get_pipeline_model_parallel_rank()
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def init_distributed(
    cfg: Config,
    *,
    world_size_hint: Optional[int] = None,
    timeout_minutes: Optional[int] = None,
    env: Optional[Mapping[str, str]] = None,
) -> DistEnv:
    """Initialise torch.distributed and megatron's model-parallel groups for ``cfg.parallel``.

    ``world_size_hint``: the world size the caller expects; a different real world size is
    an error. Re-entrant: an existing process group (e.g. tests' ``run_gloo``) is reused,
    and an existing megatron initialisation with the same TP/PP is kept (one with
    different sizes is rebuilt). The CPU harness is installed when no GPU is present.
    """
    from erpd_megatron.config.validate import check_transformer_engine_importable

    # A broken TE kills `import megatron.core` with a raw error: check first.
    check_transformer_engine_importable()
    from megatron.core import parallel_state as ps

    check_cuda_available(os.environ if env is None else env, torch.cuda.is_available())
    harness = not torch.cuda.is_available()
    if harness:
        from erpd_megatron.runtime.cpu_harness import install_cpu_harness

        install_cpu_harness()
    launch = parse_launch_env(env)
    timeout_minutes = (
        timeout_minutes or cfg.parallel.distributed_timeout_minutes
    )  # None: the config's
    if dist.is_initialized():
        backend = dist.get_backend()
        rank, world = dist.get_rank(), dist.get_world_size()
        local_rank = launch.local_rank if launch.world_size == world else rank
        if torch.cuda.is_available():
            torch.cuda.set_device(local_device_index(local_rank, torch.cuda.device_count()))
    else:
        backend = _init_process_group(launch, timeout_minutes)
        rank, world, local_rank = launch.rank, launch.world_size, launch.local_rank
    if world_size_hint is not None and world_size_hint != world:
        raise ConfigError(
            f"expected world size {world_size_hint} but the launcher started {world} processes"
        )
    validate_layout(cfg.model, cfg.parallel, world)
    tp, pp = cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size
    ep = cfg.parallel.expert_model_parallel_size
    if ps.model_parallel_is_initialized():
        same = (
            ps.get_tensor_model_parallel_world_size(),
            ps.get_pipeline_model_parallel_world_size(),
            ps.get_expert_model_parallel_world_size(),
            ps.get_expert_tensor_parallel_world_size(),
            ps.get_virtual_pipeline_model_parallel_world_size(),
            ps.get_context_parallel_world_size(),
        ) == (
            tp,
            pp,
            ep,
            cfg.parallel.expert_tensor_parallel_size,
            cfg.parallel.virtual_pipeline_model_parallel_size,
            cfg.parallel.context_parallel_size,
        )
        if not same:
            ps.destroy_model_parallel()
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(
            tensor_model_parallel_size=tp,
            pipeline_model_parallel_size=pp,
            expert_model_parallel_size=ep,
            distributed_timeout_minutes=timeout_minutes,
            expert_tensor_parallel_size=cfg.parallel.expert_tensor_parallel_size,
            virtual_pipeline_model_parallel_size=cfg.parallel.virtual_pipeline_model_parallel_size,
            context_parallel_size=cfg.parallel.context_parallel_size,
        )
    seed_everything(cfg.seed)
    device = (
        torch.device("cuda", torch.cuda.current_device()) if not harness else torch.device("cpu")
    )
    out = DistEnv(
        rank=rank,
        world_size=world,
        local_rank=local_rank,
        device=device,
        backend=backend,
        tp_rank=ps.get_tensor_model_parallel_rank(),
        tp_size=tp,
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        pp_size=pp,
        dp_rank=ps.get_data_parallel_rank(),
        dp_size=ps.get_data_parallel_world_size(),
        launcher=launch.launcher if launch.world_size == world else "external",
        cpu_harness=harness,
    )
    log.info("parallel layout: TP=%d PP=%d DP=%d on %s", tp, pp, out.dp_size, device)
    return out


def destroy_distributed(*, destroy_process_group: Optional[bool] = None) -> None:
    """Tear down megatron's groups and, by default only if :func:`init_distributed` created it,
    the torch.distributed process group."""
    global _OWNS_PROCESS_GROUP
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if destroy_process_group is None:
        destroy_process_group = _OWNS_PROCESS_GROUP
    if destroy_process_group and dist.is_initialized():
        dist.destroy_process_group()
        _OWNS_PROCESS_GROUP = False


def barrier() -> None:
    """A world barrier on the group's device when distributed is up, else nothing."""
    from erpd_megatron.runtime import comm

    comm.barrier()
