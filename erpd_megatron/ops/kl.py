"""Per-token KL estimators and the KL-to-reference penalty (pure tensor math).

With ``x = log_ratio = logp - ref_logp = log(pi_theta / pi_ref)`` at a sampled token
(Schulman, "Approximating KL divergence"), estimators of ``KL(pi_theta || pi_ref)``:

* ``k1 = x``                    unbiased under samples from pi_theta, high variance, signed;
* ``k2 = x**2 / 2``             biased, low variance, >= 0;
* ``k3 = exp(-x) - 1 + x``      unbiased under samples from pi_theta, >= 0, low variance.

In ERPD the tokens come from the fixed data of pi_r, so these are the usual approximations
(exact only on-policy). ``k3`` is computed as ``expm1(-x) + x`` and the exponent is clamped
to ``[-max_log_ratio, max_log_ratio]`` (default 20; ``None`` disables) so that one extreme
token cannot give an Inf gradient. Reduction conventions (global token normaliser, metric
sums) are those of :mod:`erpd_megatron.ops.common`.
"""

from __future__ import annotations

import torch

from erpd_megatron.ops.common import (
    Number,
    Tensor,
    as_mask,
    clean_inputs,
    mcount,
    msum,
    reduce_tokens,
)

ESTIMATORS = ("k1", "k2", "k3")


def kl_k1(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k1 estimator per token: ``logp - ref_logp``."""
    return logp - ref_logp


def kl_k2(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k2 estimator per token: ``(logp - ref_logp)**2 / 2``."""
    x = logp - ref_logp
    return 0.5 * x * x


def kl_k3(logp: Tensor, ref_logp: Tensor, max_log_ratio: float | None = 20.0) -> Tensor:
    """k3 estimator per token: ``exp(-x) - 1 + x`` with ``x = logp - ref_logp`` (clamped in the exp)."""
    x = logp - ref_logp
    xe = x if max_log_ratio is None else x.clamp(-max_log_ratio, max_log_ratio)
    return torch.expm1(-xe) + x


def kl_estimate(name: str, logp: Tensor, ref_logp: Tensor, max_log_ratio: float | None = 20.0) -> Tensor:
    """Per-token KL estimate by name (``"k1"``, ``"k2"`` or ``"k3"``)."""
    if name == "k1":
        return kl_k1(logp, ref_logp)
    if name == "k2":
        return kl_k2(logp, ref_logp)
    if name == "k3":
        return kl_k3(logp, ref_logp, max_log_ratio)
    raise ValueError(f"unknown KL estimator {name!r}; choose one of {ESTIMATORS}")


def kl_penalty(
    logp: Tensor,
    ref_logp: Tensor,
    mask: Tensor | None,
    *,
    coef: float,
    normalizer: Number | None,
    estimator: str = "k3",
    max_log_ratio: float | None = 20.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """KL-to-reference penalty ``coef * sum_valid(k(logp, ref_logp)) / normalizer``.

    ``ref_logp`` is a constant (detached). Returns ``(loss, metrics)`` with metric sums ``kl_k1_sum``, ``kl_k3_sum``,
    ``kl_penalty_sum`` (the coefficient-weighted estimator), ``tokens`` and
    ``nonfinite_tokens``.
    """
    mask = as_mask(mask, logp)
    c, mask, nonfinite = clean_inputs(mask, logp=logp, ref_logp=ref_logp)
    lp, ref = c["logp"], c["ref_logp"].detach()
    per_token = coef * kl_estimate(estimator, lp, ref, max_log_ratio)
    loss = reduce_tokens(per_token, mask, normalizer)
    metrics = {
        "tokens": mcount(mask),
        "kl_k1_sum": msum(kl_k1(lp, ref), mask),
        "kl_k3_sum": msum(kl_k3(lp, ref, max_log_ratio), mask),
        "kl_penalty_sum": msum(per_token, mask),
        "nonfinite_tokens": nonfinite,
    }
    return loss, metrics
