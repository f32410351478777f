"""Sampling, rewarding and teacher-forced scoring of one model on one held-out set: steps 1-4
of :mod:`erpd_megatron.eval.evaluate` (the prompts, the rollout engine's samples and their
rewards, pi's own scores and drift, and the KL to the base), with the transformers backend
for steps 3-4 (:mod:`erpd_megatron.eval.scoring`; the sharded backend is
:mod:`erpd_megatron.eval.mcore_scoring`)."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from erpd_megatron.config.schema import Config, EvalModelConfig
from erpd_megatron.data.prompts import SelectedPrompt, load_prompt_set
from erpd_megatron.eval import stats
from erpd_megatron.rollout.engines import Completion, make_engine
from erpd_megatron.rollout.reward_pool import RewardPool
from erpd_megatron.utils.log import get_logger

log = get_logger(__name__)


@dataclass
class ModelSamples:
    """One model's samples on one held-out set and what was measured on them."""

    model: EvalModelConfig
    """Name and checkpoint."""
    is_base: bool
    """Whether this is pi_base."""
    completions: list[Completion]
    """Samples, prompt-major (``n`` per prompt)."""
    rewards: np.ndarray
    """Rewards, [prompts, n]."""
    tf_logprobs: list[np.ndarray] | None = None
    """Teacher-forced log pi of each sample (None at temperature 0)."""
    entropy: list[np.ndarray] | None = None
    """Token entropies of pi on its samples (None at temperature 0)."""
    drift: np.ndarray | None = None
    """``sum_t (log pi - log pi_base)`` on each of the base's samples (None for the base)."""
    kl: np.ndarray | None = None
    """Per-sequence KL(pi || pi_base) estimates on pi's samples."""
    seconds: dict[str, float] = field(default_factory=dict)
    """Wall time of each phase."""
    kl_source: str = ""
    """Where log pi in the KL came from: "engine" or "teacher_forced"."""
    logprobs_mode: str = "processed"
    """The engine's log-prob mode ("raw" log-probs are not of the tempered sampling
    distribution)."""


def select_heldout(cfg: Config, dataset: str, tokenizer: Any) -> list[SelectedPrompt]:
    """The held-out prompts of one set: the rollout loader with the rollout template/format
    fields."""
    rc, ec = cfg.rollout, cfg.eval
    sel = load_prompt_set(
        dataset,
        tokenizer,
        split=ec.dataset_split or rc.dataset_split,
        config_name=rc.dataset_config,
        num_prompts=ec.num_prompts,
        seed=ec.seed,
        max_prompt_tokens=rc.max_prompt_tokens,
        prompt_format=rc.prompt_format,
        question_key=rc.question_key,
        answer_key=rc.answer_key,
        template=rc.prompt_template,
        use_chat_template=rc.use_chat_template,
    )
    return sel.prompts


def score_completions(
    model: Any,
    prompts: list[list[int]],
    comps: list[Completion],
    cfg: Config,
    pad: int,
    *,
    entropy: bool,
) -> Any:
    """Teacher-forced log-probs (and entropies) of ``model`` on the samples ``comps``."""
    from erpd_megatron.eval.scoring import score_responses

    return score_responses(
        model,
        prompts,
        [c.token_ids for c in comps],
        temperature=cfg.eval.temperature,
        entropy=entropy,
        max_tokens=cfg.eval.score_max_tokens,
        pad_token_id=pad,
        packing=bool(cfg.data.packing),
    )


def generate_and_reward(
    cfg: Config,
    m: EvalModelConfig,
    *,
    prompts: list[SelectedPrompt],
    tokenizer: Any,
    pool: RewardPool | None,
    seed: int,
    progress: bool = True,
) -> tuple[ModelSamples, Any]:
    """Sample ``eval.n`` responses per prompt through the rollout engine and reward them
    (steps 1-2 of :mod:`erpd_megatron.eval.evaluate`; with no ``pool`` the rewards are NaN,
    for :func:`reward_samples` later). Returns the samples and the engine's model (hf engine)
    or None."""
    rc, ec = cfg.rollout, cfg.eval
    rc = dataclasses.replace(rc, max_new_tokens=ec.max_new_tokens)
    ids = [p.token_ids for p in prompts]
    secs: dict[str, float] = {}
    t0 = time.perf_counter()
    with make_engine(rc, tokenizer, model_path=m.path) as engine:
        groups = engine.generate(
            ids,
            ec.n,
            temperature=ec.temperature,
            top_p=1.0,
            max_new_tokens=ec.max_new_tokens,
            seed=seed,
            progress=progress,
        )
        secs["generate"] = time.perf_counter() - t0
        model = getattr(engine, "model", None) if engine.name == "hf" else None
    comps = [c for g in groups for c in g]
    if len(comps) != len(prompts) * ec.n:
        raise RuntimeError(
            f"{m.name}: engine returned {len(comps)} samples for {len(prompts)} prompts x {ec.n}"
        )
    out = ModelSamples(
        model=m,
        is_base=False,
        completions=comps,
        rewards=np.full((len(prompts), ec.n), np.nan),
        seconds=secs,
        logprobs_mode=engine.logprobs_mode,
    )
    if pool is not None:
        reward_samples(cfg, out, prompts, tokenizer, pool, progress=progress)
    return out, model


def reward_samples(
    cfg: Config,
    s: ModelSamples,
    prompts: list[SelectedPrompt],
    tokenizer: Any,
    pool: RewardPool,
    *,
    progress: bool = True,
) -> None:
    """Step 2: ``s.rewards`` from the reward pool, in place."""
    n = cfg.eval.n
    t0 = time.perf_counter()
    texts = tokenizer.batch_decode([c.token_ids for c in s.completions], skip_special_tokens=True)
    rewards = pool.map(texts, [p.reference for p in prompts for _ in range(n)], progress=progress)
    s.rewards = np.asarray(rewards, dtype=np.float64).reshape(len(prompts), n)
    s.seconds["reward"] = time.perf_counter() - t0


def sample_model(
    cfg: Config,
    m: EvalModelConfig,
    *,
    is_base: bool,
    prompts: list[SelectedPrompt],
    tokenizer: Any,
    pool: RewardPool | None,
    seed: int,
    base: ModelSamples | None,
    keep_model: bool = False,
    progress: bool = True,
) -> tuple[ModelSamples, Any]:
    """Sample, reward and self-score one model (steps 1-3 of :mod:`erpd_megatron.eval.evaluate`).

    Returns the samples and, when ``keep_model`` and the engine is hf, the loaded model (so the
    base need not be loaded twice); else None."""
    from erpd_megatron.eval.scoring import load_causal_lm

    rc, ec = cfg.rollout, cfg.eval
    flat_prompts = [p.token_ids for p in prompts for _ in range(ec.n)]
    pad = int(tokenizer.pad_token_id)
    out, model = generate_and_reward(
        cfg, m, prompts=prompts, tokenizer=tokenizer, pool=pool, seed=seed, progress=progress
    )
    out.is_base = is_base
    secs = out.seconds
    if ec.temperature > 0:
        t0 = time.perf_counter()
        if model is None:
            model = load_causal_lm(m.path, device=rc.hf_device, dtype=rc.hf_dtype)
        own = score_completions(model, flat_prompts, out.completions, cfg, pad, entropy=True)
        out.tf_logprobs, out.entropy = own.logprobs, own.entropy
        if base is not None and base.tf_logprobs is not None:
            on_base = score_completions(
                model, flat_prompts, base.completions, cfg, pad, entropy=False
            )
            out.drift = stats.sequence_kl(on_base.logprobs, base.tf_logprobs)
        secs["score_self"] = time.perf_counter() - t0
    kept = model if keep_model and rc.engine == "hf" else None
    del model
    _free_gpu_memory()  # before the next engine (vLLM) claims its share
    return out, kept


def _free_gpu_memory() -> None:
    import gc

    import torch

    if torch.cuda.is_available():
        gc.collect()
        torch.cuda.empty_cache()


def score_kl(
    cfg: Config,
    samples: list[ModelSamples],
    base_model: Any,
    prompts: list[SelectedPrompt],
    pad: int,
) -> None:
    """Step 4: the per-sequence KL(pi || pi_base) of every non-base model, in place."""
    flat_prompts = [p.token_ids for p in prompts for _ in range(cfg.eval.n)]
    for s in samples:
        if s.is_base:
            continue
        t0 = time.perf_counter()
        base_lp = score_completions(
            base_model, flat_prompts, s.completions, cfg, pad, entropy=False
        ).logprobs
        apply_kl(cfg, s, base_lp)
        s.seconds["score_base"] = time.perf_counter() - t0


def apply_kl(cfg: Config, s: ModelSamples, base_lp: list[np.ndarray]) -> None:
    """Set ``s.kl`` (and ``s.kl_source``) from pi_base's teacher-forced log-probs of ``s``'s
    samples and log pi from the engine or the teacher-forced pass (``eval.kl_logprobs``)."""
    raw = s.logprobs_mode == "raw" and cfg.eval.temperature != 1.0
    if raw and cfg.eval.kl_logprobs == "engine":
        log.warning(
            "%s: the engine's log-probs are of the raw logits, not of the tempered "
            "sampling distribution; the KL uses teacher-forced log pi instead",
            s.model.name,
        )
    if cfg.eval.kl_logprobs == "teacher_forced" or raw:
        pi_lp, s.kl_source = s.tf_logprobs, "teacher_forced"
    else:
        pi_lp = [np.asarray(c.logprobs, dtype=np.float64) for c in s.completions]
        s.kl_source = "engine"
    s.kl = stats.sequence_kl(pi_lp, base_lp)
