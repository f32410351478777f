"""Held-out accuracy during training (``stage1.eval_every_epochs``): the evaluation child.

Every N epochs (and once before the first step, for pi_r) the loop saves a model-only
checkpoint (or reuses that epoch's snapshot); rank 0 then runs this module in a child
process (:func:`erpd_megatron.train.heldout.run_heldout_child` starts it by module name, so
the trainer imports nothing of the evaluation layer), which exports the checkpoint to HF,
samples ``eval.n`` responses for ``eval.num_prompts`` prompts of each ``eval.datasets`` set
through the rollout engine (``rollout.engine``, at ``eval.temperature`` /
``eval.max_new_tokens``, with ``eval.seed``: every epoch sees the same prompts and random
numbers), rewards them, and writes ``accuracy`` (avg@n), ``pass@k`` and the response length
as JSON. The loop logs them as ``stage1/eval/...`` at the epoch's last step, where the
Stage-1 curves plot them.

    python -m erpd_megatron.eval.heldout --config RESOLVED.yaml --checkpoint DIR --out RESULT.json
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import Any

from erpd_megatron.config.loader import load_config
from erpd_megatron.config.schema import Config, EvalModelConfig
from erpd_megatron.utils.files import atomic_write_json
from erpd_megatron.utils.log import get_logger

log = get_logger(__name__)


def heldout_metrics(cfg: Config, hf_dir: str | Path, *, progress: bool = False) -> dict[str, float]:
    """Accuracy, pass@k and mean response length of the HF model ``hf_dir`` on every
    ``eval.datasets`` set (keys ``<name>/accuracy``...; without the prefix for a single set)."""
    from erpd_megatron.eval import stats
    from erpd_megatron.eval.evaluate import dataset_names, eval_threads
    from erpd_megatron.eval.sampling import generate_and_reward, select_heldout
    from erpd_megatron.rollout.engines import derive_seed, load_tokenizer
    from erpd_megatron.rollout.reward_pool import RewardPool

    rc, ec = cfg.rollout, cfg.eval
    tokenizer = load_tokenizer(rc.tokenizer_path or str(hf_dir))
    model = EvalModelConfig(name="heldout", path=str(hf_dir))
    out: dict[str, float] = {}
    names = dataset_names(ec.datasets)
    with (
        eval_threads(cfg),
        RewardPool.from_config(rc) as pool,
    ):
        for d, (dataset, name) in enumerate(zip(ec.datasets, names)):
            prompts = select_heldout(cfg, dataset, tokenizer)
            s, _ = generate_and_reward(
                cfg,
                model,
                prompts=prompts,
                tokenizer=tokenizer,
                pool=pool,
                seed=derive_seed(ec.seed, "eval", d),
                progress=progress,
            )
            prefix = "" if len(names) == 1 else f"{name}/"
            acc = stats.accuracy_stats(s.rewards, ec.pass_k)
            out.update({f"{prefix}{k}": float(v) for k, v in acc.items() if v is not None})
            out[f"{prefix}response_length"] = float(
                sum(len(c.token_ids) for c in s.completions) / max(len(s.completions), 1)
            )
    return out


def main(argv: list[str] | None = None) -> int:
    """Child entry point: export ``--checkpoint`` to HF next to ``--out``, evaluate, write JSON."""
    import torch

    from erpd_megatron.models.convert import mcore_to_hf
    from erpd_megatron.runtime.distributed import destroy_distributed

    p = argparse.ArgumentParser(
        prog="python -m erpd_megatron.eval.heldout", description=__doc__.splitlines()[0]
    )
    p.add_argument("--config", required=True)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    cfg = load_config(args.config, args.overrides, validate=False)
    out = Path(args.out)
    hf_dir = out.parent / "hf"
    try:
        dtype = None if torch.cuda.is_available() else "float32"
        mcore_to_hf(args.checkpoint, hf_dir, dtype=dtype)
    finally:
        destroy_distributed()
    try:
        metrics: dict[str, Any] = heldout_metrics(cfg, hf_dir)
    finally:
        shutil.rmtree(hf_dir, ignore_errors=True)
    atomic_write_json(out, metrics)
    return 0


if __name__ == "__main__":
    sys.exit(main())
