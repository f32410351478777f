"""Stage-2 token signals and the trust-region surrogate (pure tensor math).

Per token t of the fixed data (all log-probs at the sampled token):

* ``logratio``: ``s = lp_T - lp_r`` (teacher against the round's policy pi_r);
* ``contrast``: ``s = lp_T - lp_U`` (teacher against the unlearned policy U: drift shared by
  T and U cancels, so weak or degenerate teachers still carry signal);
* ``gated`` on a base signal s and the sequence advantage A, two forms:
  ``mode="sign"`` keeps ``s`` where ``sign(s) == sign(A)`` and gives 0 elsewhere;
  ``mode="add"`` gives ``A + alpha * s``;
* multi-teacher: ``s = sum_j w_j s_j``;
* outlier mask: tokens with ``|s| > c_out`` (on the raw, unscaled signal) leave the loss;
* scale and clip: ``adv_t = clip(lambda * s, -c, c)``.

The advantage-style signal enters the clipped surrogate against pi_r,
``-min(rho*adv_t, clip(rho, 1-eps, 1+eps)*adv_t)`` with ``rho = exp(lp_theta - lp_r)``,
optionally plus the k3 KL-to-pi_r penalty (:func:`erpd_megatron.ops.kl.kl_penalty`).
Reductions and metrics follow :mod:`erpd_megatron.ops.common` (global token normaliser,
metric sums and counts). Signal statistics are sums and sums of squares so that callers
can all-reduce and then form the mean and std.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from erpd_megatron.ops.common import Number, Tensor, as_mask, clean_inputs, mcount, msum
from erpd_megatron.ops.kl import kl_penalty
from erpd_megatron.ops.losses import pg_loss

SIGNALS = ("logratio", "contrast", "gated")
GATE_MODES = ("sign", "add")


def logratio_signal(lp_teacher: Tensor, lp_r: Tensor) -> Tensor:
    """``s = lp_T - lp_r`` per token."""
    return lp_teacher - lp_r


def contrast_signal(lp_teacher: Tensor, lp_unlearned: Tensor) -> Tensor:
    """``s = lp_T - lp_U`` per token."""
    return lp_teacher - lp_unlearned


def gated_signal(s: Tensor, adv: Tensor, *, mode: str = "sign", alpha: float = 1.0) -> Tensor:
    """Gate a signal by the sequence advantage.

    ``mode="sign"``: ``s`` where ``sign(s) == sign(A)`` else 0 (A = 0 keeps only s = 0).
    ``mode="add"``: ``A + alpha * s``.
    """
    if mode == "sign":
        return torch.where(torch.sign(s) == torch.sign(adv), s, torch.zeros_like(s))
    if mode == "add":
        return adv + alpha * s
    raise ValueError(f"unknown gate mode {mode!r}; choose one of {GATE_MODES}")


def teacher_signal(
    kind: str,
    lp_teacher: Tensor,
    *,
    lp_r: Tensor | None = None,
    lp_unlearned: Tensor | None = None,
    adv: Tensor | None = None,
    gate_source: str = "logratio",
    gate_mode: str = "sign",
    gate_alpha: float = 1.0,
) -> Tensor:
    """One teacher's raw signal by name: ``logratio``, ``contrast`` or ``gated``.

    ``gated`` gates the ``gate_source`` signal (``logratio`` or ``contrast``) by ``adv``.
    """
    if kind not in SIGNALS:
        raise ValueError(f"unknown signal {kind!r}; choose one of {SIGNALS}")
    source = gate_source if kind == "gated" else kind
    if source == "logratio":
        if lp_r is None:
            raise ValueError("logratio signal needs lp_r")
        s = logratio_signal(lp_teacher, lp_r)
    elif source == "contrast":
        if lp_unlearned is None:
            raise ValueError("contrast signal needs lp_unlearned")
        s = contrast_signal(lp_teacher, lp_unlearned)
    else:
        raise ValueError(f"gate_source must be 'logratio' or 'contrast', not {source!r}")
    if kind == "gated":
        if adv is None:
            raise ValueError("gated signal needs adv")
        s = gated_signal(s, adv, mode=gate_mode, alpha=gate_alpha)
    return s


def combine_teachers(signals: Sequence[Tensor], weights: Sequence[float] | None = None) -> Tensor:
    """Weighted sum ``sum_j w_j s_j`` of per-teacher signals (weights default to 1 each)."""
    if len(signals) == 0:
        raise ValueError("combine_teachers needs at least one signal")
    if weights is None:
        weights = [1.0] * len(signals)
    if len(weights) != len(signals):
        raise ValueError(f"{len(signals)} signals but {len(weights)} weights")
    out = weights[0] * signals[0]
    for w, s in zip(weights[1:], signals[1:]):
        out = out + w * s
    return out


def outlier_mask(s: Tensor, c_out: float | None) -> Tensor:
    """Bool mask of tokens to KEEP: ``|s| <= c_out`` (all True when ``c_out`` is None)."""
    if c_out is None:
        return torch.ones_like(s, dtype=torch.bool)
    return s.abs() <= c_out


def scale_and_clip(s: Tensor, *, lam: float = 1.0, clip: float | None = None) -> tuple[Tensor, Tensor]:
    """``clip(lam * s, -clip, clip)`` and the mask of tokens the clip changed."""
    x = lam * s
    if clip is None:
        return x, torch.zeros_like(x, dtype=torch.bool)
    return x.clamp(-clip, clip), x.abs() > clip


def build_signal(
    s: Tensor,
    mask: Tensor | None,
    *,
    lam: float = 1.0,
    clip: float | None = None,
    c_out: float | None = None,
) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """Turn a raw (combined) signal into the token advantage of the surrogate.

    Returns ``(adv_tokens, keep_mask, metrics)``: ``adv_tokens = clip(lam*s, -c, c)``
    (detached: the signal is a constant of the Stage-2 loss), ``keep_mask`` = the valid
    tokens that are finite and not outliers. Metrics over valid finite tokens: ``tokens``,
    ``signal_raw_sum``/``signal_raw_sq_sum`` (s), ``signal_sum``/``signal_sq_sum``
    (adv_tokens, over kept tokens), ``signal_clipped_tokens``, ``signal_outlier_tokens``,
    ``nonfinite_tokens``.
    """
    mask = as_mask(mask, s)
    c, valid, nonfinite = clean_inputs(mask, signal=s.detach())
    raw = c["signal"]
    keep = valid & outlier_mask(raw, c_out)
    adv, clipped = scale_and_clip(raw, lam=lam, clip=clip)
    adv = torch.where(keep, adv, adv.new_zeros(()))
    metrics = {
        "tokens": mcount(valid),
        "signal_raw_sum": msum(raw, valid),
        "signal_raw_sq_sum": msum(raw * raw, valid),
        "signal_sum": msum(adv, keep),
        "signal_sq_sum": msum(adv * adv, keep),
        "signal_clipped_tokens": mcount(clipped & keep),
        "signal_outlier_tokens": mcount(valid & ~keep),
        "nonfinite_tokens": nonfinite,
    }
    return adv, keep, metrics


def clipped_surrogate(
    logp: Tensor,
    logp_r: Tensor,
    adv_tokens: Tensor,
    mask: Tensor | None,
    *,
    eps: float | None,
    normalizer: Number | None,
    eps_high: float | None = None,
    max_log_ratio: float | None = 20.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Stage-2 surrogate ``-min(rho*adv, clip(rho, 1-eps, 1+eps_high)*adv)``, rho against pi_r.

    ``eps_high`` defaults to ``eps`` (symmetric trust region). Same metrics as
    :func:`erpd_megatron.ops.losses.pg_loss` (``clipped_tokens`` gives the clip fraction).
    """
    return pg_loss(
        logp, logp_r, adv_tokens, mask,
        eps_low=eps, eps_high=eps if eps_high is None else eps_high,
        normalizer=normalizer, max_log_ratio=max_log_ratio,
    )


def stage2_signal_loss(
    logp: Tensor,
    logp_r: Tensor,
    signal: Tensor,
    mask: Tensor | None,
    *,
    normalizer: Number | None,
    lam: float = 1.0,
    clip: float | None = None,
    c_out: float | None = None,
    eps: float | None = 0.2,
    kl_coef: float = 0.0,
    max_log_ratio: float | None = 20.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Whole advantage-style Stage-2 loss: build the signal, clipped surrogate, k3 penalty.

    ``signal`` is the raw (possibly multi-teacher) signal; see :func:`build_signal` and
    :func:`clipped_surrogate`. Outlier tokens leave both the surrogate and the penalty; the
    normaliser is the caller's global valid-token count either way.
    """
    adv, keep, metrics = build_signal(signal, mask, lam=lam, clip=clip, c_out=c_out)
    loss, m = clipped_surrogate(logp, logp_r, adv, keep, eps=eps, normalizer=normalizer,
                                max_log_ratio=max_log_ratio)
    nonfinite = metrics["nonfinite_tokens"] + m["nonfinite_tokens"]
    metrics.update({k: v for k, v in m.items() if k != "tokens"})
    metrics["nonfinite_tokens"] = nonfinite
    if kl_coef > 0:
        kl_loss, km = kl_penalty(logp, logp_r, keep, coef=kl_coef, normalizer=normalizer,
                                 max_log_ratio=max_log_ratio)
        loss = loss + kl_loss
        metrics.update({k: v for k, v in km.items() if k.startswith("kl_")})
    return loss, metrics
