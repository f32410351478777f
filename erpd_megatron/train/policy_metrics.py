"""Metrics both stages log about the policy on the fixed data (docs/method.md, Stage 1):
token entropy, KL (k1, k3) to pi_r, and the sequence log-prob drift ``sum_t(lp - lp_r)``
split by reward. Returned as sums and counts (summed over micro-batches and ranks, then
divided in :func:`finalize_policy_metrics`), computed from the pre-update forward pass.

Direction of the KL. The fixed data are samples of pi_r, so the KL that can be estimated on
them without importance weights is ``KL(pi_r || pi_theta)`` -- the trust-region direction of
TRPO, whose constraint is also taken on the old policy's samples. With ``y = lp - lp_r``:
``k1 = -y`` and ``k3 = exp(y) - 1 - y`` (>= 0, low variance) are both unbiased per token
(``E_r[exp(y)] = 1``), and their sums over a response estimate the sequence KL by the chain
rule. The GRPO-style ``exp(-y) - 1 + y`` estimates ``KL(pi_theta || pi_r)`` only on samples of
pi_theta; on pi_r's data it is biased and heavy-tailed (one token whose probability collapsed
dominates it), so it is not used here. Held-out evaluation measures ``KL(pi || pi_base)`` on
fresh samples of pi (:mod:`erpd_megatron.eval`).
"""

from __future__ import annotations

import torch

from erpd_megatron.data.batching import MicroBatch

POLICY_KEYS = [
    "pm_tokens",
    "pm_sequences",
    "pm_entropy_sum",
    "pm_k1_sum",
    "pm_k3_sum",
    "pm_drift_pos_sum",
    "pm_pos_sequences",
    "pm_drift_neg_sum",
    "pm_neg_sequences",
]


def reverse_k3(y: torch.Tensor, max_log_ratio: float = 20.0) -> torch.Tensor:
    """``exp(y) - 1 - y`` per token, ``y = lp_theta - lp_r``: unbiased for KL(pi_r || pi_theta)
    on samples of pi_r, >= 0 (the exponent is clamped at ``max_log_ratio``)."""
    return torch.expm1(y.clamp(max=max_log_ratio)) - y


def policy_metric_sums(
    logp: torch.Tensor, ref_logp: torch.Tensor, entropy: torch.Tensor | None, mb: MicroBatch
) -> dict[str, torch.Tensor]:
    """Sums over one micro-batch ([b, s] tensors, ``mb.loss_mask`` selects response tokens;
    per-sequence sums go through ``mb.seq_index``, so packed rows count each sequence)."""
    with torch.no_grad():
        mask = mb.loss_mask > 0
        lp = torch.where(mask, logp.detach().double(), 0.0)
        ref = torch.where(mask, ref_logp.double(), 0.0)
        # per sequence through seq_index (a packed row holds several sequences)
        n_seq = int(mb.rewards.shape[0])
        idx = torch.where(mask, mb.seq_index.to(lp.device), 0).reshape(-1)
        drift = lp.new_zeros(n_seq).index_add(0, idx, (lp - ref).reshape(-1))
        count = lp.new_zeros(n_seq).index_add(0, idx, mask.reshape(-1).double())
        has = count > 0  # sums: every rank's part of a sequence (partial under CP)
        pos = has & (mb.rewards.to(drift.device) > 0)
        neg = has & ~pos
        counted = has  # counts: context parallel counts a sequence on one CP rank only
        if mb.seq_owned is not None:
            counted = has & mb.seq_owned.to(has.device)
        out = {
            "pm_tokens": mask.sum().double(),
            "pm_sequences": counted.sum().double(),
            "pm_entropy_sum": torch.where(mask, entropy.detach().double(), 0.0).sum()
            if entropy is not None
            else torch.zeros((), dtype=torch.float64),
            "pm_k1_sum": torch.where(mask, ref - lp, 0.0).sum(),
            "pm_k3_sum": torch.where(mask, reverse_k3(lp - ref), 0.0).sum(),
            "pm_drift_pos_sum": drift[pos].sum(),
            "pm_pos_sequences": (pos & counted).sum().double(),
            "pm_drift_neg_sum": drift[neg].sum(),
            "pm_neg_sequences": (neg & counted).sum().double(),
        }
    return out


def _div(a: float, b: float) -> float:
    return a / b if b else 0.0


def finalize_policy_metrics(s: dict[str, float]) -> dict[str, float]:
    """Means from the reduced sums: ``entropy``, ``kl_k1``/``kl_k3`` per token and
    ``seq_kl_k1``/``seq_kl_k3`` per sequence (KL(pi_r || pi_theta) on the data, see the module
    docstring), ``drift_pos``/``drift_neg`` (mean sequence log-prob drift of reward-1 /
    reward-0 responses)."""
    t, n = s.get("pm_tokens", 0.0), s.get("pm_sequences", 0.0)
    return {
        "entropy": _div(s.get("pm_entropy_sum", 0.0), t),
        "kl_k1": _div(s.get("pm_k1_sum", 0.0), t),
        "kl_k3": _div(s.get("pm_k3_sum", 0.0), t),
        "seq_kl_k3": _div(s.get("pm_k3_sum", 0.0), n),
        "seq_kl_k1": _div(s.get("pm_k1_sum", 0.0), n),
        "drift_pos": _div(s.get("pm_drift_pos_sum", 0.0), s.get("pm_pos_sequences", 0.0)),
        "drift_neg": _div(s.get("pm_drift_neg_sum", 0.0), s.get("pm_neg_sequences", 0.0)),
        "tokens": t,
        "sequences": n,
    }
