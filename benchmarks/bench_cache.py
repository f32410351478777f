"""Teacher-cache benchmark: ERPD's cache format against the peers' top-k layouts, measured.

    python benchmarks/bench_cache.py [--quick] [--tokens 65536] [--reps 5] [--device cuda]
        [--dtype bf16] [model.hidden_size=512 ...]

1. Formats, at Qwen's vocabulary (151,936) and k = 64. The same top-k arrays (ids, log-probs
   per position of prompt + response) are written in each layout, read back, and timed:

   * ERPD: :class:`CacheWriter` shards (18-bit packed ids, fp16 values; response tokens
     only), read with ``TeacherCache.get`` (memory-mapped; ids unpacked to int64).
   * Megatron-LM offline logits (megatron/training/distillation/logits_saver.py and
     utils_logits.py, NVIDIA/Megatron-LM @ d98e8a6): per iteration one
     ``torch.save({'values': [fp16 (seq, batch, k)], 'indices_low': [uint16], 'bit_17':
     [bool]})`` payload, zstd level 3, one tar member ``{iteration}.pt.zst`` after a meta
     member; decoded as ``decode_logprobs_payload`` does (zstd, ``torch.load``,
     ``unpack_indices``). Every position of the sequence is stored (its saver hooks the
     output layer of whole training sequences). Its packing rule is run on vocab 151,936:
     the saver's assertion refuses it, and ids >= 2^17 do not survive ``pack_indices``.
   * verl (GKD recipe, verl-project/verl-recipe @ 48ea0a7, gkd/megatron/teacher_utils.py
     ``get_teacher_knowledge``; dtypes asserted in gkd/megatron/teacher/client.py): in
     memory, ``teacher_topk_logps`` fp32 and ``teacher_topk_indices`` int32, each
     ``[batch, padded input length, k]`` (prompt + response, padded to the batch's longest).
   * NeMo-RL (nemo_rl/models/policy/workers/dtensor_policy_worker_v2.py ``get_topk_logits``
     and nemo_rl/distributed/model_utils.py ``distributed_vocab_topk``, NVIDIA-NeMo/RL @
     7ea279a): in memory, ``topk_logits`` fp32 and ``topk_indices`` int64 ``[batch, padded
     sequence length, k]``.

   Bytes per entry count every byte the layout keeps (headers, padding, prompt positions)
   divided by the response entries (response tokens x k), the entries a trainer reads;
   ``stored`` divides by the positions the layout actually stores. Decode: entries per
   second to per-sample ``(ids, values)`` arrays (for the in-memory layouts: a contiguous
   copy of the sample's slice, as their trainers split micro-batches).

2. Cache tool overhead: the full cache pass of the real tool's pieces
   (``erpd_megatron.train.cache_pass``: ``rank_order``, ``pack_in_order`` micro-batches,
   ``_score_microbatch`` for the teacher (log-probs + vocab-parallel top-k) and pi_r
   (log-probs + its log-probs at the teacher's ids), ``CacheWriter`` (pack, quantise,
   checksum, write), ``finalize_manifest`` (SHA-256 verify)) against a forward-only scoring
   pass of the same two models, layout and micro-batches: Megatron's own
   ``GPTModel.forward(..., labels=targets)`` under the same forward-only schedule, log-probs
   to host arrays. Interleaved rounds (``--reps``), medians.

Last line: ``RESULT bytes_per_entry=... decode_entries_per_s=... cache_tool_overhead=...``.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import statistics
import sys
import tarfile
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
warnings.filterwarnings("ignore")

VOCAB, K = 151936, 64
MEGATRON_LM_MAX_VOCAB = 2**17  # logits_saver.py: _MAX_VOCAB_SIZE = 2 ** 17 (17 bits)


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--quick", action="store_true", help="smoke run: fewer tokens, a tiny model, 2 reps"
    )
    p.add_argument(
        "--tokens",
        type=int,
        default=None,
        help="response tokens in the format part (default 65536)",
    )
    p.add_argument(
        "--seq", type=int, default=1024, help="longest response per sample (format part)"
    )
    p.add_argument("--reps", type=int, default=None, help="interleaved timed rounds (default 5)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument(
        "--dtype", choices=["fp32", "bf16"], default="fp32", help="model dtype of the tool pass"
    )
    p.add_argument("--threads", type=int, default=1, help="torch/OpenMP threads (0: torch default)")
    p.add_argument("--skip-tool", action="store_true", help="formats only (no models)")
    p.add_argument("overrides", nargs="*", help="config overrides for the tool pass, a.b=c")
    return p.parse_args()


# ---------------------------------------------------------------- data -----------------------
def make_data(n_samples: int, seq: int, prompt: int, seed: int = 0) -> list[dict]:
    """Per sample: top-k ids/log-probs for every position (prompt + response), sorted by
    log-prob, and the response length."""
    import numpy as np

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_samples):
        length = int(rng.integers(seq // 2, seq + 1))
        pos = prompt + length
        ids = np.stack([rng.choice(VOCAB, K, replace=False) for _ in range(pos)]).astype(np.int64)
        lps = np.sort(-rng.exponential(4.0, size=(pos, K)).astype(np.float32), axis=1)[:, ::-1]
        out.append(
            {
                "ids": ids,
                "lps": np.ascontiguousarray(lps),
                "prompt": prompt,
                "len": length,
                "base": -rng.exponential(1.0, length).astype(np.float32),
                "teacher0": -rng.exponential(1.0, length).astype(np.float32),
            }
        )
    return out


CPU_TIMES: dict[str, list[float]] = {}
"""Process time (user+sys) of every timed run, by name (less disturbed by other load)."""


def _timed_rounds(fns: dict, reps: int, warmup: int = 1) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(warmup + reps):
        for name, f in fns.items():
            t0, c0 = time.perf_counter(), time.process_time()
            f()
            if r >= warmup:
                times[name].append(time.perf_counter() - t0)
                CPU_TIMES.setdefault(name, []).append(time.process_time() - c0)
    return times


# ---------------------------------------------------------------- formats --------------------
def erpd_write(root: Path, data: list[dict], value_dtype: str = "fp16") -> Path:
    from erpd_megatron.cache import CacheWriter, finalize_manifest

    shutil.rmtree(root, ignore_errors=True)
    with CacheWriter(
        root,
        rank=0,
        sample_ids=list(range(len(data))),
        vocab_size=VOCAB,
        k=K,
        sampled_models=["base", "teacher0"],
        teachers=["teacher0"],
        value_dtype=value_dtype,
        max_shard_bytes=64 << 20,
        fsync=False,
    ) as w:
        for sid in w.pending():
            d = data[sid]
            p = d["prompt"]
            w.write_sample(
                sid,
                sampled={"base": d["base"], "teacher0": d["teacher0"]},
                topk={"teacher0": (d["ids"][p:], d["lps"][p:])},
            )
    models = {n: {"path": f"/ckpt/{n}", "fingerprint": "bench"} for n in ("base", "teacher0")}
    finalize_manifest(
        root, 1, {"rollout_fingerprint": "bench", "models": models}, verify_checksums=False
    )
    return root


def erpd_topk_bytes(root: Path) -> int:
    """Bytes of the shards without the per-token sampled log-prob sections."""
    from erpd_megatron.cache.format import KIND_SAMPLED, ShardFile

    total = 0
    for path in sorted(root.glob("*.erpdc")):
        shard = ShardFile.open(path, verify=False)
        total += shard.file_size - sum(
            nb for (kind, _), (_, nb) in shard.sections.items() if kind == KIND_SAMPLED
        )
        shard.close()
    return total


def megatron_lm_check_vocab(global_vocab_size: int) -> None:
    """Megatron-LM's rule, logits_saver.py (LogitsSaverHooks, before its top-k):
    ``assert global_vocab_size <= _MAX_VOCAB_SIZE``, same message."""
    assert global_vocab_size <= MEGATRON_LM_MAX_VOCAB, (
        f"Global vocab size {global_vocab_size} exceeds maximum supported "
        f"{MEGATRON_LM_MAX_VOCAB} (17 bits)"
    )


def megatron_lm_pack(indices):
    """utils_logits.py ``pack_indices``: lower 16 bits as uint16, the 17th as bool."""
    import torch

    return (indices & 0xFFFF).to(torch.uint16), (indices >> 16).to(torch.bool)


def megatron_lm_unpack(low, bit17):
    """utils_logits.py ``unpack_indices``."""
    return (bit17.long() << 16) | low.long()


def megatron_lm_write(path: Path, data: list[dict], per_iter: int) -> None:
    """One tar: a meta member first, then ``{iteration}.pt.zst`` per iteration, each a zstd
    (level 3) of ``torch.save`` of the per-micro-batch lists (logits_saver.py
    ``_buffer_iteration`` / ``_write_batched_tar``); micro-batch = one sample ``(seq, 1, k)``."""
    import torch
    import zstandard

    comp = zstandard.ZstdCompressor(level=3)
    meta = b'{"dataset_hash": "bench"}'
    with open(path, "wb") as f, tarfile.open(fileobj=f, mode="w") as tar:
        info = tarfile.TarInfo(name="meta.json")
        info.size = len(meta)
        tar.addfile(info, io.BytesIO(meta))
        for it in range(0, len(data), per_iter):
            vals, low, hi = [], [], []
            for d in data[it : it + per_iter]:
                ids = torch.from_numpy(d["ids"])[:, None, :]
                vals.append(torch.from_numpy(d["lps"])[:, None, :].to(torch.float16))
                lo, b17 = megatron_lm_pack(ids)
                low.append(lo)
                hi.append(b17)
            buf = io.BytesIO()
            torch.save({"values": vals, "indices_low": low, "bit_17": hi}, buf)
            payload = comp.compress(buf.getvalue())
            info = tarfile.TarInfo(name=f"{it // per_iter + 1}.pt.zst")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))


def megatron_lm_read(path: Path) -> int:
    """Decode every iteration as utils_logits.py ``decode_logprobs_payload``; returns tokens."""
    import torch
    import zstandard

    tokens = 0
    with tarfile.open(path, "r") as tar:
        for member in tar:
            if not member.name.endswith(".pt.zst"):
                continue
            raw = zstandard.ZstdDecompressor().decompress(tar.extractfile(member).read())
            t = torch.load(io.BytesIO(raw), weights_only=True)
            for v, lo, b17 in zip(t["values"], t["indices_low"], t["bit_17"]):
                ids = megatron_lm_unpack(lo, b17)
                tokens += ids.shape[0]
                _ = v.float()
    return tokens


def padded_layout(data: list[dict], batch: int, val_dtype, idx_dtype) -> list[tuple]:
    """verl / NeMo-RL: per batch ``[batch, longest prompt+response, k]`` zero-padded tensors."""
    import torch

    out = []
    for b0 in range(0, len(data), batch):
        group = data[b0 : b0 + batch]
        s = max(len(d["ids"]) for d in group)
        vals = torch.zeros(len(group), s, K, dtype=val_dtype)
        ids = torch.zeros(len(group), s, K, dtype=idx_dtype)
        for j, d in enumerate(group):
            vals[j, : len(d["ids"])] = torch.from_numpy(d["lps"]).to(val_dtype)
            ids[j, : len(d["ids"])] = torch.from_numpy(d["ids"]).to(idx_dtype)
        out.append((group, vals, ids))
    return out


def padded_read(layout: list[tuple]) -> int:
    """Per sample, contiguous copies of its response slice (ids, values)."""
    tokens = 0
    for group, vals, ids in layout:
        for j, d in enumerate(group):
            p, n = d["prompt"], d["len"]
            _ = vals[j, p : p + n].contiguous(), ids[j, p : p + n].contiguous()
            tokens += n
    return tokens


def formats(args: argparse.Namespace, reps: int) -> dict:
    import numpy as np
    import torch

    from erpd_megatron.cache import TeacherCache, bits_per_id

    try:
        import zstandard  # noqa: F401
    except ImportError:
        raise SystemExit(
            "bench_cache.py needs zstandard for Megatron-LM's layout: pip install zstandard "
            "(it is in the dev extra: pip install -e .[dev])"
        ) from None
    tokens = args.tokens or (8192 if args.quick else 65536)
    seq = min(args.seq, tokens)
    prompt = seq // 4
    n_samples = max(1, round(tokens / (0.75 * seq)))
    data = make_data(n_samples, seq, prompt)
    resp = sum(d["len"] for d in data)
    positions = sum(len(d["ids"]) for d in data)
    entries = resp * K
    root = Path(tempfile.mkdtemp(prefix="bench_cache_"))
    per_batch = 8
    print(
        f"# formats: vocab {VOCAB} ({bits_per_id(VOCAB)} bits per id for ERPD), k {K}, "
        f"{n_samples} samples, {resp} response tokens ({entries:,} entries), {positions} "
        f"positions with prompts; {per_batch} samples per batch/iteration for the peers"
    )

    # Megatron-LM's packing rule on this vocabulary
    try:
        megatron_lm_check_vocab(VOCAB)
        refusal = "accepted"
    except AssertionError as e:
        refusal = f"AssertionError: {e}"
    all_ids = torch.from_numpy(np.concatenate([d["ids"] for d in data]))
    wrong = int((megatron_lm_unpack(*megatron_lm_pack(all_ids)) != all_ids).sum())
    print(f"  Megatron-LM rule on vocab {VOCAB}: {refusal}")
    print(
        f"  Megatron-LM pack/unpack of these ids: {wrong:,} of {all_ids.numel():,} ids come "
        "back wrong "
        f"({wrong / all_ids.numel():.1%}: every id >= {MEGATRON_LM_MAX_VOCAB})"
    )

    erpd_dir, mlm_tar = root / "erpd", root / "megatron_lm.tar"
    erpd_write(erpd_dir, data)
    megatron_lm_write(mlm_tar, data, per_batch)
    verl = padded_layout(data, per_batch, torch.float32, torch.int32)
    nemo = padded_layout(data, per_batch, torch.float32, torch.int64)
    cache = TeacherCache.open(erpd_dir)
    sids = cache.sample_ids

    def erpd_read() -> None:
        for sid in sids:
            rec = cache.get(sid)
            _ = rec.topk_ids["teacher0"], rec.topk_logprobs["teacher0"]

    times = _timed_rounds(
        {
            "erpd": erpd_read,
            "megatron_lm": lambda: megatron_lm_read(mlm_tar),
            "verl": lambda: padded_read(verl),
            "nemo_rl": lambda: padded_read(nemo),
        },
        reps,
    )
    rec = cache.get(sids[-1])
    d = data[sids[-1]]
    assert np.array_equal(rec.topk_ids["teacher0"], d["ids"][d["prompt"] :])
    cache.close()

    def layout_bytes(layout) -> int:
        return sum(
            v.numel() * v.element_size() + i.numel() * i.element_size() for _, v, i in layout
        )

    def stored(layout) -> int:
        return sum(v.shape[0] * v.shape[1] * K for _, v, _ in layout)

    rows = {
        "erpd (18-bit ids, fp16; disk)": (erpd_topk_bytes(erpd_dir), entries, "erpd"),
        "Megatron-LM (17-bit, fp16, zstd)": (mlm_tar.stat().st_size, positions * K, "megatron_lm"),
        "verl GKD (int32, fp32; memory)": (layout_bytes(verl), stored(verl), "verl"),
        "NeMo-RL (int64, fp32; memory)": (layout_bytes(nemo), stored(nemo), "nemo_rl"),
    }
    print(
        f"  {'layout':<34}{'bytes/entry':>12}{'stored':>9}{'decode M entries/s':>20}{'min-max':>15}"
    )
    out = {}
    for label, (nbytes, stored_entries, key) in rows.items():
        t = times[key]
        rate = entries / statistics.median(t)
        print(
            f"  {label:<34}{nbytes / entries:>12.3f}{nbytes / stored_entries:>9.3f}"
            f"{rate / 1e6:>20.2f}"
            f"{entries / max(t) / 1e6:>8.2f}-{entries / min(t) / 1e6:<6.2f}"
        )
        out[key] = (nbytes / entries, rate)
    print(
        "  (bytes/entry: per response entry; stored: per stored position entry; decode: response "
        "entries per second, median of the rounds, min-max)"
    )
    shutil.rmtree(root, ignore_errors=True)
    return out


# ---------------------------------------------------------------- tool overhead --------------
def tool_overhead(args: argparse.Namespace, reps: int) -> tuple[float, dict]:
    import numpy as np
    import torch

    from erpd_megatron.cache import CacheWriter, finalize_manifest
    from erpd_megatron.config import load_config
    from erpd_megatron.data.batching import SampleTable, collate, pack_in_order
    from erpd_megatron.runtime.distributed import init_distributed
    from erpd_megatron.train import cache_pass as tool
    from erpd_megatron.train.engine import Engine, _device

    if args.quick:
        model = [
            "model.num_layers=2",
            "model.hidden_size=128",
            "model.ffn_hidden_size=384",
            "model.num_attention_heads=4",
            "model.num_query_groups=2",
            "model.kv_channels=32",
            "model.vocab_size=32000",
        ]
        n, prompt_len, resp_len = 4, 32, 96
    else:
        model = [
            "model.num_layers=4",
            "model.hidden_size=256",
            "model.ffn_hidden_size=768",
            "model.num_attention_heads=8",
            "model.num_query_groups=4",
            "model.kv_channels=32",
            f"model.vocab_size={VOCAB}",
        ]
        n, prompt_len, resp_len = 8, 64, 192
    tmp = Path(tempfile.mkdtemp(prefix="bench_cache_tool_"))
    cfg = load_config(
        ROOT / "configs/recipes/tiny-cpu.yaml",
        model
        + [
            f"precision.params_dtype={args.dtype}",
            "data.max_tokens_per_microbatch=1024",
            "data.max_seq_length=512",
            f"cache.topk={K}",
            f"output_dir={tmp}",
        ]
        + args.overrides,
    )
    init_distributed(cfg)
    v = cfg.model.vocab_size
    rng = np.random.default_rng(1)
    table = SampleTable(
        sample_ids=np.arange(n, dtype=np.int64),
        group_ids=np.arange(n) // 4,
        prompt_ids=[rng.integers(1, v, prompt_len) for _ in range(n)],
        response_ids=[rng.integers(1, v, resp_len - (i % 4) * 8) for i in range(n)],
        rewards=rng.integers(0, 2, n).astype(np.float32),
    )
    engines = {"base": Engine(cfg, train=False), "teacher0": Engine(cfg, train=False)}
    base = engines["base"]
    order = tool.rank_order(table, base.dp_rank, base.dp_size)
    sid = table.sample_ids
    chunks = list(
        pack_in_order([int(r) for r in order], table.lengths, cfg.data.max_tokens_per_microbatch)
    )
    k = cfg.cache.topk
    device = _device()
    from megatron.core.pipeline_parallel import get_forward_backward_func

    def full_pass() -> None:
        out = tmp / "cache"
        shutil.rmtree(out, ignore_errors=True)
        writer = CacheWriter(
            out,
            rank=0,
            sample_ids=[int(sid[r]) for r in order],
            vocab_size=v,
            k=k,
            sampled_models=["base", "teacher0"],
            teachers=["teacher0"],
            ref_teachers=["teacher0"],
            value_dtype=cfg.cache.dtype,
            max_shard_bytes=cfg.cache.max_shard_bytes,
        )
        for rows in chunks:
            mb = collate(table, rows)
            res = {"teacher0": tool._score_microbatch(engines["teacher0"], mb, k, {})}
            res["base"] = tool._score_microbatch(
                base, mb, None, {"teacher0": res["teacher0"]["ids"]}
            )
            mask = mb.loss_mask.bool()
            for j, r in enumerate(rows.tolist()):
                m = mask[j]
                sampled = {name: res[name]["lp"][j][m].float().cpu().numpy() for name in res}
                t = res["teacher0"]
                topk = {
                    "teacher0": (
                        t["ids"][j][m].cpu().numpy(),
                        t["topk"][j][m].float().cpu().numpy(),
                        res["base"]["ref:teacher0"][j][m].float().cpu().numpy(),
                    )
                }
                writer.write_sample(int(sid[r]), sampled=sampled, topk=topk)
        writer.close()
        finalize_manifest(
            out,
            1,
            {
                "rollout_fingerprint": "bench",
                "models": {name: {"path": "-", "fingerprint": "-"} for name in engines},
            },
        )  # SHA-256 of every shard

    def scoring_pass() -> None:
        results = {}
        for rows in chunks:
            mb = collate(table, rows).to(device)
            for name, e in engines.items():

                def forward_step(it, model, mb=mb):
                    out = model(mb.input_ids, mb.position_ids, None, labels=mb.targets)  # CE [b, s]
                    return out, lambda loss: (loss.sum() * 0.0, {"lp": -loss.float()})

                with torch.no_grad():
                    outs = get_forward_backward_func()(
                        forward_step_func=forward_step,
                        data_iterator=iter([mb]),
                        model=e.model[0],
                        num_microbatches=1,
                        seq_length=int(mb.input_ids.shape[1]),
                        micro_batch_size=int(mb.input_ids.shape[0]),
                        forward_only=True,
                    )
                lp, mask = outs[0]["lp"], mb.loss_mask.bool()
                for j, r in enumerate(rows.tolist()):
                    results[name, r] = lp[j][mask[j]].cpu().numpy()

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def timed(f):
        def g():
            sync()
            f()
            sync()

        return g

    times = _timed_rounds({"scoring": timed(scoring_pass), "cache": timed(full_pass)}, reps)
    tok = int(table.lengths.sum())
    med = {k2: statistics.median(t) for k2, t in times.items()}
    print(
        f"# cache tool pass vs forward-only scoring: device {device.type}, dtype {args.dtype}, "
        f"2 models (layers {cfg.model.num_layers}, hidden {cfg.model.hidden_size}, vocab {v}), "
        f"{n} samples, {tok} tokens, {len(chunks)} micro-batches, k {k}, {reps} interleaved rounds"
    )
    print(
        f"  {'pass':<58}{'median s':>10}{'min-max s':>16}{'ratio':>7}{'cpu s':>8}{'cpu ratio':>10}"
    )
    cpu = {key: statistics.median(CPU_TIMES[key]) for key in times}
    labels = {
        "scoring": "forward-only scoring (GPTModel(labels=), 2 models)",
        "cache": "cache pass (log-probs, top-k, pi_r buckets, write, SHA-256)",
    }
    for key in ("scoring", "cache"):
        t = times[key]
        print(
            f"  {labels[key]:<58}{med[key]:>10.3f}{min(t):>8.3f}-{max(t):<7.3f}"
            f"{med[key] / med['scoring']:>7.3f}"
            f"{cpu[key]:>8.3f}{cpu[key] / cpu['scoring']:>10.3f}"
        )
    med["cpu_ratio"] = cpu["cache"] / cpu["scoring"]
    shutil.rmtree(tmp, ignore_errors=True)
    return med["cache"] / med["scoring"], med


def main() -> None:
    args = _args()
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible")
    if args.threads:
        torch.set_num_threads(args.threads)
    reps = args.reps or (2 if args.quick else 5)
    print(
        f"# bench_cache: threads {args.threads or 'default'}, load avg "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )
    fmt = formats(args, reps)
    overhead, cpu_overhead = float("nan"), float("nan")
    if not args.skip_tool:
        overhead, med = tool_overhead(args, reps)
        cpu_overhead = med["cpu_ratio"]
    b, rate = fmt["erpd"]
    print(
        f"RESULT bytes_per_entry={b:.4f} decode_entries_per_s={rate:.4g} "
        f"cache_tool_overhead={overhead:.3f} "
        f"cache_tool_cpu_overhead={cpu_overhead:.3f} "
        f"megatron_lm_bytes_per_entry={fmt['megatron_lm'][0]:.4f} "
        f"verl_bytes_per_entry={fmt['verl'][0]:.4f} "
        f"nemo_rl_bytes_per_entry={fmt['nemo_rl'][0]:.4f} "
        f"megatron_lm_decode_entries_per_s={fmt['megatron_lm'][1]:.4g} dtype={args.dtype}"
    )


if __name__ == "__main__":
    main()
