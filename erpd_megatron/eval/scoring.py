"""Teacher-forced scoring of sampled responses with a transformers causal LM.

For each ``(prompt, response)`` pair, one forward pass over ``prompt + response`` gives, for
every response token ``y_t``, its log-probability ``log p(y_t | x, y_<t)`` and the entropy of
the full next-token distribution ``H_t = -sum_v p(v) log p(v)`` (both in nats, of the
distribution at ``temperature``: logits divided by it).

Sequences are cut into micro-batches of at most ``max_tokens`` tokens with the trainer's
packers (:mod:`erpd_megatron.data.batching`): right-padded rows of similar length, or with
``data.packing`` one packed row of several sequences (block-diagonal causal mask); only
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

from erpd_megatron.data.batching import (
    SampleTable,
    collate,
    collate_packed,
    micro_batches,
    pack_rows,
    packed_attention_mask,
)
from erpd_megatron.utils.log import get_logger

log = get_logger(__name__)

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


def response_table(prompts: list[list[int]], responses: list[list[int]]) -> SampleTable:
    """``(prompt, response)`` pairs as the trainer's :class:`SampleTable` (row ``i`` is pair
    ``i``), so that evaluation cuts and lays out micro-batches with the trainer's packers."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    n = len(prompts)
    return SampleTable(
        sample_ids=np.arange(n, dtype=np.int64),
        group_ids=np.zeros(n, np.int64),
        prompt_ids=[np.asarray(p, np.int64) for p in prompts],
        response_ids=[np.asarray(r, np.int64) for r in responses],
        rewards=np.zeros(n, np.float32),
    )


PACKED_ATTENTION = ("eager", "sdpa")
"""transformers attention implementations that take a custom 4D additive mask as it is
(transformers 5.x ``masking_utils._preprocess_mask_arguments`` returns a 4D mask unchanged;
eager adds it to the scores, SDPA passes it as ``attn_mask``)."""


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
    packing: bool = False,
) -> TokenScores:
    """Teacher-forced log-probs (and entropies) of ``responses[i]`` after ``prompts[i]``.

    ``temperature`` must be positive; the scores are of ``softmax(logits / temperature)``.
    With ``packing`` (``data.packing``) each forward is ONE row of several sequences filled
    by first-fit-decreasing (:func:`~erpd_megatron.data.batching.pack_rows`), each with
    position ids of its own and a block-diagonal causal mask
    (:func:`~erpd_megatron.data.batching.packed_attention_mask`, as a 4D additive mask); else
    right-padded rows of similar length (:func:`~erpd_megatron.data.batching.micro_batches`).
    Both give the same scores up to rounding."""
    table = response_table(prompts, responses)
    if temperature <= 0:
        raise ValueError(f"teacher-forced scores need a positive temperature, got {temperature}")
    device = next(model.parameters()).device
    keep_kw = "logits_to_keep" in inspect.signature(model.forward).parameters
    impl = getattr(getattr(model, "config", None), "_attn_implementation", "eager") or "eager"
    if packing and impl not in PACKED_ATTENTION:
        log.warning(
            "packed scoring needs attention %s, not %s: padded rows", PACKED_ATTENTION, impl
        )
        packing = False
    lps: list[np.ndarray] = [np.zeros(0)] * len(prompts)
    ents: list[np.ndarray] = [np.zeros(0)] * len(prompts)
    rows = np.flatnonzero(table.response_lengths > 0).astype(np.int64)
    if packing:
        mbs = [collate_packed(table, g) for g in pack_rows(rows, table.lengths, max_tokens)]
    else:
        mbs = [collate(table, g) for g in micro_batches(rows, table.lengths, max_tokens)]
    for mb in mbs:
        ids = mb.input_ids.clone()
        if mb.segments is not None:  # one packed row: each sequence attends to itself only
            dtype = next(model.parameters()).dtype
            blocked = packed_attention_mask(mb.segments)  # [1, 1, s, s], True = masked
            mask = torch.zeros(blocked.shape, dtype=dtype).masked_fill(
                blocked, torch.finfo(dtype).min
            )
        else:  # right-padded rows of one sequence each
            lens = torch.from_numpy(table.lengths[mb.rows])
            mask = (torch.arange(ids.shape[1])[None] < lens[:, None]).long()
            ids[mask == 0] = pad_token_id
        # only the columns that predict a response token
        cols = mb.loss_mask.bool().any(0).nonzero().flatten()
        kwargs: dict[str, Any] = {
            "input_ids": ids.to(device),
            "attention_mask": mask.to(device),
            "position_ids": mb.position_ids.to(device),
            "use_cache": False,
        }
        if keep_kw:
            logits = model(**kwargs, logits_to_keep=cols.to(device)).logits
        else:
            logits = model(**kwargs).logits[:, cols.to(device)]
        targets = mb.targets[:, cols].to(device)
        # row-major over [b, kept columns]: each sequence's tokens in order, sequences in
        # mb.rows order, in both layouts
        pos = mb.loss_mask[:, cols].reshape(-1).nonzero().flatten().to(device)
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
        for i in mb.rows.tolist():
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
    "response_table",
    "score_responses",
    "token_scores",
]
