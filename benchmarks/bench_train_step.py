"""Cost of ERPD's bookkeeping per optimizer step, as ratios to a plain cross-entropy step.

On one process (this CPU, or a GPU where present), for the same model, batch, micro-batching
and layout, time (a) a plain megatron-core cross-entropy step (``vocab_parallel_cross_entropy``,
token mean, backward, optimizer step), (b) a Stage-1 step (``pg`` loss with anchors, entropy,
KL and drift metrics, metric reduction, NaN guard), (c) a Stage-2 step (teacher cache read
through memory-mapped shards, ``topk_kl`` with k=64 and the ratio trust region). Steps are
interleaved (a, b, c, a, b, c, ...) after warm-up so that machine noise hits all alike; the
median is reported. Last line: ``RESULT stage1_step_ratio=... stage2_step_ratio=...``.

    python benchmarks/bench_train_step.py [--steps 6] [model.num_layers=4 ...]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

warnings.filterwarnings("ignore")

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--seqs", type=int, default=32)
    p.add_argument("--topk", type=int, default=64)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()

    from erpd_megatron.cache.reader import TeacherCache
    from erpd_megatron.cache.writer import CacheWriter
    from erpd_megatron.config import load_config
    from erpd_megatron.data.batching import SampleTable, group_advantages
    from erpd_megatron.runtime.distributed import init_distributed
    from erpd_megatron.train import stage1, stage2
    from erpd_megatron.train.engine import Engine, reduce_metrics
    from erpd_megatron.train.loop import StageSpec, TrainLoop
    from erpd_megatron.train.stage2 import CacheColumn

    overrides = ["model.num_layers=4", "model.hidden_size=256", "model.ffn_hidden_size=768",
                 "model.num_attention_heads=8", "model.num_query_groups=4", "model.kv_channels=32",
                 "model.vocab_size=32000", "data.max_tokens_per_microbatch=4096",
                 f"data.global_batch_size={args.seqs}", f"cache.topk={args.topk}"] + args.overrides
    cfg = load_config(ROOT / "configs/recipes/tiny-cpu.yaml", overrides)
    init_distributed(cfg)
    rng = np.random.default_rng(0)
    n, v = args.seqs, cfg.model.vocab_size
    table = SampleTable(
        sample_ids=np.arange(n, dtype=np.int64), group_ids=np.arange(n) // 4,
        prompt_ids=[rng.integers(1, v, 64) for _ in range(n)],
        response_ids=[rng.integers(1, v, 192) for _ in range(n)],
        rewards=rng.integers(0, 2, n).astype(np.float32),
    )
    table.advantages = group_advantages(table.rewards, table.group_ids)
    engine = Engine(cfg, train=True, total_steps=1000)

    class Run:
        pass

    run = Run()
    run.engine, run.table, run.data_fingerprint = engine, table, "bench"
    ref = [rng.normal(-3, 1, len(r)).astype(np.float32).clip(max=-0.01) for r in table.response_ids]

    # a synthetic teacher cache with the real format
    tmp = tempfile.mkdtemp(prefix="erpd-bench-")
    k = args.topk
    with CacheWriter(tmp, rank=0, sample_ids=table.sample_ids.tolist(), vocab_size=v, k=k,
                     sampled_models=["base", "teacher0"], teachers=["teacher0"], ref_teachers=["teacher0"],
                     value_dtype="fp16") as w:
        for i in w.pending():
            t = len(table.response_ids[i])
            ids = np.stack([rng.choice(v, k, replace=False) for _ in range(t)])
            lps = np.sort(rng.uniform(-12, -1, (t, k)).astype(np.float32), axis=1)[:, ::-1] - 2.0
            w.write_sample(i, sampled={"base": ref[i], "teacher0": ref[i]}, topk={"teacher0": (ids, lps, lps)})
    from erpd_megatron.cache.manifest import finalize_manifest

    finalize_manifest(tmp, 1, {"rollout_fingerprint": "bench", "models": {
        "base": {"path": "-", "fingerprint": "-"}, "teacher0": {"path": "-", "fingerprint": "-"}}})
    cache = TeacherCache.open(tmp)
    from collections import OrderedDict

    lru: OrderedDict = OrderedDict()
    s2_arrays = {"ref_logp": CacheColumn(cache, table.sample_ids, "sampled", "base", lru),
                 "lp:teacher0": CacheColumn(cache, table.sample_ids, "sampled", "teacher0", lru),
                 "ids:teacher0": CacheColumn(cache, table.sample_ids, "topk_ids", "teacher0", lru),
                 "topk:teacher0": CacheColumn(cache, table.sample_ids, "topk_logprobs", "teacher0", lru)}
    rows = np.arange(n)

    dummy = StageSpec(name="bench", table=table, epochs=1, make_loss=None, metric_keys=[],
                      finalize_metrics=lambda s: s)
    loop = TrainLoop.__new__(TrainLoop)
    loop.cfg, loop.engine, loop.spec, loop.lengths = cfg, engine, dummy, table.lengths

    def ce_step() -> None:
        from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

        tokens = float(table.response_lengths.sum())

        def fn(logits, mb):
            nll = vocab_parallel_cross_entropy(logits.float().transpose(0, 1).contiguous(),
                                               mb.targets.transpose(0, 1).contiguous()).transpose(0, 1)
            return (nll * mb.loss_mask).sum() / tokens, {"loss_sum": (nll * mb.loss_mask).sum().detach()}

        outs = engine.run(loop.micro_batches(rows, {}), fn, forward_only=False)
        reduce_metrics(outs, ["loss_sum"], src_is_owner=True)
        engine.step()

    s1_keys = stage1.stage1_metric_keys(cfg)

    def s1_step() -> None:
        outs = engine.run(loop.micro_batches(rows, {"ref_logp": ref}), stage1.make_stage1_loss(cfg, run, table, rows),
                          forward_only=False)
        sums = reduce_metrics(outs, s1_keys, src_is_owner=True)
        assert all(np.isfinite(list(sums.values()))) and engine.grads_finite()
        engine.step()

    from erpd_megatron.config.schema import TeacherSignalConfig

    cfg.stage2.teachers = [TeacherSignalConfig(model="teacher0", signal="topk_kl")]
    s2_keys = stage2.stage2_metric_keys(cfg)

    def s2_step() -> None:
        lru.clear()
        outs = engine.run(loop.micro_batches(rows, s2_arrays), stage2.make_stage2_loss(cfg, run, rows),
                          forward_only=False)
        sums = reduce_metrics(outs, s2_keys, src_is_owner=True)
        assert all(np.isfinite(list(sums.values()))) and engine.grads_finite()
        engine.step()

    fns = {"ce": ce_step, "stage1": s1_step, "stage2": s2_step}
    for f in fns.values():  # warm-up
        f()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(args.steps):
        for name, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    tok = int(table.lengths.sum())
    print(f"device: {'cuda' if torch.cuda.is_available() else 'cpu'}; {n} sequences, {tok} tokens per step, "
          f"vocab {v}, layers {cfg.model.num_layers}, hidden {cfg.model.hidden_size}, top-k {k}")
    print(f"{'step':<10}{'median s':>10}{'tokens/s':>12}{'ratio':>8}")
    for name in fns:
        print(f"{name:<10}{med[name]:>10.4f}{tok / med[name]:>12.0f}{med[name] / med['ce']:>8.3f}")
    print(f"RESULT stage1_step_ratio={med['stage1'] / med['ce']:.3f} stage2_step_ratio={med['stage2'] / med['ce']:.3f}")


if __name__ == "__main__":
    main()
