"""Streaming (bounded-memory) conversion against the in-memory path, bit for bit: HF -> mcore
gives checkpoints whose tensors load identically (a tied, bf16 Qwen2 with QKV bias; a Qwen3-MoE
with a dense layer between sparse ones), and mcore -> HF streamed from either checkpoint gives
the source's HF tensors exactly, also with several output files."""

from __future__ import annotations

from pathlib import Path

import torch

from tests.dist import run_gloo
from tests.models.hf_fixtures import save_hf_model

FAMILIES = ("qwen2", "qwen3_moe")


def _loaded(mc, ckpt: Path, world: int) -> dict[str, torch.Tensor]:
    from erpd_megatron.models.builder import build_model
    from erpd_megatron.models.checkpoint import load_checkpoint, state_dict_on_cpu
    from erpd_megatron.runtime.distributed import init_distributed
    from tests.models.moe_conv_workers import make_moe_cfg

    cfg = make_moe_cfg(mc, world=world)
    cfg.precision.params_dtype = "bf16" if mc.family == "qwen2" else "fp32"
    init_distributed(cfg)
    model = build_model(cfg)
    load_checkpoint(ckpt, model, model_cfg=mc)
    return state_dict_on_cpu(model)


def stream_worker(rank: int, world: int, root: str) -> dict:
    """Per family: both conversions, the loaded tensors compared, three exports compared."""
    from erpd_megatron.models.checkpoint import read_model_config
    from erpd_megatron.models.convert import LazySafetensors, hf_to_mcore, mcore_to_hf

    out: dict = {}
    for fam in FAMILIES:
        d = Path(root) / fam
        hf_to_mcore(d / "hf", d / "old", tp=2, streaming=False)
        hf_to_mcore(d / "hf", d / "new", tp=2)
        mc = read_model_config(d / "new")
        old, new = _loaded(mc, d / "old", world), _loaded(mc, d / "new", world)
        out[f"{fam}/keys_equal"] = sorted(old) == sorted(new)
        out[f"{fam}/tensors_equal"] = all(torch.equal(old[k], new[k]) for k in old)
        src = LazySafetensors(d / "hf")
        for name, ckpt, kw in (
            ("back_new", "new", {}),
            ("back_old", "old", {}),  # a checkpoint written by dist_checkpointing.save
            ("back_small", "new", {"max_shard_bytes": 40_000}),  # several files + index
        ):
            mcore_to_hf(d / ckpt, d / name, **kw)
            back = LazySafetensors(d / name)
            out[f"{fam}/{name}"] = sorted(back) == sorted(src) and all(
                back[k].dtype == src[k].dtype and torch.equal(back[k], src[k]) for k in src
            )
        out[f"{fam}/files_small"] = len(list((d / "back_small").glob("*.safetensors")))
    return out


def test_streaming_conversion_is_bit_exact_vs_in_memory(tmp_path):
    for fam in FAMILIES:
        save_hf_model(
            fam, tmp_path / fam / "hf", dtype=torch.bfloat16 if fam == "qwen2" else torch.float32
        )
    res = run_gloo(stream_worker, 1, str(tmp_path))[0]
    for fam in FAMILIES:
        assert res[f"{fam}/keys_equal"] and res[f"{fam}/tensors_equal"], (fam, res)
        for name in ("back_new", "back_old", "back_small"):
            assert res[f"{fam}/{name}"], (fam, name)
        assert res[f"{fam}/files_small"] > 1


def test_tp_slices_read_from_hf_equal_the_sliced_full_tensors(tmp_path):
    """What a torchrun rank reads (only its rows / columns of each HF tensor) equals its slice
    of the full converted tensor, for every tensor of every fixture family at TP=2 and 4."""
    from erpd_megatron.config.validate import padded_vocab_size
    from erpd_megatron.models import hf_maps
    from erpd_megatron.models.convert import LazySafetensors, read_hf_config
    from erpd_megatron.models.hf_config import hf_to_model_config
    from erpd_megatron.models.hf_slices import tp_slice_from_hf
    from tests.models.hf_fixtures import FAMILIES, MOE_FAMILIES

    for fam in FAMILIES + MOE_FAMILIES:
        dtype = torch.bfloat16 if fam == "qwen2" else torch.float32
        save_hf_model(fam, tmp_path / fam, shard=fam == "llama", dtype=dtype)
        src = LazySafetensors(tmp_path / fam)
        mc = hf_to_model_config(read_hf_config(tmp_path / fam))
        for tp in (2, 4):
            if mc.num_query_groups % tp:
                continue
            padded = padded_vocab_size(mc, tp)
            names = list(hf_maps.megatron_names(mc)) + ["output_layer.weight"]
            for name in names:
                full = hf_maps.hf_tensor_for(src.__getitem__, mc, padded, name)
                for r in range(tp):
                    got = tp_slice_from_hf(src.slice, mc, padded, name, tp, r, dtype)
                    want = hf_maps._tp_slice(name, full, tp, r)
                    assert got is None or torch.equal(got, want), (fam, tp, name, r)
                    assert got is not None or hf_maps.tp_split_kind(name) == "rep", name
