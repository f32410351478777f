"""What Stage 1 and Stage 2 share around the loop: config + distributed start-up, the fixed
data, the engine with pi_r's weights, forward-only scoring, and the per-token log-prob and
entropy of a micro-batch from vocab-parallel logits."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from erpd_megatron.config.checks import check_stage1_signal, check_stage_inputs, print_config_error
from erpd_megatron.config.loader import ConfigError, load_config
from erpd_megatron.config.schema import Config
from erpd_megatron.config.validate import validate_config
from erpd_megatron.data.batching import MicroBatch, SampleTable
from erpd_megatron.train.engine import Engine, VocabShard, token_rows
from erpd_megatron.train.loop import EXIT_NONFINITE, NonFiniteAbort, StageSpec, TrainLoop
from erpd_megatron.utils.log import get_logger

log = get_logger(__name__)


def logits_logprob_entropy(
    logits: torch.Tensor, mb: MicroBatch, shard: VocabShard, *, sole_consumer: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of the target tokens ([b, s], differentiable) and token entropy ([b, s],
    detached) from vocab-parallel logits [b, s, V/tp] (rows taken without a copy, see
    :func:`~erpd_megatron.train.engine.token_rows`). ``sole_consumer``: nothing else
    differentiates through ``logits``, so the backward may write the gradient into their
    memory, as Megatron's cross entropy does (no logits-sized allocation)."""
    from erpd_megatron.ops.vocab_parallel import vp_logprob_and_entropy

    flat, order = token_rows(logits)
    lp, ent = vp_logprob_and_entropy(
        flat,
        order.flat(mb.targets.to(logits.device)),
        group=shard.group,
        vocab_start=shard.start,
        vocab_size=shard.vocab_size,
        inplace_backward=sole_consumer,
    )
    # one pass over the logits for both; the entropy is a metric, so its backward never runs
    return order.unflat(lp), order.unflat(ent.detach())


Precheck = Callable[[Config, SampleTable, str], object]


def check_initial_checkpoint(cfg: Config) -> None:
    """``checkpoint.load`` must name an existing Megatron checkpoint of pi_r."""
    load = cfg.checkpoint.load
    if not load:
        raise ValueError(
            "checkpoint.load is not set: the Megatron checkpoint of pi_r "
            "(convert an HF model with tools/convert_checkpoint.py hf-to-mcore)"
        )
    if not Path(load).exists():
        raise FileNotFoundError(f"checkpoint.load={load}: no such checkpoint directory")


class StageRun:
    """A started stage: config, distributed env, data, and an engine holding pi_r."""

    def __init__(self, cfg: Config, stage: str, precheck: Precheck | None = None) -> None:
        """Checks everything that can be checked cheaply first (initial checkpoint, data,
        and the stage's ``precheck``, e.g. the teacher cache), then starts torch.distributed,
        builds the engine and loads pi_r."""
        from erpd_megatron.data.table import load_sample_table
        from erpd_megatron.runtime.distributed import init_distributed

        self.cfg = cfg
        self.stage = stage
        self._keys: dict[bool, str] = {}
        self.out_dir = Path(cfg.output_dir) / stage
        check_initial_checkpoint(cfg)
        if cfg.data.rollout_dir is None:
            raise ValueError(
                "data.rollout_dir is not set: point it at the rollout Parquet directory"
            )
        self.table, self.data_fingerprint = load_sample_table(cfg)
        if stage == "stage1":  # no gradient at all on this data: refuse (stage1.force overrides)
            check_stage1_signal(cfg, self.table)
        self.context = precheck(cfg, self.table, self.data_fingerprint) if precheck else None
        self.env = init_distributed(cfg)
        self.engine = Engine(cfg, train=True, total_steps=self._count_steps())
        self._load_initial_weights()

    def _count_steps(self) -> int:
        epochs = self.cfg.stage1.epochs if self.stage == "stage1" else self.cfg.stage2.epochs
        per_epoch = -(-len(self.table) // self.cfg.data.global_batch_size)
        return epochs * per_epoch

    def _load_initial_weights(self) -> None:
        from erpd_megatron.models.checkpoint import load_checkpoint

        load_checkpoint(self.cfg.checkpoint.load, self.engine.model, model_cfg=self.cfg.model)

    def score(self, tag: str, *, trained: bool = False) -> list[np.ndarray]:
        """Per-response-token log-probs of the whole table under the current weights, cached
        under the stage's output dir in ``tag/<key>``.

        The key (:meth:`scores_key`) is a digest of ``checkpoint.load``'s weights, the data's
        fingerprint and the model config, plus, with ``trained`` (weights reached by training
        from pi_r, e.g. epoch anchors), the training config. Scores cached under another key
        (other weights or data, or an older unkeyed layout) are never reused: they are
        recomputed, with a log line, and the stale ones removed."""
        import shutil

        import torch.distributed as dist

        from erpd_megatron.train.scoring import score_logprobs

        key = self.scores_key(trained)
        base = self.out_dir / tag
        out = base / key[:24]
        stale = sorted(p for p in base.iterdir() if p != out) if base.is_dir() else []
        if stale:
            log.info(
                "%s: scores cached for other weights, data or config (%s) are not reused; "
                "scoring again (key %s)",
                base,
                ", ".join(p.name for p in stale),
                key[:24],
            )
        scores = score_logprobs(
            self.engine,
            self.table,
            out,
            max_tokens=self.cfg.data.max_tokens_per_microbatch,
            desc=tag,
        )
        if stale and (not dist.is_initialized() or dist.get_rank() == 0):
            for p in stale:
                shutil.rmtree(p) if p.is_dir() else p.unlink()
        return scores

    def scores_key(self, trained: bool = False) -> str:
        """Digest of what cached scores depend on (see :meth:`score`); the checkpoint is read
        by global rank 0 only and the digest broadcast."""
        if trained not in self._keys:
            import dataclasses
            import hashlib
            import json

            import torch.distributed as dist

            from erpd_megatron.utils.files import dir_fingerprint

            key = [None]
            if not dist.is_initialized() or dist.get_rank() == 0:
                parts = {
                    "weights": dir_fingerprint(self.cfg.checkpoint.load),
                    "data": self.data_fingerprint,
                    "model": dataclasses.asdict(self.cfg.model),
                }
                if trained:
                    parts["train"] = {
                        k: v
                        for k, v in dataclasses.asdict(self.cfg).items()
                        if k not in ("output_dir", "logging")
                    }
                blob = json.dumps(parts, sort_keys=True, default=str).encode()
                key = [hashlib.sha256(blob).hexdigest()]
            from erpd_megatron.runtime import comm

            key = [comm.broadcast_object(key[0], src=0)]  # on the group's device
            self._keys[trained] = str(key[0])
        return self._keys[trained]

    def report_mismatch(self, trainer_logprobs: list[np.ndarray]) -> dict[str, float]:
        """Rollout-engine vs trainer log-prob mismatch on the fixed data (logged, returned)."""
        eng = self.table.engine_logprobs
        if eng is None:
            return {}
        a = np.concatenate([np.asarray(x, np.float64) for x in eng]) if eng else np.zeros(0)
        b = (
            np.concatenate([np.asarray(x, np.float64) for x in trainer_logprobs])
            if trainer_logprobs
            else np.zeros(0)
        )
        if len(a) != len(b) or len(a) == 0:
            return {}
        d = b - a
        out = {
            "mismatch/mean_abs_logprob_diff": float(np.abs(d).mean()),
            "mismatch/max_abs_logprob_diff": float(np.abs(d).max()),
            "mismatch/k3_engine_to_trainer": float(np.mean(np.expm1(-d) + d)),
        }
        log.info(
            "rollout engine vs trainer log-probs: mean |diff| %.3g, max %.3g, k3 %.3g",
            *out.values(),
        )
        return out

    @staticmethod
    def launch(
        stage: str,
        config: str,
        overrides: list[str],
        build_spec: Callable[[Config, StageRun], StageSpec],
        precheck: Precheck | None = None,
    ) -> int:
        """Load the config, start the run, train, tear down; returns the exit code."""
        from erpd_megatron.runtime.distributed import destroy_distributed

        try:  # every input checked before compute; all problems in one line, no traceback
            cfg = load_config(config, overrides, validate=False)
            validate_config(
                cfg,
                world_size=int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1"))),
                check_runtime=True,
            )
            check_stage_inputs(cfg, stage)
        except ConfigError as e:
            return print_config_error(stage, e)
        run = None
        try:
            run = StageRun(cfg, stage, precheck)
            spec = build_spec(cfg, run)
            loop = TrainLoop(cfg, run.engine, spec, run.out_dir)
            return loop.run()
        except NonFiniteAbort as e:
            log.error("%s", e)
            return EXIT_NONFINITE
        except ConfigError as e:  # e.g. the Stage-1 signal check (needs the loaded data)
            return print_config_error(stage, e)
        finally:
            if run is not None:
                run.engine.release()  # nothing of the model outlives the run (in-process steps)
            destroy_distributed()
            sys.stdout.flush()
