"""Expert parallelism on CPU: megatron-core's MoE layers at EP=2 over two gloo processes.

Without the CPU harness's MoE fixes the router raises NameError (``te_general_gemm``),
the alltoall dispatcher's split sizes are tensors gloo rejects, and its
``record_event().synchronize()`` hits None. With them, EP=2 gives the same logits and
gradients as the same weights at EP=1, for both dispatchers.
"""

from __future__ import annotations

from tests.dist import run_gloo
from tests.models.moe_workers import ep2_matches_ep1


def test_ep2_equals_ep1_for_both_dispatchers():
    res = run_gloo(ep2_matches_ep1, 2, ["alltoall", "allgather"], timeout=600)
    for r in (d for rank in res for d in rank.values()):
        assert r["scale"] > 0
        assert r["logits"] <= 1e-5 * r["scale"], r
        assert r["grads"] <= 1e-6, r
