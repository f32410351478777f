"""The dry run's memory accounting: against Megatron-LM's theoretical formula, against a
measured CPU forward, and the recipes' properties (they fit, roll out with vLLM, checkpoint
periodically)."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from erpd_megatron.config.dryrun import estimate
from erpd_megatron.config.dryrun import main as dryrun_main
from erpd_megatron.config.loader import load_config
from erpd_megatron.config.memory import (
    CHUNK_ELEMENTS_GPU,
    GIB,
    activation_bytes,
    estimate_layout,
    layout_of,
    max_tokens_that_fit,
    microbatch_tokens,
)
from erpd_megatron.config.validate import head_dim, padded_vocab_size

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted((ROOT / "configs/recipes").glob("*.yaml"))


def _is_gpu(path: Path) -> bool:
    return load_config(path).precision.transformer_impl != "local"


GPU_RECIPES = [p for p in RECIPES if _is_gpu(p)]
# Megatron-LM's formula transcribed below is the dense one: the MoE recipes are checked
# against the published parameter counts instead (test_moe_recipes_count_total_and_active)
DENSE_GPU_RECIPES = [p for p in GPU_RECIPES if load_config(p).model.num_experts is None]
MOE_GPU_RECIPES = [p for p in GPU_RECIPES if p not in DENSE_GPU_RECIPES]


# ---- Megatron-LM's formula, transcribed as the reference ------------------------------------
# From NVIDIA/Megatron-LM megatron/training/theoretical_memory_usage.py at commit
# d98e8a64ddf34856e74b24714e3bedb2f5a39553: compute_weight_and_optimizer_memory (dense,
# non-MLA, no MTP branch), compute_activation_memory (used with sequence parallel and
# selective recompute) and compute_activation_memory_without_sp (used otherwise). The output
# layer's term (PP == 1) is returned apart, since the dry run counts logits on its own at the
# precision the ERPD ops use (fp32).


def megatron_weight_and_optimizer(args) -> float:
    query_projection_size = args.kv_channels * args.num_attention_heads
    query_projection_to_hidden_size_ratio = query_projection_size / args.hidden_size
    gated_linear_multiplier = 3 / 2 if args.swiglu else 1
    norm_size = 1  # RMSNorm
    self_attn_term = (
        2
        * args.hidden_size
        * args.hidden_size
        * (
            (1 + (args.num_query_groups / args.num_attention_heads))
            * query_projection_to_hidden_size_ratio
        )
    )
    embedding_size = args.hidden_size * args.padded_vocab_size
    final_layernorm = norm_size * args.hidden_size
    dense_mlp_params = 2 * args.hidden_size * args.ffn_hidden_size * gated_linear_multiplier
    layernorm_params = 2 * args.hidden_size * norm_size
    tp_sharded = (self_attn_term + dense_mlp_params) * args.num_layers
    replicated = layernorm_params * args.num_layers + final_layernorm
    tp_on_most_loaded = (
        tp_sharded / args.pipeline_model_parallel_size + embedding_size
    ) / args.tensor_model_parallel_size
    replicated_on_most_loaded = replicated / args.pipeline_model_parallel_size
    if args.untie_embeddings_and_output_weights and args.pipeline_model_parallel_size == 1:
        tp_on_most_loaded += embedding_size / args.tensor_model_parallel_size
    per_param = 18 if not args.use_distributed_optimizer else 6 + (12 / args.data_parallel_size)
    return (tp_on_most_loaded + replicated_on_most_loaded) * per_param


def megatron_activations_sp(args) -> tuple[float, float]:
    """compute_activation_memory (SP + selective recompute): (layers + embedding, output)."""
    act = (
        args.seq_length
        * args.micro_batch_size
        * args.hidden_size
        * (18 + (4 * (args.ffn_hidden_size / args.hidden_size)))
    )
    act *= args.num_layers
    act += 8 * args.seq_length * args.micro_batch_size * args.pipeline_model_parallel_size
    act += (
        args.seq_length
        * args.micro_batch_size
        * args.hidden_size
        * args.pipeline_model_parallel_size
    )
    if args.virtual_pipeline_model_parallel_size is not None:
        pp, vpp = args.pipeline_model_parallel_size, args.virtual_pipeline_model_parallel_size
        act *= 1 + ((pp - 1) / (pp * vpp))
    out = 0.0
    if args.pipeline_model_parallel_size == 1:
        out = (
            args.seq_length
            * args.micro_batch_size
            * args.hidden_size
            * 4
            * (1 + (args.padded_vocab_size / args.hidden_size))
        )
    return act / args.tensor_model_parallel_size, out / args.tensor_model_parallel_size


def megatron_activations_without_sp(args) -> tuple[float, float]:
    """compute_activation_memory_without_sp: (layers + embedding, output), 5% overhead in."""
    t = args.tensor_model_parallel_size
    act = args.seq_length * args.micro_batch_size * args.hidden_size * (10 + (24 / t))
    act *= args.num_layers
    act += 8 * args.seq_length * args.micro_batch_size * args.pipeline_model_parallel_size
    act += (
        args.seq_length
        * args.micro_batch_size
        * args.hidden_size
        * args.pipeline_model_parallel_size
    )
    if args.virtual_pipeline_model_parallel_size is not None:
        pp, vpp = args.pipeline_model_parallel_size, args.virtual_pipeline_model_parallel_size
        act *= 1 + ((pp - 1) / (pp * vpp))
    out = 0.0
    if args.pipeline_model_parallel_size == 1:
        logits_size = args.seq_length * args.micro_batch_size * args.padded_vocab_size / t
        out = (logits_size + args.seq_length * args.micro_batch_size * args.hidden_size) * 2
    return act * 1.05, out * 1.05


def megatron_args(cfg, lay, tokens: int, ffn: int | None = None):
    m = cfg.model
    return SimpleNamespace(
        kv_channels=head_dim(m),
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups,
        hidden_size=m.hidden_size,
        swiglu=True,
        ffn_hidden_size=ffn or m.ffn_hidden_size,
        num_layers=m.num_layers,
        padded_vocab_size=padded_vocab_size(m, lay.tp),
        untie_embeddings_and_output_weights=not m.tie_word_embeddings,
        tensor_model_parallel_size=lay.tp,
        pipeline_model_parallel_size=lay.pp,
        virtual_pipeline_model_parallel_size=lay.vpp,
        data_parallel_size=lay.dp,
        use_distributed_optimizer=True,
        seq_length=tokens,
        micro_batch_size=1,
    )


def megatron_shaped(cfg):
    """The recipe's model in the setting Megatron's activation formula assumes: multi-head
    attention with q = kv = h (no GQA, no qk-norm) and an MLP whose saved activations are
    those of its 4h GeLU MLP (4F bytes per token): a SwiGLU of width 8h/3 (6F bytes)."""
    m = cfg.model
    h = m.hidden_size
    ffn = round(8 * h / 3 / 256) * 256
    model = dataclasses.replace(
        m,
        num_query_groups=m.num_attention_heads,
        kv_channels=h // m.num_attention_heads,
        qk_layernorm=False,
        ffn_hidden_size=ffn,
    )
    return dataclasses.replace(cfg, model=model), ffn


@pytest.mark.parametrize("path", DENSE_GPU_RECIPES, ids=lambda p: p.stem)
def test_weights_and_optimizer_agree_with_megatron(path):
    cfg = load_config(path)
    lay = layout_of(cfg)
    est = estimate(cfg)
    ours = (est.weights_gib + est.grads_gib + est.optimizer_gib) * GIB
    ref = megatron_weight_and_optimizer(megatron_args(cfg, lay, microbatch_tokens(cfg)))
    assert abs(ours / ref - 1) < 0.10, (ours / GIB, ref / GIB)
    assert abs(ours / ref - 1) < 0.01  # the same accounting; qk-norm / QKV bias differ


@pytest.mark.parametrize("path", DENSE_GPU_RECIPES, ids=lambda p: p.stem)
def test_activations_agree_with_megatron_in_its_setting(path):
    """Our layer count reduces to Korthikanti/Megatron's in the configuration their formula
    assumes (dropout masks, MHA, non-gated-equivalent MLP), without SP and with SP +
    selective recompute, for each recipe's width, depth, layout and micro-batch."""
    base = load_config(path)
    cfg, ffn = megatron_shaped(base)
    tokens = microbatch_tokens(base)
    # (the formula has no recompute or CP and this row no SP: the long-response recipes turn
    # them on, so compare without them; the SP row below sets its own)
    lay = dataclasses.replace(
        layout_of(base),
        dropout=True,
        recompute=None,
        recompute_method=None,
        recompute_num_layers=None,
        sp=False,
        cp=1,
    )
    stage = "first" if lay.pp > 1 else "only"
    ours = activation_bytes(cfg, lay, tokens, tokens, stage)
    if lay.pp == 1:  # Megatron keeps the final norm's output in its output term: drop ours
        ours -= 2 * cfg.model.hidden_size * tokens * lay.act_bytes
    ref, _ = megatron_activations_without_sp(megatron_args(cfg, lay, tokens, ffn=int(1.5 * ffn)))
    assert abs(ours / ref - 1) < 0.10, (ours / GIB, ref / GIB)

    lay_sp = dataclasses.replace(lay, sp=True, recompute="selective")
    ours_sp = activation_bytes(cfg, lay_sp, tokens, tokens, stage)
    if lay.pp == 1:
        ours_sp -= 2 * cfg.model.hidden_size * tokens * lay.act_bytes / lay.tp
    ref_sp, _ = megatron_activations_sp(megatron_args(cfg, lay, tokens, ffn=int(1.5 * ffn)))
    assert abs(ours_sp / ref_sp - 1) < 0.10, (ours_sp / GIB, ref_sp / GIB)


@pytest.mark.parametrize("path", GPU_RECIPES, ids=lambda p: p.stem)
def test_gpu_recipe_fits_rolls_out_with_vllm_and_checkpoints(path, capsys):
    cfg = load_config(path)
    assert dryrun_main(["--config", str(path), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    for key in (
        "params_total",
        "params_per_rank",
        "weights_gib",
        "grads_gib",
        "optimizer_gib",
        "activations_gib",
        "logits_gib",
        "total_gib",
        "fits",
        "max_tokens_per_microbatch_that_fits",
    ):
        assert key in d, key
    assert d["fits"] is True and d["total_gib"] <= 0.9 * cfg.parallel.gpu_memory_gb * 1e9 / GIB
    assert d["max_tokens_per_microbatch_that_fits"] >= microbatch_tokens(cfg)
    # 13.8: vLLM by default, with a TP the engine's GPUs and the model's heads allow
    r, m = cfg.rollout, cfg.model
    vtp = r.vllm_tensor_parallel_size
    assert r.engine == "vllm"
    assert cfg.parallel.gpus_per_node % vtp == 0 and m.num_attention_heads % vtp == 0
    weights_per_gpu = estimate(cfg).params_total * 2 / vtp
    # an MoE engine holds every expert while a token reads 8 of 128: weights may take more of
    # the engine's memory (Qwen3-235B-A22B: 59 GB of 72 on TP=8), the KV cache the rest
    share = 0.85 if m.num_experts else 0.5
    assert (
        weights_per_gpu < share * r.vllm_gpu_memory_utilization * cfg.parallel.gpu_memory_gb * 1e9
    )
    # 21.5: a hard kill loses at most save_interval steps
    assert 0 < cfg.checkpoint.save_interval <= 200
    header = path.read_text().split("\ndefaults:")[0]
    assert "erpd dryrun" in header and "vLLM" in header and "Checkpoints every" in header


def test_largest_budget_is_the_edge_of_fitting():
    cfg = load_config(ROOT / "configs/recipes/llama3-70b-8node.yaml")
    lay = layout_of(cfg)
    best = max_tokens_that_fit(cfg, lay)
    assert best % 256 == 0 and best > 0
    assert estimate_layout(cfg, lay, best).fits and not estimate_layout(cfg, lay, best + 256).fits
    # the recipe's former 8192-token micro-batch does not fit: ~84 GiB
    assert not estimate(cfg, tokens=8192).fits


def test_layout_knobs_scale_activations_as_korthikanti():
    cfg = load_config(ROOT / "configs/recipes/qwen3-8b-2node.yaml")
    lay = layout_of(cfg)
    t = 8192
    base = activation_bytes(cfg, lay, t, t)
    sp = activation_bytes(cfg, dataclasses.replace(lay, sp=True), t, t)
    full = activation_bytes(cfg, dataclasses.replace(lay, recompute="full"), t, t)
    cp2 = activation_bytes(cfg, dataclasses.replace(lay, cp=2), t, t)
    h, L = cfg.model.hidden_size, cfg.model.num_layers
    # SP divides the 4h unsharded elements by TP as well
    assert base - sp == pytest.approx((4 * h * L + 2 * h) * t * 2 * (1 - 1 / lay.tp), rel=1e-9)
    # full recompute: each layer's input (h, bf16) + one layer being recomputed
    rest = 2 * h * t * 2 + 8 * t  # final norm in/out, input ids
    assert full == pytest.approx(L * h * t * 2 + (base - rest) / L + rest, rel=1e-9)
    assert cp2 == pytest.approx(base / 2, rel=1e-9)
    # 1F1B on PP=4: the first stage keeps PP micro-batches of L/PP layers; interleaving adds
    # (PP-1)/(PP*VPP)
    pp4 = dataclasses.replace(lay, pp=4)
    first = activation_bytes(cfg, pp4, t, t, "first")
    assert first == pytest.approx(base - 2 * h * t * 2 + 8 * t * 3, rel=1e-6)
    vpp = activation_bytes(cfg, dataclasses.replace(pp4, vpp=3), t, t, "first")
    assert vpp == pytest.approx(first * (1 + 3 / 12), rel=1e-9)
    # without flash attention the scores a*s per token appear; selective recompute drops them
    local = dataclasses.replace(lay, flash=False)
    a = cfg.model.num_attention_heads
    assert activation_bytes(cfg, local, t, t) - activation_bytes(
        cfg, dataclasses.replace(local, recompute="selective"), t, t
    ) == pytest.approx(a * t * t * 2 * L / lay.tp, rel=1e-9)


def test_full_recompute_methods():
    cfg = load_config(ROOT / "configs/recipes/qwen3-8b-2node.yaml")  # 36 layers
    lay = dataclasses.replace(layout_of(cfg), recompute="full")
    t, h = 4096, cfg.model.hidden_size
    rest = 2 * h * t * 2 + 8 * t
    layer = (activation_bytes(cfg, dataclasses.replace(lay, recompute=None), t, t) - rest) / 36
    uniform4 = activation_bytes(cfg, dataclasses.replace(lay, recompute_num_layers=4), t, t)
    assert uniform4 == pytest.approx(9 * h * t * 2 + 4 * layer + rest, rel=1e-9)
    block10 = activation_bytes(
        cfg, dataclasses.replace(lay, recompute_method="block", recompute_num_layers=10), t, t
    )
    assert block10 == pytest.approx(10 * h * t * 2 + 26 * layer + layer + rest, rel=1e-9)


def test_moe_experts_spread_over_ep_and_expert_dp():
    cfg = load_config(ROOT / "configs/recipes/qwen3-8b-2node.yaml")  # 16 ranks, TP=4
    moe = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, num_experts=8))
    lay = dataclasses.replace(layout_of(moe), ep=4, etp=1)
    dense = estimate_layout(cfg, layout_of(cfg))
    est = estimate_layout(moe, lay)
    m = cfg.model
    mlp = 3 * m.hidden_size * m.ffn_hidden_size
    # each rank holds 8/4 whole experts of every layer (ETP=1) and the router, instead of its
    # TP shard of one dense MLP
    extra = m.num_layers * (mlp * 8 / 4 - mlp / lay.tp + m.hidden_size * 8)
    assert est.params_per_rank - dense.params_per_rank == pytest.approx(extra, rel=1e-6)
    # expert optimizer states over expert-DP = 16 / (ETP * EP * PP) = 4, the rest over DP = 4
    expert = m.num_layers * mlp * 8 / 4
    edp = 16 // (1 * 4 * 1)
    assert est.optimizer_gib * GIB == pytest.approx(
        (est.params_per_rank - expert) * 12 / lay.dp + expert * 12 / edp, rel=1e-6
    )
    # the routed part of the activations is per routed copy of each token (top-k)
    assert est.activations_gib > dense.activations_gib


def test_chunk_constant_matches_the_ops():
    from erpd_megatron.ops.vocab_parallel import DEFAULT_CHUNK_ELEMENTS

    assert CHUNK_ELEMENTS_GPU == DEFAULT_CHUNK_ELEMENTS["cuda"]


def test_estimate_matches_a_measured_cpu_forward():
    """benchmarks/bench_dryrun_memory.py at one small size: the activation estimate for the
    CPU setting (fp32, local spec, materialised scores) against the saved tensors and the
    resident-memory growth of a real megatron-core forward."""
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks/bench_dryrun_memory.py"), "--sizes", "512x256"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    num = r"([\d.]+)\.\.([\d.]+)"
    m = re.search(rf"RESULT ratio_saved={num} ratio_rss={num}", out.stdout)
    assert m, out.stdout[-2000:]
    lo_s, hi_s, lo_r, hi_r = (float(x) for x in m.groups())
    assert 0.9 < lo_s <= hi_s < 1.1
    assert 0.85 < lo_r <= hi_r < 1.15  # RSS is page-granular and sees allocator slack
    assert math.isfinite(hi_r)


def test_readme_table_is_what_the_dry_run_prints(capsys):
    assert dryrun_main(["--table", *map(str, GPU_RECIPES)]) == 0
    printed = capsys.readouterr().out.strip()
    readme = (ROOT / "README.md").read_text()
    start = readme.index(printed.splitlines()[0])
    assert readme[start : start + len(printed)] == printed, "regenerate the README table"


@pytest.mark.parametrize(
    "path,total,active",
    # Qwen/Qwen3-30B-A3B and Qwen/Qwen3-235B-A22B model cards: 30.5 B / 3.3 B, 235 B / 22 B
    [("qwen3-30b-a3b-2node", 30.5e9, 3.3e9), ("qwen3-235b-a22b-16node", 235e9, 22e9)],
)
def test_moe_recipes_count_total_and_active(path, total, active, capsys):
    recipe = ROOT / f"configs/recipes/{path}.yaml"
    assert recipe in MOE_GPU_RECIPES
    assert dryrun_main(["--config", str(recipe), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert abs(d["params_total"] / total - 1) < 0.01
    assert abs(d["params_active"] / active - 1) < 0.03
    cfg = load_config(recipe)
    m, par = cfg.model, cfg.parallel
    assert d["experts_per_ep_rank"] * par.expert_model_parallel_size == m.num_experts
    world = par.num_nodes * par.gpus_per_node
    edp = world // (par.expert_tensor_parallel_size * par.expert_model_parallel_size * d["pp"])
    assert d["expert_dp"] == edp and d["fits"] is True
    assert dryrun_main(["--config", str(recipe)]) == 0
    out = capsys.readouterr().out
    assert "active parameters" in out and f"expert-DP={edp}" in out and "-> fits" in out
