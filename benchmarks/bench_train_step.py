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
and its backward). Neither side pays it: the ERPD engine calls the model with ``labels=``
too and takes the output layer's ``[s, b, V]`` logits unchanged
(:func:`erpd_megatron.train.engine.token_rows`); the row shows what it cost before.

    python benchmarks/bench_train_step.py [--quick] [--reps 5] [--device cuda] [--dtype bf16]
        [model.num_layers=4 ...]

* ``moe_megatron`` / ``moe_stage1`` (``--moe``, on by default): the same two steps on the
  MoE model of ``configs/models/qwen3-moe-tiny.yaml`` (its own engine; megatron adds the
  router's aux loss on both sides), issue 16 item 9.

Ratios: ``X_step_ratio`` is median(X) / median(baseline); the spread beside it is the
min-max of the per-round ratios (each round runs both rows back to back).

Last line: ``RESULT stage1_step_ratio=... stage2_step_ratio=... moe_stage1_step_ratio=...``.
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
    p.add_argument(
        "--moe",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also the MoE rows (qwen3-moe-tiny)",
    )
    p.add_argument(
        "--profile",
        choices=["megatron", "stage1", "stage2", "moe_megatron", "moe_stage1"],
        default=None,
        help="instead of timing: torch.profiler over --reps steps of one row (op table)",
    )
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


def _profile(step, args: argparse.Namespace, reps: int) -> None:
    """Where one row's time goes: a warm-up step, then torch.profiler (CPU, and CUDA when
    on a GPU) over ``reps`` steps; the ops by self time, and Python by cumulative time."""
    import cProfile
    import pstats

    import torch

    step()
    acts = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(reps):
            step()
    key = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=30))
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(reps):
        step()
    pr.disable()
    pstats.Stats(pr).sort_stats("cumulative").print_stats(45)


def _model_overrides(quick: bool) -> tuple[list[str], int, int]:
    """The dense model and data shape: (overrides, prompt length, response length)."""
    if quick:
        return (
            [
                "model.num_layers=2",
                "model.hidden_size=128",
                "model.ffn_hidden_size=384",
                "model.num_attention_heads=4",
                "model.num_query_groups=2",
                "model.kv_channels=32",
                "model.vocab_size=8192",
                "data.max_tokens_per_microbatch=1024",
            ],
            32,
            96,
        )
    return (
        [
            "model.num_layers=4",
            "model.hidden_size=256",
            "model.ffn_hidden_size=768",
            "model.num_attention_heads=8",
            "model.num_query_groups=4",
            "model.kv_channels=32",
            "model.vocab_size=32000",
            "data.max_tokens_per_microbatch=2048",
        ],
        64,
        192,
    )


def _moe_overrides() -> list[str]:
    """``model.*`` overrides of every field of configs/models/qwen3-moe-tiny.yaml."""
    import yaml

    fields = yaml.safe_load((ROOT / "configs/models/qwen3-moe-tiny.yaml").read_text())
    return [f"model.{k}={v}" for k, v in fields.items()]


class Rows:
    """The timed steps of one model: Megatron's own loss step, the real Stage-1 step and
    (``stage2``) the real Stage-2 step, all on one engine, table and set of micro-batches."""

    def __init__(self, cfg, table, tmp: Path, *, stage2: bool, seed: int) -> None:
        import numpy as np

        from erpd_megatron.train import stage1
        from erpd_megatron.train.engine import Engine, _device
        from erpd_megatron.train.loop import TrainLoop

        self.cfg, self.table, self.tmp = cfg, table, tmp
        (tmp / "pi_r").mkdir(parents=True, exist_ok=True)  # fingerprinted by anchors/cache
        self.engine = Engine(cfg, train=True, total_steps=1000)
        self.device = _device()
        self.rng = np.random.default_rng(seed)
        self.loop1 = TrainLoop(cfg, self.engine, self._spec("stage1", stage1), tmp / "stage1")
        self.loop1.spec.on_epoch_start(0)
        self.arrays1 = self.loop1.spec.token_arrays(0)
        self.rows = self.loop1.batches(0)[0]
        assert len(self.rows) == len(table)
        self.tokens = float(table.response_lengths[self.rows].sum())
        self.steps = {"megatron": self.megatron_step, "stage1": self.stage1_step}
        if stage2:
            self._build_stage2()
            self.steps["stage2"] = self.stage2_step

    def _run(self, stage: str, context=None):
        from erpd_megatron.train.common import StageRun

        run = StageRun.__new__(StageRun)  # the real class; __init__ would load data, weights
        run.cfg, run.stage, run.out_dir, run._keys = self.cfg, stage, self.tmp / stage, {}
        run.table, run.data_fingerprint, run.context = self.table, "bench", context
        run.engine = self.engine
        return run

    def _spec(self, stage: str, module, context=None):
        return module.build_spec(self.cfg, self._run(stage, context))

    def _build_stage2(self) -> None:
        """A teacher cache in the real format (CacheWriter, finalize_manifest, open_cache)."""
        import numpy as np

        from erpd_megatron.cache.manifest import finalize_manifest
        from erpd_megatron.cache.writer import CacheWriter
        from erpd_megatron.train import stage2
        from erpd_megatron.train.loop import TrainLoop
        from erpd_megatron.utils.files import dir_fingerprint

        cfg, table, tmp, rng = self.cfg, self.table, self.tmp, self.rng
        ref, v, k = self.arrays1["ref_logp"], cfg.model.vocab_size, cfg.cache.topk
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
                lps = np.sort(rng.uniform(-12, -1, (t, k)).astype(np.float32), axis=1)[:, ::-1]
                lps = lps - 2.0
                lp_t = (ref[i] + rng.normal(0, 0.05, t)).astype(np.float32).clip(max=-1e-3)
                w.write_sample(
                    i,
                    sampled={"base": ref[i], "teacher0": lp_t},
                    topk={"teacher0": (ids, lps, lps)},
                )
        finalize_manifest(
            tmp / "cache",
            1,
            {
                "rollout_fingerprint": "bench",
                "models": {
                    "base": {
                        "path": str(tmp / "pi_r"),
                        "fingerprint": dir_fingerprint(tmp / "pi_r"),
                    },
                    "teacher0": {"path": "-", "fingerprint": "-"},
                },
            },
        )
        cache = stage2.open_cache(cfg, table, "bench")
        self.loop2 = TrainLoop(
            cfg, self.engine, self._spec("stage2", stage2, cache), tmp / "stage2"
        )
        self.arrays2 = self.loop2.spec.token_arrays(0)
        self.lru = next(iter(self.arrays2.values())).lru

    def megatron_step(self) -> None:
        """Megatron's own loss path on the Stage-1 micro-batches (see the module docstring)."""
        import torch
        from megatron.core.pipeline_parallel import get_forward_backward_func

        engine, tokens = self.engine, self.tokens
        mbs = self.loop1.micro_batches(self.rows, {})
        nmb = len(mbs)
        for m in engine.model:
            m.zero_grad_buffer()
        engine.optimizer.zero_grad()
        it = iter([mb.to(self.device) for mb in mbs])

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

    def stage1_step(self) -> None:
        import numpy as np

        sums, _, applied = self.loop1._step(self.rows, self.arrays1)
        assert applied and np.isfinite(list(sums.values())).all()

    def stage2_step(self) -> None:
        import numpy as np

        self.lru.clear()  # every sample decoded from the shards again, as over a big table
        sums, _, applied = self.loop2._step(self.rows, self.arrays2)
        assert applied and np.isfinite(list(sums.values())).all()


def _table(n: int, v: int, prompt_len: int, resp_len: int, seed: int):
    import numpy as np

    from erpd_megatron.data.batching import SampleTable, group_advantages

    rng = np.random.default_rng(seed)
    table = SampleTable(
        sample_ids=np.arange(n, dtype=np.int64),
        group_ids=np.arange(n) // 4,
        prompt_ids=[rng.integers(1, v, prompt_len) for _ in range(n)],
        response_ids=[rng.integers(1, v, resp_len - (i % 4) * 8) for i in range(n)],
        rewards=rng.integers(0, 2, n).astype(np.float32),
    )
    table.advantages = group_advantages(table.rewards, table.group_ids)
    return table


def main() -> None:
    args = _args()
    _setup_device(args)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible")
    if args.threads:
        torch.set_num_threads(args.threads)
    reps = args.reps or (2 if args.quick else 5)
    n = args.seqs or (8 if args.quick else 16)

    from erpd_megatron.config import load_config
    from erpd_megatron.config.validate import padded_vocab_size
    from erpd_megatron.runtime.distributed import init_distributed

    model, prompt_len, resp_len = _model_overrides(args.quick)
    tmp = Path(tempfile.mkdtemp(prefix="erpd-bench-step-"))

    def config(model_ov: list[str], name: str):
        return load_config(
            ROOT / "configs/recipes/tiny-cpu.yaml",
            model_ov
            + [
                f"checkpoint.load={tmp / name / 'pi_r'}",
                f"data.global_batch_size={n}",
                f"cache.topk={args.topk}",
                f"precision.params_dtype={args.dtype}",
                "data.max_seq_length=512",
                f"output_dir={tmp / name}",
                "logging.progress_bar=false",
                f"stage2.cache_dir={tmp / name / 'cache'}",
            ]
            + args.overrides,
        )

    cfg = config(model, "dense")
    init_distributed(cfg)
    dense = Rows(
        cfg,
        _table(n, cfg.model.vocab_size, prompt_len, resp_len, 0),
        tmp / "dense",
        stage2=True,
        seed=0,
    )
    fns = {name: f for name, f in dense.steps.items()}
    moe = None
    if args.moe:
        mcfg = config(_moe_overrides() + [m for m in model if m.startswith("data.")], "moe")
        mtable = _table(n, mcfg.model.vocab_size, prompt_len, resp_len, 0)
        moe = Rows(mcfg, mtable, tmp / "moe", stage2=False, seed=0)
        fns.update({f"moe_{name}": f for name, f in moe.steps.items()})
    device = dense.device
    if args.profile:
        _profile(fns[args.profile], args, reps)
        return

    # the logits copy of GPTModel.forward without labels (forward) and its backward
    mbs = dense.loop1.micro_batches(dense.rows, {})
    ldtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    tp = dense.engine.tp_size
    v_local = padded_vocab_size(cfg.model, tp) // tp
    shapes = [(int(mb.input_ids.shape[1]), int(mb.input_ids.shape[0]), v_local) for mb in mbs]

    def logits_copy() -> None:
        for s, b, vv in shapes:
            x = torch.empty(s, b, vv, dtype=ldtype, device=device).requires_grad_()
            y = x.transpose(0, 1).contiguous()
            y.backward(torch.ones_like(y))
            _ = x.grad.contiguous()
            del x, y

    fns["copy"] = logits_copy
    times: dict[str, list[float]] = {name: [] for name in fns}
    cpu: dict[str, list[float]] = {name: [] for name in fns}

    def timed(f) -> tuple[float, float]:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0, c0 = time.perf_counter(), time.process_time()
        f()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0, time.process_time() - c0

    load0 = os.getloadavg()
    for r in range(args.warmup + reps):
        for name, f in fns.items():
            dt, dc = timed(f)
            if r >= args.warmup:
                times[name].append(dt)
                cpu[name].append(dc)
    load1 = os.getloadavg()

    med = {name: _stats(ts) for name, ts in times.items()}
    cmed = {name: statistics.median(ts) for name, ts in cpu.items()}
    tok = int(dense.table.lengths[dense.rows].sum())
    print(
        f"# bench_train_step: device {device.type}, dtype {args.dtype}, threads "
        f"{args.threads or 'default'}, {n} sequences, {tok} tokens ({int(dense.tokens)} "
        f"response) per step in {len(mbs)} micro-batches, vocab {cfg.model.vocab_size}, "
        f"layers {cfg.model.num_layers}, hidden {cfg.model.hidden_size}, top-k {args.topk}, "
        f"stage1 loss {cfg.stage1.loss}, {reps} interleaved reps after {args.warmup} warm-up"
    )
    if moe is not None:
        mc = moe.cfg.model
        print(
            f"# MoE rows: qwen3-moe-tiny ({mc.num_experts} experts, top-{mc.moe_router_topk}, "
            f"layers {mc.num_layers}, hidden {mc.hidden_size}, vocab {mc.vocab_size}), the same "
            "batch shape"
        )
    print(
        f"# load average before {' '.join(f'{x:.2f}' for x in load0)}, after "
        f"{' '.join(f'{x:.2f}' for x in load1)}"
    )
    base_of = {name: "moe_megatron" if name.startswith("moe_") else "megatron" for name in fns}
    base_of["copy"] = "megatron"

    def paired(name: str) -> list[float]:
        b = times[base_of[name]]
        return [t / bt for t, bt in zip(times[name], b)]

    print(
        f"{'row':<36}{'median s':>10}{'min s':>9}{'max s':>9}{'ratio':>8}{'round ratios':>15}"
        f"{'cpu s':>9}{'cpu ratio':>10}"
    )
    labels = {
        "megatron": "megatron GPTModel(labels=) + CE",
        "stage1": "ERPD stage 1 (TrainLoop._step)",
        "stage2": "ERPD stage 2 (TrainLoop._step)",
        "moe_megatron": "MoE: megatron GPTModel(labels=) + CE",
        "moe_stage1": "MoE: ERPD stage 1 (TrainLoop._step)",
        "copy": "  [s,b,V]->[b,s,V] logits copy",
    }
    ratio = {}
    for name, (m, lo, hi) in med.items():
        b = base_of[name]
        ratio[name] = m / med[b][0]
        pr = paired(name)
        print(
            f"{labels[name]:<36}{m:>10.4f}{lo:>9.4f}{hi:>9.4f}{ratio[name]:>8.3f}"
            f"{min(pr):>8.3f}-{max(pr):<6.3f}{cmed[name]:>9.4f}{cmed[name] / cmed[b]:>10.3f}"
        )
    print(
        "# ratio: median / the baseline's median (wall); round ratios: min-max of each round's "
        "row / baseline; cpu: median process time (user+sys of this process, less disturbed by "
        "other load). The copy row is what GPTModel without labels adds "
        "(logits.transpose(0, 1).contiguous()); neither side makes it (both pass labels=)."
    )

    def spread(name: str) -> str:
        pr = paired(name)
        return f"{name}_ratio_min={min(pr):.3f} {name}_ratio_max={max(pr):.3f} "

    moe_part = ""
    if moe is not None:
        moe_part = (
            f"moe_stage1_step_ratio={ratio['moe_stage1']:.3f} {spread('moe_stage1')}"
            f"moe_megatron_step_s={med['moe_megatron'][0]:.4f} "
            f"moe_stage1_step_s={med['moe_stage1'][0]:.4f} "
        )
    print(
        f"RESULT stage1_step_ratio={ratio['stage1']:.3f} stage2_step_ratio={ratio['stage2']:.3f} "
        + moe_part
        + spread("stage1")
        + spread("stage2")
        + f"megatron_step_s={med['megatron'][0]:.4f} stage1_step_s={med['stage1'][0]:.4f} "
        f"stage2_step_s={med['stage2'][0]:.4f} logits_copy_s={med['copy'][0]:.4f} "
        f"stage1_step_cpu_ratio={cmed['stage1'] / cmed['megatron']:.3f} "
        f"stage2_step_cpu_ratio={cmed['stage2'] / cmed['megatron']:.3f} "
        f"load_avg={load1[0]:.2f} device={device.type} dtype={args.dtype}"
    )


if __name__ == "__main__":
    main()
