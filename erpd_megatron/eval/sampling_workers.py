"""The non-base models of one held-out set sampled and scored side by side on a CPU
(``eval.cpu_workers`` > 1, hf engine and hf scoring).

Generation of the demo's and tests' tiny models is single-threaded work (``eval.cpu_threads``
is 1 there), so on an N-core machine N worker processes evaluate N models at a time. A worker
does steps 1, 3 and 4 of :mod:`erpd_megatron.eval.evaluate` for one model (sample, score pi on
its own and on the base's samples, score the base on pi's samples) with the same seed, threads
and code as the one-process path, so the table is the same bit for bit; the parent rewards the
samples in its reward pool (step 2) and builds the rows. Workers are spawned (no fork of a
process holding torch threads) and get the base's samples and model path, never a live model.
"""

from __future__ import annotations

import multiprocessing as mp
from concurrent.futures import ProcessPoolExecutor
from typing import Any

from erpd_megatron.config.schema import Config, EvalModelConfig
from erpd_megatron.data.prompts import SelectedPrompt
from erpd_megatron.eval.sampling import ModelSamples, reward_samples, sample_model, score_kl
from erpd_megatron.rollout.reward_pool import RewardPool
from erpd_megatron.utils.log import get_logger

log = get_logger(__name__)


def _sample_one(
    cfg: Config,
    m: EvalModelConfig,
    prompts: list[SelectedPrompt],
    tokenizer: Any,
    seed: int,
    base: ModelSamples,
    threads: int,
) -> ModelSamples:
    """In a worker: one model's samples, self-scores, drift and KL to the base (no rewards)."""
    import torch

    from erpd_megatron.eval.scoring import load_causal_lm

    torch.set_num_threads(threads)
    s, _ = sample_model(
        cfg,
        m,
        is_base=False,
        prompts=prompts,
        tokenizer=tokenizer,
        pool=None,
        seed=seed,
        base=base,
        progress=False,
    )
    if cfg.eval.temperature > 0:
        rc = cfg.rollout
        base_model = load_causal_lm(base.model.path, device=rc.hf_device, dtype=rc.hf_dtype)
        score_kl(cfg, [s], base_model, prompts, int(tokenizer.pad_token_id))
    return s


def sample_in_workers(
    cfg: Config,
    models: list[EvalModelConfig],
    *,
    prompts: list[SelectedPrompt],
    tokenizer: Any,
    pool: RewardPool,
    seed: int,
    base: ModelSamples,
    progress: bool = True,
) -> list[ModelSamples]:
    """``models`` (the base excluded) sampled and scored in ``eval.cpu_workers`` processes,
    then rewarded here; in the order of ``models``."""
    import torch

    from erpd_megatron.utils.progress import progress_bar

    workers = min(cfg.eval.cpu_workers, len(models))
    threads = torch.get_num_threads()  # eval_threads() has set it for this evaluation
    log.info("eval: %d models in %d worker processes (eval.cpu_workers)", len(models), workers)
    ctx = mp.get_context("spawn")
    out: list[ModelSamples] = []
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as ex:
        futs = [
            ex.submit(_sample_one, cfg, m, prompts, tokenizer, seed, base, threads) for m in models
        ]
        bar = progress_bar(len(futs), enabled=progress, desc="eval models")
        for f in futs:
            s = f.result()
            reward_samples(cfg, s, prompts, tokenizer, pool, progress=False)
            out.append(s)
            bar.update(1)
        bar.close()
    return out
