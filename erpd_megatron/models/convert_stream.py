"""Bounded-memory HF <-> megatron conversion: tensor by tensor, never the whole model.

* :func:`stream_hf_to_mcore`: the model is built on the ``meta`` device (no memory) only to ask
  megatron for its ``sharded_state_dict()``: the checkpoint keys, global shapes and offsets of
  every tensor (stacked layers, experts, swiglu halves, replicas) exactly as
  ``dist_checkpointing.save`` would store them. Those become the write plan of a
  ``torch.distributed.checkpoint`` save (the ``torch_dist`` format megatron loads) whose planner
  converts each tensor from the HF safetensors only when the writer asks for it
  (``resolve_data``): one HF tensor (or the three of a fused one) and one converted tensor are
  alive at a time, and at most one safetensors file is open (mapped). Under torchrun each rank
  plans its own layout's main replicas: it reads only its stage's layers, its EP rank's experts
  and, of TP-split tensors, its own rows / columns (:mod:`hf_slices`); DP replicas read nothing.
* :func:`stream_mcore_to_hf`: the inverse. Tensors are read one at a time from the checkpoint
  (any layout it was saved at: ``torch.distributed.checkpoint`` reshards each read), converted
  with :func:`hf_maps.hf_tensors_from` and appended to safetensors files whose headers were
  planned beforehand on ``meta`` tensors; under torchrun the files are split over the ranks.

Peak memory: the largest single tensor (the embedding) a few times over, plus one mapped
input file; measured in ``benchmarks/bench_convert_memory.py``.
"""

from __future__ import annotations

import dataclasses
import io
import json
import shutil
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from erpd_megatron.config.schema import ModelConfig
from erpd_megatron.models import checkpoint as ckpt_io
from erpd_megatron.models import hf_maps
from erpd_megatron.models.hf_slices import tp_slice_from_hf
from erpd_megatron.utils.files import atomic_write_json
from erpd_megatron.utils.log import get_logger
from erpd_megatron.utils.progress import progress_bar

log = get_logger(__name__)

_ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


@dataclasses.dataclass
class Piece:
    """One stored chunk of one model tensor: checkpoint key, its global offset and chunk size
    (prepended stacking axes included), and how it comes out of the module tensor ``name``."""

    name: str
    key: str
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    global_shape: tuple[int, ...]
    dtype: torch.dtype
    factory: Any = None  # a ShardedTensorFactory (swiglu fc1): rebuilt on the real tensor
    part: int = 0  # which of the factory's built ShardedTensors
    main: bool = True  # main replica (the one rank that writes it)

    @property
    def nbytes(self) -> int:
        """Bytes of this chunk."""
        n = 1
        for s in self.sizes:
            n *= s
        return n * torch.empty((), dtype=self.dtype).element_size()


def model_pieces(model: Any) -> tuple[list[Piece], list[Any]]:
    """The checkpoint chunks of a (meta) GPTModel, in module order, and its ShardedObjects
    (module ``_extra_state``), from megatron's own ``sharded_state_dict()``."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import (
        ShardedObject,
        ShardedTensor,
        ShardedTensorFactory,
        is_main_replica,
    )

    pieces: list[Piece] = []
    objects: list[Any] = []
    for name, v in model.sharded_state_dict().items():
        if isinstance(v, ShardedObject):
            objects.append(v)
            continue
        built = list(nested_values(v.build())) if isinstance(v, ShardedTensorFactory) else [v]
        for part, st in enumerate(built):
            if not isinstance(st, ShardedTensor) or st.flattened_range is not None:
                raise TypeError(f"{name}: unsupported sharded entry {type(st).__name__}")
            pieces.append(
                Piece(
                    name=name,
                    key=st.key,
                    offsets=tuple(st.global_offset),
                    sizes=(1,) * st.prepend_axis_num + tuple(st.local_shape),
                    global_shape=tuple(st.global_shape),
                    dtype=st.dtype,
                    factory=v if isinstance(v, ShardedTensorFactory) else None,
                    part=part,
                    main=is_main_replica(st.replica_id),
                )
            )
    return pieces, [o for o in objects if is_main_replica(o.replica_id)]


def piece_view(piece: Piece, t: torch.Tensor) -> torch.Tensor:
    """The chunk ``piece`` of the module tensor ``t`` (a view where megatron makes one)."""
    if piece.factory is not None:
        from megatron.core.dist_checkpointing.dict_utils import nested_values

        built = list(nested_values(dataclasses.replace(piece.factory, data=t).build()))
        t = built[piece.part].data
    return t.reshape(piece.sizes) if t.is_contiguous() else t.contiguous().reshape(piece.sizes)


class _StreamSavePlanner:
    """A ``torch.distributed.checkpoint`` SavePlanner whose tensors are produced on demand."""

    def __init__(self, items: list[Any], resolve: Callable[[Any], Any]) -> None:
        self.items, self.resolve = items, resolve

    def set_up_planner(
        self, state_dict: Any, storage_meta: Any = None, is_coordinator: bool = False
    ):  # noqa: D102
        self.is_coordinator = is_coordinator

    def create_local_plan(self) -> Any:  # noqa: D102
        from torch.distributed.checkpoint.planner import SavePlan

        return SavePlan(self.items)

    def create_global_plan(self, all_plans: list[Any]) -> tuple[list[Any], Any]:  # noqa: D102
        from torch.distributed.checkpoint.default_planner import create_default_global_save_plan

        return create_default_global_save_plan(all_plans)

    def finish_plan(self, new_plan: Any) -> Any:  # noqa: D102
        return new_plan

    def resolve_data(self, write_item: Any) -> Any:  # noqa: D102
        return self.resolve(write_item)


def _write_items(pieces: list[Piece], objects: list[Any]) -> list[Any]:
    from torch.distributed.checkpoint.metadata import (
        ChunkStorageMetadata,
        MetadataIndex,
        TensorProperties,
    )
    from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType

    items = [
        WriteItem(index=MetadataIndex(o.unique_key), type=WriteItemType.BYTE_IO, bytes_io_data=None)
        for o in objects
    ]
    for p in pieces:
        offsets = torch.Size(p.offsets)
        items.append(
            WriteItem(
                index=MetadataIndex(p.key, offsets),
                type=WriteItemType.SHARD,
                tensor_data=TensorWriteData(
                    chunk=ChunkStorageMetadata(offsets=offsets, sizes=torch.Size(p.sizes)),
                    properties=TensorProperties(dtype=p.dtype),
                    size=torch.Size(p.global_shape),
                ),
            )
        )
    return items


def write_dist_checkpoint(
    tmp: Path,
    pieces: list[Piece],
    objects: list[Any],
    tensor_of: Callable[[str], torch.Tensor],
    *,
    desc: str = "hf-to-mcore",
) -> tuple[int, float]:
    """Write this rank's main-replica ``pieces`` (+ ``objects``) into ``tmp`` in megatron's
    ``torch_dist`` format, each module tensor produced by ``tensor_of(name)`` when the writer
    reaches it (the last one kept for its other pieces). Returns (bytes written, seconds)."""
    from megatron.core.dist_checkpointing.core import CheckpointingConfig, save_config
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint import save as dcp_save

    mine = [p for p in pieces if p.main]
    by_index = {(p.key, p.offsets): p for p in mine}
    objs = {o.unique_key: o for o in objects}
    total = sum(p.nbytes for p in mine)
    bar = progress_bar(max(1, total >> 20), enabled=_rank() == 0, desc=desc, unit="MiB")
    state: dict[str, Any] = {"name": None, "t": None, "out": None, "done": 0, "shown": 0}

    def resolve(item: Any) -> Any:
        if item.index.fqn in objs:
            buf = io.BytesIO()
            torch.save([objs[item.index.fqn].data], buf)  # as megatron's torch_dist strategy
            buf.seek(0)
            return buf
        p = by_index[(item.index.fqn, tuple(item.index.offset))]
        # torch's writer (2.13, filesystem.py _write_files_from_queue) keeps every tensor it
        # wrote in a dict until the file is closed: hand it tensors this function owns and
        # free the previous one's storage (written by now) so that only one stays alive.
        if state["out"] is not None:
            state["out"].untyped_storage().resize_(0)
        if state["name"] != p.name:
            state["name"], state["t"] = p.name, None  # free the previous tensor first
            state["t"] = tensor_of(p.name)
        # The model's dtype, as the in-memory path's copy_ into it (local-spec norms are fp32)
        out = torch.empty(p.sizes, dtype=p.dtype)
        out.copy_(piece_view(p, state["t"]))
        state["out"] = out
        state["done"] += p.nbytes
        mib = state["done"] >> 20
        bar.update(mib - state["shown"])
        state["shown"] = mib
        return out

    t0 = time.perf_counter()
    # One thread, no copy-ahead: the serial loader resolves items in plan order (the overlapping
    # one a GPU node would pick sorts them by size, splitting each tensor's pieces apart).
    writer = FileSystemWriter(
        str(tmp), single_file_per_rank=True, thread_count=1, per_thread_copy_ahead=0
    )
    planner = _StreamSavePlanner(_write_items(mine, list(objs.values())), resolve)
    dcp_save({}, storage_writer=writer, planner=planner)  # type: ignore[arg-type]
    state["t"] = state["out"] = None
    if _rank() == 0:
        save_config(CheckpointingConfig("torch_dist"), str(tmp))
        torch.save({}, tmp / "common.pt")  # a model-only checkpoint has no common state
    bar.close()
    return total, time.perf_counter() - t0


def meta_model(cfg: Any, vocab_size: Optional[int] = None) -> Any:
    """This rank's GPTModel on the ``meta`` device: shapes, dtypes and sharding, no memory."""
    from erpd_megatron.models.convert import _bare_model

    with torch.device("meta"):
        return _bare_model(cfg, vocab_size=vocab_size)


def _globalize(name: str, mc: ModelConfig, layer0: int, expert0: int) -> str:
    """A rank's module name -> the full-Megatron name (global layer and expert numbers)."""
    m = hf_maps._LAYER_RE.match(name)
    if not m:
        return name
    full = f"decoder.layers.{int(m.group(1)) + layer0}.{m.group(2)}"
    x = hf_maps._EXPERT_RE.match(full)
    return f"{x.group(1)}{int(x.group(2)) + expert0}{x.group(3)}" if x else full


def stream_hf_to_mcore(
    tensors: Any,
    out_dir: str | Path,
    cfg: Any,
    mc: ModelConfig,
    *,
    dtype: torch.dtype,
    target_padded: int,
    layout: dict,
    hf_dir: Path,
    hf_cfg: dict,
    dtype_name: str,
) -> Path:
    """HF safetensors (``tensors``: a lazy mapping) -> megatron checkpoint, streamed.

    ``cfg``'s parallel layout is this process's (TP=1/PP=1 in one process: the embedding padded
    to ``target_padded`` rows; a torchrun rank's own layout otherwise); megatron's
    parallel_state must already be initialised for it."""
    from megatron.core import parallel_state as ps

    tp, pp = ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()
    ep, etp = ps.get_expert_model_parallel_world_size(), ps.get_expert_tensor_parallel_world_size()
    tp_rank, pp_rank = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
    ep_rank = ps.get_expert_model_parallel_rank()
    model = meta_model(cfg, vocab_size=target_padded if _world() == 1 else None)
    pieces, objects = model_pieces(model)
    layer0 = hf_maps.stage_layers(mc, pp, pp_rank).start
    expert0 = hf_maps.ep_experts(mc, ep, ep_rank).start if mc.num_experts else 0
    shapes = {n: tuple(t.shape) for n, t in model.state_dict().items() if t is not None}

    def get(k: str) -> torch.Tensor:
        return tensors[k].to(dtype)

    def tensor_of(name: str) -> torch.Tensor:
        full_name = _globalize(name, mc, layer0, expert0)
        expert = hf_maps.is_expert(full_name)
        size, r = (etp, tp_rank if etp > 1 else 0) if expert else (tp, tp_rank)
        t = None
        if size > 1 and hasattr(tensors, "slice"):  # read only this rank's rows / columns
            t = tp_slice_from_hf(tensors.slice, mc, target_padded, full_name, size, r, dtype)
        if t is None:
            full = hf_maps.hf_tensor_for(get, mc, target_padded, full_name)
            t = hf_maps._tp_slice(full_name, full, size, r)
        if tuple(t.shape) != shapes[name]:
            raise RuntimeError(f"{name}: converted shape {tuple(t.shape)} != model {shapes[name]}")
        return t.contiguous()

    ckpt_dir, tmp = ckpt_io.begin_save(out_dir)
    nbytes, secs = write_dist_checkpoint(tmp, pieces, objects, tensor_of)
    total = _sum_over_ranks(nbytes)
    meta = {
        "format": ckpt_io.FORMAT,
        "saved_layout": ckpt_io._layout(),
        "padded_vocab_size": target_padded,
        "params_dtype": dtype_name,
        "has_optimizer": False,
        "optimizer_sharding": None,
        "has_scheduler": False,
        "target_layout": layout,
        "source": str(hf_dir),
    }
    out = ckpt_io.finish_save(
        ckpt_dir, tmp, meta, model_cfg=mc, tokenizer_dir=hf_dir, hf_config=hf_cfg
    )
    _log_rate("hf-to-mcore", total, secs)
    return out


def _sum_over_ranks(n: int) -> int:
    if not dist.is_initialized() or _world() == 1:
        return n
    from erpd_megatron.runtime import comm

    return int(sum(comm.all_gather_object(n)))


def _log_rate(what: str, nbytes: int, secs: float) -> None:
    if _rank() == 0:
        log.info(
            "%s streamed %.2f GB in %.1f s: %.3f GB/s",
            what,
            nbytes / 1e9,
            secs,
            nbytes / 1e9 / max(secs, 1e-9),
        )


class CheckpointReader:
    """Reads chunks of a megatron ``torch_dist`` checkpoint one at a time, into given tensors
    (``torch.distributed.checkpoint`` reshards: any saved layout, any requested region)."""

    def __init__(self, ckpt_dir: str | Path) -> None:
        from torch.distributed.checkpoint import FileSystemReader

        self.reader = FileSystemReader(str(ckpt_dir))
        self.metadata = self.reader.read_metadata()
        self.reader.set_up_storage_reader(self.metadata, True)

    def shape(self, key: str) -> tuple[int, ...]:
        """Global shape of the stored tensor ``key``."""
        return tuple(self.metadata.state_dict_metadata[key].size)

    def read_into(self, key: str, offsets: tuple[int, ...], dest: torch.Tensor) -> None:
        """Fill ``dest`` with the region of ``key`` at ``offsets`` (of ``dest``'s shape)."""
        from torch.distributed._shard._utils import narrow_tensor_by_index
        from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
        from torch.distributed.checkpoint.planner import LoadPlan
        from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

        if key not in self.metadata.state_dict_metadata:
            raise KeyError(f"{key} is not in the checkpoint")
        chunk = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=dest.shape)
        items = create_read_items_for_chunk_list(
            key, self.metadata.state_dict_metadata[key], [chunk]
        )

        class _Into:
            def resolve_tensor(self, ri: Any) -> torch.Tensor:
                return narrow_tensor_by_index(dest, ri.dest_offsets, ri.lengths)

            def commit_tensor(self, ri: Any, t: torch.Tensor) -> None:
                pass

        self.reader.read_data(LoadPlan(items), _Into()).wait()  # type: ignore[arg-type]

    def read_module_tensor(self, pieces: list[Piece], shape: tuple[int, ...]) -> torch.Tensor:
        """One module tensor (of ``shape``) assembled from its ``pieces``."""
        stored = self.metadata.state_dict_metadata[pieces[0].key].properties.dtype
        t = torch.empty(shape, dtype=stored)
        for p in pieces:
            view = piece_view(p, t)
            if view.untyped_storage().data_ptr() != t.untyped_storage().data_ptr():
                raise RuntimeError(f"{p.name}: chunk {p.offsets} is not a view of the tensor")
            self.read_into(p.key, p.offsets, view)
        return t


def _shard_names(n: int) -> list[str]:
    if n == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def plan_hf_shards(
    modules: list[tuple[str, tuple[int, ...]]],
    mc: ModelConfig,
    dtype: torch.dtype,
    max_shard_bytes: int,
) -> list[list[tuple[str, tuple[int, ...], str]]]:
    """The HF safetensors files of an export, planned on ``meta`` tensors: per file, its
    ``(hf name, shape, module name)`` entries in write order (files of at most
    ``max_shard_bytes`` unless one tensor is larger)."""
    esize = torch.empty((), dtype=dtype).element_size()
    shards: list[list[tuple[str, tuple[int, ...], str]]] = [[]]
    size = 0
    for name, shape in modules:
        hf = hf_maps.hf_tensors_from(name, torch.empty(shape, device="meta"), mc)
        for k, v in hf.items():
            nbytes = v.numel() * esize
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append((k, tuple(v.shape), name))
            size += nbytes
    return shards


def write_safetensors_stream(
    path: Path,
    entries: list[tuple[str, tuple[int, ...], str]],
    dtype: torch.dtype,
    produce: Callable[[str, str], torch.Tensor],
    on_bytes: Callable[[int], None] = lambda n: None,
) -> int:
    """Write one safetensors file whose header is known in advance, appending each tensor
    (``produce(module name, hf name)``) as it comes; returns the bytes of tensor data. The
    format: u64 header length, JSON header (dtype, shape, data offsets), the raw bytes."""
    esize = torch.empty((), dtype=dtype).element_size()
    header: dict[str, Any] = {}
    off = 0
    for k, shape, _ in entries:
        n = esize
        for d in shape:
            n *= d
        header[k] = {
            "dtype": _ST_DTYPES[dtype],
            "shape": list(shape),
            "data_offsets": [off, off + n],
        }
        off += n
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for k, shape, name in entries:
            t = produce(name, k)
            if tuple(t.shape) != shape or t.dtype != dtype:
                raise RuntimeError(f"{k}: got {tuple(t.shape)} {t.dtype}, planned {shape} {dtype}")
            f.write(t.contiguous().reshape(-1).view(torch.uint8).numpy().data)
            on_bytes(t.numel() * esize)
    return off


def stream_mcore_to_hf(
    ckpt_dir: Path,
    out_dir: Path,
    cfg: Any,
    mc: ModelConfig,
    *,
    dtype: torch.dtype,
    max_shard_bytes: int,
) -> tuple[Path, list[list[tuple[str, tuple[int, ...], str]]]]:
    """Megatron checkpoint -> HF safetensors files in ``out_dir`` (a fresh directory the caller
    finalises), streamed: one module tensor read and converted at a time. All ranks call (the
    files are split over them); megatron's parallel_state must be initialised for ``cfg``
    (TP=1/PP=1). Returns ``out_dir`` and the plan (for the index)."""
    reader = CheckpointReader(ckpt_dir)
    padded = reader.shape("embedding.word_embeddings.weight")[0]
    model = meta_model(cfg, vocab_size=padded)
    pieces, _ = model_pieces(model)
    by_name: dict[str, list[Piece]] = {}
    for p in pieces:
        by_name.setdefault(p.name, []).append(p)
    shapes = {
        n: tuple(t.shape) for n, t in model.state_dict().items() if isinstance(t, torch.Tensor)
    }
    plan = plan_hf_shards([(n, shapes[n]) for n in by_name], mc, dtype, max_shard_bytes)
    planned = {k for shard in plan for k, _, _ in shard}
    missing = [k for k in hf_maps.expected_hf_keys(mc) if k not in planned]
    if missing:
        raise KeyError(f"{ckpt_dir}: no Megatron tensors for {missing[:3]} ({len(missing)} in all)")
    rank, world = _rank(), _world()
    mine = [i for i in range(len(plan)) if i % world == rank]
    esize = torch.empty((), dtype=dtype).element_size()
    total = sum(esize * _numel(s) for i in mine for _, s, _ in plan[i])
    bar = progress_bar(max(1, total >> 20), enabled=rank == 0, desc="mcore-to-hf", unit="MiB")
    cache: dict[str, Any] = {"name": None, "hf": None}
    done = {"n": 0, "shown": 0}

    def produce(name: str, k: str) -> torch.Tensor:
        if cache["name"] != name:
            cache["name"], cache["hf"] = name, None
            t = reader.read_module_tensor(by_name[name], shapes[name])
            cache["hf"] = {n: v.to(dtype) for n, v in hf_maps.hf_tensors_from(name, t, mc).items()}
        return cache["hf"][k]

    def on_bytes(n: int) -> None:
        done["n"] += n
        bar.update((done["n"] >> 20) - done["shown"])
        done["shown"] = done["n"] >> 20

    t0 = time.perf_counter()
    names = _shard_names(len(plan))
    for i in mine:
        write_safetensors_stream(out_dir / names[i], plan[i], dtype, produce, on_bytes)
    cache["hf"] = None
    bar.close()
    _log_rate("mcore-to-hf", _sum_over_ranks(done["n"]), time.perf_counter() - t0)
    return out_dir, plan


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def write_hf_index(
    out_dir: Path, plan: list[list[tuple[str, tuple[int, ...], str]]], dtype: torch.dtype
) -> None:
    """``model.safetensors.index.json`` of a multi-file export (nothing for one file)."""
    if len(plan) == 1:
        return
    names = _shard_names(len(plan))
    esize = torch.empty((), dtype=dtype).element_size()
    weight_map = {k: names[i] for i, shard in enumerate(plan) for k, _, _ in shard}
    total = sum(esize * _numel(s) for shard in plan for _, s, _ in shard)
    atomic_write_json(
        out_dir / "model.safetensors.index.json",
        {"metadata": {"total_size": total}, "weight_map": weight_map},
    )


def fresh_dir(out_dir: Path) -> Path:
    """Rank 0 makes an empty ``.<name>.tmp`` beside ``out_dir``; every rank gets its path."""
    tmp = out_dir.parent / f".{out_dir.name}.tmp"
    if _rank() == 0:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    from erpd_megatron.runtime import comm

    comm.barrier()
    return tmp
