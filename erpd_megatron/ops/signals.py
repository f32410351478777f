"""Stage-2 token signals and the trust-region surrogate (pure tensor math).

Per token t of the fixed data (all log-probs at the sampled token):

* ``logratio``: ``s = lp_T - lp_r`` (teacher against the round's policy pi_r);
* ``contrast``: ``s = lp_T - lp_U`` (teacher against the unlearned policy U: drift shared by
  T and U cancels, so weak or degenerate teachers still carry signal);
* ``gated`` on a base signal s and the sequence advantage A, two forms:
  ``mode="sign"`` keeps ``s`` where ``sign(s) == sign(A)`` and gives 0 elsewhere;
  ``mode="add"`` gives ``A + alpha * s``;
* per teacher j: outlier mask on the raw signal, ``|s_j| > c_out``; scale and clip,
  ``a_j = clip(lambda_j * s_j, -c_j, c_j)``;
* multi-teacher: ``adv_t = sum_j w_j a_j``; a token that is an outlier for any teacher
  leaves the surrogate.

The advantage-style signal enters the clipped surrogate against pi_r,
``-min(rho*adv_t, clip(rho, 1-eps, 1+eps)*adv_t)`` with ``rho = exp(lp_theta - lp_r)``,
optionally plus the k3 KL-to-pi_r penalty (:func:`erpd_megatron.ops.kl.kl_penalty`).
:func:`stage2_loss` composes every teacher term (top-k KL terms included, their per-token
KL computed by the caller) into the Stage-2 loss; training and tests use it alike.
Reductions and metrics follow :mod:`erpd_megatron.ops.common` (global token normaliser,
metric sums and counts). Signal statistics are sums and sums of squares so that callers
can all-reduce and then form the mean and std.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from erpd_megatron.ops.common import (
    Number,
    Tensor,
    as_mask,
    clean_inputs,
    mcount,
    msum,
    safe_normalizer,
)
from erpd_megatron.ops.kl import kl_penalty
from erpd_megatron.ops.losses import importance_ratio, pg_loss, token_mean_loss

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


def outlier_mask(s: Tensor, c_out: float | None) -> Tensor:
    """Bool mask of tokens to KEEP: ``|s| <= c_out`` (all True when ``c_out`` is None)."""
    if c_out is None:
        return torch.ones_like(s, dtype=torch.bool)
    return s.abs() <= c_out


def scale_and_clip(
    s: Tensor, *, lam: float = 1.0, clip: float | None = None
) -> tuple[Tensor, Tensor]:
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
        logp,
        logp_r,
        adv_tokens,
        mask,
        eps_low=eps,
        eps_high=eps if eps_high is None else eps_high,
        normalizer=normalizer,
        max_log_ratio=max_log_ratio,
    )


@dataclass(frozen=True)
class TeacherTerm:
    """One teacher's part of the Stage-2 loss, as tensors (see :func:`stage2_loss`).

    ``kind="topk_kl"``: ``kl`` is the per-token forward KL from the teacher's (or the
    geometric mixture's) top-k + tail buckets to the student, differentiable w.r.t. the
    student's logits (e.g. :func:`erpd_megatron.ops.vocab_parallel.vp_topk_kl`'s output,
    computed by the caller, so this module stays free of the vocab-parallel wiring).
    Any other kind (``logratio``, ``contrast``, ``gated``): ``raw`` is the teacher's raw
    signal (:func:`teacher_signal`), scaled by ``lam`` and clipped to ``[-clip, clip]``.
    """

    kind: str
    weight: float = 1.0
    kl: Tensor | None = None
    raw: Tensor | None = None
    lam: float = 1.0
    clip: float | None = None


SIGNAL_METRICS = (
    "signal_raw_sum",
    "signal_raw_sq_sum",
    "signal_sum",
    "signal_sq_sum",
    "signal_clipped_tokens",
    "signal_outlier_tokens",
    "nonfinite_tokens",
)


def trust_region_mask(
    logp: Tensor, logp_r: Tensor, eps: float | None, max_log_ratio: float | None = 20.0
) -> Tensor:
    """Tokens whose ratio ``rho = exp(logp - logp_r)`` lies in ``[1-eps, 1+eps]`` (all when
    ``eps`` is None); a constant of the loss (computed without gradient)."""
    if eps is None:
        return torch.ones_like(logp, dtype=torch.bool)
    with torch.no_grad():
        rho = importance_ratio(logp.detach(), logp_r.detach(), max_log_ratio)
        return (rho >= 1 - eps) & (rho <= 1 + eps)


def stage2_loss(
    logp: Tensor,
    logp_r: Tensor,
    mask: Tensor | None,
    terms: Sequence[TeacherTerm],
    *,
    normalizer: Number | None,
    eps: float | None = 0.2,
    c_out: float | None = None,
    kl_coef: float = 0.0,
    max_log_ratio: float | None = 20.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The whole Stage-2 loss of a micro-batch: every teacher term, the surrogate, the penalty.

    The one composition used by training (:mod:`erpd_megatron.train.stage2`) and the tests.
    Its value and gradient do not depend on the order of ``terms`` (only the metric keys
    ``t{i}_*`` follow it):

    * ``topk_kl`` term j: ``w_j * sum(kl_j over valid tokens inside the trust region) /
      normalizer``; the trust region (:func:`trust_region_mask`, ``eps``) masks tokens whose
      sampled-token ratio to pi_r has left ``[1-eps, 1+eps]``, so the student stops moving
      there. The outlier mask does NOT apply: it is defined by advantage signals.
    * advantage-style terms: ``adv = sum_j w_j clip(lam_j s_j, -c_j, c_j)`` enters ONE clipped
      surrogate against pi_r (:func:`clipped_surrogate`, ``eps``). A token whose raw signal
      is an outlier (``|s_j| > c_out``) or non-finite for ANY advantage teacher leaves the
      surrogate (the union of the teachers' outlier masks, so order does not matter).
    * ``kl_coef > 0``: the k3 KL-to-pi_r penalty over ALL valid tokens (a trust-region term,
      independent of the signals: outlier tokens are still held near pi_r).

    ``normalizer`` is the caller's global valid-token count for every term. Metric sums
    (:mod:`erpd_megatron.ops.common` conventions): ``loss_total_sum`` (the loss times the
    normaliser), ``out_of_region_tokens``; per term ``t{i}_kl_sum``, ``t{i}_kl_tokens``,
    ``t{i}_nonfinite`` (top-k KL) or ``t{i}_<SIGNAL_METRICS>`` (advantage-style); with
    advantage terms ``surrogate_sum``, ``clipped_tokens``, ``masked_tokens`` (valid tokens
    left out of the surrogate); with the penalty ``kl_penalty_sum``.
    """
    if len(terms) == 0:
        raise ValueError("stage2_loss needs at least one teacher term")
    mask = as_mask(mask, logp)
    in_region = trust_region_mask(logp, logp_r, eps, max_log_ratio)
    metrics: dict[str, Tensor] = {}
    parts: list[Tensor] = []
    advs: list[Tensor] = []
    keep_adv = mask
    for i, t in enumerate(terms):
        if t.kind == "topk_kl":
            if t.kl is None:
                raise ValueError(f"teacher term {i} (topk_kl) needs its per-token kl")
            loss_i, m = token_mean_loss(
                t.kl, mask & in_region, normalizer=normalizer, name=f"kl_{i}"
            )
            parts.append(t.weight * loss_i)
            metrics[f"t{i}_kl_sum"] = m["loss_sum"]
            metrics[f"t{i}_kl_tokens"] = m["tokens"]
            metrics[f"t{i}_nonfinite"] = m["nonfinite_tokens"]
        else:
            if t.raw is None:
                raise ValueError(f"teacher term {i} ({t.kind}) needs its raw signal")
            a, keep, m = build_signal(t.raw, mask, lam=t.lam, clip=t.clip, c_out=c_out)
            advs.append(t.weight * a)
            keep_adv = keep_adv & keep
            for k in SIGNAL_METRICS:
                metrics[f"t{i}_{k}"] = m[k]
    if advs:
        adv = advs[0]
        for a in advs[1:]:
            adv = adv + a
        loss_s, m = clipped_surrogate(
            logp, logp_r, adv, keep_adv, eps=eps, normalizer=normalizer, max_log_ratio=max_log_ratio
        )
        parts.append(loss_s)
        metrics["surrogate_sum"] = m["loss_sum"]
        metrics["clipped_tokens"] = m["clipped_tokens"]
        metrics["masked_tokens"] = mcount(mask) - mcount(keep_adv)
    if kl_coef > 0:
        kl_loss, km = kl_penalty(
            logp, logp_r, mask, coef=kl_coef, normalizer=normalizer, max_log_ratio=max_log_ratio
        )
        parts.append(kl_loss)
        metrics["kl_penalty_sum"] = km["kl_penalty_sum"]
    total = parts[0]
    for p in parts[1:]:
        total = total + p
    metrics["loss_total_sum"] = total.detach().double() * safe_normalizer(normalizer, mask)
    metrics["out_of_region_tokens"] = mcount(mask & ~in_region)
    return total, metrics
