"""Forward-only scoring of a fixed rollout set: per-token log-probs (and entropy) of the
sampled tokens under the current weights, with the same parallel layout as training.

Each data-parallel rank scores its share of the samples through the pipeline schedule in
forward-only mode. The ranks that own results (last pipeline stage, TP rank 0) write them
to ``out_dir/dp{rank}.npz``; after a barrier every rank reads all files, so that any rank
can later look up any sample (the per-epoch shuffle moves samples between DP ranks). A
``COMPLETE`` marker makes a finished scoring reusable on resume.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from erpd_megatron.data.batching import (
    MicroBatch,
    SampleTable,
    build_micro_batches,
    scatter_response_values,
)
from erpd_megatron.runtime import comm
from erpd_megatron.train.engine import Engine, token_rows
from erpd_megatron.utils.files import atomic_write_bytes
from erpd_megatron.utils.log import get_logger

log = get_logger(__name__)


def _barrier() -> None:
    comm.barrier()


def score_logprobs(
    engine: Engine,
    table: SampleTable,
    out_dir: str | os.PathLike,
    *,
    max_tokens: int,
    desc: str = "scoring",
) -> list[np.ndarray]:
    """Log-probs of every response token of ``table`` under ``engine``'s current weights.

    Returns a list aligned with the table's rows (float32 arrays, one value per response
    token). Results are cached in ``out_dir``; an existing complete directory is reused.
    """
    from erpd_megatron.ops.vocab_parallel import vp_logprob

    out_dir = Path(out_dir)
    done = out_dir / "COMPLETE"
    if not done.exists():
        shard = engine.vocab_shard()
        # every DP rank runs the same number of forwards (FP8's amax reduction spans TP x DP);
        # packed like training when data.packing is on
        mbs = build_micro_batches(
            engine.cfg,
            table,
            np.arange(len(table)),
            engine.dp_rank,
            engine.dp_size,
            max_tokens=max_tokens,
        )

        def fn(logits: torch.Tensor, mb: MicroBatch) -> tuple[torch.Tensor, dict]:
            flat, order = token_rows(logits)  # no copy of the logits
            lp = order.unflat(
                vp_logprob(
                    flat,
                    order.flat(mb.targets),
                    group=shard.group,
                    vocab_start=shard.start,
                    vocab_size=shard.vocab_size,
                )
            )
            return logits.new_zeros(()), {"logprobs": lp.detach() * mb.loss_mask}

        if engine.moe is not None:  # MoE: the routing of every scored token, beside the scores
            engine.moe.start_recording()
        with torch.no_grad():
            outs = engine.run(mbs, fn, forward_only=True)
        if engine.moe is not None:
            tp0 = engine.ps.get_tensor_model_parallel_rank() == 0
            engine.moe.save_recording(out_dir, engine.dp_rank, owner=tp0)
        owner = engine.is_last_stage and engine.ps.get_tensor_model_parallel_rank() == 0
        if owner:
            ids, vals, offs = [], [], [0]
            for mb, o in zip(mbs, outs):
                # per sequence through seq_index: one row may hold several packed sequences
                for row, v in zip(mb.rows, scatter_response_values(mb, o["logprobs"])):
                    ids.append(int(row))
                    vals.append(v)
                    offs.append(offs[-1] + len(v))
            buf = _npz_bytes(
                rows=np.array(ids, np.int64),
                offsets=np.array(offs, np.int64),
                values=np.concatenate(vals).astype(np.float32) if vals else np.zeros(0, np.float32),
            )
            atomic_write_bytes(out_dir / f"dp{engine.dp_rank:05d}.npz", buf)
        _barrier()
        if not comm.is_distributed() or dist.get_rank() == 0:
            atomic_write_bytes(done, b"ok\n")
        _barrier()
    return load_scores(out_dir, len(table))


def load_scores(out_dir: str | os.PathLike, num_rows: int) -> list[np.ndarray]:
    """Read what :func:`score_logprobs` wrote, as a list aligned with the table's rows."""
    out: list[np.ndarray | None] = [None] * num_rows
    for f in sorted(Path(out_dir).glob("dp*.npz")):
        with np.load(f) as z:
            rows, offs, vals = z["rows"], z["offsets"], z["values"]
        for k, r in enumerate(rows):
            out[int(r)] = vals[offs[k] : offs[k + 1]]
    missing = [i for i, v in enumerate(out) if v is None]
    if missing:
        raise RuntimeError(
            f"{out_dir}: scores missing for {len(missing)} rows (e.g. row {missing[0]}); "
            "delete the directory and rerun"
        )
    return out  # type: ignore[return-value]


def _npz_bytes(**arrays: np.ndarray) -> bytes:
    import io

    bio = io.BytesIO()
    np.savez(bio, **arrays)
    return bio.getvalue()
