"""Synthetic rollout sets: random prompts and responses with a learnable reward, for tests and
the GPU check (``scripts/gpu_check.py``), written with :func:`write_rollout_set`.

One generator serves every caller; what they differ in (sizes, length ranges, vocabulary,
seed, shard size, reward rule) is a parameter. The draw order is part of the contract: callers'
tests compare against runs made on these exact sets, so for each group the prompt's length and
tokens are drawn first, then each sample's response length and tokens, from one
``numpy.random.default_rng(seed)``. A fixed length (``lo == hi``) consumes no random draw.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np

from erpd_megatron.data.rollouts import RolloutRecord, RolloutSet, write_rollout_set

ENGINE_LOGPROB = -5.0
"""Engine log-prob stored for every response token (a constant: nothing samples these)."""


def first_token_even(response: list[int]) -> float:
    """Reward 1.0 for a response whose first token is even, else 0.0: a rule a policy can
    learn from the tokens alone, so that losses have something to move."""
    return float(response[0] % 2 == 0)


def write_synthetic_rollouts(
    out: str | os.PathLike,
    *,
    prompts: int,
    group: int,
    vocab: int,
    prompt_len: tuple[int, int],
    response_len: tuple[int, int],
    seed: int = 0,
    min_token: int = 1,
    prompts_per_shard: int = 4,
    reward: Callable[[list[int]], float] = first_token_even,
) -> RolloutSet:
    """Write a rollout set of ``prompts`` groups of ``group`` random samples to ``out``.

    Token ids are drawn uniformly from ``[min_token, vocab)`` (the default keeps id 0, often a
    special token, out); prompt and response lengths uniformly from the inclusive ranges
    ``prompt_len`` and ``response_len``. Every sample of a group shares its prompt; sample ids
    are ``group_index * group + sample_index``, every finish reason is "stop" and every engine
    log-prob :data:`ENGINE_LOGPROB`. ``reward`` maps a response's token ids to its reward.
    Same arguments, same bytes (parquet shards and manifest).
    """
    for name, (lo, hi) in (("prompt_len", prompt_len), ("response_len", response_len)):
        if not 1 <= lo <= hi:
            raise ValueError(f"{name}={(lo, hi)}: need 1 <= lo <= hi")
    if not 0 <= min_token < vocab:
        raise ValueError(f"min_token={min_token}, vocab={vocab}: need 0 <= min_token < vocab")
    rng = np.random.default_rng(seed)

    def tokens(length: tuple[int, int]) -> list[int]:
        n = length[0] if length[0] == length[1] else rng.integers(length[0], length[1] + 1)
        return rng.integers(min_token, vocab, n).tolist()

    recs = []
    for g in range(prompts):
        prompt = tokens(prompt_len)
        for s in range(group):
            resp = tokens(response_len)
            recs.append(
                RolloutRecord(
                    sample_id=g * group + s,
                    prompt_id=g,
                    group_index=g,
                    sample_index=s,
                    prompt_token_ids=prompt,
                    response_token_ids=resp,
                    reward=reward(resp),
                    finish_reason="stop",
                    engine_logprobs=[ENGINE_LOGPROB] * len(resp),
                )
            )
    return write_rollout_set(out, recs, prompts_per_shard=prompts_per_shard)
