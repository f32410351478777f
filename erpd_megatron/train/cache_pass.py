"""`erpd cache` / ``tools/cache_teacher_logprobs.py``: score pi_r, the teachers (and U) on the
fixed rollout data and write the teacher cache.

Every model is built once with the run's parallel layout (forward-only engines, any
TP/PP/DP) and loaded from its Megatron checkpoint; each data-parallel rank streams its
samples in a fixed order through all models micro-batch by micro-batch and hands the
results to its :class:`~erpd_megatron.cache.writer.CacheWriter`. Top-k is computed
vocab-parallel (no full-vocabulary gather). pi_r's log-probs at each teacher's top-k ids are
stored too, for the geometric-mixture target of Stage 2. A rerun skips the shards already
complete; rank 0 writes ``manifest.json`` last.

This is the cache-producing forward pass, so it lives with the engines in ``train/``;
``erpd_megatron.cache`` keeps the format (codec, writer, reader, manifest) and imports
nothing above it.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from erpd_megatron.config.checks import check_cache_inputs, print_config_error
from erpd_megatron.config.compute import compute_record
from erpd_megatron.config.loader import ConfigError, load_config
from erpd_megatron.config.schema import Config
from erpd_megatron.config.validate import validate_config
from erpd_megatron.data.batching import (
    MicroBatch,
    SampleTable,
    collate,
    collate_packed,
    dp_shard,
    dummy_micro_batch,
    pack_in_order,
    pack_in_order_packed,
    pack_seq_multiple,
    pad_multiple,
    sequence_values,
)
from erpd_megatron.data.context_parallel import cp_split
from erpd_megatron.runtime import comm
from erpd_megatron.train.engine import Engine, cp_indices, token_rows
from erpd_megatron.utils.files import dir_fingerprint
from erpd_megatron.utils.log import get_logger
from erpd_megatron.utils.progress import progress_bar

log = get_logger(__name__)


def rank_order(table: SampleTable, dp_rank: int, dp_size: int) -> np.ndarray:
    """The rows a DP rank writes, in writing order (by length, so micro-batches pad little)."""
    rows = dp_shard(np.arange(len(table)), table.lengths, dp_rank, dp_size)
    lengths = table.lengths
    return np.array(sorted(rows.tolist(), key=lambda i: (int(lengths[i]), i)), np.int64)


def _score_microbatch(
    engine: Engine, mb: MicroBatch, k: int | None, ref_ids: dict[str, torch.Tensor]
) -> dict:
    """Forward one micro-batch; return per-row results on the owner rank, {} elsewhere."""
    from erpd_megatron.ops.vocab_parallel import vp_logprob
    from erpd_megatron.ops.vocab_parallel_topk import vp_bucket_logprobs, vp_topk

    shard = engine.vocab_shard()
    kw = dict(group=shard.group, vocab_start=shard.start, vocab_size=shard.vocab_size)

    def fn(logits: torch.Tensor, m: MicroBatch):
        # rows without a copy; the ops take bf16 directly (fp32 per chunk)
        # One pass over the logits per model: the sampled tokens' log-probs come out of the
        # top-k pass (teachers) or the first bucket pass (pi_r), computed there with
        # vp_logprob's own operations (equal bit for bit, tested): Stage 2's ratio to the
        # cached lp_r stays exactly 1 at pi_r.
        flat, order = token_rows(logits)
        target = order.flat(m.targets)
        out: dict[str, torch.Tensor] = {}
        lp = None
        if k:
            ids, lps, lp = vp_topk(flat, k, **kw, target=target)
            out["ids"], out["topk"] = order.unflat(ids), order.unflat(lps)
        for name, tid in ref_ids.items():
            if engine.cp_size > 1:  # the teacher's ids are whole rows (gathered over CP)
                tid = cp_split(tid, cp_indices(mb, engine.cp_size, engine.cp_rank))
            if lp is None:
                rl, _, lp = vp_bucket_logprobs(flat, order.flat(tid), **kw, target=target)
            else:
                rl, _ = vp_bucket_logprobs(flat, order.flat(tid), **kw)
            out[f"ref:{name}"] = order.unflat(rl)
        if lp is None:
            lp = vp_logprob(flat, target, **kw)
        out["lp"] = order.unflat(lp)
        return logits.new_zeros(()), out  # forward only: no loss

    with torch.no_grad():
        outs = engine.run([mb], fn, forward_only=True)
    return outs[0] if outs else {}


def write_cache(cfg: Config) -> Path:
    """Score every cached model and write the cache (call on every rank)."""
    from erpd_megatron.cache.manifest import finalize_manifest
    from erpd_megatron.cache.writer import CacheWriter
    from erpd_megatron.data.table import load_sample_table
    from erpd_megatron.models.checkpoint import load_checkpoint

    t_start = time.time()  # compute accounting (meta "compute")
    check_cache_inputs(cfg)  # every missing input in one ConfigError, before any engine
    table, fingerprint = load_sample_table(cfg)
    out = Path(cfg.cache.dir)
    models = [("base", cfg.checkpoint.load, False)] + [
        (m.name, m.checkpoint, m.topk) for m in cfg.cache.models
    ]
    engines = {}
    for name, path, _ in models:
        e = Engine(cfg, train=False)
        load_checkpoint(path, e.model)
        engines[name] = e
    base = engines["base"]
    teachers = [n for n, _, t in models if t]
    k = cfg.cache.topk
    owner = base.is_last_stage and base.ps.get_tensor_model_parallel_rank() == 0
    order = rank_order(table, base.dp_rank, base.dp_size)
    sid = table.sample_ids
    # Only owner ranks write; the other ranks of the same DP replica compute alongside them.
    writer = (
        CacheWriter(
            out,
            rank=base.dp_rank,
            sample_ids=[int(sid[r]) for r in order],
            vocab_size=cfg.model.vocab_size,
            k=k,
            sampled_models=[n for n, _, _ in models],
            teachers=teachers,
            ref_teachers=teachers,
            value_dtype=cfg.cache.dtype,
            max_shard_bytes=cfg.cache.max_shard_bytes,
        )
        if owner
        else None
    )
    row_of = {int(sid[r]): int(r) for r in order}
    pending = [row_of[s] for s in writer.pending()] if writer else None
    pending = _agree_pending(pending, order, base)
    packing = cfg.data.packing  # packed rows of consecutive samples (the writer's order)
    seqm = pack_seq_multiple(cfg)
    chunks: list[np.ndarray | None] = list(
        pack_in_order_packed(
            pending, table.lengths, cfg.data.max_tokens_per_microbatch, seq_multiple=seqm
        )
        if packing
        else pack_in_order(pending, table.lengths, cfg.data.max_tokens_per_microbatch)
    )
    # Every DP replica runs as many forwards as the one with the most pending chunks (zero-loss
    # dummies, nothing written): FP8 delayed scaling all-reduces amax over TP x DP at every
    # FP8 forward, so unequal counts would hang (see erpd_megatron.train.engine).
    count = int(comm.all_reduce(torch.tensor([len(chunks)], dtype=torch.long), "max").item())
    chunks += [None] * (count - len(chunks))
    pad = pad_multiple(cfg)
    bar = progress_bar(len(chunks), enabled=(dist.get_rank() == 0), desc="cache")
    for rows in chunks:
        mb = (
            dummy_micro_batch(pad)
            if rows is None
            else collate_packed(table, rows, pad_to=pad, seq_multiple=seqm)
            if packing
            else collate(table, rows, pad_to=pad)
        )
        res: dict[str, dict] = {}
        for name in teachers:
            res[name] = _score_microbatch(engines[name], mb, k, {})
        for name, _, is_t in models:
            if name == "base" or is_t:
                continue
            res[name] = _score_microbatch(engines[name], mb, None, {})
        # Teachers' top-k ids are known on every last-stage rank (the TP ranks all-gather
        # them), which is where the base model's last stage runs too.
        ref_ids = {t: res[t]["ids"] for t in teachers} if base.is_last_stage else {}
        res["base"] = _score_microbatch(base, mb, None, ref_ids)
        if writer is not None and rows is not None:
            # per sequence through seq_index (a packed row holds several samples)
            per = {(n, key): sequence_values(mb, v) for n, d in res.items() for key, v in d.items()}
            for j, r in enumerate(rows.tolist()):
                sampled = {n: per[n, "lp"][j].float().numpy() for n, _, _ in models}
                topk = {
                    t: (
                        per[t, "ids"][j].numpy(),
                        per[t, "topk"][j].float().numpy(),
                        per["base", f"ref:{t}"][j].float().numpy(),
                    )
                    for t in teachers
                }
                writer.write_sample(int(sid[r]), sampled=sampled, topk=topk)
        bar.update(1)
    bar.close()
    if writer is not None:
        writer.close()
    comm.barrier()
    if dist.get_rank() == 0:
        meta = {
            "rollout_fingerprint": fingerprint,
            # checked by Stage 2 against the checkpoints it trains from (train/stage2.py)
            "models": {
                n: {"path": str(p), "fingerprint": dir_fingerprint(p)} for n, p, _ in models
            },
            "dp_size": base.dp_size,
            # every model scores every token once, forward only: 2 N per token (config/compute.py)
            "compute": compute_record(
                cfg,
                scored_tokens=int(np.sum(table.lengths)) * len(models),
                wall_s=time.time() - t_start,
                gpus=dist.get_world_size(),
                models_scored=len(models),
            ),
        }
        finalize_manifest(out, base.dp_size, meta)
        log.info("teacher cache written to %s", out)
    comm.barrier()
    return out


def _agree_pending(pending: list[int] | None, order: np.ndarray, engine) -> list[int]:
    """The owner rank of each DP replica knows which samples are still pending; the other
    ranks of that replica (TP peers, earlier pipeline stages) adopt its count, because the
    pending samples are always a suffix of the fixed order."""
    n_done = torch.tensor(
        [len(order) - len(pending) if pending is not None else -1], dtype=torch.long
    )
    world = dist.get_world_size()
    gathered = comm.all_gather(n_done)  # on the group's device (NCCL rejects CPU tensors)
    ps = engine.ps
    # ranks of my model-parallel group (same DP replica): take the owner's value (>= 0)
    mp_ranks = dist.get_process_group_ranks(ps.get_model_parallel_group()) if world > 1 else [0]
    done = max(int(gathered[r].item()) for r in mp_ranks)
    return [int(x) for x in order[max(done, 0) :]]


def main(argv: list[str] | None = None) -> int:
    """CLI: ``erpd cache --config RECIPE [a.b=c ...]``."""
    from erpd_megatron.runtime.distributed import destroy_distributed, init_distributed

    p = argparse.ArgumentParser(
        prog="erpd cache", description=" ".join(__doc__.split("\n\n")[0].split())
    )
    p.add_argument("--config", required=True)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    try:  # all input problems in one line, before torch.distributed or any engine starts
        cfg = load_config(args.config, args.overrides, validate=False)
        validate_config(
            cfg,
            world_size=int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1"))),
            check_runtime=True,
        )
        check_cache_inputs(cfg)
    except ConfigError as e:
        return print_config_error("cache", e)
    init_distributed(cfg)
    try:
        write_cache(cfg)
    finally:
        destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
