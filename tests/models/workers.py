"""gloo worker functions for the model tests (module-level so that spawn can import them)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
import torch.distributed as dist

from tests.models.hf_fixtures import FAMILIES, VOCAB, hf_logits, rel_err, sample_ids


def make_cfg(mc, tp: int = 1, pp: int = 1, world: int = 1, dist_opt: bool = True):
    """A CPU fp32 Config for ``mc`` at the given layout."""
    from erpd_megatron.config.schema import Config, ParallelConfig, PrecisionConfig

    return Config(
        model=mc,
        parallel=ParallelConfig(
            tensor_model_parallel_size=tp,
            pipeline_model_parallel_size=pp,
            num_nodes=1,
            gpus_per_node=world,
            use_distributed_optimizer=dist_opt,
        ),
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
        convert_main(
            ["hf-to-mcore", "--hf-dir", str(d / "hf"), "--out", str(d / "mc"), "--tp", "2"]
        )
        mc = read_model_config(d / "mc")
        _, model = build_and_load(mc, d / "mc", 1, 1, world)
        logits = logits_at(model)
        out[f"{fam}/tp1_err"] = rel_err(logits[..., :VOCAB], hf_logits(d / "hf", sample_ids()))
        out[f"{fam}/tp1_pad_max"] = logits[..., VOCAB:].abs().max().item()
        # RoPE frequencies (llama3 scaling barely moves tiny-model logits, so compare directly)
        from transformers import AutoModelForCausalLM

        from erpd_megatron.models.builder import unwrap_model

        hf_freq = AutoModelForCausalLM.from_pretrained(d / "hf").model.rotary_emb.inv_freq
        out[f"{fam}/inv_freq_err"] = rel_err(
            unwrap_model(model[0]).rotary_pos_emb.inv_freq, hf_freq
        )
        out[f"{fam}/inv_freq_scaled"] = bool(
            hf_freq[-1] < 1 / mc.rope_theta ** ((len(hf_freq) - 1) / len(hf_freq)) / 2
        )
        bad = dataclasses.replace(mc, vocab_size=VOCAB + 1)
        try:
            load_checkpoint(d / "mc", model, model_cfg=bad)
        except ConfigError as e:
            out[f"{fam}/vocab_error"] = str(e)
        convert_main(["mcore-to-hf", "--ckpt", str(d / "mc"), "--out", str(d / "hf_back")])
    out["no_extra_state_err"] = _load_without_extra_state(Path(root) / "qwen3")
    return out


def _load_without_extra_state(d: Path) -> float:
    """A checkpoint without any module ``_extra_state`` objects (as a CPU conversion looks to a
    Transformer Engine model) still loads strictly; returns the logits error vs HF."""
    import json
    import shutil

    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    from erpd_megatron.models.builder import unwrap_model
    from erpd_megatron.models.checkpoint import read_model_config

    mc = read_model_config(d / "mc")
    _, model = build_and_load(mc, d / "mc", 1, 1, 1)
    sd = {
        k: v
        for k, v in unwrap_model(model[0]).sharded_state_dict().items()
        if not isinstance(v, ShardedObject)
    }
    (d / "no_extra").mkdir()
    dist_checkpointing.save({"model": sd}, str(d / "no_extra"))
    shutil.copy(d / "mc" / "model_config.yaml", d / "no_extra" / "model_config.yaml")
    # the metadata without the source's file digests: these files were written here, by
    # dist_checkpointing directly (as a checkpoint from before the digests, loaded unchecked)
    meta = json.loads((d / "mc" / "checkpoint.json").read_text())
    meta.pop("files", None)
    (d / "no_extra" / "checkpoint.json").write_text(json.dumps(meta))
    _, model = build_and_load(mc, d / "no_extra", 1, 1, 1)
    return rel_err(logits_at(model)[..., :VOCAB], hf_logits(d / "hf", sample_ids()))


def multi_layout_worker(rank: int, world: int, root: str) -> dict:
    """World 2: the single-process conversion loads at TP=2; a TP=2 save reloads at PP=2 and at
    TP=1 (DP=2); the torchrun conversion path (TP=1, PP=2) loads at TP=2."""
    from erpd_megatron.models.checkpoint import read_model_config, save_checkpoint
    from erpd_megatron.models.convert import hf_to_mcore, mcore_to_hf
    from erpd_megatron.runtime.distributed import destroy_distributed

    out: dict = {}
    for fam in FAMILIES:
        d = Path(root) / fam
        ref = hf_logits(d / "hf", sample_ids())
        mc = read_model_config(d / "mc")
        _, model = build_and_load(mc, d / "mc", 2, 1, world)
        tp2 = logits_at(model)
        out[f"{fam}/tp2_err"] = rel_err(tp2[..., :VOCAB], ref)
        save_checkpoint(
            d / "tp2",
            model,
            model_cfg=mc,
            tokenizer_dir=d / "hf",
            hf_config=json.loads((d / "hf" / "config.json").read_text()),
        )
        env, model = build_and_load(mc, d / "tp2", 1, 2, world)
        pp2 = logits_at(model)
        if env.is_last_stage:
            out[f"{fam}/pp2_err"] = rel_err(pp2[..., :VOCAB], ref)
            out[f"{fam}/pp2_vs_tp2"] = rel_err(pp2[..., :VOCAB], tp2[..., :VOCAB])
        _, model = build_and_load(mc, d / "tp2", 1, 1, world)
        tp1 = logits_at(model)
        out[f"{fam}/tp1_from_tp2_vs_tp2"] = rel_err(tp1[..., :VOCAB], tp2[..., :VOCAB])
        destroy_distributed()
        mcore_to_hf(d / "tp2", d / "hf_from_tp2")  # export with 2 ranks (DP=2, rank 0 writes)
        hf_to_mcore(d / "hf", d / "mc_pp2_dist", tp=1, pp=2)
        _, model = build_and_load(mc, d / "mc_pp2_dist", 2, 1, world)
        out[f"{fam}/torchrun_conv_tp2_err"] = rel_err(logits_at(model)[..., :VOCAB], ref)
        destroy_distributed()
    return out


def _train_setup(mc, tp: int, world: int, dist_opt: bool = True):
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    from erpd_megatron.models.builder import build_model, get_config
    from erpd_megatron.runtime.distributed import init_distributed

    cfg = make_cfg(mc, tp, 1, world, dist_opt)
    init_distributed(cfg)
    model = build_model(cfg, wrap_ddp=True)
    opt = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam",
            lr=1e-2,
            min_lr=1e-3,
            weight_decay=0.01,
            bf16=False,
            params_dtype=torch.float32,
            use_distributed_optimizer=dist_opt,
            clip_grad=1.0,
        ),
        model,
    )
    sched = OptimizerParamScheduler(
        opt,
        init_lr=0.0,
        max_lr=1e-2,
        min_lr=1e-3,
        lr_warmup_steps=2,
        lr_decay_steps=10,
        lr_decay_style="cosine",
        start_wd=0.01,
        end_wd=0.01,
        wd_incr_steps=10,
        wd_incr_style="constant",
    )
    get_config(model[0]).grad_scale_func = opt.scale_loss
    return model, opt, sched


def _train_step(model, opt, sched) -> None:
    """One optimizer step on a fixed batch.

    The loss is layout independent (the padded vocabulary is excluded).
    """
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from erpd_megatron.config.validate import padded_vocab_size

    ids = sample_ids(seed=3)
    b, s = ids.shape
    tp = ps.get_tensor_model_parallel_world_size()

    def step(it, m):
        x = next(it)
        logits = m(x, torch.arange(s).expand(b, s), None)
        local = padded_vocab_size(model_cfg_of(m), tp) // tp  # as Engine.vocab_shard
        start = ps.get_tensor_model_parallel_rank() * local
        end = start + local
        real = (torch.arange(start, end) < VOCAB).float()

        def loss_func(out):
            loss = (out.float().pow(2) * real).sum() / (b * s * VOCAB)
            return loss, {"loss": loss.detach()}

        return logits, loss_func

    for c in model:
        c.zero_grad_buffer()
    opt.zero_grad()
    get_forward_backward_func()(
        forward_step_func=step,
        data_iterator=iter([ids]),
        model=model,
        num_microbatches=1,
        seq_length=s,
        micro_batch_size=b,
        forward_only=False,
    )
    ok, _, _ = opt.step()
    assert ok
    sched.step(increment=1)


_MC = None


def model_cfg_of(_m):
    """The ModelConfig of the optimizer tests (set by the worker)."""
    return _MC


def _full_hf(model, mc) -> dict:
    """The model's weights as a full HF state dict (gathered over TP), on every rank."""
    from megatron.core import parallel_state as ps

    from erpd_megatron.models.checkpoint import state_dict_on_cpu
    from erpd_megatron.models.hf_maps import megatron_to_hf, merge_ranks, state_dict_tensors

    local = state_dict_tensors(state_dict_on_cpu(model))
    tp = ps.get_tensor_model_parallel_world_size()
    parts = [None] * tp
    dist.all_gather_object(parts, local, group=ps.get_tensor_model_parallel_group())
    return megatron_to_hf(merge_ranks({(t, 0): parts[t] for t in range(tp)}, mc, tp=tp, pp=1), mc)


def optimizer_worker(rank: int, world: int, root: str) -> dict:
    """DP=2 distributed optimizer: train, save with optimizer + scheduler, reload at the same
    layout (next step bit-identical), and at TP=2 from a fully_reshardable save."""
    global _MC
    from erpd_megatron.config.schema import ModelConfig
    from erpd_megatron.models.checkpoint import load_checkpoint, save_checkpoint
    from erpd_megatron.runtime.distributed import destroy_distributed

    _MC = mc = ModelConfig(
        family="qwen2",
        num_layers=2,
        hidden_size=64,
        ffn_hidden_size=128,
        num_attention_heads=4,
        num_query_groups=2,
        vocab_size=VOCAB,
        add_qkv_bias=True,
        tie_word_embeddings=True,
    )
    out: dict = {}
    model, opt, sched = _train_setup(mc, 1, world)
    for _ in range(3):
        _train_step(model, opt, sched)
    save_checkpoint(
        Path(root) / "dp",
        model,
        optimizer=opt,
        opt_param_scheduler=sched,
        extra={"step": 3},
        model_cfg=mc,
    )
    save_checkpoint(
        Path(root) / "full",
        model,
        optimizer=opt,
        opt_param_scheduler=sched,
        extra={"step": 3},
        model_cfg=mc,
        optimizer_sharding="fully_reshardable",
    )
    saved = _full_hf(model, mc)
    _train_step(model, opt, sched)
    ref_next = _full_hf(model, mc)
    ref_lr = opt.param_groups[0]["lr"]

    for name in ("dp", "full"):
        model2, opt2, sched2 = _train_setup(mc, 1, world)
        extra = load_checkpoint(
            Path(root) / name, model2, optimizer=opt2, opt_param_scheduler=sched2, model_cfg=mc
        )
        out[f"{name}/extra"] = extra
        loaded = _full_hf(model2, mc)
        out[f"{name}/params_equal"] = all(torch.equal(saved[k], loaded[k]) for k in saved)
        _train_step(model2, opt2, sched2)
        nxt = _full_hf(model2, mc)
        out[f"{name}/next_step_equal"] = all(torch.equal(ref_next[k], nxt[k]) for k in ref_next)
        out[f"{name}/lr_equal"] = opt2.param_groups[0]["lr"] == ref_lr
    destroy_distributed()

    model3, opt3, sched3 = _train_setup(mc, 2, world)  # TP=2, DP=1
    try:
        load_checkpoint(Path(root) / "dp", model3, optimizer=opt3, opt_param_scheduler=sched3)
    except ValueError as e:
        out["tp2/dp_reshardable_error"] = str(e)
    load_checkpoint(Path(root) / "full", model3, optimizer=opt3, opt_param_scheduler=sched3)
    loaded = _full_hf(model3, mc)
    out["tp2/params_equal"] = all(torch.equal(saved[k], loaded[k]) for k in saved)
    _train_step(model3, opt3, sched3)
    nxt = _full_hf(model3, mc)
    moved = max((ref_next[k] - saved[k]).abs().max().item() for k in saved)
    out["tp2/next_step_max_diff"] = max((ref_next[k] - nxt[k]).abs().max().item() for k in ref_next)
    out["tp2/step_size"] = moved
    destroy_distributed()
    return out
