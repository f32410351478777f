"""Stage 2 of ERPD: trust-region distillation of cached teacher signals into pi_r.

``python -m erpd_megatron.stage2 --config RECIPE [a.b=c ...]`` (also ``erpd stage2``). The
student starts from pi_r (``checkpoint.load``); the rollout data and the teacher cache
(``stage2.cache_dir``) are read together by sample id (memory-mapped, no teacher forward
passes). The loss is the weighted sum over ``stage2.teachers``:

* ``topk_kl``: token-mean forward KL from the teacher's top-k+tail distribution (or the
  geometric mixture ``p_r^(1-alpha) p_T^alpha`` on the same buckets) to the student. The
  trust region masks tokens whose sampled-token ratio ``exp(lp - lp_r)`` has left
  ``[1-eps, 1+eps]``: the student stops moving there.
* advantage-style signals (``logratio``, ``contrast``, ``gated``): each teacher's signal is
  scaled by its ``lam`` and clipped to ``[-clip, clip]``, the weighted sum enters the clipped
  surrogate ``-min(rho*s, clip(rho, 1-eps, 1+eps)*s)`` against pi_r; tokens with
  ``|s| > c_out`` are masked.

Optional k3 KL-to-pi_r penalty; KL budget ``stage2.kl_budget``: when the mean sequence
KL(pi_r || pi_theta) to pi_r measured on a step's batch exceeds it, training stops and the
newest checkpoint whose measured KL is inside the budget becomes ``final``.
"""

from __future__ import annotations

import argparse
import json
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from erpd_megatron.config.schema import Config
from erpd_megatron.data.batching import MicroBatch, SampleTable
from erpd_megatron.models.router_replay import load_pi_r_routing
from erpd_megatron.ops.signals import SIGNAL_METRICS, TeacherTerm, stage2_loss, teacher_signal
from erpd_megatron.train.common import StageRun, logits_logprob_entropy
from erpd_megatron.train.engine import token_rows
from erpd_megatron.train.loop import StageSpec
from erpd_megatron.train.policy_metrics import (
    POLICY_KEYS,
    finalize_policy_metrics,
    policy_metric_sums,
)
from erpd_megatron.utils.log import get_logger

log = get_logger(__name__)


class CacheColumn:
    """Row-indexable view of one cached per-token array (what :func:`collate` reads), backed
    by memory-mapped records; the records of recent rows are kept in a small LRU so that
    the several columns of one sample decode it once."""

    def __init__(
        self, cache, sample_ids: np.ndarray, field: str, model: str, lru: OrderedDict
    ) -> None:
        self.cache, self.sample_ids, self.field, self.model, self.lru = (
            cache,
            sample_ids,
            field,
            model,
            lru,
        )

    def __getitem__(self, row: int) -> np.ndarray:
        sid = int(self.sample_ids[row])
        rec = self.lru.get(sid)
        if rec is None:
            rec = self.cache.get(sid)
            self.lru[sid] = rec
            while len(self.lru) > 4096:
                self.lru.popitem(last=False)
        arr = getattr(rec, self.field)[self.model]
        return arr.astype(np.float32) if arr.dtype == np.float16 else arr


def open_cache(cfg: Config, table: SampleTable, data_fingerprint: str):
    """Open and check the cache against the student and the rollout data; runs before
    torch.distributed starts, so a wrong cache costs seconds, not a job."""
    from erpd_megatron.cache.reader import TeacherCache

    if not cfg.stage2.cache_dir:
        raise ValueError(
            "stage2.cache_dir is not set: the teacher cache from tools/cache_teacher_logprobs.py"
        )
    counts = {int(s): int(n) for s, n in zip(table.sample_ids, table.response_lengths)}
    # each rank hashes its part of the shards (every shard once per job); all ranks run this
    # before torch.distributed starts, so a corrupt shard stops the job before any step
    part = _launch_rank()
    cache = TeacherCache.open(
        cfg.stage2.cache_dir,
        expect_vocab_size=cfg.model.vocab_size,
        expect_rollout_fingerprint=data_fingerprint,
        expect_token_counts=counts,
        verify_part=part,
    )
    sampled = set(cache.sampled_models)
    if "base" not in sampled:
        raise ValueError(f"{cfg.stage2.cache_dir}: the cache has no 'base' (pi_r) log-probs")
    for i, t in enumerate(cfg.stage2.teachers):
        if t.model not in sampled:
            raise ValueError(
                f"stage2.teachers.{i}.model='{t.model}' is not in the cache {cfg.stage2.cache_dir} "
                f"(it has {sorted(sampled)})"
            )
        if t.signal == "topk_kl" and t.model not in cache.teachers:
            raise ValueError(
                f"stage2.teachers.{i}: topk_kl needs the top-k of '{t.model}', which the cache "
                "does not hold (cache.models[].topk was false)"
            )
        if t.signal == "topk_kl" and t.alpha != 1.0 and t.model not in cache.ref_teachers:
            raise ValueError(
                f"stage2.teachers.{i}: alpha != 1 needs pi_r's log-probs at the teacher's top-k"
            )
        if t.signal == "contrast" and t.contrast_model not in sampled:
            raise ValueError(
                f"stage2.teachers.{i}.contrast_model='{t.contrast_model}' is not in the cache"
            )
    try:
        check_base_fingerprint(cfg, cache)
    except BaseException:
        cache.close()
        raise
    return cache


def _launch_rank() -> tuple[int, int]:
    """(rank, world size) as the launcher (torchrun or Slurm) set them, before any init."""
    from erpd_megatron.runtime.distributed import parse_launch_env

    launch = parse_launch_env()
    return launch.rank, launch.world_size


def check_base_fingerprint(cfg: Config, cache) -> None:
    """The cache's pi_r (``base``) must have been scored from the weights Stage 2 starts from
    (``checkpoint.load``): lp_r, the ratio anchor and the mixture's pi_r buckets come from it.

    Compares :func:`erpd_megatron.utils.files.dir_fingerprint` of ``checkpoint.load`` with
    the one the cache tool recorded. Only global rank 0 reads the checkpoint (this runs
    before torch.distributed starts; when it fails, the launcher stops the other ranks).
    """
    from erpd_megatron.cache.format import CacheError
    from erpd_megatron.utils.files import dir_fingerprint

    if _launch_rank()[0] != 0:
        return
    info = cache.models.get("base") or {}
    recorded = str(info.get("fingerprint", ""))
    load = cfg.checkpoint.load
    actual = dir_fingerprint(load)
    if recorded != actual:
        raise CacheError(
            f"{cache.cache_dir}: the cache's pi_r ('base') was scored from {info.get('path')!r} "
            f"(fingerprint {recorded[:16] or 'none'}), but checkpoint.load={load} has fingerprint "
            f"{actual[:16]}: its lp_r and pi_r top-k log-probs are not those of the weights "
            "Stage 2 trains from. Re-run the cache tool (erpd cache / "
            f"tools/cache_teacher_logprobs.py) with checkpoint.load={load}, or set "
            "checkpoint.load to the checkpoint the cache was written from."
        )


def make_stage2_loss(cfg: Config, run: StageRun, rows: np.ndarray):
    """The loss of one global batch (token mean over all its response tokens)."""
    shard = run.engine.vocab_shard()
    tokens = float(run.table.response_lengths[rows].sum())
    s2 = cfg.stage2
    # With only top-k KL teachers and no KL penalty, the sampled-token log-prob is a metric and
    # a mask (no gradient), so a single KL term can write its gradient into the logits.
    kl_only = all(t.signal == "topk_kl" for t in s2.teachers) and s2.kl_coef == 0
    inplace_kl = kl_only and len(s2.teachers) == 1

    def loss_fn(logits: torch.Tensor, mb: MicroBatch):
        if kl_only:
            with torch.no_grad():
                lp, ent = logits_logprob_entropy(logits.detach(), mb, shard)
        else:
            lp, ent = logits_logprob_entropy(logits, mb, shard)
        dev = lp.device
        arr = {k: v.to(dev) for k, v in mb.token_arrays.items()}
        mask = mb.loss_mask.to(dev) > 0
        ref = arr["ref_logp"]
        adv = mb.advantages.to(dev)
        terms = []
        for t in s2.teachers:
            if t.signal == "topk_kl":
                kl = _topk_kl(logits, arr, t, shard, inplace=inplace_kl)
                terms.append(TeacherTerm("topk_kl", weight=t.weight, kl=kl))
            else:
                raw = teacher_signal(
                    t.signal,
                    arr[f"lp:{t.model}"],
                    lp_r=ref,
                    lp_unlearned=arr.get(f"lp:{t.contrast_model}"),
                    adv=adv,
                    gate_mode=t.gate_mode,
                    gate_alpha=t.alpha,
                )
                terms.append(
                    TeacherTerm(t.signal, weight=t.weight, raw=raw, lam=t.lam, clip=t.clip)
                )
        total, metrics = stage2_loss(
            lp, ref, mask, terms, normalizer=tokens, eps=s2.eps, c_out=s2.c_out, kl_coef=s2.kl_coef
        )
        metrics.update(policy_metric_sums(lp, ref, ent, mb))
        return total, {
            k: v.detach().double() if torch.is_tensor(v) else v for k, v in metrics.items()
        }

    return loss_fn


def _topk_kl(
    logits: torch.Tensor, arr: dict[str, torch.Tensor], t, shard, *, inplace: bool = False
) -> torch.Tensor:
    """Per-token top-k KL ``[b, s]`` of one teacher (logits' rows without a copy)."""
    from erpd_megatron.ops.vocab_parallel_topk import vp_topk_kl

    flat, order = token_rows(logits)
    ref_lp = arr.get(f"reftopk:{t.model}") if t.alpha != 1.0 else None
    # padded positions carry id 0 and log-prob 0 (a full-mass bucket): harmless, masked later
    kl = vp_topk_kl(
        flat,
        order.flat(arr[f"ids:{t.model}"]),
        order.flat(arr[f"topk:{t.model}"]),
        group=shard.group,
        vocab_start=shard.start,
        vocab_size=shard.vocab_size,
        alpha=t.alpha,
        ref_logprobs=None if ref_lp is None else order.flat(ref_lp),
        inplace_backward=inplace,
    )
    return order.unflat(kl)


def stage2_metric_keys(cfg: Config) -> list[str]:
    """Keys of the sums the Stage-2 loss returns (known on every rank)."""
    keys = ["loss_total_sum", "out_of_region_tokens"]
    adv_style = False
    for i, t in enumerate(cfg.stage2.teachers):
        if t.signal == "topk_kl":
            keys += [f"t{i}_kl_sum", f"t{i}_kl_tokens", f"t{i}_nonfinite"]
        else:
            adv_style = True
            keys += [f"t{i}_{k}" for k in SIGNAL_METRICS]
    if adv_style:
        keys += ["surrogate_sum", "clipped_tokens", "masked_tokens"]
    if cfg.stage2.kl_coef > 0:
        keys.append("kl_penalty_sum")
    return keys + POLICY_KEYS


def finalize_stage2_metrics(cfg: Config):
    """Means, fractions and per-teacher signal statistics from the reduced sums."""

    def fin(s: dict[str, float]) -> dict[str, float]:
        out = finalize_policy_metrics(s)
        t = out["tokens"] or 1.0
        out["loss"] = s.get("loss_total_sum", 0.0) / t
        out["kl_to_base"] = out["seq_kl_k3"]
        out["out_of_region_frac"] = s.get("out_of_region_tokens", 0.0) / t
        if "clipped_tokens" in s:
            out["clip_frac"] = s["clipped_tokens"] / t
            out["masked_frac"] = s["masked_tokens"] / t
        nonfinite = 0.0
        for i, te in enumerate(cfg.stage2.teachers):
            if te.signal == "topk_kl":
                out[f"teacher{i}/topk_kl"] = s.get(f"t{i}_kl_sum", 0.0) / max(
                    s.get(f"t{i}_kl_tokens", 0.0), 1.0
                )
                nonfinite += s.get(f"t{i}_nonfinite", 0.0)
            else:
                n = t
                mean = s.get(f"t{i}_signal_raw_sum", 0.0) / n
                out[f"teacher{i}/signal_mean"] = mean
                out[f"teacher{i}/signal_std"] = (
                    max(s.get(f"t{i}_signal_raw_sq_sum", 0.0) / n - mean * mean, 0.0) ** 0.5
                )
                out[f"teacher{i}/signal_clipped_frac"] = (
                    s.get(f"t{i}_signal_clipped_tokens", 0.0) / n
                )
                out[f"teacher{i}/signal_masked_frac"] = (
                    s.get(f"t{i}_signal_outlier_tokens", 0.0) / n
                )
                nonfinite += s.get(f"t{i}_nonfinite_tokens", 0.0)
        out["nonfinite_tokens"] = nonfinite
        return out

    return fin


def build_spec(cfg: Config, run: StageRun) -> StageSpec:
    """Stage 2's plug-in for the shared loop."""
    cache = run.context  # opened and checked by open_cache before the engine was built
    if run.engine.moe is not None:  # MoE: score pi_r once to record its routing
        run.score("anchors/data")
        load_pi_r_routing(run)
    sids = run.table.sample_ids
    lru: OrderedDict = OrderedDict()
    arrays: dict = {"ref_logp": CacheColumn(cache, sids, "sampled", "base", lru)}
    for t in cfg.stage2.teachers:
        arrays[f"lp:{t.model}"] = CacheColumn(cache, sids, "sampled", t.model, lru)
        if t.signal == "contrast":
            arrays[f"lp:{t.contrast_model}"] = CacheColumn(
                cache, sids, "sampled", t.contrast_model, lru
            )
        if t.signal == "topk_kl":
            arrays[f"ids:{t.model}"] = CacheColumn(cache, sids, "topk_ids", t.model, lru)
            arrays[f"topk:{t.model}"] = CacheColumn(cache, sids, "topk_logprobs", t.model, lru)
            if t.alpha != 1.0:
                arrays[f"reftopk:{t.model}"] = CacheColumn(
                    cache, sids, "ref_topk_logprobs", t.model, lru
                )
    budget = cfg.stage2.kl_budget
    save_root = Path(cfg.checkpoint.save or Path(cfg.output_dir) / "stage2" / "checkpoints")
    kl_log = save_root / "kl_by_step.json"

    def should_stop(values: dict[str, float], step: int) -> bool:
        # The KL measured at step `step` is that of the weights after step-1 updates, i.e.
        # of the checkpoint iter_{step-1}, if one was saved.
        if budget is None:
            return False
        import torch.distributed as dist

        if dist.get_rank() == 0:
            data = json.loads(kl_log.read_text()) if kl_log.exists() else {}
            data[str(step - 1)] = values["kl_to_base"]
            kl_log.parent.mkdir(parents=True, exist_ok=True)
            kl_log.write_text(json.dumps(data))
        return values["kl_to_base"] > budget

    def choose_final(root: Path) -> Path | None:
        data = json.loads(kl_log.read_text()) if kl_log.exists() else {}
        inside = sorted(int(s) for s, kl in data.items() if kl <= budget)
        for step in reversed(inside):
            p = root / f"iter_{step:07d}"
            if p.exists():
                return p
        log.warning(
            "stage2: no saved checkpoint lies inside the KL budget %.4g; publishing pi_r", budget
        )
        return Path(cfg.checkpoint.load)

    return StageSpec(
        name="stage2",
        table=run.table,
        epochs=cfg.stage2.epochs,
        make_loss=lambda rows: make_stage2_loss(cfg, run, rows),
        metric_keys=stage2_metric_keys(cfg),
        finalize_metrics=finalize_stage2_metrics(cfg),
        token_arrays=lambda epoch: arrays,
        should_stop=should_stop,
        choose_final=choose_final,
    )


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit code (see :mod:`erpd_megatron.train.loop`)."""
    p = argparse.ArgumentParser(prog="erpd stage2", description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="recipe YAML")
    p.add_argument("overrides", nargs="*", help="a.b=c overrides")
    args = p.parse_args(argv)
    return StageRun.launch("stage2", args.config, args.overrides, build_spec, precheck=open_cache)


if __name__ == "__main__":
    import sys

    sys.exit(main())
