"""Teacher-forced scoring of sampled responses with a transformers causal LM.

For each ``(prompt, response)`` pair, one forward pass over ``prompt + response`` gives, for
every response token ``y_t``, its log-probability ``log p(y_t | x, y_<t)`` and the entropy of
the full next-token distribution ``H_t = -sum_v p(v) log p(v)`` (both in nats, of the
distribution at ``temperature``: logits divided by it).

Sequences are sorted by length and packed into right-padded batches of at most
``max_tokens`` padded tokens; only the logits of positions that predict a response token are
computed (``logits_to_keep`` with the indices, where the model supports it), and the
log-softmax is taken in float32. Everything runs under :func:`torch.inference_mode`.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class TokenScores:
    """Per-token scores of a list of responses (one array per response, in input order)."""

    logprobs: list[np.ndarray]
    """``log p(y_t | x, y_<t)`` of each response token (float64, nats)."""
    entropy: list[np.ndarray] | None
    """Full-distribution entropy at each response position (nats); None when not asked for."""


def resolve_device_dtype(device: str = "auto", dtype: str = "auto") -> tuple[torch.device, torch.dtype]:
    """The hf engine's rules: "auto" is CUDA + bf16 when a GPU is present, else CPU + fp32."""
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    if dtype == "auto":
        return dev, torch.bfloat16 if dev.type == "cuda" else torch.float32
    return dev, _DTYPES[dtype]


def load_causal_lm(path: str, *, device: str = "auto", dtype: str = "auto") -> Any:
    """Load an HF causal LM for scoring (eval mode, on ``device``)."""
    from transformers import AutoModelForCausalLM

    dev, torch_dtype = resolve_device_dtype(device, dtype)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype).to(dev).eval()


def _batches(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Indices grouped into batches, shortest first, with rows x longest <= max_tokens
    (a sequence longer than the budget gets a batch of its own)."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    out: list[list[int]] = []
    cur: list[int] = []
    for i in order:
        if cur and (len(cur) + 1) * lengths[i] > max_tokens:
            out.append(cur)
            cur = []
        cur.append(i)
    if cur:
        out.append(cur)
    return out


@torch.inference_mode()
def score_responses(model: Any, prompts: list[list[int]], responses: list[list[int]], *,
                    temperature: float = 1.0, entropy: bool = True, max_tokens: int = 4096,
                    pad_token_id: int = 0) -> TokenScores:
    """Teacher-forced log-probs (and entropies) of ``responses[i]`` after ``prompts[i]``.

    ``temperature`` must be positive; the scores are of ``softmax(logits / temperature)``.
    """
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    if temperature <= 0:
        raise ValueError(f"teacher-forced scores need a positive temperature, got {temperature}")
    device = next(model.parameters()).device
    keep_kw = "logits_to_keep" in inspect.signature(model.forward).parameters
    lps: list[np.ndarray] = [np.zeros(0)] * len(prompts)
    ents: list[np.ndarray] = [np.zeros(0)] * len(prompts)
    lengths = [len(p) + len(r) for p, r in zip(prompts, responses)]
    for batch in _batches(lengths, max_tokens):
        batch = [i for i in batch if responses[i]]
        if not batch:
            continue
        width = max(lengths[i] for i in batch)
        ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):
            ids[row, :lengths[i]] = torch.tensor(prompts[i] + responses[i], dtype=torch.long)
            mask[row, :lengths[i]] = 1
        # positions start-1 .. width-2 predict every response token of the batch
        start = min(len(prompts[i]) for i in batch) - 1
        keep = torch.arange(start, width - 1)
        kwargs: dict[str, Any] = {"input_ids": ids.to(device), "attention_mask": mask.to(device), "use_cache": False}
        if keep_kw:
            kwargs["logits_to_keep"] = keep.to(device)
            logits = model(**kwargs).logits
        else:
            logits = model(**kwargs).logits[:, start:width - 1]
        targets = ids[:, start + 1:width].to(device)
        logp = torch.log_softmax(logits.float() / temperature, dim=-1)
        tok_lp = logp.gather(-1, targets[..., None]).squeeze(-1).double().cpu().numpy()
        ent = None
        if entropy:  # 0 * log 0 = 0 where a logit is -inf
            ent = (-(logp.exp() * logp.clamp(min=torch.finfo(logp.dtype).min)).sum(-1)).double().cpu().numpy()
        for row, i in enumerate(batch):
            a = len(prompts[i]) - 1 - start
            b = a + len(responses[i])
            lps[i] = tok_lp[row, a:b].copy()
            if ent is not None:
                ents[i] = ent[row, a:b].copy()
    return TokenScores(logprobs=lps, entropy=ents if entropy else None)


__all__ = ["TokenScores", "load_causal_lm", "resolve_device_dtype", "score_responses"]
