"""Sequence packing against padded micro-batches, and activation recompute's memory and time.

Lengths are long-tailed: lognormal with median 2k and p99 16k tokens (sigma = ln(8)/2.326),
scaled down by ``--scale`` (default 1/32: median 64, p99 512, cap 1024) to fit a CPU. For the
same global batches and the same token budget (``--budget``, default the length cap 2 x p99:
the long-response recipes set ``max_tokens_per_microbatch = max_seq_length`` so that the
longest allowed sequence fits one micro-batch), this runs
the real training path, ``Engine.run`` forward+backward through megatron's schedule on the
local spec (one process), with micro-batches from
:func:`erpd_megatron.data.batching.build_micro_batches`:

* ``unsorted``: the usual padded baseline, rows in their shuffled batch order cut into
  micro-batches of count x longest <= budget (``pack_in_order``), padded to the longest;
* ``padded``: ``data.packing=false``, this repository's unpacked default: rows bucketed by
  length (sorted), count x longest <= budget;
* ``packed``: ``data.packing=true``, first-fit-decreasing rows of <= budget tokens with the
  block-diagonal causal mask (on GPUs, THD). The local spec's core attention
  (``erpd_megatron/models/local_varlen_attention.py``) recognises that mask and runs the row's
  sequences as causal batches of similar length (sum n_b x L_b^2 scores, not T^2), with
  megatron's own ``DotProductAttention`` per batch; TE does varlen attention from THD.

The model (``--proxy qwen3-4b``, :func:`proxy_model`) is Qwen3-4B's shape scaled with the
lengths, so that attention, the linear layers and the output layer keep Qwen3-4B's shares of a
token's multiply-adds at the scaled lengths (both are printed). ``flop_ceiling`` is the speedup
packing would give if time were multiply-adds (:func:`flop_ceiling`): what the measured figure
is to be read against.

tokens/s counts response+prompt tokens (not padding); ``padding_fraction`` is the packed
rows' padding over their size. Wall time is the target's measure; with ``--threads 1`` the
process CPU time of the same epochs (``packing_speedup_cpu``) is also given, the figure that
other jobs on a shared machine disturb least. Recompute: the same model with
``parallel.recompute_granularity=full`` (uniform, 1 layer): the bytes of tensors saved for
backward during one packed micro-batch's forward (``torch.autograd.graph.saved_tensors_hooks``:
the activation memory that recompute trades), and the forward+backward time ratio.
Rows interleave (unsorted, padded, packed, unsorted, ...) after a warm-up; medians of ``--reps``.

    python benchmarks/bench_packing.py [--quick] [--reps 5] [--threads 1]

Last line: ``RESULT packing_speedup=... (packed vs unsorted) packing_speedup_vs_bucketed=...
packing_speedup_cpu=... padding_fraction=... (packed rows) padded_padding_fraction=...
(unsorted) recompute_mem_ratio=... recompute_time_ratio=... flop_ceiling=...
flop_ceiling_vs_bucketed=...``.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
warnings.filterwarnings("ignore")


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer sequences and reps (smoke run)")
    p.add_argument("--reps", type=int, default=None, help="timed interleaved rounds (default 5)")
    p.add_argument("--seqs", type=int, default=None, help="sequences per global batch (default 64)")
    p.add_argument("--scale", type=float, default=1 / 32, help="length scale (1 = 2k median)")
    p.add_argument(
        "--budget",
        type=int,
        default=None,
        help="tokens per micro-batch (default the length cap, 2 x p99, as the long-response "
        "recipes set max_tokens_per_microbatch = max_seq_length)",
    )
    p.add_argument("--threads", type=int, default=1, help="torch/OpenMP threads")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="params dtype")
    p.add_argument(
        "--proxy",
        choices=["qwen3-4b", "legacy"],
        default="qwen3-4b",
        help="the model: Qwen3-4B's cost shares at --scale (default), or the former 2x128 model",
    )
    p.add_argument("overrides", nargs="*", help="config overrides a.b=c")
    return p.parse_args()


# the long-response recipe whose model (Qwen3-4B) the benchmark model is scaled from
REFERENCE_RECIPE = ROOT / "configs/recipes/qwen3-4b-thinking-16k.yaml"
PROXY_LAYERS = 4
PROXY_HEAD_DIM = 32


def reference_model():
    """Qwen3-4B's ModelConfig, as the 16k recipe loads it (``configs/models/qwen3-4b.yaml``)."""
    from erpd_megatron.config import load_config

    return load_config(REFERENCE_RECIPE, validate=False).model  # a GPU recipe: no TE check


def proxy_model(scale: float, kind: str = "qwen3-4b") -> list[str]:
    """The benchmark model's overrides. ``qwen3-4b``: Qwen3-4B's shape scaled with the lengths,
    so that per token the three costs packing changes keep their proportions at the scaled
    lengths (:func:`cost_shares`). Attention per token and layer is ``L x q_dim`` multiply-adds
    against ``~15.4 hidden^2`` for the linear layers, so scaling every length by ``scale``
    keeps the ratio when the width is scaled by ``scale`` too (hidden 2560 -> 80 at 1/32);
    q/kv widths and ffn keep Qwen3-4B's ratios to the hidden size (head size 32, GQA 4:1), and
    the vocabulary keeps the output layer's share of a token's cost at 4 layers instead of 36
    (``vocab ~ 151936 x 4 x 80 / (36 x 2560)``). ``legacy``: the former 2-layer, hidden-128,
    vocab-4096 model, whose vocabulary projection is 57% of a token's multiply-adds (Qwen3-4B:
    10%) and whose attention share at a given scaled length is about half of Qwen3-4B's."""
    if kind == "legacy":
        return [
            "model.num_layers=2",
            "model.hidden_size=128",
            "model.ffn_hidden_size=384",
            "model.num_attention_heads=4",
            "model.num_query_groups=2",
            "model.kv_channels=32",
            "model.vocab_size=4096",
        ]
    r = reference_model()
    hidden = max(16, 16 * round(r.hidden_size * scale / 16))
    q_dim = r.num_attention_heads * r.kv_channels
    heads = max(1, round(q_dim / r.hidden_size * hidden / PROXY_HEAD_DIM))
    groups = max(1, heads * r.num_query_groups // r.num_attention_heads)
    ffn = 16 * round(r.ffn_hidden_size / r.hidden_size * hidden / 16)
    vocab = r.vocab_size * PROXY_LAYERS * hidden / (r.num_layers * r.hidden_size)
    return [
        f"model.num_layers={PROXY_LAYERS}",
        f"model.hidden_size={hidden}",
        f"model.ffn_hidden_size={ffn}",
        f"model.num_attention_heads={heads}",
        f"model.num_query_groups={groups}",
        f"model.kv_channels={PROXY_HEAD_DIM}",
        f"model.vocab_size={16 * round(vocab / 16)}",
        "model.make_vocab_size_divisible_by=16",
    ]


def cost_shares(m, length: float) -> tuple[float, float]:
    """Per token of a sequence of ``length`` (``m``: a SwiGLU ModelConfig): (causal
    attention's multiply-adds over the linear layers', the output layer's share of all
    multiply-adds)."""
    h = m.hidden_size
    q, kv = m.num_attention_heads * m.kv_channels, m.num_query_groups * m.kv_channels
    linear = h * (q + 2 * kv) + q * h + 3 * h * m.ffn_hidden_size
    attn = length * q  # q.k^T and p.v over length/2 keys on average
    out = h * m.vocab_size
    return attn / linear, out / (m.num_layers * linear + out)


def random_table(lengths, vocab: int, seed: int = 1):
    """A SampleTable of random token ids with these total lengths (an eighth prompt, at
    least 2 tokens; groups of 4; random 0/1 rewards and their group advantages)."""
    import numpy as np

    from erpd_megatron.data.batching import SampleTable, group_advantages

    rng = np.random.default_rng(seed)
    prompt = [rng.integers(1, vocab, max(2, int(L) // 8)) for L in lengths]
    table = SampleTable(
        sample_ids=np.arange(len(lengths)),
        group_ids=np.arange(len(lengths)) // 4,
        prompt_ids=prompt,
        response_ids=[
            rng.integers(1, vocab, max(1, int(L) - len(p))) for L, p in zip(lengths, prompt)
        ],
        rewards=rng.integers(0, 2, len(lengths)).astype(np.float32),
    )
    table.advantages = group_advantages(table.rewards, table.group_ids)
    return table


def build_plans(cfg, cfg_pack, table, batches, budget: int) -> dict:
    """Each arm's micro-batches of every global batch: ``unsorted`` (rows in batch order,
    count x longest <= budget), ``padded`` (``cfg``: length-bucketed) and ``packed``
    (``cfg_pack``: first-fit-decreasing packed rows)."""
    from erpd_megatron.data.batching import build_micro_batches, collate, pack_in_order

    plans = {
        name: [build_micro_batches(c, table, b, 0, 1) for b in batches]
        for name, c in (("padded", cfg), ("packed", cfg_pack))
    }
    # the usual padded baseline: rows in their (shuffled) batch order, count x longest <= budget
    plans["unsorted"] = [
        [collate(table, r) for r in pack_in_order(b.tolist(), table.lengths, budget)]
        for b in batches
    ]
    return plans


def flop_ceiling(m, plans: dict) -> dict[str, float]:
    """The speedup packing could reach if time were multiply-adds: per arm the linear layers
    and the output layer over its row tokens plus causal attention over each sequence's
    squared length (``count x longest^2`` a padded micro-batch, ``sum L^2`` a packed row),
    over packed's; ``plans`` as :func:`build_plans` makes them, ``m`` their ModelConfig.
    ``{"unsorted": ..., "padded": ...}``."""
    import numpy as np

    from erpd_megatron.data.batching import packed_cu_seqlens

    attn, out = cost_shares(m, 1.0)
    # attention per token and unit of length, over all of a token's other multiply-adds
    ratio = attn * (1 - out)

    def cost(mb) -> float:
        b, s = mb.input_ids.shape
        if mb.segments is None:
            return b * s * (1 + ratio * s)
        lengths = np.diff(packed_cu_seqlens(mb.segments)[0].numpy()).astype(np.float64)
        return float((lengths * (1 + ratio * lengths)).sum())

    total = {k: sum(cost(mb) for mbs in v for mb in mbs) for k, v in plans.items()}
    return {k: total[k] / total["packed"] for k in ("unsorted", "padded")}


def lognormal_lengths(n: int, scale: float, seed: int = 0):
    """Median 2048*scale, p99 16384*scale (clipped to [8, 2 x p99])."""
    import numpy as np

    sigma = math.log(8.0) / 2.3263
    rng = np.random.default_rng(seed)
    x = rng.lognormal(math.log(2048 * scale), sigma, n)
    return np.clip(np.round(x), 8, 2 * 16384 * scale).astype(np.int64)


def main() -> None:
    args = _args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    import numpy as np
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible")
    torch.set_num_threads(args.threads)
    from erpd_megatron.config import load_config
    from erpd_megatron.runtime.distributed import init_distributed
    from erpd_megatron.train.common import logits_logprob_entropy
    from erpd_megatron.train.engine import Engine, _device, packed_inputs

    reps = args.reps or (2 if args.quick else 5)
    n = args.seqs or (32 if args.quick else 64)
    p99 = int(16384 * args.scale)
    budget = args.budget or 2 * p99  # the length cap of lognormal_lengths
    tmp = Path(tempfile.mkdtemp(prefix="erpd-bench-pack-"))
    model = proxy_model(args.scale, args.proxy) + [
        f"model.max_position_embeddings={4 * p99}",
        f"data.max_seq_length={4 * p99}",
    ]
    base = model + [
        f"output_dir={tmp}",
        "logging.progress_bar=false",
        f"data.max_tokens_per_microbatch={budget}",
        f"data.global_batch_size={n}",
        f"precision.params_dtype={args.dtype}",
    ]
    cfg = load_config(ROOT / "configs/recipes/tiny-cpu.yaml", base + args.overrides)
    cfg_pack = load_config(
        ROOT / "configs/recipes/tiny-cpu.yaml", base + ["data.packing=true"] + args.overrides
    )
    cfg_rc = load_config(
        ROOT / "configs/recipes/tiny-cpu.yaml",
        base
        + [
            "data.packing=true",
            "parallel.recompute_granularity=full",
            "parallel.recompute_method=uniform",
            "parallel.recompute_num_layers=1",
        ]
        + args.overrides,
    )
    init_distributed(cfg)
    lengths = lognormal_lengths(n * 3, args.scale)
    table = random_table(lengths, cfg.model.vocab_size)
    order = np.random.default_rng(2).permutation(len(lengths))  # an epoch's shuffle
    batches = [order[i : i + n] for i in range(0, len(lengths), n)]
    real = float(table.lengths.sum())
    print(
        f"lengths: median {np.median(table.lengths):.0f}, "
        f"p99 {np.percentile(table.lengths, 99):.0f}, "
        f"max {table.lengths.max()}; {len(lengths)} sequences in {len(batches)} global batches; "
        f"budget {budget}"
    )
    for name, m, scl in (("Qwen3-4B", reference_model(), 1.0), (args.proxy, cfg.model, args.scale)):
        at = [cost_shares(m, 2048 * scl * q) for q in (1, 8)]
        print(
            f"{name}: attention/linear per token at the median {at[0][0]:.3f}, at p99 "
            f"{at[1][0]:.3f}; output layer {at[0][1]:.3f} of a token's multiply-adds"
        )

    engine = Engine(cfg, train=True, total_steps=1000)
    shard = engine.vocab_shard()
    total_tokens = float(table.response_lengths.sum())

    def loss_fn(logits, mb):
        lp, _ = logits_logprob_entropy(logits, mb, shard)
        return -(lp * mb.loss_mask.to(lp.device)).sum() / total_tokens, {}

    plans = build_plans(cfg, cfg_pack, table, batches, budget)
    ceiling = flop_ceiling(cfg.model, plans)
    sizes = {k: sum(int(m.input_ids.numel()) for mbs in v_ for m in mbs) for k, v_ in plans.items()}
    counts = {k: sum(len(mbs) for mbs in v_) for k, v_ in plans.items()}
    pad_frac = {k: 1 - real / sizes[k] for k in plans}

    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)

    cpu_times: dict[str, list[float]] = {}

    def epoch(eng, plan, name: str = "") -> float:
        sync()
        t, c = time.perf_counter(), time.process_time()
        for mbs in plan:
            eng.run(mbs, loss_fn, forward_only=False)
        sync()
        cpu_times.setdefault(name, []).append(time.process_time() - c)
        return time.perf_counter() - t

    times: dict[str, list[float]] = {"unsorted": [], "padded": [], "packed": []}
    for name in times:
        epoch(engine, plans[name])  # warm-up
    for _ in range(reps):
        for name in times:
            times[name].append(epoch(engine, plans[name], name))
    med = {k: statistics.median(v_) for k, v_ in times.items()}
    tps = {k: real / med[k] for k in med}
    cpu_med = {k: statistics.median(cpu_times[k]) for k in times}
    for k in times:
        print(
            f"{k:7s}: {counts[k]:3d} micro-batches, {sizes[k]:7d} row tokens, "
            f"padding {pad_frac[k]:.3f}, median {med[k]:.3f} s "
            f"({min(times[k]):.3f}-{max(times[k]):.3f}), {tps[k]:.0f} tokens/s; "
            f"CPU {cpu_med[k]:.3f} s"
        )

    # ---- recompute: saved-for-backward bytes of one packed micro-batch, and time ----
    engine_rc = Engine(cfg_rc, train=True, total_steps=1000)
    engine_rc.model[0].load_state_dict(engine.model[0].state_dict())
    mb = max((m for mbs in plans["packed"] for m in mbs), key=lambda m: m.num_tokens)

    def saved_bytes(eng) -> int:
        total = [0]

        def pack(t):
            total[0] += t.numel() * t.element_size()
            return t

        model = eng.model[0]
        m = mb.to(_device())
        mask, _ = packed_inputs(m, te=False)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(m.input_ids, m.position_ids, mask)
        out.float().sum().backward()
        model.zero_grad_buffer()
        return total[0]

    mem = saved_bytes(engine_rc) / saved_bytes(engine)
    rc_times: dict[str, list[float]] = {"plain": [], "recompute": []}
    epoch(engine_rc, plans["packed"])
    for _ in range(reps):
        rc_times["plain"].append(epoch(engine, plans["packed"]))
        rc_times["recompute"].append(epoch(engine_rc, plans["packed"]))
    rc_ratio = statistics.median(rc_times["recompute"]) / statistics.median(rc_times["plain"])
    print(f"recompute full/uniform/1: saved activations x{mem:.3f}, time x{rc_ratio:.3f}")
    speed = tps["packed"] / tps["unsorted"]
    speed_b = tps["packed"] / tps["padded"]
    print(
        f"RESULT packing_speedup={speed:.3f} packing_speedup_vs_bucketed={speed_b:.3f} "
        f"packing_speedup_cpu={cpu_med['unsorted'] / cpu_med['packed']:.3f} "
        f"padding_fraction={pad_frac['packed']:.4f} "
        f"padded_padding_fraction={pad_frac['unsorted']:.4f} "
        f"recompute_mem_ratio={mem:.3f} recompute_time_ratio={rc_ratio:.3f} "
        f"flop_ceiling={ceiling['unsorted']:.3f} flop_ceiling_vs_bucketed={ceiling['padded']:.3f} "
        f"load_avg={os.getloadavg()[0]:.2f} device={_device().type} dtype={args.dtype}"
    )


if __name__ == "__main__":
    main()
