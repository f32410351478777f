"""runtime/comm.py: collectives on the group's device, and no direct torch.distributed
collective anywhere else in the package (NCCL rejects the CPU tensors such calls made)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from erpd_megatron.runtime import comm
from erpd_megatron.runtime.comm import collective_device
from tests.dist import run_gloo

ROOT = Path(__file__).resolve().parents[2]

COLLECTIVES = {
    "all_reduce",
    "all_gather",
    "all_gather_object",
    "all_gather_into_tensor",
    "all_gather_coalesced",
    "reduce",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "broadcast",
    "broadcast_object_list",
    "barrier",
    "monitored_barrier",
    "gather",
    "gather_object",
    "scatter",
    "scatter_object_list",
    "all_to_all",
    "all_to_all_single",
    "send",
    "recv",
    "isend",
    "irecv",
    "batch_isend_irecv",
}

WHITELIST = {
    "erpd_megatron/runtime/comm.py": "the helper itself",
    "erpd_megatron/ops/vocab_parallel.py": "TP collectives on tensors derived from the logits, "
    "which are already on the NCCL group's GPU; pure tensor math that must not import the runtime",
    "erpd_megatron/ops/vocab_parallel_topk.py": "the top-k half of ops/vocab_parallel.py (split "
    "for size), same reason",
}


def direct_collectives(root: Path) -> list[str]:
    """``path:line name`` of every torch.distributed collective called (or imported by name)
    outside the whitelist, in ``root``'s erpd_megatron/ and tools/."""
    found = []
    files = sorted((root / "erpd_megatron").rglob("*.py")) + sorted((root / "tools").rglob("*.py"))
    for path in files:
        rel = path.relative_to(root).as_posix()
        if rel in WHITELIST:
            continue
        tree = ast.parse(path.read_text(), filename=rel)
        aliases = {"torch.distributed"}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                aliases |= {
                    a.asname for a in node.names if a.name == "torch.distributed" and a.asname
                }
            elif isinstance(node, ast.ImportFrom) and node.module == "torch.distributed":
                found += [
                    f"{rel}:{node.lineno} {a.name}" for a in node.names if a.name in COLLECTIVES
                ]
            elif isinstance(node, ast.ImportFrom) and node.module == "torch":
                aliases |= {a.asname or a.name for a in node.names if a.name == "distributed"}
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in COLLECTIVES
                and ast.unparse(node.func.value) in aliases
            ):
                found.append(f"{rel}:{node.lineno} {node.func.attr}")
    return found


def test_no_direct_collectives_outside_comm():
    bad = direct_collectives(ROOT)
    assert not bad, (
        "call these through erpd_megatron.runtime.comm (it puts the tensor on the "
        "group's device) or whitelist them here with a reason:\n" + "\n".join(bad)
    )


def test_scan_finds_a_direct_collective(tmp_path):
    pkg = tmp_path / "erpd_megatron" / "x"
    pkg.mkdir(parents=True)
    (tmp_path / "tools").mkdir()
    (pkg / "a.py").write_text("import torch.distributed as d\nd.all_reduce(t)\n")
    (tmp_path / "tools" / "b.py").write_text(
        "from torch.distributed import barrier\nimport torch\ntorch.distributed.broadcast(t, 0)\n"
    )
    assert direct_collectives(tmp_path) == [
        "erpd_megatron/x/a.py:2 all_reduce",
        "tools/b.py:1 barrier",
        "tools/b.py:3 broadcast",
    ]


@pytest.mark.parametrize(
    "backend, cuda, want",
    [
        ("nccl", 3, "cuda:3"),
        ("cpu:gloo,cuda:nccl", 1, "cuda:1"),
        ("NCCL", 0, "cuda:0"),
        ("gloo", 0, "cpu"),
        ("gloo", None, "cpu"),
        ("mpi", None, "cpu"),
    ],
)
def test_collective_device(backend, cuda, want):
    assert collective_device(backend, cuda) == torch.device(want)


def test_nccl_without_cuda_is_a_clear_error():
    with pytest.raises(RuntimeError, match="needs CUDA tensors.*CUDA build of torch"):
        collective_device("nccl", None)


def test_nccl_group_moves_cpu_tensor_to_the_current_gpu(monkeypatch):
    """The failure class: a CPU tensor handed to an NCCL group. The helper must move it to the
    group's device and bring the result back; here the backend answers "nccl" and the
    all-reduce records the device it was given ("meta" stands in for the GPU on this CPU)."""
    seen = []
    monkeypatch.setattr(comm, "is_distributed", lambda: True)
    monkeypatch.setattr(comm.dist, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(
        comm,
        "collective_device",
        lambda b, c: torch.device("meta") if b == "nccl" else torch.device("cpu"),
    )
    monkeypatch.setattr(
        comm.dist, "all_reduce", lambda t, op=None, group=None: seen.append(t.device)
    )
    with pytest.raises(NotImplementedError):  # a meta tensor has no data to copy back
        comm.all_reduce(torch.ones(2), "max")
    assert seen == [torch.device("meta")]


def test_identity_without_process_group():
    t = torch.tensor([1.0, 2.0])
    assert torch.equal(comm.all_reduce(t), t) and comm.all_reduce(t) is not t
    assert comm.all_reduce_floats([1.5]) == [1.5]
    assert comm.any_rank(True) and not comm.any_rank(False)
    assert [x.tolist() for x in comm.all_gather(t)] == [[1.0, 2.0]]
    assert comm.all_gather_object({"a": 1}) == [{"a": 1}] and comm.broadcast_object("k") == "k"
    comm.barrier()


def _gloo_worker(rank: int, world: int) -> dict:
    t = torch.tensor([float(rank + 1), -float(rank)])
    out = {
        "sum": comm.all_reduce(t).tolist(),
        "max": comm.all_reduce(t, "max").tolist(),
        "min": comm.all_reduce(t, "min").tolist(),
        "input": t.tolist(),
        "floats": comm.all_reduce_floats([0.5 * rank, 1.0]),
        "any": comm.any_rank(rank == 1),
        "none": comm.any_rank(False),
        "gather": [x.tolist() for x in comm.all_gather(torch.tensor([rank * 10]))],
        "objects": comm.all_gather_object({"rank": rank}),
        "bcast": comm.broadcast(torch.tensor([rank + 7]), src=1).tolist(),
        "bobj": comm.broadcast_object({"from": rank}, src=0),
    }
    comm.barrier()
    return out


def test_collectives_on_two_gloo_processes():
    a, b = run_gloo(_gloo_worker, 2, timeout=120)
    for r in (a, b):
        assert r["sum"] == [3.0, -1.0] and r["max"] == [2.0, 0.0] and r["min"] == [1.0, -1.0]
        assert r["floats"] == [0.5, 2.0] and r["any"] is True and r["none"] is False
        assert r["gather"] == [[0], [10]] and r["objects"] == [{"rank": 0}, {"rank": 1}]
        assert r["bcast"] == [8] and r["bobj"] == {"from": 0}
    assert a["input"] == [1.0, -0.0] and b["input"] == [2.0, -1.0]  # inputs left untouched
