"""gloo worker for the MoE conversion tests: Qwen3-MoE / Qwen2-MoE HF -> mcore with the CLI
under 2 ranks at TP=2 x EP=2 (the torchrun path: each rank converts its TP slice of its own
experts), logits against transformers at (TP, EP) = (1, 2), (1, 1), (2, 1), (2, 2) from that
one checkpoint, and the export back to HF."""

from __future__ import annotations

from pathlib import Path

from tests.models.hf_fixtures import MOE_FAMILIES, VOCAB, hf_logits, rel_err, sample_ids

LAYOUTS = ((1, 2), (1, 1), (2, 1), (2, 2))


def make_moe_cfg(mc, *, tp: int = 1, ep: int = 1, world: int = 2):
    """A CPU fp32 Config for ``mc`` at TP=tp, EP=ep (alltoall dispatcher)."""
    from erpd_megatron.config.schema import Config, ParallelConfig, PrecisionConfig

    return Config(
        model=mc,
        parallel=ParallelConfig(
            tensor_model_parallel_size=tp,
            expert_model_parallel_size=ep,
            num_nodes=1,
            gpus_per_node=world,
        ),
        precision=PrecisionConfig(params_dtype="fp32", transformer_impl="local"),
    )


def _logits_and_experts(mc, ckpt: Path, tp: int, ep: int, world: int):
    """Logits of the sample batch (full real vocabulary) and the number of experts this rank
    holds in layer 0."""
    from erpd_megatron.models.builder import build_model, forward_logits, unwrap_model
    from erpd_megatron.models.checkpoint import load_checkpoint
    from erpd_megatron.runtime.distributed import init_distributed
    from tests.models.workers import gather_tp

    cfg = make_moe_cfg(mc, tp=tp, ep=ep, world=world)
    init_distributed(cfg)
    model = build_model(cfg)
    load_checkpoint(ckpt, model, model_cfg=mc)
    local = len(unwrap_model(model[0]).decoder.layers[0].mlp.experts.local_experts)
    return gather_tp(forward_logits(model, sample_ids()))[..., :VOCAB], local


def moe_conversion_worker(rank: int, world: int, root: str) -> dict:
    """Per family: ``{family/tp{t}_ep{e}_err, family/tp{t}_ep{e}_experts}``; exports ``hf_back``."""
    from erpd_megatron.models.checkpoint import read_model_config
    from erpd_megatron.models.convert import main as convert_main

    out: dict = {}
    for fam in MOE_FAMILIES:
        d = Path(root) / fam
        ref = hf_logits(d / "hf", sample_ids())
        convert_main(
            [
                "hf-to-mcore",
                "--hf-dir",
                str(d / "hf"),
                "--out",
                str(d / "mc"),
                "--tp",
                "2",
                "--ep",
                "2",
            ]
        )
        mc = read_model_config(d / "mc")
        for tp, ep in LAYOUTS:
            logits, local = _logits_and_experts(mc, d / "mc", tp, ep, world)
            out[f"{fam}/tp{tp}_ep{ep}_err"] = rel_err(logits, ref)
            out[f"{fam}/tp{tp}_ep{ep}_experts"] = local
        convert_main(["mcore-to-hf", "--ckpt", str(d / "mc"), "--out", str(d / "hf_back")])
    return out
