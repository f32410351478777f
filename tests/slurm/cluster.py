"""The local one-node Slurm cluster of the Slurm tests: bring-up, job submission, waiting.

Everything goes through ``scripts/slurm/local_cluster.sh`` (one cluster under
``ERPD_SLURM_DIR``, default /tmp/erpd-slurm) and the ordinary Slurm clients with
``SLURM_CONF`` pointing at its slurm.conf. An exclusive file lock serialises pytest sessions
that run at the same time on this machine (they would share the daemons and the 2 CPUs).
"""

from __future__ import annotations

import fcntl
import os
import platform
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ROOT / "scripts/slurm"
LOCAL_CLUSTER = SCRIPTS / "local_cluster.sh"
SLURM_DIR = Path(os.environ.get("ERPD_SLURM_DIR", "/tmp/erpd-slurm"))
SLURM_CONF = SLURM_DIR / "slurm.conf"
LOCK = Path(str(SLURM_DIR) + ".lock")


def why_no_local_slurm() -> str | None:
    """Why this machine cannot host the local cluster, or None when it can try."""
    if platform.system() != "Linux":
        return "the local Slurm cluster needs Linux"
    if os.geteuid() != 0:
        return "the local Slurm cluster runs its daemons as root (run the Slurm tests as root)"
    have = all(shutil.which(b) for b in ("munged", "slurmctld", "slurmd", "sbatch"))
    if not have and not (Path("/etc/debian_version").exists() and shutil.which("apt-get")):
        return "Slurm is not installed and this is not Debian (apt-get install slurm-wlm munge)"
    return None


def slurm_env(**extra: str) -> dict[str, str]:
    """This process's environment without inherited job variables, with SLURM_CONF set."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
    # GPUS_PER_NODE=0: the local node has no GPUs (the training scripts refuse a GPU-less job
    # otherwise: one task per GPU)
    env.update(
        SLURM_CONF=str(SLURM_CONF), PYTHONWARNINGS="ignore", ERPD_ROOT=str(ROOT), GPUS_PER_NODE="0"
    )
    env.update(extra)
    return env


def run(
    cmd: list[str], *, timeout: float = 60, check: bool = True, **kw
) -> subprocess.CompletedProcess:
    """Run a command with the cluster's environment; failures carry its output."""
    kw.setdefault("env", slurm_env())
    p = subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, cwd=kw.pop("cwd", ROOT), **kw
    )
    if check and p.returncode != 0:
        raise AssertionError(
            f"{' '.join(map(str, cmd))} exited {p.returncode}\n{p.stdout}\n{p.stderr}"
        )
    return p


class ClusterLock:
    """An exclusive lock on the local cluster for one pytest session."""

    def __init__(self) -> None:
        self.fd: int | None = None

    def acquire(self, timeout: float) -> bool:
        self.fd = os.open(LOCK, os.O_CREAT | os.O_RDWR, 0o644)
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                if time.monotonic() > deadline:
                    return False
                time.sleep(1)

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def cluster_is_up() -> bool:
    """Whether local_cluster.sh reports all daemons running and the node usable."""
    return run(["bash", str(LOCAL_CLUSTER), "status"], check=False, timeout=60).returncode == 0


def cluster_up() -> subprocess.CompletedProcess:
    """``local_cluster.sh up`` (installs Slurm with apt-get when missing)."""
    return run(["bash", str(LOCAL_CLUSTER), "up"], check=False, timeout=900)


def cluster_down() -> subprocess.CompletedProcess:
    """``local_cluster.sh down``, keeping the daemons' logs."""
    return run(
        ["bash", str(LOCAL_CLUSTER), "down"],
        check=False,
        timeout=180,
        env=slurm_env(ERPD_SLURM_KEEP_LOGS="1"),
    )


@dataclass
class Job:
    """A submitted batch job and where its log goes."""

    id: str
    log: Path

    def info(self) -> dict[str, str]:
        """``scontrol show job`` as a dict ({} once Slurm forgot the job)."""
        p = run(["scontrol", "show", "job", "-o", self.id], check=False)
        if p.returncode != 0:
            return {}
        return dict(re.findall(r"(\w+)=(\S*)", p.stdout))

    def log_text(self) -> str:
        """The job's output so far (all its runs: the scripts append)."""
        return (
            self.log.read_text(errors="replace") if self.log.exists() else f"(no log at {self.log})"
        )

    def describe(self) -> str:
        """State and log tail, for failure messages."""
        info = self.info()
        state = {k: info.get(k) for k in ("JobState", "Reason", "ExitCode", "Restarts", "RunTime")}
        return f"job {self.id} {state}\n--- {self.log} (tail) ---\n{self.log_text()[-6000:]}"

    def wait(self, timeout: float, *, states: tuple[str, ...] = ("COMPLETED",)) -> dict[str, str]:
        """Wait until the job ends; assert it ended in one of ``states``. On timeout the job is
        cancelled and the failure shows its log."""
        deadline = time.monotonic() + timeout
        final = {
            "COMPLETED",
            "FAILED",
            "CANCELLED",
            "TIMEOUT",
            "NODE_FAIL",
            "OUT_OF_MEMORY",
            "PREEMPTED",
            "BOOT_FAIL",
            "DEADLINE",
        }
        while time.monotonic() < deadline:
            info = self.info()
            if info.get("JobState") in final:
                assert info["JobState"] in states, (
                    f"ended {info['JobState']}, expected {states}\n{self.describe()}"
                )
                return info
            time.sleep(0.5)
        msg = f"not done after {timeout:.0f} s\n{self.describe()}"
        run(["scancel", self.id], check=False)
        raise AssertionError(msg)


def sbatch(
    script: str | Path,
    args: list[str],
    *,
    log_dir: Path,
    sbatch_args: list[str] | None = None,
    env: dict[str, str] | None = None,
) -> Job:
    """Submit ``scripts/slurm/<script>`` (or a script path) from the repository root, with the
    log in ``log_dir/<job name>-<job id>.out``."""
    path = script if isinstance(script, Path) else SCRIPTS / script
    log_dir.mkdir(parents=True, exist_ok=True)
    m = re.search(r"^#SBATCH --job-name=(\S+)", path.read_text(), re.M)
    name = m.group(1) if m else path.name
    cmd = [
        "sbatch",
        "--parsable",
        f"--job-name={name}",
        f"--output={log_dir}/%x-%j.out",
        *(sbatch_args or []),
        str(path),
        *args,
    ]
    p = run(cmd, env=env or slurm_env())
    job_id = p.stdout.strip().split(";")[0]
    return Job(job_id, log_dir / f"{name}-{job_id}.out")


CPU_JOB = ["--ntasks-per-node=2", "--time=00:15:00"]
"""sbatch flags for a 2-task job on the local 2-CPU node (GPUS_PER_NODE=0 is in slurm_env)."""
