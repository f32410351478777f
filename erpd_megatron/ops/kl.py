"""Per-token KL estimators and the KL-to-reference penalty (pure tensor math).

With ``x = log_ratio = logp - ref_logp = log(pi_theta / pi_ref)`` at a sampled token
(Schulman, "Approximating KL divergence"), estimators of ``KL(pi_theta || pi_ref)``:

* ``k1 = x``                    unbiased under samples from pi_theta, high variance, signed;
* ``k2 = x**2 / 2``             biased, low variance, >= 0;
* ``k3 = exp(-x) - 1 + x``      unbiased under samples from pi_theta, >= 0, low variance.

In ERPD the tokens come from the fixed data of pi_r, so these are the usual approximations
(exact only on-policy). ``k3`` is computed as ``expm1(-x) + x``. With ``M = max_log_ratio``
(default 20; ``None`` gives the plain formula, which overflows for ``x < -88`` in float32),
``exp(-x)`` is continued LINEARLY below ``x = -M`` (its tangent at ``-M``):
``exp(-x) ~ exp(M) * (1 - M - x)``. So for every finite ``x``:

* ``x >= -M``: value and gradient are exactly those of k3 (``1 - exp(-x)``);
* ``x < -M``: the value is continuous and keeps growing, the gradient is the constant
  ``1 - exp(M)`` (continuous at ``-M``, negative: the penalty pulls ``logp`` up, as the true
  k3 does);
* the gradient has the sign of ``x`` and ``|d k3 / dx| <= exp(M) - 1`` (4.85e8 for M = 20;
  ``< 1`` for ``x > 0``).

Reduction conventions (global token normaliser, metric sums) are those of
:mod:`erpd_megatron.ops.common`.
"""

from __future__ import annotations

import math

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
    """k3 estimator per token: ``exp(-x) - 1 + x`` with ``x = logp - ref_logp``.

    Below ``x = -max_log_ratio`` the exponential is continued by its tangent, so value and
    gradient stay finite with the gradient's sign that of ``x`` and ``|grad| <=
    exp(max_log_ratio) - 1`` (see the module docstring). Exact for ``x >= -max_log_ratio``.
    """
    x = logp - ref_logp
    if max_log_ratio is None:
        return torch.expm1(-x) + x
    m = float(max_log_ratio)
    beyond = x < -m
    # where beyond, the exp's argument is the constant M (no gradient) and the linear part
    # exp(M) * (-M - x) carries the gradient -exp(M); elsewhere the linear part is exactly 0
    xe = torch.where(beyond, x.new_full((), -m), x)
    lin = torch.where(beyond, (-m - x) * math.exp(m), x.new_zeros(()))
    return torch.expm1(-xe) + lin + x


def kl_estimate(
    name: str, logp: Tensor, ref_logp: Tensor, max_log_ratio: float | None = 20.0
) -> Tensor:
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

    ``ref_logp`` is a constant (detached). Returns ``(loss, metrics)`` with metric sums
    ``kl_k1_sum``, ``kl_k3_sum``, ``kl_penalty_sum`` (the coefficient-weighted estimator),
    ``tokens`` and ``nonfinite_tokens``.
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
