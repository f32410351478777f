"""HF <-> Megatron tensor maps for Llama, Qwen2/2.5, Qwen3 (dense, RMSNorm, SwiGLU, GQA) and
Qwen3-MoE / Qwen2-MoE (routed experts, optional gated shared expert).

Three layouts appear here:

* **HF**: ``model.layers.{i}.self_attn.q_proj.weight`` ... (unfused, what transformers and
  vLLM load).
* **full Megatron**: the unsharded (TP=1, PP=1) ``GPTModel.state_dict()`` with global layer
  numbers and the vocabulary padded to ``padded_vocab`` rows (zeros). Local-spec names by
  default; :func:`to_te_names` gives the Transformer Engine spec names (norms fused into
  ``linear_qkv.layer_norm_weight`` / ``linear_fc1.layer_norm_weight``) and every function
  that reads Megatron tensors accepts both.
* **rank shard**: what ``GPTModel.state_dict()`` holds on TP rank ``t`` of PP stage ``p``
  (local layer numbers, TP slices) -- :func:`shard_for_rank` / :func:`merge_ranks`.

Layout facts (nh query heads, ng KV groups, d head_dim, h = nh/ng):
``linear_qkv = cat([q.view(ng, h*d, H), k.view(ng, d, H), v.view(ng, d, H)], 1).reshape(-1, H)``
(per group: its queries, then k, then v; biases alike), TP split = plain chunk on dim 0.
``linear_fc1 = [gate; up]``; TP rank r holds ``cat(gate.chunk(tp)[r], up.chunk(tp)[r])``.
Column parallel (dim 0): embedding, output_layer, linear_qkv. Row parallel (dim 1):
linear_proj, linear_fc2. Norms replicated. Tied embeddings: no ``output_layer.weight``
except on a last pipeline stage that is not also the first (a copy of the embedding).

MoE layers (which ones: :func:`erpd_megatron.config.moe.moe_layer_pattern`), HF names as on
disk and on the Hub (transformers 5.x fuses them on load into 3-D ``experts.gate_up_proj`` /
``experts.down_proj`` with ``conversion_mapping.py``'s qwen2_moe rules, and splits them back on
save): router ``mlp.gate.weight`` <-> ``mlp.router.weight`` (replicated); expert j
``mlp.experts.{j}.{gate,up,down}_proj.weight`` <-> ``mlp.experts.local_experts.{j}.linear_fc1``
(``[gate; up]``) / ``linear_fc2`` (megatron's local-spec ``SequentialMLP``); Qwen2-MoE's shared
expert ``mlp.shared_expert.*`` / ``mlp.shared_expert_gate.weight`` <-> ``mlp.shared_experts.
linear_fc1/linear_fc2/gate_weight``. Full-Megatron dicts number experts globally; EP rank e
holds experts ``[e*E/ep, (e+1)*E/ep)`` renumbered from 0. Experts are split over the expert-TP
size (1, or equal to TP), shared experts over TP. The TE spec keeps ``pre_mlp_layernorm`` of
MoE layers unfused (``TENorm``), so only dense layers get the fused norm name.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from typing import Optional

import torch

from erpd_megatron.config.moe import moe_layer_pattern
from erpd_megatron.config.schema import ModelConfig
from erpd_megatron.config.validate import head_dim

Tensor = torch.Tensor

# Megatron (local spec) per-layer name -> HF per-layer name, for 1:1 tensors.
_LAYER_1TO1 = {
    "input_layernorm.weight": "input_layernorm.weight",
    "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
    "self_attention.q_layernorm.weight": "self_attn.q_norm.weight",
    "self_attention.k_layernorm.weight": "self_attn.k_norm.weight",
    "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
}
# Local-spec name <-> TE-spec name (norms fused into the following linear).
_TE_NAMES = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
}
_LAYER_RE = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_EXPERT_RE = re.compile(r"^(.*\.mlp\.experts\.local_experts\.)(\d+)(\..+)$")


def to_te_names(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename local-spec layer-norm keys to the Transformer Engine spec's fused names (MoE
    layers keep their separate ``pre_mlp_layernorm``)."""
    out = {}
    for k, v in sd.items():
        m = _LAYER_RE.match(k)
        if m and m.group(2) in _TE_NAMES:
            dense = f"decoder.layers.{m.group(1)}.mlp.linear_fc1.weight" in sd
            if m.group(2) != "pre_mlp_layernorm.weight" or dense:
                k = f"decoder.layers.{m.group(1)}.{_TE_NAMES[m.group(2)]}"
        out[k] = v
    return out


def to_local_names(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Inverse of :func:`to_te_names`; drops TE ``_extra_state`` entries."""
    inv = {v: k for k, v in _TE_NAMES.items()}
    out = {}
    for k, v in sd.items():
        if k.endswith("_extra_state"):
            continue
        m = _LAYER_RE.match(k)
        if m and m.group(2) in inv:
            k = f"decoder.layers.{m.group(1)}.{inv[m.group(2)]}"
        out[k] = v
    return out


def _qkv_dims(mc: ModelConfig) -> tuple[int, int, int, int]:
    ng, d = mc.num_query_groups, head_dim(mc)
    return mc.num_attention_heads, ng, mc.num_attention_heads // ng, d


def fuse_qkv(q: Tensor, k: Tensor, v: Tensor, mc: ModelConfig) -> Tensor:
    """HF q/k/v projections (weights ``[out, H]`` or biases ``[out]``) -> Megatron linear_qkv."""
    _, ng, h, d = _qkv_dims(mc)
    rest = q.shape[1:]
    fused = torch.cat(
        [q.reshape(ng, h * d, *rest), k.reshape(ng, d, *rest), v.reshape(ng, d, *rest)], dim=1
    )
    return fused.reshape(-1, *rest)


def split_qkv(qkv: Tensor, mc: ModelConfig) -> tuple[Tensor, Tensor, Tensor]:
    """Megatron linear_qkv (weight or bias, unsharded) -> HF q, k, v."""
    nh, ng, h, d = _qkv_dims(mc)
    rest = qkv.shape[1:]
    g = qkv.reshape(ng, (h + 2) * d, *rest)
    q, k, v = torch.split(g, [h * d, d, d], dim=1)
    return (
        q.reshape(nh * d, *rest).contiguous(),
        k.reshape(ng * d, *rest).contiguous(),
        v.reshape(ng * d, *rest).contiguous(),
    )


def pad_vocab(w: Tensor, padded_vocab: int) -> Tensor:
    """Append zero rows up to ``padded_vocab`` (no copy when already that size)."""
    if w.shape[0] > padded_vocab:
        raise ValueError(f"vocabulary {w.shape[0]} is larger than the padded size {padded_vocab}")
    if w.shape[0] == padded_vocab:
        return w
    return torch.cat([w, w.new_zeros(padded_vocab - w.shape[0], *w.shape[1:])], dim=0)


def megatron_names(
    mc: ModelConfig,
    *,
    layers: Optional[range] = None,
    embedding: bool = True,
    head: bool = True,
    experts: Optional[range] = None,
) -> Iterator[str]:
    """The full-Megatron (local spec) tensor names :func:`iter_hf_to_megatron` yields, in order."""
    sparse = moe_layer_pattern(mc)
    if embedding:
        yield "embedding.word_embeddings.weight"
    for i in layers if layers is not None else range(mc.num_layers):
        mp = f"decoder.layers.{i}."
        for mname in _LAYER_1TO1:
            if mname.startswith("self_attention.") and "layernorm" in mname and not mc.qk_layernorm:
                continue  # q_layernorm / k_layernorm
            yield mp + mname
        yield mp + "self_attention.linear_qkv.weight"
        if mc.add_qkv_bias:
            yield mp + "self_attention.linear_qkv.bias"
        if not sparse[i]:
            yield from (mp + "mlp.linear_fc2.weight", mp + "mlp.linear_fc1.weight")
            continue
        yield mp + "mlp.router.weight"
        for j in experts if experts is not None else range(mc.num_experts or 0):
            x = f"{mp}mlp.experts.local_experts.{j}."
            yield from (x + "linear_fc1.weight", x + "linear_fc2.weight")
        if mc.shared_expert_intermediate_size is not None:
            x = mp + "mlp.shared_experts."
            yield from (x + "linear_fc1.weight", x + "linear_fc2.weight")
            if mc.shared_expert_gate:
                yield x + "gate_weight"
    if head:
        yield "decoder.final_layernorm.weight"
        if not mc.tie_word_embeddings:
            yield "output_layer.weight"


_MLP_RE = re.compile(
    r"^mlp\.(?:experts\.local_experts\.(\d+)\.|(shared_experts)\.)?linear_fc[12]\.weight$"
)


def _hf_mlp_prefix(name: str, hp: str, rest: str) -> str:
    """HF prefix of a (dense, routed-expert or shared-expert) MLP's gate/up/down projections."""
    x = _MLP_RE.match(rest)
    if not x:
        raise KeyError(f"{name}: not a Megatron tensor of this model")
    if x.group(1):
        return f"{hp}mlp.experts.{x.group(1)}."
    return hp + ("mlp.shared_expert." if x.group(2) else "mlp.")


def hf_tensor_for(
    get: Callable[[str], Tensor], mc: ModelConfig, padded_vocab: int, name: str
) -> Tensor:
    """One full-Megatron (local spec) tensor ``name`` from the HF tensors fetched with ``get``
    (only those it needs: a streaming converter asks for tensors in any order). The output layer
    of a tied model is the embedding."""
    if name == "embedding.word_embeddings.weight" or (
        name == "output_layer.weight" and mc.tie_word_embeddings
    ):
        emb = get("model.embed_tokens.weight")
        if emb.shape[0] != mc.vocab_size:
            raise ValueError(
                f"HF embedding has {emb.shape[0]} rows but model.vocab_size={mc.vocab_size}"
            )
        return pad_vocab(emb, padded_vocab)
    if name == "output_layer.weight":
        return pad_vocab(get("lm_head.weight"), padded_vocab)
    if name == "decoder.final_layernorm.weight":
        return get("model.norm.weight")
    m = _LAYER_RE.match(name)
    if not m:
        raise KeyError(f"{name}: not a Megatron tensor of this model")
    hp, rest = f"model.layers.{m.group(1)}.", m.group(2)
    if rest in _LAYER_1TO1:
        return get(hp + _LAYER_1TO1[rest])
    if rest.startswith("self_attention.linear_qkv."):
        kind = rest.rsplit(".", 1)[1]  # weight / bias
        a = hp + "self_attn."
        return fuse_qkv(*(get(f"{a}{p}_proj.{kind}") for p in "qkv"), mc)
    if rest == "mlp.router.weight":
        return get(hp + "mlp.gate.weight")
    if rest == "mlp.shared_experts.gate_weight":
        return get(hp + "mlp.shared_expert_gate.weight")
    e = _hf_mlp_prefix(name, hp, rest)
    if rest.endswith("linear_fc2.weight"):
        return get(e + "down_proj.weight")
    return torch.cat([get(e + "gate_proj.weight"), get(e + "up_proj.weight")], dim=0)


def iter_hf_to_megatron(
    get: Callable[[str], Tensor],
    mc: ModelConfig,
    padded_vocab: int,
    *,
    layers: Optional[range] = None,
    embedding: bool = True,
    head: bool = True,
    experts: Optional[range] = None,
) -> Iterator[tuple[str, Tensor]]:
    """Yield full-Megatron (local spec) tensors from HF tensors fetched by name with ``get``.

    Lazy: one tensor at a time (an expert's three HF tensors per fused one), so a converter can
    stream safetensors files. ``layers`` / ``embedding`` / ``head`` restrict the output to what
    one pipeline stage needs (``head``: final norm and, when untied, the output layer);
    ``experts`` to the global expert indices of one EP rank (:func:`ep_experts`).
    """
    names = megatron_names(mc, layers=layers, embedding=embedding, head=head, experts=experts)
    for name in names:
        yield name, hf_tensor_for(get, mc, padded_vocab, name)


def _hf_mlp_keys(mc: ModelConfig, hp: str, sparse: bool) -> list[str]:
    if not sparse:
        return [hp + f"mlp.{p}_proj.weight" for p in ("gate", "up", "down")]
    keys = [hp + "mlp.gate.weight"]
    keys += [
        hp + f"mlp.experts.{j}.{p}_proj.weight"
        for j in range(mc.num_experts or 0)
        for p in ("gate", "up", "down")
    ]
    if mc.shared_expert_intermediate_size is not None:
        keys += [hp + f"mlp.shared_expert.{p}_proj.weight" for p in ("gate", "up", "down")]
        if mc.shared_expert_gate:
            keys.append(hp + "mlp.shared_expert_gate.weight")
    return keys


def hf_to_megatron(
    hf: Mapping[str, Tensor], mc: ModelConfig, padded_vocab: int
) -> dict[str, Tensor]:
    """Full HF state dict -> full Megatron (TP=1, PP=1, local-spec names) state dict."""
    missing = [k for k in expected_hf_keys(mc) if k not in hf]
    if missing:
        raise KeyError(f"HF state dict lacks {len(missing)} tensors, e.g. {missing[:3]}")
    return dict(iter_hf_to_megatron(hf.__getitem__, mc, padded_vocab))


def expected_hf_keys(mc: ModelConfig) -> list[str]:
    """Every HF tensor name the model needs (``lm_head.weight`` only when untied)."""
    keys = ["model.embed_tokens.weight", "model.norm.weight"]
    sparse = moe_layer_pattern(mc)
    for i in range(mc.num_layers):
        hp = f"model.layers.{i}."
        keys += [hp + "input_layernorm.weight", hp + "post_attention_layernorm.weight"]
        keys += _hf_mlp_keys(mc, hp, bool(sparse[i]))
        keys += [hp + f"self_attn.{p}_proj.weight" for p in "qkvo"]
        if mc.add_qkv_bias:
            keys += [hp + f"self_attn.{p}_proj.bias" for p in "qkv"]
        if mc.qk_layernorm:
            keys += [hp + "self_attn.q_norm.weight", hp + "self_attn.k_norm.weight"]
    if not mc.tie_word_embeddings:
        keys.append("lm_head.weight")
    return keys


def hf_tensors_from(name: str, t: Tensor, mc: ModelConfig) -> dict[str, Tensor]:
    """The HF tensors of one full-Megatron (local spec) tensor (inverse of :func:`hf_tensor_for`):
    each Megatron tensor converts on its own, so an exporter can stream them; padded vocabulary
    rows dropped, a tied model's output layer gives nothing."""
    v = mc.vocab_size
    if name == "embedding.word_embeddings.weight":
        return {"model.embed_tokens.weight": t[:v].contiguous()}
    if name == "output_layer.weight":
        return {} if mc.tie_word_embeddings else {"lm_head.weight": t[:v].contiguous()}
    if name == "decoder.final_layernorm.weight":
        return {"model.norm.weight": t}
    m = _LAYER_RE.match(name)
    if not m:
        raise KeyError(f"{name}: not a Megatron tensor of this model")
    hp, rest = f"model.layers.{m.group(1)}.", m.group(2)
    if rest in _LAYER_1TO1:
        return {hp + _LAYER_1TO1[rest]: t}
    if rest.startswith("self_attention.linear_qkv."):
        kind = rest.rsplit(".", 1)[1]
        return {f"{hp}self_attn.{p}_proj.{kind}": x for p, x in zip("qkv", split_qkv(t, mc))}
    if rest == "mlp.router.weight":
        return {hp + "mlp.gate.weight": t}
    if rest == "mlp.shared_experts.gate_weight":
        return {hp + "mlp.shared_expert_gate.weight": t}
    e = _hf_mlp_prefix(name, hp, rest)
    if rest.endswith("linear_fc2.weight"):
        return {e + "down_proj.weight": t}
    gate, up = torch.chunk(t, 2, dim=0)
    return {e + "gate_proj.weight": gate.contiguous(), e + "up_proj.weight": up.contiguous()}


def megatron_to_hf(msd: Mapping[str, Tensor], mc: ModelConfig) -> dict[str, Tensor]:
    """Full Megatron state dict (local or TE names) -> HF state dict; padded vocab rows dropped.

    Tied models get no ``lm_head.weight`` (transformers ties it on load).
    """
    sd = to_local_names(msd)
    out: dict[str, Tensor] = {}
    for name in megatron_names(mc):
        if name in sd:
            out.update(hf_tensors_from(name, sd[name], mc))
    missing = [k for k in expected_hf_keys(mc) if k not in out]
    if missing:
        raise KeyError(
            f"Megatron state dict lacks tensors for {missing[:3]} ({len(missing)} in all)"
        )
    return out


def tp_split_kind(name: str) -> str:
    """How a Megatron tensor is split over TP: "col" (dim 0), "row" (dim 1), "fc1" or "rep".

    Routed experts (``local_experts.``) follow the same kinds over the expert-TP size."""
    if name.endswith("_extra_state"):
        return "rep"
    if name.endswith("linear_fc1.weight"):
        return "fc1"
    if name.endswith(("linear_proj.weight", "linear_fc2.weight")):
        return "row"
    if name.endswith(
        ("word_embeddings.weight", "output_layer.weight", "linear_qkv.weight", "linear_qkv.bias")
    ):
        return "col"
    return "rep"


def is_expert(name: str) -> bool:
    """Whether ``name`` is a routed expert's tensor (sharded over EP, split over expert-TP)."""
    return ".mlp.experts.local_experts." in name


def ep_experts(mc: ModelConfig, ep: int, ep_rank: int) -> range:
    """Global expert indices held by EP rank ``ep_rank``."""
    per = (mc.num_experts or 0) // ep
    return range(ep_rank * per, (ep_rank + 1) * per)


def _check_etp(tp: int, etp: int) -> None:
    if etp not in (1, tp):
        raise ValueError(
            f"expert_tensor_parallel_size={etp}: the HF maps support 1 or the TP size ({tp})"
        )


def _tp_slice(name: str, t: Tensor, tp: int, r: int) -> Tensor:
    kind = tp_split_kind(name)
    if tp == 1 or kind == "rep":
        return t
    if kind == "col":
        return t.chunk(tp, dim=0)[r].contiguous()
    if kind == "row":
        return t.chunk(tp, dim=1)[r].contiguous()
    gate, up = torch.chunk(t, 2, dim=0)
    return torch.cat([gate.chunk(tp, dim=0)[r], up.chunk(tp, dim=0)[r]], dim=0)


def _tp_merge(name: str, parts: list[Tensor]) -> Tensor:
    kind = tp_split_kind(name)
    if len(parts) == 1 or kind == "rep":
        return parts[0]
    if kind == "col":
        return torch.cat(parts, dim=0)
    if kind == "row":
        return torch.cat(parts, dim=1)
    halves = [torch.chunk(p, 2, dim=0) for p in parts]
    return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)


def stage_layers(mc: ModelConfig, pp: int, pp_rank: int) -> range:
    """Global layer indices held by pipeline stage ``pp_rank`` (even split)."""
    per = mc.num_layers // pp
    return range(pp_rank * per, (pp_rank + 1) * per)


def shard_tensor(
    name: str,
    t: Tensor,
    mc: ModelConfig,
    *,
    tp: int = 1,
    tp_rank: int = 0,
    pp: int = 1,
    pp_rank: int = 0,
    ep: int = 1,
    ep_rank: int = 0,
    etp: int = 1,
) -> Optional[tuple[str, Tensor]]:
    """One full-Megatron tensor (local names) -> (name, slice) on rank (tp, pp, ep), or None
    when that rank does not hold it. Expert-TP rank = TP rank when ``etp == tp``."""
    _check_etp(tp, etp)
    first, last = pp_rank == 0, pp_rank == pp - 1
    m = _LAYER_RE.match(name)
    if m:
        layers = stage_layers(mc, pp, pp_rank)
        g = int(m.group(1))
        if g not in layers:
            return None
        local = f"decoder.layers.{g - layers.start}.{m.group(2)}"
        x = _EXPERT_RE.match(local)
        if x:
            owned = ep_experts(mc, ep, ep_rank)
            j = int(x.group(2))
            if j not in owned:
                return None
            local = f"{x.group(1)}{j - owned.start}{x.group(3)}"
            return local, _tp_slice(name, t, etp, tp_rank if etp > 1 else 0)
        return local, _tp_slice(name, t, tp, tp_rank)
    if name.startswith("embedding.") and first:
        return name, _tp_slice(name, t, tp, tp_rank)
    if name.startswith(("decoder.final_layernorm", "output_layer.")) and last:
        return name, _tp_slice(name, t, tp, tp_rank)
    return None


def shard_for_rank(
    full: Mapping[str, Tensor],
    mc: ModelConfig,
    *,
    tp: int = 1,
    tp_rank: int = 0,
    pp: int = 1,
    pp_rank: int = 0,
    te: bool = False,
    ep: int = 1,
    ep_rank: int = 0,
    etp: int = 1,
) -> dict[str, Tensor]:
    """The ``GPTModel.state_dict()`` of rank (tp_rank, pp_rank, ep_rank) from a full Megatron
    state dict (:func:`shard_tensor` per tensor).

    Layers are renumbered from 0 within the stage, experts from 0 within the EP rank; the first
    stage holds the embedding, the last the final norm and output layer (for tied embeddings on
    a last stage that is not first: a copy of the embedding). ``te=True`` gives Transformer
    Engine spec names.
    """
    full = to_local_names(full)
    out: dict[str, Tensor] = {}
    for name, t in full.items():
        got = shard_tensor(
            name,
            t,
            mc,
            tp=tp,
            tp_rank=tp_rank,
            pp=pp,
            pp_rank=pp_rank,
            ep=ep,
            ep_rank=ep_rank,
            etp=etp,
        )
        if got is not None:
            out[got[0]] = got[1]
    first, last = pp_rank == 0, pp_rank == pp - 1
    if mc.tie_word_embeddings and last and not first:
        out["output_layer.weight"] = _tp_slice(
            "output_layer.weight", full["embedding.word_embeddings.weight"], tp, tp_rank
        )
    return to_te_names(out) if te else out


def merge_ranks(
    shards: Mapping[tuple[int, ...], Mapping[str, Tensor]],
    mc: ModelConfig,
    *,
    tp: int,
    pp: int,
    ep: int = 1,
    etp: int = 1,
) -> dict[str, Tensor]:
    """Inverse of :func:`shard_for_rank`: ``{(tp_rank, pp_rank): state_dict}`` (or
    ``(tp_rank, pp_rank, ep_rank)`` keys when ``ep > 1``) -> full Megatron (local names).
    Tied models drop the last stage's output-layer copy."""
    _check_etp(tp, etp)
    full: dict[str, Tensor] = {}

    def shard(t: int, p: int, e: int) -> dict[str, Tensor]:
        return to_local_names(shards[(t, p, e)] if ep > 1 else shards[(t, p)])

    for p in range(pp):
        layers = stage_layers(mc, pp, p)
        for e in range(ep):
            ranks = [shard(t, p, e) for t in range(tp)]
            for name in ranks[0]:
                if mc.tie_word_embeddings and name == "output_layer.weight":
                    continue
                x = _EXPERT_RE.match(name)
                if x:
                    j = int(x.group(2)) + ep_experts(mc, ep, e).start
                    merged = _tp_merge(name, [r[name] for r in ranks[:etp]])
                    name = f"{x.group(1)}{j}{x.group(3)}"
                elif e > 0:
                    continue  # non-expert tensors are the same on every EP rank
                else:
                    merged = _tp_merge(name, [r[name] for r in ranks])
                m = _LAYER_RE.match(name)
                if m:
                    name = f"decoder.layers.{int(m.group(1)) + layers.start}.{m.group(2)}"
                full[name] = merged
    return full


def state_dict_tensors(sd: Mapping[str, Optional[Tensor]]) -> dict[str, Tensor]:
    """Drop ``_extra_state`` / non-tensor entries of a module state dict."""
    return {k: v for k, v in sd.items() if isinstance(v, Tensor) and not k.endswith("_extra_state")}
