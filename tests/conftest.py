"""Session fixtures shared by every test folder: the local one-node Slurm cluster.

One definition for the whole suite: a second copy of the session fixture (imported into
another module) would try to take the cluster lock a second time in the same process and wait
for itself (flock locks of two descriptors conflict even within one process)."""

from __future__ import annotations

import os

import pytest

from tests.slurm.cluster import (
    SLURM_DIR,
    ClusterLock,
    cluster_down,
    cluster_is_up,
    cluster_up,
    why_no_local_slurm,
)

LOCK_WAIT_S = 900


@pytest.fixture(scope="session")
def slurm_cluster():
    """A running local cluster (scripts/slurm/local_cluster.sh), brought up for this session and
    taken down at its end; a cluster that was already up is used and left up. Skips with the
    reason where the machine cannot run it (ERPD_REQUIRE_SLURM=1 turns a failed start into an
    error instead of a skip)."""
    reason = why_no_local_slurm()
    if reason:
        pytest.skip(reason)
    lock = ClusterLock()
    if not lock.acquire(LOCK_WAIT_S):
        pytest.skip(f"another pytest session held the local Slurm cluster for {LOCK_WAIT_S} s")
    started = False
    try:
        if not cluster_is_up():
            cluster_down()  # clears what a killed session may have left
            p = cluster_up()
            if p.returncode != 0:
                msg = (
                    f"the local Slurm cluster did not start (logs in {SLURM_DIR}/log):\n"
                    f"{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
                )
                if os.environ.get("ERPD_REQUIRE_SLURM") == "1":
                    pytest.fail(msg)
                pytest.skip(msg)
            started = True
        yield
    finally:
        if started:
            cluster_down()
        lock.release()
