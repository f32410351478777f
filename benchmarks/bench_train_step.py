"""Cost of an ERPD optimizer step against Megatron's own language-model loss step.

For the same model, batch, micro-batching, layout and dtype, on one process, this times

* ``megatron``: the baseline, Megatron's own path. ``GPTModel.forward(input_ids,
  position_ids, attention_mask=None, labels=targets)`` computes the loss itself in
  ``_postprocess`` -> ``compute_language_model_loss`` (megatron/core/models/gpt/gpt_model.py
  and models/common/language_module/language_module.py, megatron-core 0.16.1):
  ``vocab_parallel_cross_entropy`` on the output layer's ``[s, b, V/tp]`` logits, no copy,
  loss returned ``[b, s]``. The loss function masks and token-means it (as
  pretrain_gpt's ``loss_func``); the same pipeline schedule
  (``get_forward_backward_func``), DDP buffers, optimizer and LR step as the ERPD rows.
* ``stage1``: the real Stage-1 step: ``erpd_megatron.train.stage1.build_spec`` on a
  :class:`StageRun` holding this engine and table (it scores the anchors ``lp_r`` with the
  real forward-only scoring), then ``TrainLoop._step`` (micro-batches with the anchor
  arrays, the configured loss with entropy/KL/drift metrics, metric reduction, NaN/Inf
  guard, optimizer step).
* ``stage2``: the real Stage-2 step: a teacher cache in the real on-disk format (written by
  ``CacheWriter``, checked by ``stage2.open_cache``), ``stage2.build_spec``, then
  ``TrainLoop._step``. The spec's record LRU is emptied before every step, so each step
  decodes every sample from the memory-mapped shards, as in an epoch over a large table.

Rows run interleaved (megatron, stage1, stage2, megatron, ...) after ``--warmup`` discarded
rounds, ``--reps`` timed rounds; torch and OpenMP use ``--threads`` threads (default 1) for
every row alike. Reported: median and min-max of the wall time per row, and ratios of
medians. Also timed, for information: the ``[s, b, V] -> [b, s, V]`` logits copy that
``GPTModel.forward`` without labels makes (``logits.transpose(0, 1).contiguous()``, forward,
and its backward), which both ERPD rows pay today and the baseline does not.

    python benchmarks/bench_train_step.py [--quick] [--reps 5] [--device cuda] [--dtype bf16]
        [model.num_layers=4 ...]

Last line: ``RESULT stage1_step_ratio=... stage2_step_ratio=... ...`` (medians).
"""

from __future__ import annotations

import argparse
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
    p.add_argument(
        "--quick", action="store_true", help="a small model and batch, 2 reps (smoke run)"
    )
    p.add_argument("--reps", type=int, default=None, help="timed interleaved rounds (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="discarded rounds before timing")
    p.add_argument("--seqs", type=int, default=None, help="sequences per global batch (default 16)")
    p.add_argument("--topk", type=int, default=64)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument(
        "--dtype", choices=["fp32", "bf16"], default="fp32", help="params and logits dtype"
    )
    p.add_argument("--threads", type=int, default=1, help="torch/OpenMP threads (0: torch default)")
    p.add_argument("overrides", nargs="*", help="config overrides a.b=c")
    return p.parse_args()


def _setup_device(args: argparse.Namespace) -> None:
    """Before torch is imported: pin threads, hide GPUs for --device cpu."""
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""


def _stats(ts: list[float]) -> tuple[float, float, float]:
    return statistics.median(ts), min(ts), max(ts)


def main() -> None:
    args = _args()
    _setup_device(args)
    import numpy as np
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible")
    if args.threads:
        torch.set_num_threads(args.threads)
    reps = args.reps or (2 if args.quick else 5)
    n = args.seqs or (8 if args.quick else 16)

    from erpd_megatron.cache.manifest import finalize_manifest
    from erpd_megatron.cache.writer import CacheWriter
    from erpd_megatron.config import load_config
    from erpd_megatron.data.batching import SampleTable, group_advantages
    from erpd_megatron.runtime.distributed import init_distributed
    from erpd_megatron.train import stage1, stage2
    from erpd_megatron.train.common import StageRun
    from erpd_megatron.train.engine import Engine, _device
    from erpd_megatron.train.loop import TrainLoop

    if args.quick:
        model = [
            "model.num_layers=2",
            "model.hidden_size=128",
            "model.ffn_hidden_size=384",
            "model.num_attention_heads=4",
            "model.num_query_groups=2",
            "model.kv_channels=32",
            "model.vocab_size=8192",
            "data.max_tokens_per_microbatch=1024",
        ]
        prompt_len, resp_len = 32, 96
    else:
        model = [
            "model.num_layers=4",
            "model.hidden_size=256",
            "model.ffn_hidden_size=768",
            "model.num_attention_heads=8",
            "model.num_query_groups=4",
            "model.kv_channels=32",
            "model.vocab_size=32000",
            "data.max_tokens_per_microbatch=2048",
        ]
        prompt_len, resp_len = 64, 192
    tmp = Path(tempfile.mkdtemp(prefix="erpd-bench-step-"))
    (
        tmp / "pi_r"
    ).mkdir()  # checkpoint.load: fingerprinted by the anchor scores and the cache check
    overrides = (
        model
        + [
            f"checkpoint.load={tmp / 'pi_r'}",
            f"data.global_batch_size={n}",
            f"cache.topk={args.topk}",
            f"precision.params_dtype={args.dtype}",
            "data.max_seq_length=512",
            f"output_dir={tmp}",
            "logging.progress_bar=false",
            f"stage2.cache_dir={tmp / 'cache'}",
        ]
        + args.overrides
    )
    cfg = load_config(ROOT / "configs/recipes/tiny-cpu.yaml", overrides)
    init_distributed(cfg)
    rng = np.random.default_rng(0)
    v = cfg.model.vocab_size
    table = SampleTable(
        sample_ids=np.arange(n, dtype=np.int64),
        group_ids=np.arange(n) // 4,
        prompt_ids=[rng.integers(1, v, prompt_len) for _ in range(n)],
        response_ids=[rng.integers(1, v, resp_len - (i % 4) * 8) for i in range(n)],
        rewards=rng.integers(0, 2, n).astype(np.float32),
    )
    table.advantages = group_advantages(table.rewards, table.group_ids)
    engine = Engine(cfg, train=True, total_steps=1000)

    def stage_run(stage: str, context=None) -> StageRun:
        run = StageRun.__new__(StageRun)  # the real class; its __init__ would load data and weights
        run.cfg, run.stage, run.out_dir, run._keys = cfg, stage, tmp / stage, {}
        run.table, run.data_fingerprint, run.context, run.engine = table, "bench", context, engine
        return run

    # --- Stage 1: the real spec (scores the anchors with the real forward-only pass) ---
    run1 = stage_run("stage1")
    spec1 = stage1.build_spec(cfg, run1)
    loop1 = TrainLoop(cfg, engine, spec1, run1.out_dir)
    spec1.on_epoch_start(0)
    arrays1 = spec1.token_arrays(0)
    rows = loop1.batches(0)[0]
    assert len(rows) == n
    ref = arrays1["ref_logp"]

    # --- Stage 2: a teacher cache in the real format, the real spec ---
    k = args.topk
    with CacheWriter(
        tmp / "cache",
        rank=0,
        sample_ids=table.sample_ids.tolist(),
        vocab_size=v,
        k=k,
        sampled_models=["base", "teacher0"],
        teachers=["teacher0"],
        ref_teachers=["teacher0"],
        value_dtype=cfg.cache.dtype,
    ) as w:
        for sid in w.pending():
            i = int(sid)
            t = len(table.response_ids[i])
            ids = np.stack([rng.choice(v, k, replace=False) for _ in range(t)])
            lps = np.sort(rng.uniform(-12, -1, (t, k)).astype(np.float32), axis=1)[:, ::-1] - 2.0
            lp_t = (ref[i] + rng.normal(0, 0.05, t)).astype(np.float32).clip(max=-1e-3)
            w.write_sample(
                i, sampled={"base": ref[i], "teacher0": lp_t}, topk={"teacher0": (ids, lps, lps)}
            )
    from erpd_megatron.utils.files import dir_fingerprint

    fp = dir_fingerprint(tmp / "pi_r")
    finalize_manifest(
        tmp / "cache",
        1,
        {
            "rollout_fingerprint": "bench",
            "models": {
                "base": {"path": str(tmp / "pi_r"), "fingerprint": fp},
                "teacher0": {"path": "-", "fingerprint": "-"},
            },
        },
    )
    run2 = stage_run("stage2", stage2.open_cache(cfg, table, "bench"))
    spec2 = stage2.build_spec(cfg, run2)
    loop2 = TrainLoop(cfg, engine, spec2, run2.out_dir)
    arrays2 = spec2.token_arrays(0)
    lru = next(iter(arrays2.values())).lru

    # --- Megatron's own loss path on the same micro-batches ---
    from megatron.core.pipeline_parallel import get_forward_backward_func

    tokens = float(table.response_lengths[rows].sum())
    device = _device()

    def megatron_step() -> None:
        mbs = loop1.micro_batches(rows, {})
        nmb = len(mbs)
        for m in engine.model:
            m.zero_grad_buffer()
        engine.optimizer.zero_grad()
        it = iter([mb.to(device) for mb in mbs])

        def forward_step(data_iterator, model):
            mb = next(data_iterator)
            out = model(mb.input_ids, mb.position_ids, None, labels=mb.targets)  # loss [b, s]

            def loss_func(loss: torch.Tensor):
                total = (loss.float() * mb.loss_mask).sum()
                return total * (nmb / tokens), {"lm loss": total.detach()}

            return out, loss_func

        get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=it,
            model=engine.model[0],
            num_microbatches=nmb,
            seq_length=max(int(mb.input_ids.shape[1]) for mb in mbs),
            micro_batch_size=max(int(mb.input_ids.shape[0]) for mb in mbs),
            forward_only=False,
        )
        engine.step()

    def stage1_step() -> None:
        sums, _, applied = loop1._step(rows, arrays1)
        assert applied and np.isfinite(list(sums.values())).all()

    def stage2_step() -> None:
        lru.clear()  # every sample decoded from the shards again, as in an epoch over a big table
        sums, _, applied = loop2._step(rows, arrays2)
        assert applied and np.isfinite(list(sums.values())).all()

    # the logits copy of GPTModel.forward without labels (forward) and its backward
    mbs = loop1.micro_batches(rows, {})
    ldtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    from erpd_megatron.config.validate import padded_vocab_size

    v_local = padded_vocab_size(cfg.model, engine.tp_size) // engine.tp_size
    shapes = [(int(mb.input_ids.shape[1]), int(mb.input_ids.shape[0]), v_local) for mb in mbs]

    def logits_copy() -> None:
        for s, b, vv in shapes:
            x = torch.empty(s, b, vv, dtype=ldtype, device=device).requires_grad_()
            y = x.transpose(0, 1).contiguous()
            y.backward(torch.ones_like(y))
            _ = x.grad.contiguous()
            del x, y
        if device.type == "cuda":
            torch.cuda.synchronize()

    fns = {"megatron": megatron_step, "stage1": stage1_step, "stage2": stage2_step}
    times: dict[str, list[float]] = {name: [] for name in [*fns, "copy"]}
    cpu: dict[str, list[float]] = {name: [] for name in times}

    def timed(f) -> tuple[float, float]:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0, c0 = time.perf_counter(), time.process_time()
        f()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0, time.process_time() - c0

    for r in range(args.warmup + reps):
        for name, f in [*fns.items(), ("copy", logits_copy)]:
            dt, dc = timed(f)
            if r >= args.warmup:
                times[name].append(dt)
                cpu[name].append(dc)

    med = {name: _stats(ts) for name, ts in times.items()}
    cmed = {name: statistics.median(ts) for name, ts in cpu.items()}
    tok = int(table.lengths[rows].sum())
    base = med["megatron"][0]
    print(
        f"# bench_train_step: device {device.type}, dtype {args.dtype}, threads "
        f"{args.threads or 'default'}, {n} sequences, {tok} tokens ({int(tokens)} response) per step in "
        f"{len(mbs)} micro-batches, vocab {v}, layers {cfg.model.num_layers}, hidden {cfg.model.hidden_size}, "
        f"top-k {k}, stage1 loss {cfg.stage1.loss}, {reps} interleaved reps after {args.warmup} warm-up, "
        f"load avg {' '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )
    print(
        f"{'row':<34}{'median s':>10}{'min s':>9}{'max s':>9}{'tokens/s':>10}{'ratio':>8}{'cpu s':>9}"
        f"{'cpu ratio':>10}"
    )
    labels = {
        "megatron": "megatron GPTModel(labels=) + CE",
        "stage1": "ERPD stage 1 (TrainLoop._step)",
        "stage2": "ERPD stage 2 (TrainLoop._step)",
        "copy": "  [s,b,V]->[b,s,V] logits copy",
    }
    for name, (m, lo, hi) in med.items():
        print(
            f"{labels[name]:<34}{m:>10.4f}{lo:>9.4f}{hi:>9.4f}{tok / m:>10.0f}{m / base:>8.3f}"
            f"{cmed[name]:>9.4f}{cmed[name] / cmed['megatron']:>10.3f}"
        )
    print(
        "# ratio: median / megatron median (wall); cpu: median process time (user+sys of this process, "
        "less disturbed by other load). The copy row is part of both ERPD rows today (GPTModel "
        "without labels returns logits.transpose(0, 1).contiguous()); the baseline never makes it."
    )
    r1, r2 = med["stage1"][0] / base, med["stage2"][0] / base
    print(
        f"RESULT stage1_step_ratio={r1:.3f} stage2_step_ratio={r2:.3f} "
        f"stage1_ratio_min={min(times['stage1']) / max(times['megatron']):.3f} "
        f"stage1_ratio_max={max(times['stage1']) / min(times['megatron']):.3f} "
        f"megatron_step_s={base:.4f} stage1_step_s={med['stage1'][0]:.4f} stage2_step_s={med['stage2'][0]:.4f} "
        f"logits_copy_s={med['copy'][0]:.4f} stage1_step_cpu_ratio={cmed['stage1'] / cmed['megatron']:.3f} "
        f"stage2_step_cpu_ratio={cmed['stage2'] / cmed['megatron']:.3f} device={device.type} dtype={args.dtype}"
    )


if __name__ == "__main__":
    main()
