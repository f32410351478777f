"""HF safetensors <-> megatron distributed checkpoint conversion (tools/convert_checkpoint.py).

* :func:`hf_to_mcore`: HF dir (``model.safetensors`` or sharded with
  ``model.safetensors.index.json``) -> megatron dist checkpoint + ``model_config.yaml`` +
  ``hf_config.json`` + tokenizer files. As ONE process (a login node) it writes the tensors of
  a single TP=1/PP=1 rank whose embedding is padded for the *target* TP: dist_checkpointing
  stores global tensors, so the result is the checkpoint a TP x PP run would write and loads
  at that layout (or any other). Under torchrun with ``world = tp * pp * dp`` every rank
  writes its own shard. Streamed by default (:mod:`convert_stream`: tensor by tensor, the
  model never built); ``streaming=False`` builds the model and saves it.
* :func:`mcore_to_hf`: any checkpoint (any TP/PP it was saved at) -> HF safetensors shards,
  ``config.json``, ``generation_config.json`` and tokenizer files that
  ``AutoModelForCausalLM.from_pretrained`` (and vLLM) load: HF names, unfused, vocabulary
  padding dropped. Streamed by default (one tensor at a time, files split over torchrun
  ranks); ``streaming=False`` loads the model at TP=1/PP=1 and rank 0 writes.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from erpd_megatron.config.loader import ConfigError
from erpd_megatron.config.schema import Config, ModelConfig, ParallelConfig, PrecisionConfig
from erpd_megatron.config.validate import padded_vocab_size, validate_layout, validate_model
from erpd_megatron.models import checkpoint as ckpt_io
from erpd_megatron.models import hf_maps
from erpd_megatron.models.hf_config import hf_to_model_config, model_config_to_hf
from erpd_megatron.utils.files import atomic_write_json
from erpd_megatron.utils.log import get_logger

log = get_logger(__name__)

_DTYPE_NAMES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MAX_SHARD_BYTES = 5 * 1024**3


class LazySafetensors(Mapping[str, torch.Tensor]):
    """Read-only mapping over the tensors of an HF directory's safetensors files, loaded on
    access; at most ``max_open`` files are open (memory-mapped) at a time."""

    def __init__(self, hf_dir: str | Path, max_open: int = 1) -> None:
        self.dir = Path(hf_dir)
        index = self.dir / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            self._where = {k: self.dir / f for k, f in weight_map.items()}
        elif (self.dir / "model.safetensors").exists():
            from safetensors import safe_open

            path = self.dir / "model.safetensors"
            with safe_open(str(path), framework="pt") as f:
                self._where = {k: path for k in f.keys()}
        else:
            found = sorted(p.name for p in self.dir.glob("*"))[:10]
            raise FileNotFoundError(
                f"{self.dir}: no model.safetensors or model.safetensors.index.json (found "
                f"{found}); only safetensors HF checkpoints are supported (re-save with "
                "safe_serialization=True)"
            )
        self._handles: dict[Path, Any] = {}
        self.max_open = max_open

    def _open(self, key: str) -> Any:
        from safetensors import safe_open

        if key not in self._where:
            raise KeyError(f"{self.dir}: tensor {key!r} not in the checkpoint")
        path = self._where[key]
        if path not in self._handles:
            while len(self._handles) >= self.max_open:  # unmap the oldest file: its pages
                self._handles.pop(next(iter(self._handles)))  # count in this process's RSS
            self._handles[path] = safe_open(str(path), framework="pt")
        return self._handles[path]

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._open(key).get_tensor(key)

    def slice(self, key: str) -> Any:
        """A safetensors slice of ``key`` (``[a:b]``, ``[:, a:b]`` read only those elements)."""
        return self._open(key).get_slice(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def read_hf_config(hf_dir: str | Path) -> dict:
    """``config.json`` of an HF checkpoint directory (a clear error when missing)."""
    path = Path(hf_dir) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: {hf_dir} is not an HF model directory")
    return json.loads(path.read_text())


def hf_dtype_name(hf_cfg: dict) -> str:
    """The HF checkpoint's dtype name (``torch_dtype`` / ``dtype``), default bfloat16."""
    name = hf_cfg.get("dtype") or hf_cfg.get("torch_dtype") or "bfloat16"
    if name not in _TORCH_DTYPES:
        raise ConfigError(
            f"HF dtype {name!r} is not supported; expected one of {sorted(_TORCH_DTYPES)}"
        )
    return name


def _conversion_config(
    mc: ModelConfig, tp: int, pp: int, dtype_name: str, ep: int = 1, etp: int = 1
) -> Config:
    return Config(
        model=mc,
        parallel=ParallelConfig(
            tensor_model_parallel_size=tp,
            pipeline_model_parallel_size=pp,
            expert_model_parallel_size=ep,
            expert_tensor_parallel_size=etp,
            num_nodes=1,
            gpus_per_node=tp * pp * ep * etp,
            use_distributed_optimizer=False,
        ),
        precision=PrecisionConfig(params_dtype=_DTYPE_NAMES[dtype_name], transformer_impl="local"),  # type: ignore[arg-type]
    )


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _bare_model(cfg: Config, *, vocab_size: Optional[int] = None) -> Any:
    """A GPTModel for this rank's stage on CPU, parameters uninitialised (they are overwritten)."""
    from megatron.core import parallel_state as ps

    from erpd_megatron.models.builder import build_gpt, transformer_config

    config = transformer_config(cfg, use_cpu_initialization=True, perform_initialization=False)
    return build_gpt(
        cfg,
        config,
        vocab_size=vocab_size,
        pre_process=ps.is_pipeline_first_stage(ignore_virtual=True),
        post_process=ps.is_pipeline_last_stage(ignore_virtual=True),
    )


def _load_into(
    model: Any, state: Mapping[str, torch.Tensor] | Iterator[tuple[str, torch.Tensor]]
) -> None:
    """Copy converted tensors into the model; ``state`` may be a lazy stream of (name, tensor)
    pairs, so only one converted tensor (e.g. one expert's fc1) is alive at a time."""
    own = model.state_dict()
    seen: set[str] = set()
    unexpected: list[str] = []
    with torch.no_grad():
        for k, v in state.items() if isinstance(state, Mapping) else state:
            if k not in own:
                unexpected.append(k)
                continue
            if own[k].shape != v.shape:
                raise RuntimeError(
                    f"{k}: converted shape {tuple(v.shape)} != model shape {tuple(own[k].shape)}"
                )
            own[k].copy_(v)
            seen.add(k)
    missing = [k for k in own if not k.endswith("_extra_state") and k not in seen]
    if missing or unexpected:
        raise RuntimeError(
            f"converted tensors do not fit the model: missing {missing[:4]}, "
            f"unexpected {unexpected[:4]}"
        )


def hf_to_mcore(
    hf_dir: str | Path,
    out_dir: str | Path,
    *,
    tp: int = 1,
    pp: int = 1,
    dtype: Optional[str] = None,
    make_vocab_size_divisible_by: int = 128,
    ep: int = 1,
    etp: int = 1,
    streaming: bool = True,
) -> Path:
    """Convert an HF Llama/Qwen2/Qwen3/Qwen3-MoE/Qwen2-MoE checkpoint into a megatron dist
    checkpoint for TP=tp, PP=pp, EP=ep (expert-TP etp).

    One process, or all ranks of a torchrun job (``world = tp * pp * dp``, divisible by
    ``etp * ep * pp``). ``dtype`` ("float32", "bfloat16", "float16") defaults to the HF
    checkpoint's. Writes ``model_config.yaml`` (architecture), ``hf_config.json`` and the
    tokenizer files. Experts are stored with global expert offsets (megatron's
    ``SequentialMLP.sharded_state_dict``), so the result loads at any EP. Under torchrun each
    rank reads only its stage's layers and its EP rank's experts, one tensor at a time.
    ``streaming`` (default): bounded memory (:mod:`convert_stream`), the model is never built;
    False: the in-memory path (the model built, then saved by ``dist_checkpointing``).
    """
    from erpd_megatron.runtime.distributed import init_distributed

    hf_dir = Path(hf_dir)
    hf_cfg = read_hf_config(hf_dir)
    mc = hf_to_model_config(hf_cfg, make_vocab_size_divisible_by=make_vocab_size_divisible_by)
    validate_model(mc)
    dtype = dtype or hf_dtype_name(hf_cfg)
    validate_layout(mc, _conversion_config(mc, tp, pp, dtype, ep, etp).parallel, tp * pp * ep * etp)
    tensors = LazySafetensors(hf_dir)
    target_padded = padded_vocab_size(mc, tp)
    world = _world()
    layout = {"tp": tp, "pp": pp, **({"ep": ep, "etp": etp} if mc.num_experts is not None else {})}
    if streaming:
        from erpd_megatron.models import convert_stream

        cfg = _conversion_config(mc, *((tp, pp, dtype, ep, etp) if world > 1 else (1, 1, dtype)))
        cfg.parallel.gpus_per_node = world
        init_distributed(cfg)
        out = convert_stream.stream_hf_to_mcore(
            tensors,
            out_dir,
            cfg,
            mc,
            dtype=_TORCH_DTYPES[dtype],
            target_padded=target_padded,
            layout=layout,
            hf_dir=hf_dir,
            hf_cfg=hf_cfg,
            dtype_name=dtype,
        )
        log.info(
            "converted %s -> %s (%s, %s, padded vocab %d)",
            hf_dir,
            out,
            layout,
            dtype,
            target_padded,
        )
        return out
    if world > 1:  # torchrun: every rank converts its own shard
        from megatron.core import parallel_state as ps

        cfg = _conversion_config(mc, tp, pp, dtype, ep, etp)
        cfg.parallel.gpus_per_node = world
        env = init_distributed(cfg)
        model = _bare_model(cfg)
        first, last = env.is_first_stage, env.is_last_stage
        ep_rank = ps.get_expert_model_parallel_rank()
        stream = hf_maps.iter_hf_to_megatron(
            lambda k: tensors[k].to(_TORCH_DTYPES[dtype]),
            mc,
            target_padded,
            layers=hf_maps.stage_layers(mc, pp, env.pp_rank),
            embedding=first or (mc.tie_word_embeddings and last),
            head=last,
            experts=hf_maps.ep_experts(mc, ep, ep_rank),
        )
        local = _shard_stream(
            stream,
            mc,
            tp=tp,
            tp_rank=env.tp_rank,
            pp=pp,
            pp_rank=env.pp_rank,
            ep=ep,
            ep_rank=ep_rank,
            etp=etp,
        )
    else:  # one process: the whole model as one TP=1/PP=1 rank, embedding padded for the target TP
        cfg = _conversion_config(mc, 1, 1, dtype)
        init_distributed(cfg)
        model = _bare_model(cfg, vocab_size=target_padded)
        local = hf_maps.iter_hf_to_megatron(
            lambda k: tensors[k].to(_TORCH_DTYPES[dtype]), mc, target_padded
        )
    _load_into(model, local)
    del local
    out = ckpt_io.save_checkpoint(
        out_dir, [model], model_cfg=mc, tokenizer_dir=hf_dir, hf_config=hf_cfg
    )
    if not dist.is_initialized() or dist.get_rank() == 0:
        meta_path = out / ckpt_io.META_FILE
        meta = json.loads(meta_path.read_text())
        meta.update(target_layout=layout, padded_vocab_size=target_padded, source=str(hf_dir))
        atomic_write_json(meta_path, meta)
    log.info(
        "converted %s -> %s (TP=%d PP=%d EP=%d, %s, padded vocab %d)",
        hf_dir,
        out,
        tp,
        pp,
        ep,
        dtype,
        target_padded,
    )
    return out


def _shard_stream(
    stream: Iterator[tuple[str, torch.Tensor]],
    mc: ModelConfig,
    *,
    tp: int,
    tp_rank: int,
    pp: int,
    pp_rank: int,
    ep: int,
    ep_rank: int,
    etp: int,
) -> Iterator[tuple[str, torch.Tensor]]:
    """This rank's slices of a stream of full-Megatron tensors (``hf_maps.shard_tensor``), plus the
    embedding copy a tied last stage that is not first holds as its output layer."""
    first, last = pp_rank == 0, pp_rank == pp - 1
    for name, t in stream:
        if (
            mc.tie_word_embeddings
            and last
            and not first
            and name == "embedding.word_embeddings.weight"
        ):
            yield (
                "output_layer.weight",
                hf_maps.shard_tensor("output_layer.weight", t, mc, tp=tp, tp_rank=tp_rank)[1],
            )
        got = hf_maps.shard_tensor(
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
            yield got


def save_hf_safetensors(
    state: Mapping[str, torch.Tensor], out_dir: str | Path, max_shard_bytes: int = MAX_SHARD_BYTES
) -> list[str]:
    """Write ``state`` as ``model.safetensors`` or ``model-0000i-of-0000n.safetensors`` + index."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, v in state.items():
        nbytes = v.numel() * v.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = v.contiguous()
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(out_dir / "model.safetensors"), metadata={"format": "pt"})
        return ["model.safetensors"]
    names, weight_map = [], {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out_dir / name), metadata={"format": "pt"})
        names.append(name)
        weight_map.update({k: name for k in shard})
    total = sum(v.numel() * v.element_size() for v in state.values())
    atomic_write_json(
        out_dir / "model.safetensors.index.json",
        {"metadata": {"total_size": total}, "weight_map": weight_map},
    )
    return names


def mcore_to_hf(
    ckpt_dir: str | Path,
    out_dir: str | Path,
    *,
    dtype: Optional[str] = None,
    max_shard_bytes: int = MAX_SHARD_BYTES,
    streaming: bool = True,
) -> Path:
    """Export a megatron dist checkpoint (saved at any TP/PP) to an HF directory.

    ``dtype`` defaults to the original HF dtype (``hf_config.json``), else the checkpoint's
    parameter dtype. One process, or all ranks of a torchrun job. ``streaming`` (default): one
    tensor at a time, the files split over the ranks (:mod:`convert_stream`); False: the model
    loaded whole, rank 0 writes.
    """
    from erpd_megatron.runtime.distributed import init_distributed

    ckpt_dir = ckpt_io.check_checkpoint_dir(ckpt_dir)
    mc = ckpt_io.read_model_config(ckpt_dir)
    base = (
        json.loads((ckpt_dir / "hf_config.json").read_text())
        if (ckpt_dir / "hf_config.json").exists()
        else None
    )
    meta = (
        json.loads((ckpt_dir / ckpt_io.META_FILE).read_text())
        if (ckpt_dir / ckpt_io.META_FILE).exists()
        else {}
    )
    if dtype is None:
        saved = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}.get(
            meta.get("params_dtype", "")
        )
        dtype = hf_dtype_name(base) if base else (saved or "bfloat16")
    world = _world()
    # Load in the dtype the checkpoint was saved in (no upcast: half the memory for bf16).
    load_dtype = (
        meta.get("params_dtype") if meta.get("params_dtype") in _TORCH_DTYPES else "float32"
    )
    cfg = _conversion_config(mc, 1, 1, load_dtype)
    cfg.parallel.gpus_per_node = world
    init_distributed(cfg)
    out_dir = Path(out_dir)
    if streaming:
        return _stream_export(ckpt_dir, out_dir, cfg, mc, dtype, base, max_shard_bytes)
    model = _bare_model(cfg)
    ckpt_io.load_checkpoint(ckpt_dir, [model], model_cfg=mc)
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    if rank0:
        full = hf_maps.state_dict_tensors(model.state_dict())
        hf = {k: v.to(_TORCH_DTYPES[dtype]) for k, v in hf_maps.megatron_to_hf(full, mc).items()}
        tmp = out_dir.parent / f".{out_dir.name}.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        save_hf_safetensors(hf, tmp, max_shard_bytes)
        atomic_write_json(tmp / "config.json", model_config_to_hf(mc, dtype=dtype, base=base))
        ckpt_io.copy_tokenizer_files(ckpt_dir, tmp)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
        log.info("exported %s -> %s (%s, %d tensors)", ckpt_dir, out_dir, dtype, len(hf))
    from erpd_megatron.runtime import comm

    comm.barrier()  # on the group's device (NCCL: the current GPU)
    return out_dir


def _stream_export(
    ckpt_dir: Path,
    out_dir: Path,
    cfg: Config,
    mc: ModelConfig,
    dtype: str,
    base: Optional[dict],
    max_shard_bytes: int,
) -> Path:
    from erpd_megatron.models import convert_stream
    from erpd_megatron.runtime import comm

    ckpt_io.verify_checkpoint_files(ckpt_dir)  # the digests, as a load checks them
    tmp = convert_stream.fresh_dir(out_dir)
    _, plan = convert_stream.stream_mcore_to_hf(
        ckpt_dir, tmp, cfg, mc, dtype=_TORCH_DTYPES[dtype], max_shard_bytes=max_shard_bytes
    )
    comm.barrier()  # every rank's files written
    if not dist.is_initialized() or dist.get_rank() == 0:
        convert_stream.write_hf_index(tmp, plan, _TORCH_DTYPES[dtype])
        atomic_write_json(tmp / "config.json", model_config_to_hf(mc, dtype=dtype, base=base))
        ckpt_io.copy_tokenizer_files(ckpt_dir, tmp)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
        n = sum(len(shard) for shard in plan)
        log.info(
            "exported %s -> %s (%s, %d tensors, %d files)", ckpt_dir, out_dir, dtype, n, len(plan)
        )
    comm.barrier()
    return out_dir


def main(argv: Optional[list[str]] = None) -> int:
    """CLI: ``hf-to-mcore --hf-dir D --out D --tp N --pp M`` / ``mcore-to-hf --ckpt D --out D``."""
    import argparse

    p = argparse.ArgumentParser(
        prog="convert_checkpoint", description="HF <-> megatron checkpoint conversion"
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("hf-to-mcore", help="HF safetensors -> megatron dist checkpoint")
    a.add_argument("--hf-dir", required=True, help="HF model directory (config.json + safetensors)")
    a.add_argument("--out", required=True, help="output checkpoint directory")
    a.add_argument(
        "--tp", type=int, default=1, help="target tensor-parallel size (vocabulary padding)"
    )
    a.add_argument("--pp", type=int, default=1, help="target pipeline-parallel size")
    a.add_argument("--ep", type=int, default=1, help="target expert-parallel size (MoE models)")
    a.add_argument(
        "--etp", type=int, default=1, help="target expert tensor-parallel size (MoE models)"
    )
    a.add_argument(
        "--dtype", choices=sorted(_TORCH_DTYPES), default=None, help="default: the HF dtype"
    )
    a.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    for q in (
        a,
        b := sub.add_parser("mcore-to-hf", help="megatron dist checkpoint -> HF safetensors"),
    ):
        q.add_argument(
            "--in-memory",
            action="store_true",
            help="build the whole model in memory (the pre-streaming path; for comparisons)",
        )
    b.add_argument(
        "--ckpt",
        required=True,
        help="checkpoint directory (an iter_XXXXXXX dir or a converted one)",
    )
    b.add_argument("--out", required=True, help="output HF directory")
    b.add_argument(
        "--dtype",
        choices=sorted(_TORCH_DTYPES),
        default=None,
        help="default: the original HF dtype",
    )
    b.add_argument("--max-shard-gb", type=float, default=MAX_SHARD_BYTES / 1024**3)
    args = p.parse_args(argv)
    from erpd_megatron.runtime.distributed import destroy_distributed

    try:
        if args.cmd == "hf-to-mcore":
            hf_to_mcore(
                args.hf_dir,
                args.out,
                tp=args.tp,
                pp=args.pp,
                dtype=args.dtype,
                make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
                ep=args.ep,
                etp=args.etp,
                streaming=not args.in_memory,
            )
        else:
            mcore_to_hf(
                args.ckpt,
                args.out,
                dtype=args.dtype,
                max_shard_bytes=int(args.max_shard_gb * 1024**3),
                streaming=not args.in_memory,
            )
    finally:
        destroy_distributed()
    return 0
