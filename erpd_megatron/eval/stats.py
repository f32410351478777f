"""The numbers of an evaluation row, from per-sample arrays (pure numpy, no model).

Definitions (all in nats where a unit applies):

* accuracy ``avg@n``: mean reward over the ``n`` samples of every prompt, averaged over
  prompts; its standard error is over prompts (the prompt is the independent unit);
* ``pass@k``: the unbiased estimator ``1 - C(n-c, k) / C(n, k)`` per prompt (``c`` samples
  with reward > 0.5), averaged over prompts;
* sequence KL(pi || pi_base): the per-sequence estimate ``sum_t (log pi(y_t) - log pi_base(y_t))``
  on samples ``y ~ pi``, mean and standard error over sequences (an unbiased estimate; a single
  sequence's value may be negative);
* token entropy: mean over all response tokens of the full-distribution entropy of pi;
* accuracy gained per nat: ``(acc - acc_base) / KL``, None for the base or when KL < ``KL_EPS``.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

import numpy as np

from erpd_megatron.data.rollouts import pass_at_k

CORRECT_THRESHOLD = 0.5
"""A sample counts as correct for pass@k when its reward exceeds this."""
KL_EPS = 1e-3
"""Below this KL (nats per sequence) the accuracy gained per nat is not reported."""


def mean_se(values: Sequence[float] | np.ndarray) -> tuple[float, float]:
    """Mean and standard error of the mean (``std(ddof=1) / sqrt(N)``; 0 for one value)."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return float("nan"), float("nan")
    se = float(x.std(ddof=1) / math.sqrt(x.size)) if x.size > 1 else 0.0
    return float(x.mean()), se


def accuracy_stats(rewards: np.ndarray, pass_k: Sequence[int]) -> dict[str, float | None]:
    """``accuracy`` (avg@n), ``accuracy_se`` and ``pass@k`` from rewards shaped [prompts, n].

    A k larger than n gives None (the estimator needs n >= k)."""
    r = np.asarray(rewards, dtype=np.float64)
    if r.ndim != 2 or r.size == 0:
        raise ValueError(f"rewards must be [prompts, n] and non-empty, got shape {r.shape}")
    acc, se = mean_se(r.mean(axis=1))
    out: dict[str, float | None] = {"accuracy": acc, "accuracy_se": se}
    n = r.shape[1]
    correct = (r > CORRECT_THRESHOLD).sum(axis=1)
    for k in pass_k:
        out[f"pass@{k}"] = (
            float(np.mean([pass_at_k(n, int(c), k) for c in correct])) if k <= n else None
        )
    return out


def sequence_kl(logp: Sequence[np.ndarray], base_logp: Sequence[np.ndarray]) -> np.ndarray:
    """Per-sequence KL estimates ``sum_t (logp[t] - base_logp[t])`` (float64)."""
    if len(logp) != len(base_logp):
        raise ValueError(f"{len(logp)} sequences but {len(base_logp)} base scores")
    out = np.empty(len(logp), dtype=np.float64)
    for i, (a, b) in enumerate(zip(logp, base_logp)):
        if len(a) != len(b):
            raise ValueError(f"sequence {i}: {len(a)} log-probs but {len(b)} base log-probs")
        out[i] = float(np.sum(np.asarray(a, np.float64) - np.asarray(b, np.float64)))
    return out


def kl_stats(per_seq: np.ndarray, num_tokens: int) -> dict[str, float]:
    """``kl_to_base`` (mean per sequence), ``kl_to_base_se`` and ``kl_to_base_per_token``."""
    mean, se = mean_se(per_seq)
    return {
        "kl_to_base": mean,
        "kl_to_base_se": se,
        "kl_to_base_per_token": float(np.sum(per_seq) / num_tokens) if num_tokens else float("nan"),
    }


def drift_stats(drift: np.ndarray, base_rewards: np.ndarray) -> dict[str, float | None]:
    """Mean sequence log-prob drift ``sum_t (log pi - log pi_base)`` on the base's samples,
    overall and split by the base sample's reward (as ``stage*/drift_pos`` / ``drift_neg``).
    Its mean is ``-KL(pi_base || pi)``."""
    pos = np.asarray(base_rewards) > CORRECT_THRESHOLD

    def m(x: np.ndarray) -> float | None:
        return float(x.mean()) if x.size else None

    return {"drift": m(drift), "drift_pos": m(drift[pos]), "drift_neg": m(drift[~pos])}


def token_mean(values: Sequence[np.ndarray]) -> float:
    """Mean over all tokens of all sequences."""
    total = sum(len(v) for v in values)
    return float(sum(float(np.sum(v)) for v in values) / total) if total else float("nan")


def mean_abs_diff(a: Sequence[np.ndarray], b: Sequence[np.ndarray]) -> float:
    """Mean over tokens of ``|a - b|`` (engine vs teacher-forced log-prob mismatch)."""
    total = sum(len(x) for x in a)
    if not total:
        return float("nan")
    return float(
        sum(float(np.abs(np.asarray(x) - np.asarray(y)).sum()) for x, y in zip(a, b)) / total
    )


def finish_counts(reasons: Sequence[str]) -> dict[str, int]:
    """Count of each finish reason ("stop", "length")."""
    return dict(sorted(Counter(reasons).items()))


def accuracy_per_nat(
    acc: float, acc_base: float, kl: float | None, *, is_base: bool
) -> float | None:
    """``(acc - acc_base) / KL``; None for the base, a missing KL or KL < :data:`KL_EPS`."""
    if is_base or kl is None or not math.isfinite(kl) or kl < KL_EPS:
        return None
    return (acc - acc_base) / kl


__all__ = [
    "CORRECT_THRESHOLD",
    "KL_EPS",
    "accuracy_per_nat",
    "accuracy_stats",
    "drift_stats",
    "finish_counts",
    "kl_stats",
    "mean_abs_diff",
    "mean_se",
    "sequence_kl",
    "token_mean",
]
