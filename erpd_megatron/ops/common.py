"""Shared helpers for the pure token math: masking, normalisers, metrics, non-finite guard.

Conventions used by every loss in :mod:`erpd_megatron.ops`:

* Token tensors have any shape (``[B, T]`` or flat ``[N]``); the mask has the same shape
  and selects valid tokens. Masked-out positions may hold anything, NaN included: they are
  replaced by 0 *before* any arithmetic, so they never reach a value or a gradient.
* ``loss = sum(per_token over valid tokens) / normalizer``. The normaliser is the GLOBAL
  number of valid tokens (over every micro-batch and data-parallel rank of the optimizer
  step), so summing the losses of all micro-batches gives the token mean of the whole batch
  and its gradient equals that of one big batch. A normaliser <= 0 is treated as 1 (the sum
  is then 0 anyway), so an empty batch gives an exact 0 loss with its graph intact.
* Metrics are detached float64 scalars holding SUMS over this call's valid tokens (or
  sequences) plus the counts they are divided by (``tokens``, ``sequences``). Callers add
  them over micro-batches, all-reduce over data parallelism, then divide.
* Non-finite inputs: with the debug switch on (env ``ERPD_DEBUG_NONFINITE=1`` or
  :func:`set_debug_nonfinite`), a NaN/Inf in a valid token raises ``ValueError`` naming
  the tensor; otherwise such tokens are dropped from the loss (value and gradient 0) and
  counted in ``metrics["nonfinite_tokens"]``.
"""

from __future__ import annotations

import os
from typing import Union

import torch

Tensor = torch.Tensor
Number = Union[float, int, Tensor]

_DEBUG_NONFINITE: bool | None = None


def set_debug_nonfinite(enabled: bool | None) -> None:
    """Force the non-finite debug mode on/off; ``None`` goes back to the environment."""
    global _DEBUG_NONFINITE
    _DEBUG_NONFINITE = enabled


def debug_nonfinite() -> bool:
    """True when a NaN/Inf in an input should raise instead of being counted."""
    if _DEBUG_NONFINITE is not None:
        return _DEBUG_NONFINITE
    return os.environ.get("ERPD_DEBUG_NONFINITE", "0").lower() in ("1", "true", "yes")


def as_mask(mask: Tensor | None, like: Tensor) -> Tensor:
    """Return ``mask`` as a bool tensor shaped like ``like`` (all True when None)."""
    if mask is None:
        return torch.ones_like(like, dtype=torch.bool)
    if mask.shape != like.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} != token shape {tuple(like.shape)}")
    return mask if mask.dtype == torch.bool else mask != 0


def clean_inputs(mask: Tensor, **tensors: Tensor) -> tuple[dict[str, Tensor], Tensor, Tensor]:
    """Zero masked-out and non-finite entries of token tensors, before any arithmetic.

    Returns ``(clean, mask, nonfinite_count)``: the cleaned tensors by name, the mask with
    non-finite tokens removed, and the number of valid tokens that were non-finite in any
    tensor (a detached float64 scalar). In debug mode a non-finite valid token raises a
    ``ValueError`` naming the tensor.
    """
    bad = torch.zeros_like(mask)
    for name, x in tensors.items():
        if x.shape != mask.shape:
            raise ValueError(f"{name} shape {tuple(x.shape)} != mask shape {tuple(mask.shape)}")
        if x.is_floating_point():
            bad_x = ~torch.isfinite(x.detach()) & mask
            if debug_nonfinite() and bool(bad_x.any()):
                raise ValueError(
                    f"non-finite values in '{name}' at {int(bad_x.sum())} valid token(s) "
                    "(ERPD_DEBUG_NONFINITE is on)"
                )
            bad = bad | bad_x
    keep = mask & ~bad
    clean = {
        name: torch.where(keep, x, x.new_zeros(())) if x.is_floating_point() else x
        for name, x in tensors.items()
    }
    return clean, keep, bad.sum().to(torch.float64)


def safe_normalizer(normalizer: Number | None, mask: Tensor) -> Tensor:
    """The denominator as a tensor: the local valid count when None, and 1 where it is <= 0."""
    if normalizer is None:
        normalizer = mask.sum()
    n = torch.as_tensor(normalizer, device=mask.device, dtype=torch.float64)
    return torch.where(n > 0, n, torch.ones_like(n))


def reduce_tokens(per_token: Tensor, mask: Tensor, normalizer: Number | None) -> Tensor:
    """``sum(per_token where mask) / normalizer``; masked positions contribute exactly 0."""
    total = torch.where(mask, per_token, per_token.new_zeros(())).sum()
    return total / safe_normalizer(normalizer, mask).to(total.dtype)


def msum(x: Tensor, mask: Tensor) -> Tensor:
    """Detached float64 sum of ``x`` over the mask (a metric)."""
    x = x.detach().to(torch.float64)
    return torch.where(mask, x, x.new_zeros(())).sum()


def mcount(mask: Tensor) -> Tensor:
    """Detached float64 count of True entries (a metric)."""
    return mask.detach().sum().to(torch.float64)
