"""Device binding and the CPU-torch-on-a-GPU-node guard of runtime/distributed.py (pure
functions of the environment; the real init path calls them)."""

from __future__ import annotations

import pytest

from erpd_megatron.runtime.distributed import check_cuda_available, local_device_index


@pytest.mark.parametrize(
    "env",
    [
        {"SLURM_GPUS_ON_NODE": "8"},
        {"SLURM_JOB_GPUS": "0,1,2,3"},
        {"SLURM_STEP_GPUS": "2"},
        {"CUDA_VISIBLE_DEVICES": "0"},
        {"CUDA_VISIBLE_DEVICES": "GPU-1a2b"},
    ],
)
def test_gpus_reported_but_cpu_torch_fails_fast(env):
    want = r"reports GPUs .*CUDA build of torch.*make install.*ERPD_ALLOW_CPU=1"
    with pytest.raises(RuntimeError, match=want):
        check_cuda_available(env, cuda_available=False)


@pytest.mark.parametrize(
    "env",
    [
        {},
        {"CUDA_VISIBLE_DEVICES": ""},
        {"CUDA_VISIBLE_DEVICES": "-1"},
        {"SLURM_JOB_GPUS": "NoDevFiles"},
        {"SLURM_GPUS_ON_NODE": "0"},
        {"SLURM_PROCID": "0", "SLURM_NTASKS": "2"},
        {"CUDA_VISIBLE_DEVICES": "0", "ERPD_ALLOW_CPU": "1"},
    ],
)
def test_no_gpu_reported_or_cpu_allowed(env):
    check_cuda_available(env, cuda_available=False)


def test_cuda_available_never_fails():
    check_cuda_available({"CUDA_VISIBLE_DEVICES": "0,1"}, cuda_available=True)


@pytest.mark.parametrize("local_rank, count, want", [(0, 8, 0), (5, 8, 5), (3, 1, 0), (9, 4, 1)])
def test_local_device_index(local_rank, count, want):
    # one GPU per task (each task sees only device 0) and all GPUs per node both work
    assert local_device_index(local_rank, count) == want


def test_no_visible_device_is_an_error():
    with pytest.raises(RuntimeError, match="no CUDA device"):
        local_device_index(0, 0)
