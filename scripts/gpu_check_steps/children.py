"""The child modes of scripts/gpu_check.py (``_logits``, ``_reload``, ``_vllm``): each runs in
a process of its own, prints one ``RESULT {json}`` line (see :func:`common.child_result`)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def _child_logits(args: argparse.Namespace) -> dict[str, Any]:
    """Megatron logits of ``--mc`` (``--impl`` spec, ``--dtype``) vs transformers on ``--hf``."""
    import torch
    from transformers import AutoModelForCausalLM

    from erpd_megatron.config.schema import Config, ParallelConfig, PrecisionConfig
    from erpd_megatron.models.builder import build_model, forward_logits
    from erpd_megatron.models.checkpoint import load_checkpoint, read_model_config
    from erpd_megatron.runtime.distributed import destroy_distributed, init_distributed

    mc = read_model_config(args.mc)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    cfg = Config(
        model=mc,
        parallel=ParallelConfig(num_nodes=1, gpus_per_node=1),
        precision=PrecisionConfig(params_dtype=args.dtype, transformer_impl=args.impl),
    )
    init_distributed(cfg)
    model = build_model(cfg)
    load_checkpoint(args.mc, model, model_cfg=mc)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, mc.vocab_size, (2, 48), generator=g).to(dev)
    ours = forward_logits(model, ids)[..., : mc.vocab_size].float()
    hf = AutoModelForCausalLM.from_pretrained(args.hf, dtype=dtype).to(dev).eval()
    with torch.no_grad():
        ref = hf(ids).logits.float()
    lp, lp_ref = torch.log_softmax(ours, -1), torch.log_softmax(ref, -1)
    out = {
        "impl": args.impl,
        "dtype": args.dtype,
        "logits_dtype": str(forward_logits(model, ids).dtype),
        "max_abs_logprob_diff": float((lp - lp_ref).abs().max()),
        "rel_err": float((ours - ref).norm() / ref.norm()),
        "argmax_agree": float((ours.argmax(-1) == ref.argmax(-1)).float().mean()),
    }
    destroy_distributed()
    return out


def _child_reload(args: argparse.Namespace) -> dict[str, Any]:
    """Load each ``--ckpt`` into a forward-only model of ``--config`` and check finite logits."""
    import torch

    from erpd_megatron.config import load_config
    from erpd_megatron.models.builder import build_model, forward_logits
    from erpd_megatron.models.checkpoint import load_checkpoint
    from erpd_megatron.runtime.distributed import destroy_distributed, init_distributed

    cfg = load_config(args.config, args.overrides, validate=False)
    init_distributed(cfg)
    model = build_model(cfg)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ids = torch.randint(0, cfg.model.vocab_size, (1, 64)).to(dev)
    out = {}
    for ck in args.ckpt:
        load_checkpoint(ck, model)
        logits = forward_logits(model, ids)
        out[Path(ck).parent.parent.parent.name] = bool(torch.isfinite(logits.float()).all())
    destroy_distributed()
    return out


def _child_vllm(args: argparse.Namespace) -> dict[str, Any]:
    """vLLM samples of ``--hf`` vs the Megatron teacher-forced log-probs of ``--mc`` (fp32);
    with ``--export`` also greedy samples of the mcore-to-hf export against the original."""
    import torch

    from erpd_megatron.config.schema import Config, ParallelConfig, PrecisionConfig
    from erpd_megatron.models.builder import build_model, forward_logits
    from erpd_megatron.models.checkpoint import load_checkpoint, read_model_config
    from erpd_megatron.rollout.vllm_engine import VLLMEngine
    from erpd_megatron.runtime.distributed import destroy_distributed, init_distributed

    mc = read_model_config(args.mc)
    prompts = [
        [
            int(x)
            for x in torch.randint(
                0, mc.vocab_size - 3, (12,), generator=torch.Generator().manual_seed(i)
            )
        ]
        for i in range(4)
    ]
    eos = [mc.vocab_size - 1]
    with VLLMEngine(
        args.hf,
        eos_token_ids=eos,
        dtype="float32",
        gpu_memory_utilization=0.3,
        max_model_len=128,
        seed=0,
    ) as eng:
        groups = eng.generate(prompts, 4, max_new_tokens=24, seed=3, progress=False)
        greedy = eng.generate(
            prompts, 1, temperature=0.0, max_new_tokens=16, seed=0, progress=False
        )
    out: dict[str, Any] = {"samples": sum(len(g) for g in groups)}
    if args.export:
        with VLLMEngine(
            args.export,
            eos_token_ids=eos,
            dtype="float32",
            gpu_memory_utilization=0.3,
            max_model_len=128,
            seed=0,
        ) as eng:
            again = eng.generate(
                prompts, 1, temperature=0.0, max_new_tokens=16, seed=0, progress=False
            )
        out["export_greedy_agree"] = float(
            sum(a[0].token_ids == b[0].token_ids for a, b in zip(greedy, again)) / len(prompts)
        )
    cfg = Config(
        model=mc,
        parallel=ParallelConfig(num_nodes=1, gpus_per_node=1),
        precision=PrecisionConfig(params_dtype="fp32", transformer_impl="local"),
    )
    init_distributed(cfg)
    model = build_model(cfg)
    load_checkpoint(args.mc, model, model_cfg=mc)
    diffs = []
    for p, group in zip(prompts, groups):
        for c in group:
            ids = torch.tensor([p + c.token_ids], device="cuda")
            lp = torch.log_softmax(forward_logits(model, ids)[0, :, : mc.vocab_size].float(), -1)
            ref = lp[len(p) - 1 : -1].gather(-1, ids[0, len(p) :, None])[:, 0].cpu()
            diffs.append((ref - torch.tensor(c.logprobs)).abs().max().item())
    destroy_distributed()
    out["max_abs_logprob_diff"] = max(diffs)
    return out
