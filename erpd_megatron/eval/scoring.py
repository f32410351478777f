"""Teacher-forced scoring of sampled responses with a transformers causal LM.

For each ``(prompt, response)`` pair, one forward pass over ``prompt + response`` gives, for
every response token ``y_t``, its log-probability ``log p(y_t | x, y_<t)`` and the entropy of
the full next-token distribution ``H_t = -sum_v p(v) log p(v)`` (both in nats, of the
distribution at ``temperature``: logits divided by it).

Sequences are sorted by length and cut into right-padded batches of at most ``max_tokens``
padded tokens (:func:`erpd_megatron.data.batching.micro_batches`, the trainer's packer); only
the logits of positions that predict a response token are computed (``logits_to_keep`` with
the indices, where the model supports it). The log-prob and entropy come from
:func:`token_scores`: the response positions' logits, a chunk of tokens at a time, through the
chunked vocab-parallel ops (:mod:`erpd_megatron.ops.vocab_parallel`, fp32 math per chunk); no
``[batch, seq, vocab]`` float32 log-softmax is ever built. Everything runs under
:func:`torch.inference_mode`.

This is the ``eval.scoring_backend=hf`` path: one process holds the whole model. The sharded
path (megatron-core at the recipe's TP/PP, any DP) is :mod:`erpd_megatron.eval.mcore_scoring`.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from erpd_megatron.data.batching import micro_batches

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class TokenScores:
    """Per-token scores of a list of responses (one array per response, in input order)."""

    logprobs: list[np.ndarray]
    """``log p(y_t | x, y_<t)`` of each response token (float64, nats)."""
    entropy: list[np.ndarray] | None
    """Full-distribution entropy at each response position (nats); None when not asked for."""


def resolve_device_dtype(
    device: str = "auto", dtype: str = "auto"
) -> tuple[torch.device, torch.dtype]:
    """The hf engine's rules: "auto" is CUDA + bf16 when a GPU is present, else CPU + fp32."""
    dev = torch.device(
        "cuda"
        if device == "auto" and torch.cuda.is_available()
        else ("cpu" if device == "auto" else device)
    )
    if dtype == "auto":
        return dev, torch.bfloat16 if dev.type == "cuda" else torch.float32
    return dev, _DTYPES[dtype]


def load_causal_lm(path: str, *, device: str = "auto", dtype: str = "auto") -> Any:
    """Load an HF causal LM for scoring (eval mode, on ``device``)."""
    from transformers import AutoModelForCausalLM

    dev, torch_dtype = resolve_device_dtype(device, dtype)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype).to(dev).eval()


@torch.inference_mode()
def score_responses(
    model: Any,
    prompts: list[list[int]],
    responses: list[list[int]],
    *,
    temperature: float = 1.0,
    entropy: bool = True,
    max_tokens: int = 4096,
    pad_token_id: int = 0,
) -> TokenScores:
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
    order = np.arange(len(lengths), dtype=np.int64)
    for group in micro_batches(order, np.asarray(lengths, np.int64), max_tokens):
        batch = [i for i in group.tolist() if responses[i]]
        if not batch:
            continue
        width = max(lengths[i] for i in batch)
        ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):
            ids[row, : lengths[i]] = torch.tensor(prompts[i] + responses[i], dtype=torch.long)
            mask[row, : lengths[i]] = 1
        # positions start-1 .. width-2 predict every response token of the batch
        start = min(len(prompts[i]) for i in batch) - 1
        keep = torch.arange(start, width - 1)
        kwargs: dict[str, Any] = {
            "input_ids": ids.to(device),
            "attention_mask": mask.to(device),
            "use_cache": False,
        }
        if keep_kw:
            kwargs["logits_to_keep"] = keep.to(device)
            logits = model(**kwargs).logits
        else:
            logits = model(**kwargs).logits[:, start : width - 1]
        targets = ids[:, start + 1 : width].to(device)
        want = torch.zeros(targets.shape, dtype=torch.bool)  # the response positions
        for row, i in enumerate(batch):
            a = len(prompts[i]) - 1 - start
            want[row, a : a + len(responses[i])] = True
        pos = want.reshape(-1).nonzero().flatten().to(device)
        tok_lp, ent = token_scores(
            logits.reshape(-1, logits.shape[-1]),
            targets.reshape(-1),
            pos,
            temperature=temperature,
            entropy=entropy,
        )
        tok_lp = tok_lp.double().cpu().numpy()
        ent_np = ent.double().cpu().numpy() if ent is not None else None
        k = 0
        for i in batch:
            n = len(responses[i])
            lps[i] = tok_lp[k : k + n].copy()
            if ent_np is not None:
                ents[i] = ent_np[k : k + n].copy()
            k += n
    return TokenScores(logprobs=lps, entropy=ents if entropy else None)


def token_scores(
    logits: torch.Tensor,
    targets: torch.Tensor,
    positions: torch.Tensor,
    *,
    temperature: float = 1.0,
    entropy: bool = True,
    group: Any = None,
    vocab_start: int | None = None,
    vocab_size: int | None = None,
    chunk_elements: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-prob of ``targets[positions]`` (and the entropy there) under ``softmax(logits / T)``.

    ``logits [N, V_local]`` (any dtype; a vocabulary shard over ``group`` as in
    :mod:`erpd_megatron.ops.vocab_parallel`, whole when ``group`` is None), ``targets [N]``
    global ids, ``positions [P]`` the rows to score. Rows are taken a chunk at a time (about
    ``chunk_elements`` logits: the ops' per-device default), divided by the temperature in
    fp32 for that chunk only, and scored with
    :func:`~erpd_megatron.ops.vocab_parallel.vp_logprob_and_entropy` (or ``vp_logprob``): the
    largest temporary is one chunk, never ``[N, V]`` in fp32. Every rank of ``group`` must
    call with the same ``positions`` (the ops all-reduce per chunk). Returns fp32 ``[P]``
    tensors (fp64 for fp64 logits) on the logits' device; the entropy is None unless asked."""
    from erpd_megatron.ops.vocab_parallel import (
        DEFAULT_CHUNK_ELEMENTS,
        vp_logprob,
        vp_logprob_and_entropy,
    )

    v_local = max(1, int(logits.shape[-1]))
    budget = chunk_elements or DEFAULT_CHUNK_ELEMENTS.get(logits.device.type, 1 << 23)
    rows = max(1, budget // v_local)
    kw = dict(group=group, vocab_start=vocab_start, vocab_size=vocab_size)
    lps, ents = [], []
    positions = positions.to(logits.device)
    tgt_all = targets.to(logits.device)
    for s in range(0, int(positions.numel()), rows):
        idx = positions[s : s + rows]
        x = logits.index_select(0, idx)  # one chunk of rows, in the logits' dtype
        if temperature != 1.0:
            x = x.float() / temperature if x.dtype != torch.float64 else x / temperature
        tgt = tgt_all.index_select(0, idx)
        if entropy:
            lp, ent = vp_logprob_and_entropy(x, tgt, **kw)
            ents.append(ent)
        else:
            lp = vp_logprob(x, tgt, **kw)
        lps.append(lp)
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    empty = torch.zeros(0, dtype=dtype, device=logits.device)
    lp_out = torch.cat(lps) if lps else empty
    return lp_out, (torch.cat(ents) if ents else empty) if entropy else None


__all__ = [
    "TokenScores",
    "load_causal_lm",
    "resolve_device_dtype",
    "score_responses",
    "token_scores",
]
