"""`erpd dryrun`: check a recipe for its target cluster without the cluster.

Pure arithmetic over the config: the layout is validated for
``parallel.num_nodes * parallel.gpus_per_node`` ranks, then parameters per rank and a
memory estimate per GPU are printed (weights, gradients, optimizer states, activations at
the configured micro-batch token budget, logits), flagging layouts that do not fit.

The activation estimate follows Korthikanti et al. (2022) with flash attention (no
s^2 attention scores kept): about 34 bytes per token per hidden unit per layer in bf16
without recomputation, divided by TP, for the micro-batches a 1F1B pipeline keeps in flight
on its first stage (``pp``). It is an estimate meant to catch layouts that are off by a
wide margin, not to replace a profile.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from erpd_megatron.config.loader import load_config
from erpd_megatron.config.schema import Config
from erpd_megatron.config.validate import (
    head_dim,
    padded_vocab_size,
    validate_config,
    validate_layout,
)

GIB = 1024**3


@dataclass
class RankEstimate:
    """Parameters and memory of the most loaded rank (the first or last pipeline stage)."""

    world_size: int
    dp: int
    params_total: int
    params_per_rank: int
    weights_gib: float
    grads_gib: float
    optimizer_gib: float
    activations_gib: float
    logits_gib: float

    @property
    def total_gib(self) -> float:
        """Sum of all parts."""
        return self.weights_gib + self.grads_gib + self.optimizer_gib + self.activations_gib + self.logits_gib


def layer_params(cfg: Config) -> int:
    """Parameters of one transformer layer (unsharded)."""
    m = cfg.model
    h, d = m.hidden_size, head_dim(m)
    q, kv = m.num_attention_heads * d, m.num_query_groups * d
    attn = h * (q + 2 * kv) + q * h + (q + 2 * kv if m.add_qkv_bias else 0)
    mlp = 3 * h * m.ffn_hidden_size
    norms = 2 * h + (2 * d if m.qk_layernorm else 0)
    return attn + mlp + norms


def estimate(cfg: Config, world_size: int | None = None) -> RankEstimate:
    """Parameters per rank and memory per GPU for the target layout."""
    par, m = cfg.parallel, cfg.model
    world = world_size or par.num_nodes * par.gpus_per_node
    dp = validate_layout(m, par, world)
    tp, pp = par.tensor_model_parallel_size, par.pipeline_model_parallel_size
    vocab = padded_vocab_size(m, tp)
    emb = vocab * m.hidden_size
    out = 0 if m.tie_word_embeddings else emb
    total = m.num_layers * layer_params(cfg) + emb + out + m.hidden_size
    stage_layers = m.num_layers // pp
    # The most loaded stage: first (embedding) or last (output layer + final norm).
    per_rank = (stage_layers * layer_params(cfg) + max(emb, out if pp > 1 else emb + out)) // tp
    on_gpu_bf16 = cfg.precision.params_dtype in ("auto", "bf16", "fp16")
    wbytes = 2 if on_gpu_bf16 else 4
    weights = per_rank * wbytes
    grads = per_rank * 4  # Megatron DDP keeps fp32 grad buffers
    opt = per_rank * (12 if on_gpu_bf16 else 8)  # fp32 master + Adam m, v
    if par.use_distributed_optimizer:
        opt /= dp
    tokens = cfg.data.max_tokens_per_microbatch
    act_per_layer = 34 * tokens * m.hidden_size / tp
    acts = act_per_layer * stage_layers * (pp if pp > 1 else 1)
    logits = tokens * vocab / tp * 4 * 2  # fp32 logits and their gradient
    return RankEstimate(
        world_size=world, dp=dp, params_total=total, params_per_rank=per_rank,
        weights_gib=weights / GIB, grads_gib=grads / GIB, optimizer_gib=opt / GIB,
        activations_gib=acts / GIB, logits_gib=logits / GIB,
    )


def format_report(cfg: Config, est: RankEstimate) -> str:
    """Human-readable dry-run report."""
    par = cfg.parallel
    budget = par.gpu_memory_gb * 1e9 / GIB
    fits = est.total_gib <= 0.9 * budget
    lines = [
        f"recipe {cfg.name}: {cfg.model.family} {cfg.model.num_layers} layers, hidden {cfg.model.hidden_size}",
        f"layout: {par.num_nodes} nodes x {par.gpus_per_node} GPUs = {est.world_size} ranks; "
        f"TP={par.tensor_model_parallel_size} PP={par.pipeline_model_parallel_size} DP={est.dp}",
        f"parameters: {est.params_total / 1e9:.3f} B total, {est.params_per_rank / 1e9:.3f} B on the most loaded rank",
        "memory per GPU (GiB, estimate):",
        f"  weights {est.weights_gib:8.2f}   grads {est.grads_gib:8.2f}   optimizer {est.optimizer_gib:8.2f}",
        f"  activations {est.activations_gib:8.2f} (micro-batch {cfg.data.max_tokens_per_microbatch} tokens)"
        f"   logits {est.logits_gib:8.2f}",
        f"  total {est.total_gib:8.2f} of {budget:.1f} GiB -> "
        + ("fits" if fits else "DOES NOT FIT: raise TP/PP, lower data.max_tokens_per_microbatch, or add nodes"),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """CLI: ``erpd dryrun --config RECIPE [a.b=c ...]``; exit 0 when it fits, 3 when not."""
    p = argparse.ArgumentParser(prog="erpd dryrun", description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("--world-size", type=int, default=None, help="override num_nodes*gpus_per_node")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    cfg = load_config(args.config, args.overrides, validate=False)
    validate_config(cfg, world_size=args.world_size or cfg.parallel.num_nodes * cfg.parallel.gpus_per_node)
    est = estimate(cfg, args.world_size)
    print(format_report(cfg, est))
    return 0 if est.total_gib <= 0.9 * cfg.parallel.gpu_memory_gb * 1e9 / GIB else 3
