"""gloo worker functions for the model tests (module-level so that spawn can import them)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import torch.distributed as dist

from tests.models.hf_fixtures import FAMILIES, VOCAB, hf_logits, rel_err, sample_ids


def make_cfg(mc, tp: int = 1, pp: int = 1, world: int = 1, dist_opt: bool = True):
    """A CPU fp32 Config for ``mc`` at the given layout."""
    from erpd_megatron.config.schema import Config, ParallelConfig, PrecisionConfig

    return Config(
        model=mc,
        parallel=ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                num_nodes=1, gpus_per_node=world, use_distributed_optimizer=dist_opt),
        precision=PrecisionConfig(params_dtype="fp32", transformer_impl="local"),
    )


def gather_tp(logits: torch.Tensor) -> torch.Tensor:
    """All-gather TP-sharded logits along the vocabulary."""
    from megatron.core import parallel_state as ps

    n = ps.get_tensor_model_parallel_world_size()
    if n == 1:
        return logits
    parts = [torch.empty_like(logits) for _ in range(n)]
    dist.all_gather(parts, logits.contiguous(), group=ps.get_tensor_model_parallel_group())
    return torch.cat(parts, dim=-1)


def build_and_load(mc, ckpt: Path, tp: int, pp: int, world: int):
    """init_distributed at (tp, pp), build, load ``ckpt``; return (env, model chunks)."""
    from erpd_megatron.models.builder import build_model
    from erpd_megatron.models.checkpoint import load_checkpoint
    from erpd_megatron.runtime.distributed import init_distributed

    cfg = make_cfg(mc, tp, pp, world)
    env = init_distributed(cfg)
    model = build_model(cfg)
    load_checkpoint(ckpt, model, model_cfg=mc)
    return env, model


def logits_at(model) -> torch.Tensor | None:
    """Full-vocabulary (padded) logits of the sample batch, None off the last stage."""
    from erpd_megatron.models.builder import forward_logits

    out = forward_logits(model, sample_ids())
    return None if out is None else gather_tp(out)


def single_process_worker(rank: int, world: int, root: str) -> dict:
    """World 1: convert every family with the CLI (target TP=2), check logits at TP=1, export back,
    and the clear errors of load_checkpoint."""
    from erpd_megatron.config.loader import ConfigError
    from erpd_megatron.models.checkpoint import load_checkpoint, read_model_config
    from erpd_megatron.models.convert import main as convert_main

    out: dict = {}
    for fam in FAMILIES:
        d = Path(root) / fam
        convert_main(["hf-to-mcore", "--hf-dir", str(d / "hf"), "--out", str(d / "mc"), "--tp", "2"])
        mc = read_model_config(d / "mc")
        _, model = build_and_load(mc, d / "mc", 1, 1, world)
        logits = logits_at(model)
        out[f"{fam}/tp1_err"] = rel_err(logits[..., :VOCAB], hf_logits(d / "hf", sample_ids()))
        out[f"{fam}/tp1_pad_max"] = logits[..., VOCAB:].abs().max().item()
        bad = dataclasses.replace(mc, vocab_size=VOCAB + 1)
        try:
            load_checkpoint(d / "mc", model, model_cfg=bad)
        except ConfigError as e:
            out[f"{fam}/vocab_error"] = str(e)
        convert_main(["mcore-to-hf", "--ckpt", str(d / "mc"), "--out", str(d / "hf_back")])
    return out


def multi_layout_worker(rank: int, world: int, root: str) -> dict:
    """World 2: the single-process conversion loads at TP=2; a TP=2 save reloads at PP=2 and at
    TP=1 (DP=2); the torchrun conversion path (TP=1, PP=2) loads at TP=2."""
    from erpd_megatron.models.checkpoint import read_model_config, save_checkpoint
    from erpd_megatron.models.convert import hf_to_mcore
    from erpd_megatron.runtime.distributed import destroy_distributed

    out: dict = {}
    for fam in FAMILIES:
        d = Path(root) / fam
        ref = hf_logits(d / "hf", sample_ids())
        mc = read_model_config(d / "mc")
        _, model = build_and_load(mc, d / "mc", 2, 1, world)
        tp2 = logits_at(model)
        out[f"{fam}/tp2_err"] = rel_err(tp2[..., :VOCAB], ref)
        save_checkpoint(d / "tp2", model, model_cfg=mc, tokenizer_dir=d / "hf")
        env, model = build_and_load(mc, d / "tp2", 1, 2, world)
        pp2 = logits_at(model)
        if env.is_last_stage:
            out[f"{fam}/pp2_err"] = rel_err(pp2[..., :VOCAB], ref)
            out[f"{fam}/pp2_vs_tp2"] = rel_err(pp2[..., :VOCAB], tp2[..., :VOCAB])
        _, model = build_and_load(mc, d / "tp2", 1, 1, world)
        tp1 = logits_at(model)
        out[f"{fam}/tp1_from_tp2_vs_tp2"] = rel_err(tp1[..., :VOCAB], tp2[..., :VOCAB])
        destroy_distributed()
        hf_to_mcore(d / "hf", d / "mc_pp2_dist", tp=1, pp=2)
        _, model = build_and_load(mc, d / "mc_pp2_dist", 2, 1, world)
        out[f"{fam}/torchrun_conv_tp2_err"] = rel_err(logits_at(model)[..., :VOCAB], ref)
        destroy_distributed()
    return out
