"""Stage 1 of ERPD: weakly constrained multi-epoch optimisation on the fixed rollouts.

``python -m erpd_megatron.stage1 --config RECIPE [a.b=c ...]`` (also ``erpd stage1``), under
torchrun or srun. It loads pi_r (``checkpoint.load``), scores the fixed data once for the
anchors ``lp_r`` (and again at each epoch start with ``stage1.anchor: epoch``), reports the
rollout-engine vs trainer log-prob mismatch, then trains ``stage1.epochs`` epochs with the
configured loss. The teacher is ``<save>/final`` (plus ``epoch_XXXX`` snapshots).
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from erpd_megatron.config.schema import Config
from erpd_megatron.data.batching import MicroBatch, SampleTable
from erpd_megatron.models.router_replay import load_pi_r_routing
from erpd_megatron.ops.losses import stage1_loss
from erpd_megatron.train.common import StageRun, logits_logprob_entropy
from erpd_megatron.train.loop import StageSpec
from erpd_megatron.train.policy_metrics import (
    POLICY_KEYS,
    finalize_policy_metrics,
    policy_metric_sums,
)
from erpd_megatron.utils.log import get_logger

log = get_logger(__name__)


def _loss_kwargs(cfg: Config) -> dict:
    s = cfg.stage1
    return dict(
        base=s.unlearned_base,
        eps_low=s.eps_low,
        eps_high=s.eps_high,
        tau_pos=s.sapo_tau_pos,
        tau_neg=s.sapo_tau_neg,
        beta=s.mse_beta,
        kl_coef=s.kl_coef,
    )


def stage1_metric_keys(cfg: Config) -> list[str]:
    """The metric sums the configured loss returns (found by calling it on a dummy batch,
    so that ranks without logits know the keys too), plus the policy metrics."""
    z = torch.zeros(1, 2)
    _, m = stage1_loss(
        cfg.stage1.loss,
        logp=z,
        adv=z,
        mask=torch.ones(1, 2),
        normalizer=1.0,
        anchor_logp=z,
        ref_logp=z,
        reward=z,
        seq_normalizer=1.0,
        segment_ids=torch.zeros(1, 2, dtype=torch.long),
        num_segments=1,
        **_loss_kwargs(cfg),
    )
    return sorted(m) + POLICY_KEYS


def make_stage1_loss(cfg: Config, run: StageRun, table: SampleTable, rows: np.ndarray):
    """The loss of one global batch: token-mean over all its response tokens (sequence-mean
    over its non-empty responses for ``mse``), whatever the micro-batching and data-parallel
    split. These are the normalisers the logged ``loss`` uses (:func:`finalize_stage1_metrics`)."""
    shard = run.engine.vocab_shard()
    lengths = table.response_lengths[rows]
    tokens = float(lengths.sum())
    seqs = float((lengths > 0).sum())
    kwargs = _loss_kwargs(cfg)

    def loss_fn(logits: torch.Tensor, mb: MicroBatch):
        lp, ent = logits_logprob_entropy(logits, mb, shard, sole_consumer=True)
        ref = mb.token_arrays["ref_logp"].to(lp.device)
        anchor = mb.token_arrays.get("anchor_logp", mb.token_arrays["ref_logp"]).to(lp.device)
        # per sequence through seq_index: a packed row holds several sequences
        reward = mb.per_token(mb.rewards.to(lp.device))
        loss, m = stage1_loss(
            cfg.stage1.loss,
            logp=lp,
            adv=mb.advantages.to(lp.device),
            mask=mb.loss_mask.to(lp.device),
            normalizer=tokens,
            anchor_logp=anchor,
            ref_logp=ref,
            reward=reward,
            seq_normalizer=seqs,
            segment_ids=mb.seq_index.clamp(min=0).to(lp.device),
            num_segments=int(mb.rewards.shape[0]),
            **kwargs,
        )
        m.update(policy_metric_sums(lp, ref, ent, mb))
        return loss, m

    return loss_fn


def finalize_stage1_metrics(cfg: Config):
    """Turn reduced sums into logged values.

    ``loss`` is the optimised objective, with the optimiser's normalisers: the loss's sum
    over ALL response tokens of the step (``pm_tokens``; for ``ce`` that is every response,
    not only the imitated reward-1 ones) or, for ``mse``, over its non-empty responses
    (``pm_sequences``), plus the k3 penalty per response token. Over an epoch the same sums
    give the token-weighted (sequence-weighted for ``mse``) mean of the step objectives.
    ``clip_frac``, ``ratio_mean`` are per token of the loss (``tokens``: for ``ce`` the
    imitated tokens); ``kl_penalty`` per response token.
    """
    seq_loss = cfg.stage1.loss == "mse" or (
        cfg.stage1.loss == "unlearned" and cfg.stage1.unlearned_base == "mse"
    )

    def fin(s: dict[str, float]) -> dict[str, float]:
        out = finalize_policy_metrics(s)
        t = s.get("tokens", 0.0)
        all_tokens = s.get("pm_tokens", 0.0)
        denom = s.get("pm_sequences", 0.0) if seq_loss else all_tokens
        out["loss"] = s.get("loss_sum", 0.0) / denom if denom else 0.0
        if "kl_penalty_sum" in s and all_tokens:
            out["loss"] += s["kl_penalty_sum"] / all_tokens
        if "clipped_tokens" in s:
            out["clip_frac"] = s["clipped_tokens"] / t if t else 0.0
            out["clip_frac_low"] = s.get("clipped_low_tokens", 0.0) / t if t else 0.0
            out["clip_frac_high"] = s.get("clipped_high_tokens", 0.0) / t if t else 0.0
        if "ratio_sum" in s:
            out["ratio_mean"] = s["ratio_sum"] / t if t else 0.0
        if "kl_penalty_sum" in s:
            out["kl_penalty"] = s["kl_penalty_sum"] / all_tokens if all_tokens else 0.0
        out["nonfinite_tokens"] = s.get("nonfinite_tokens", 0.0)
        return out

    return fin


def build_spec(cfg: Config, run: StageRun) -> StageSpec:
    """Stage 1's plug-in for the shared loop."""
    table = run.table
    ref = run.score("anchors/data")  # lp_r under the initial weights (pi_r)
    load_pi_r_routing(run)  # MoE: pi_r's routing of the same pass (metrics, replay)
    run.report_mismatch(ref)
    anchors: dict[int, list[np.ndarray]] = {}

    def on_epoch_start(epoch: int) -> None:
        if cfg.stage1.anchor == "epoch":
            anchors[epoch] = (
                ref if epoch == 0 else run.score(f"anchors/epoch_{epoch:04d}", trained=True)
            )

    def token_arrays(epoch: int) -> dict[str, list[np.ndarray]]:
        arrays = {"ref_logp": ref}
        if cfg.stage1.anchor == "epoch":
            arrays["anchor_logp"] = anchors[epoch]
        return arrays

    return StageSpec(
        name="stage1",
        table=table,
        epochs=cfg.stage1.epochs,
        make_loss=lambda rows: make_stage1_loss(cfg, run, table, rows),
        metric_keys=stage1_metric_keys(cfg),
        finalize_metrics=finalize_stage1_metrics(cfg),
        token_arrays=token_arrays,
        on_epoch_start=on_epoch_start,
        snapshot_epochs=[e for e in cfg.stage1.save_epochs if e < cfg.stage1.epochs],
        heldout_every=cfg.stage1.eval_every_epochs,
    )


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit code (see :mod:`erpd_megatron.train.loop`)."""
    p = argparse.ArgumentParser(prog="erpd stage1", description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="recipe YAML")
    p.add_argument("overrides", nargs="*", help="a.b=c overrides")
    p.add_argument(
        "--force", action="store_true", help="train even on data without signal (stage1.force=true)"
    )
    args = p.parse_intermixed_args(argv)  # --force may follow the a.b=c overrides
    overrides = args.overrides + (["stage1.force=true"] if args.force else [])
    return StageRun.launch("stage1", args.config, overrides, build_spec)


if __name__ == "__main__":
    import sys

    sys.exit(main())
