"""Stage-1 losses of ERPD as pure functions of per-token tensors (no Megatron, no distributed).

Notation (see ``docs/method.md``): ``logp`` = log pi_theta(y_t | y_<t) at the sampled tokens,
``anchor_logp`` = the ratio anchor (pi_r for ``anchor: data``, the policy at the start of
the epoch for ``anchor: epoch``; the caller picks by what it passes), ``ref_logp`` = pi_r,
``adv`` = the sequence advantage broadcast to its tokens, ``rho = exp(logp - anchor_logp)``.

* ``pg``:   ``-min(rho*A, clip(rho, 1-eps_low, 1+eps_high)*A)``; either eps may be None
  (that side is not clipped; both None is the plain importance-weighted policy gradient).
* ``sapo``: ``-(4/tau) * sigmoid(tau*(rho-1)) * A`` with ``tau = tau_pos`` where A > 0 and
  ``tau_neg`` elsewhere (its gradient at rho = 1 is the policy gradient ``-A``).
* ``ce``:   ``-w * logp`` (rejection-sampling fine-tuning; ``w`` selects reward-1 responses).
* ``mse``:  per sequence ``(mean_t(logp - ref_logp) - A/beta)**2`` (policy mirror descent,
  mean form), normalised by the GLOBAL number of sequences.
* ``unlearned``: a base loss with the advantage negated (for ``ce``: imitate the reward-0
  responses), giving a policy that moves away from the reward (a contrast reference).

Each function returns ``(loss, metrics)``. ``loss = sum(per-token loss over valid tokens) /
normalizer`` with ``normalizer`` the global number of valid tokens of the optimizer step, so
that the sum of micro-batch losses (and of data-parallel ranks, if gradients are summed)
equals the token mean of the whole batch. Metrics are detached float64 SUMS plus counts
(``tokens``, ``sequences``, ``clipped_tokens``...), to be summed over micro-batches,
all-reduced, then divided by the counts; see :mod:`erpd_megatron.ops.common` for the
masking, empty-batch and non-finite conventions. The ratio exponent is clamped to
``[-max_log_ratio, max_log_ratio]`` (default 20, None disables) so that one token with an
extreme ratio cannot produce an Inf times 0 = NaN gradient.
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
    safe_normalizer,
)
from erpd_megatron.ops.kl import kl_penalty

STAGE1_LOSSES = ("pg", "sapo", "ce", "mse", "unlearned")


def importance_ratio(
    logp: Tensor, anchor_logp: Tensor, max_log_ratio: float | None = 20.0
) -> Tensor:
    """``rho = exp(logp - anchor_logp)``, the exponent clamped to ``+-max_log_ratio``."""
    x = logp - anchor_logp
    if max_log_ratio is not None:
        x = x.clamp(-max_log_ratio, max_log_ratio)
    return torch.exp(x)


def clipped_pg_per_token(
    rho: Tensor, adv: Tensor, eps_low: float | None, eps_high: float | None
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-token ``-min(rho*A, clip(rho)*A)`` and the masks of low- and high-clipped tokens.

    A token counts as clipped when the clipped branch is the active one and differs from
    the unclipped one: ``A > 0 and rho > 1+eps_high`` or ``A < 0 and rho < 1-eps_low``.
    """
    lo = None if eps_low is None else 1.0 - eps_low
    hi = None if eps_high is None else 1.0 + eps_high
    surr = rho * adv
    if lo is None and hi is None:
        zeros = torch.zeros_like(rho, dtype=torch.bool)
        return -surr, zeros, zeros
    surr_clip = rho.clamp(min=lo, max=hi) * adv
    per_token = -torch.minimum(surr, surr_clip)
    clip_low = (adv < 0) & (rho < lo) if lo is not None else torch.zeros_like(rho, dtype=torch.bool)
    clip_high = (
        (adv > 0) & (rho > hi) if hi is not None else torch.zeros_like(rho, dtype=torch.bool)
    )
    return per_token, clip_low, clip_high


def _ratio_metrics(
    per_token: Tensor, rho: Tensor, logp: Tensor, anchor: Tensor, mask: Tensor
) -> dict[str, Tensor]:
    return {
        "tokens": mcount(mask),
        "loss_sum": msum(per_token, mask),
        "ratio_sum": msum(rho, mask),
        "log_ratio_sum": msum(logp - anchor, mask),
    }


def pg_loss(
    logp: Tensor,
    anchor_logp: Tensor,
    adv: Tensor,
    mask: Tensor | None,
    *,
    eps_low: float | None,
    eps_high: float | None,
    normalizer: Number | None,
    max_log_ratio: float | None = 20.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped policy-gradient loss ``-min(rho*A, clip(rho, 1-eps_low, 1+eps_high)*A)``.

    ``logp``, ``anchor_logp``, ``adv`` and ``mask`` share one shape; the anchor is a constant.
    Metrics: ``tokens``, ``loss_sum``, ``ratio_sum``, ``log_ratio_sum``, ``clipped_tokens``,
    ``clipped_low_tokens``, ``clipped_high_tokens``, ``nonfinite_tokens``.
    """
    mask = as_mask(mask, logp)
    c, mask, nonfinite = clean_inputs(mask, logp=logp, anchor_logp=anchor_logp, adv=adv)
    lp, anchor, a = c["logp"], c["anchor_logp"].detach(), c["adv"].detach()
    rho = importance_ratio(lp, anchor, max_log_ratio)
    per_token, clip_low, clip_high = clipped_pg_per_token(rho, a, eps_low, eps_high)
    loss = reduce_tokens(per_token, mask, normalizer)
    metrics = _ratio_metrics(per_token, rho, lp, anchor, mask)
    metrics.update(
        clipped_tokens=mcount((clip_low | clip_high) & mask),
        clipped_low_tokens=mcount(clip_low & mask),
        clipped_high_tokens=mcount(clip_high & mask),
        nonfinite_tokens=nonfinite,
    )
    return loss, metrics


def sapo_loss(
    logp: Tensor,
    anchor_logp: Tensor,
    adv: Tensor,
    mask: Tensor | None,
    *,
    normalizer: Number | None,
    tau_pos: float = 1.0,
    tau_neg: float = 1.05,
    max_log_ratio: float | None = 20.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Soft-gated policy loss ``-(4/tau) * sigmoid(tau*(rho-1)) * A`` (tau by the sign of A).

    Metrics: ``tokens``, ``loss_sum``, ``ratio_sum``, ``log_ratio_sum``, ``nonfinite_tokens``.
    """
    mask = as_mask(mask, logp)
    c, mask, nonfinite = clean_inputs(mask, logp=logp, anchor_logp=anchor_logp, adv=adv)
    lp, anchor, a = c["logp"], c["anchor_logp"].detach(), c["adv"].detach()
    rho = importance_ratio(lp, anchor, max_log_ratio)
    tau = torch.where(a > 0, torch.full_like(a, tau_pos), torch.full_like(a, tau_neg))
    per_token = -(4.0 / tau) * torch.sigmoid(tau * (rho - 1.0)) * a
    loss = reduce_tokens(per_token, mask, normalizer)
    metrics = _ratio_metrics(per_token, rho, lp, anchor, mask)
    metrics["nonfinite_tokens"] = nonfinite
    return loss, metrics


def ce_loss(
    logp: Tensor,
    mask: Tensor | None,
    *,
    normalizer: Number | None,
    weight: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Rejection-sampling fine-tuning loss ``-weight * logp`` summed over valid tokens / normalizer.

    ``weight`` (per token, e.g. the 0/1 reward broadcast to its tokens) selects the
    responses to imitate; tokens with weight 0 are excluded from ``tokens`` (and from the
    loss). ``normalizer`` is the global number of tokens averaged over; Stage 1 passes ALL
    response tokens of the step, as for every token loss, so that the gradient scale does
    not depend on the batch's accuracy and the logged objective (``loss_sum`` over the same
    normaliser, :func:`erpd_megatron.train.stage1.finalize_stage1_metrics`) is the optimised
    one. Metrics: ``tokens`` (imitated tokens), ``loss_sum``, ``nonfinite_tokens``.
    """
    mask = as_mask(mask, logp)
    if weight is not None:
        mask = mask & (weight != 0)
    tensors = {"logp": logp} if weight is None else {"logp": logp, "weight": weight}
    c, mask, nonfinite = clean_inputs(mask, **tensors)
    per_token = -c["logp"] if weight is None else -c["weight"].detach() * c["logp"]
    loss = reduce_tokens(per_token, mask, normalizer)
    return loss, {
        "tokens": mcount(mask),
        "loss_sum": msum(per_token, mask),
        "nonfinite_tokens": nonfinite,
    }


def _segment_sums(
    x: Tensor, mask: Tensor, segment_ids: Tensor | None, num_segments: int | None
) -> Tensor:
    """Sum of ``x`` over the valid tokens of each sequence: rows of a 2-D tensor or segment ids."""
    x = torch.where(mask, x, x.new_zeros(()))
    if segment_ids is None:
        if x.dim() != 2:
            raise ValueError("mse_loss needs [B, T] tensors or segment_ids for flat tokens")
        return x.sum(dim=-1)
    if num_segments is None:
        raise ValueError("num_segments is required with segment_ids")
    out = x.new_zeros(num_segments)
    return out.index_add(0, segment_ids.reshape(-1).long(), x.reshape(-1))


def mse_loss(
    logp: Tensor,
    ref_logp: Tensor,
    adv: Tensor,
    mask: Tensor | None,
    *,
    beta: float,
    normalizer: Number | None,
    segment_ids: Tensor | None = None,
    num_segments: int | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Mirror-descent loss per sequence ``(mean_t(logp - ref_logp) - A/beta)**2`` / normalizer.

    Sequences are the rows of ``[B, T]`` inputs, or, for flat token tensors, given by
    ``segment_ids`` (values in ``[0, num_segments)``). ``adv`` is per token (constant within
    a sequence; its valid-token mean is used) or per sequence (shape ``[num_sequences]``).
    ``normalizer`` is the GLOBAL number of sequences; sequences without valid tokens are
    left out. Metrics: ``sequences``, ``loss_sum``, ``drift_mean_sum`` (sum over sequences of
    ``mean_t(logp - ref_logp)``), ``tokens``, ``nonfinite_tokens``.
    """
    mask = as_mask(mask, logp)
    per_seq_adv = adv.shape != logp.shape
    tensors = {"logp": logp, "ref_logp": ref_logp}
    if not per_seq_adv:
        tensors["adv"] = adv
    c, mask, nonfinite = clean_inputs(mask, **tensors)
    n = _segment_sums(mask.to(logp.dtype), mask, segment_ids, num_segments)
    valid = n > 0
    n_safe = torch.where(valid, n, torch.ones_like(n))
    drift = (
        _segment_sums(c["logp"] - c["ref_logp"].detach(), mask, segment_ids, num_segments) / n_safe
    )
    if per_seq_adv:
        a = adv.detach().to(logp.dtype).reshape(-1)
        if a.shape != n.shape:
            raise ValueError(
                f"per-sequence adv has shape {tuple(adv.shape)}, expected {tuple(n.shape)}"
            )
    else:
        a = _segment_sums(c["adv"].detach(), mask, segment_ids, num_segments) / n_safe
    per_seq = (drift - a / beta) ** 2
    loss = reduce_tokens(per_seq, valid, normalizer)
    metrics = {
        "sequences": mcount(valid),
        "loss_sum": msum(per_seq, valid),
        "drift_mean_sum": msum(drift, valid),
        "tokens": mcount(mask),
        "nonfinite_tokens": nonfinite,
    }
    return loss, metrics


def token_mean_loss(
    per_token: Tensor, mask: Tensor | None, *, normalizer: Number | None, name: str = "per_token"
) -> tuple[Tensor, dict[str, Tensor]]:
    """Reduce any per-token loss (e.g. ``vp_topk_kl``'s output) with the same conventions.

    Non-finite valid tokens are dropped and counted (or raise in debug mode, naming
    ``name``). Metrics: ``tokens``, ``loss_sum``, ``nonfinite_tokens``.
    """
    mask = as_mask(mask, per_token)
    c, mask, nonfinite = clean_inputs(mask, **{name: per_token})
    x = c[name]
    loss = reduce_tokens(x, mask, normalizer)
    return loss, {"tokens": mcount(mask), "loss_sum": msum(x, mask), "nonfinite_tokens": nonfinite}


def stage1_loss(
    name: str,
    *,
    logp: Tensor,
    adv: Tensor,
    mask: Tensor | None,
    normalizer: Number | None,
    anchor_logp: Tensor | None = None,
    ref_logp: Tensor | None = None,
    reward: Tensor | None = None,
    base: str = "pg",
    eps_low: float | None = 0.2,
    eps_high: float | None = 0.2,
    tau_pos: float = 1.0,
    tau_neg: float = 1.05,
    beta: float = 1.0,
    seq_normalizer: Number | None = None,
    segment_ids: Tensor | None = None,
    num_segments: int | None = None,
    kl_coef: float = 0.0,
    max_log_ratio: float | None = 20.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Dispatch to the Stage-1 loss ``name`` (``pg``, ``sapo``, ``ce``, ``mse``, ``unlearned``).

    ``unlearned`` negates ``adv`` and applies ``base``; for ``ce`` the imitated tokens are
    those with ``reward == 1`` (``reward`` per token; ``adv > 0`` when reward is None), and
    for unlearned ``ce`` those with ``reward == 0`` (``adv < 0``). ``pg``/``sapo`` need
    ``anchor_logp``; ``mse`` and ``kl_coef > 0`` need ``ref_logp`` (pi_r). ``mse`` is
    normalised by ``seq_normalizer`` (global sequences); every token loss by ``normalizer``.
    With ``kl_coef > 0`` the k3 KL-to-pi_r penalty is added; its metrics are merged in.
    """
    if name not in STAGE1_LOSSES:
        raise ValueError(f"unknown stage-1 loss {name!r}; choose one of {STAGE1_LOSSES}")
    negate = name == "unlearned"
    kind = base if negate else name
    if negate and base not in ("pg", "sapo", "ce", "mse"):
        raise ValueError(f"unlearned base must be pg, sapo, ce or mse, not {base!r}")
    a = -adv if negate else adv
    if kind in ("pg", "sapo") and anchor_logp is None:
        raise ValueError(f"stage-1 loss {kind!r} needs anchor_logp")
    if (kind == "mse" or kl_coef > 0) and ref_logp is None:
        raise ValueError("mse and kl_coef > 0 need ref_logp (pi_r)")
    if kind == "pg":
        loss, metrics = pg_loss(
            logp,
            anchor_logp,
            a,
            mask,
            eps_low=eps_low,
            eps_high=eps_high,
            normalizer=normalizer,
            max_log_ratio=max_log_ratio,
        )
    elif kind == "sapo":
        loss, metrics = sapo_loss(
            logp,
            anchor_logp,
            a,
            mask,
            normalizer=normalizer,
            tau_pos=tau_pos,
            tau_neg=tau_neg,
            max_log_ratio=max_log_ratio,
        )
    elif kind == "ce":
        if reward is not None:
            w = (reward != 0) if not negate else (reward == 0)
        else:
            w = a > 0
        loss, metrics = ce_loss(logp, mask, normalizer=normalizer, weight=w.to(logp.dtype))
    else:
        loss, metrics = mse_loss(
            logp,
            ref_logp,
            a,
            mask,
            beta=beta,
            normalizer=seq_normalizer,
            segment_ids=segment_ids,
            num_segments=num_segments,
        )
    if kl_coef > 0:
        kl_loss, kl_metrics = kl_penalty(
            logp, ref_logp, mask, coef=kl_coef, normalizer=normalizer, max_log_ratio=max_log_ratio
        )
        loss = loss + kl_loss
        metrics.update({k: v for k, v in kl_metrics.items() if k.startswith("kl_")})
        metrics["kl_tokens"] = kl_metrics["tokens"]
        metrics["nonfinite_tokens"] = torch.maximum(
            metrics["nonfinite_tokens"], kl_metrics["nonfinite_tokens"]
        )
    return loss, metrics


__all__ = [
    "STAGE1_LOSSES",
    "ce_loss",
    "clipped_pg_per_token",
    "importance_ratio",
    "mse_loss",
    "pg_loss",
    "safe_normalizer",
    "sapo_loss",
    "stage1_loss",
    "token_mean_loss",
]
