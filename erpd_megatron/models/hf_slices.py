"""One TP rank's slice of a full-Megatron tensor, read as slices of the HF safetensors tensors
(``safe_open(...).get_slice``), so that a torchrun rank converting at TP=t reads about 1/t of
each split tensor instead of all of it. Equal to
``hf_maps._tp_slice(name, hf_maps.hf_tensor_for(...), tp, rank)`` (tests/models/
test_convert_stream.py checks it on every tensor of the fixture families).

Layouts (``hf_maps``' docstring): column-parallel tensors (embedding and output layer over the
padded vocabulary, ``linear_qkv`` whose rank ``r`` holds query groups ``[r*g/t, (r+1)*g/t)``)
are row ranges of the HF tensors; row-parallel ones (``linear_proj``, ``linear_fc2``) column
ranges; ``linear_fc1`` rank ``r`` is ``[gate rows r; up rows r]``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional

import torch

from erpd_megatron.config.schema import ModelConfig
from erpd_megatron.config.validate import head_dim
from erpd_megatron.models import hf_maps

Tensor = torch.Tensor


def tp_slice_from_hf(
    slice_of: Callable[[str], Any],
    mc: ModelConfig,
    padded_vocab: int,
    name: str,
    tp: int,
    rank: int,
    dtype: torch.dtype,
) -> Optional[Tensor]:
    """TP rank ``rank`` of ``tp``'s part of the full-Megatron tensor ``name`` (local-spec name,
    global layer and expert numbers), from ``slice_of(hf name)`` (a safetensors slice: indexable,
    ``get_shape()``); None for a tensor that is not split (read it whole)."""
    kind = hf_maps.tp_split_kind(name)
    if tp == 1 or kind == "rep":
        return None

    def rows(k: str, a: int, b: int) -> Tensor:
        return slice_of(k)[a:b].to(dtype)

    if name in ("embedding.word_embeddings.weight", "output_layer.weight"):
        k = (
            "lm_head.weight"
            if name == "output_layer.weight" and not mc.tie_word_embeddings
            else "model.embed_tokens.weight"
        )
        rows_total = slice_of(k).get_shape()[0]
        if rows_total != mc.vocab_size:
            raise ValueError(f"HF {k} has {rows_total} rows but model.vocab_size={mc.vocab_size}")
        per = padded_vocab // tp
        a, b = rank * per, (rank + 1) * per
        got = rows(k, min(a, rows_total), min(b, rows_total))
        return torch.cat([got, got.new_zeros(per - got.shape[0], *got.shape[1:])], dim=0)
    m = hf_maps._LAYER_RE.match(name)
    if not m:
        raise KeyError(f"{name}: not a Megatron tensor of this model")
    hp, rest = f"model.layers.{m.group(1)}.", m.group(2)
    if rest.startswith("self_attention.linear_qkv."):
        part = rest.rsplit(".", 1)[1]
        ng, d = mc.num_query_groups, head_dim(mc)
        h, g = mc.num_attention_heads // ng, ng // tp
        a = hp + "self_attn."
        q = rows(f"{a}q_proj.{part}", rank * g * h * d, (rank + 1) * g * h * d)
        k = rows(f"{a}k_proj.{part}", rank * g * d, (rank + 1) * g * d)
        v = rows(f"{a}v_proj.{part}", rank * g * d, (rank + 1) * g * d)
        tail = q.shape[1:]
        fused = [q.reshape(g, h * d, *tail), k.reshape(g, d, *tail), v.reshape(g, d, *tail)]
        return torch.cat(fused, dim=1).reshape(-1, *tail)
    if rest == "self_attention.linear_proj.weight":
        k = hp + "self_attn.o_proj.weight"
        per = slice_of(k).get_shape()[1] // tp
        return slice_of(k)[:, rank * per : (rank + 1) * per].to(dtype)
    e = hf_maps._hf_mlp_prefix(name, hp, rest)
    if kind == "row":  # linear_fc2 = down_proj
        per = slice_of(e + "down_proj.weight").get_shape()[1] // tp
        return slice_of(e + "down_proj.weight")[:, rank * per : (rank + 1) * per].to(dtype)
    per = slice_of(e + "gate_proj.weight").get_shape()[0] // tp
    gate = rows(e + "gate_proj.weight", rank * per, (rank + 1) * per)
    up = rows(e + "up_proj.weight", rank * per, (rank + 1) * per)
    return torch.cat([gate, up], dim=0)
