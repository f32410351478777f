"""Sequence parallelism on CPU: TP=2 with SP over two gloo processes equals TP=1.

Without the harness's SP support megatron's torch norm asserts ``not sequence_parallel``;
with it the norms' parameters are marked ``sequence_parallel`` as Transformer Engine marks
them, and their gradients summed over TP give exactly the TP=1 gradients.
"""

from __future__ import annotations

from tests.dist import run_gloo
from tests.models.sp_workers import tp2_sp_matches_tp1


def test_tp2_sequence_parallel_equals_tp1():
    for r in run_gloo(tp2_sp_matches_tp1, 2, timeout=600):
        assert r["scale"] > 0
        assert r["logits"] <= 1e-6 * max(1.0, r["scale"]), r
        assert r["grads"] <= 1e-7, r
        # every norm, qk-norms included, is marked for the TP gradient sum
        assert any("final_layernorm" in n for n in r["marked"]), r["marked"]
        assert any("pre_mlp_layernorm" in n for n in r["marked"]), r["marked"]
