"""Megatron distributed checkpoints: atomic save / load of model, optimizer, scheduler, extras.

Layout of one checkpoint directory (``save_checkpoint``)::

    <ckpt_dir>/                 megatron dist_checkpointing (torch_dist) files
        model_config.yaml       the ModelConfig (architecture) -- required to load
        checkpoint.json         format, layout it was saved from, padded vocab, contents
        tokenizer files         copied from ``tokenizer_dir`` when given
        hf_config.json          the original HF config.json (converted checkpoints)

Tensors are stored as global tensors (layers stacked, QKV / fc1 in their unsharded
layout), so a checkpoint saved at one TP/PP loads at any other (dist_checkpointing
resharding); the padded embedding rows may differ in number and are cut or zero-filled.

Atomicity: every rank writes into ``.<name>.tmp`` beside ``ckpt_dir``; after a barrier
rank 0 renames it into place (an existing checkpoint of that name is replaced only
then). :func:`write_latest` updates a ``latest`` pointer atomically; choosing when is the
trainer's job.

Optimizer state uses ``metadata={"distrib_optim_sharding_type": ...}`` -- see
:data:`OPTIMIZER_SHARDING` (measured to save *and* load on CPU with fp32 params).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
import yaml

from erpd_megatron.config.loader import ConfigError, build_dataclass, to_dict
from erpd_megatron.config.schema import ModelConfig
from erpd_megatron.models.builder import unwrap_model
from erpd_megatron.utils.files import atomic_write_bytes, atomic_write_json, read_json, sha256_file
from erpd_megatron.utils.log import get_logger

log = get_logger(__name__)

FORMAT = "erpd-mcore-v1"
MODEL_CONFIG_FILE = "model_config.yaml"
META_FILE = "checkpoint.json"
LATEST_FILE = "latest"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "vocab.txt",
    "added_tokens.json",
    "generation_config.json",
    "chat_template.jinja",
    "chat_template.json",
)
# Sharding type of the distributed optimizer's state in checkpoints (checkpoint.json
# records it; loads use the recorded one). "dp_reshardable": every rank writes its own
# shard, no gather; reshards over DP only. "fully_reshardable": gathered on DP rank 0 at
# save; reshards over DP, TP and PP. Both save and load with fp32 (CPU) and bf16 params;
# on CPU (torch Adam, no Apex/TE) that needs the fixes in runtime/cpu_harness.py.
OPTIMIZER_SHARDING = "dp_reshardable"
OPTIMIZER_SHARDINGS = ("dp_reshardable", "fully_reshardable")


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    from erpd_megatron.runtime import comm

    comm.barrier()  # on the group's device (NCCL: the current GPU)


def _hash_part(root: Path, names: list[str]) -> dict[str, dict]:
    """Size and SHA-256 of this rank's share of ``names`` (name ``i`` goes to rank ``i % world``):
    each file is read by one rank only."""
    rank, world = _rank(), dist.get_world_size() if dist.is_initialized() else 1
    return {
        n: {"bytes": (root / n).stat().st_size, "sha256": sha256_file(root / n)}
        for i, n in enumerate(names)
        if i % world == rank
    }


def _file_names(root: Path) -> list[str]:
    return sorted(
        str(f.relative_to(root)) for f in root.rglob("*") if f.is_file() and f.name != META_FILE
    )


def verify_checkpoint_files(path: Path) -> None:
    """Check every file against the sizes and SHA-256 that ``checkpoint.json`` records (all
    ranks call; sizes on every rank, each file hashed by one rank); a damaged, truncated or
    missing file is a ValueError naming it, on every rank. Checkpoints saved before the
    digests were recorded are not checked."""
    from erpd_megatron.runtime import comm

    meta = read_json(path / META_FILE) if (path / META_FILE).exists() else {}
    files = meta.get("files")
    if not isinstance(files, dict):
        return
    problems = [f"{path / n}: missing" for n in files if not (path / n).is_file()]
    problems += [
        f"{path / n}: {(path / n).stat().st_size} bytes, {META_FILE} records {f['bytes']} "
        "(truncated "
        "or rewritten)"
        for n, f in files.items()
        if (path / n).is_file() and (path / n).stat().st_size != f["bytes"]
    ]
    if not problems:
        found = _hash_part(path, sorted(files))
        problems = [
            f"{path / n}: SHA-256 differs from the one in {path / META_FILE} (a damaged file)"
            for n, f in found.items()
            if f["sha256"] != files[n]["sha256"]
        ]
    bad = comm.any_rank(bool(problems))
    if bad:
        raise ValueError(
            "; ".join(problems or [f"{path}: another rank found a damaged file"])
            + "; re-save or re-convert this checkpoint"
        )


def iter_dir(root: str | Path, step: int) -> Path:
    """``root/iter_0000042``: the directory of the checkpoint at optimizer step ``step``."""
    return Path(root) / f"iter_{int(step):07d}"


def write_latest(root: str | Path, step: int) -> None:
    """Atomically point ``root/latest`` at ``step`` (call on one rank, after the save)."""
    atomic_write_bytes(Path(root) / LATEST_FILE, f"{int(step)}\n".encode())


def read_latest(root: str | Path) -> Optional[int]:
    """The step in ``root/latest``, or None when there is no pointer (or its checkpoint is gone)."""
    path = Path(root) / LATEST_FILE
    if not path.exists():
        return None
    text = path.read_text().strip()
    if not text.isdigit():
        raise ValueError(
            f"{path}: expected a step number, got {text!r}; delete it or fix it by hand"
        )
    step = int(text)
    if not iter_dir(root, step).is_dir():
        log.warning("%s points at step %d but %s does not exist", path, step, iter_dir(root, step))
        return None
    return step


def save_model_config(path: str | Path, mc: ModelConfig) -> None:
    """Write a ModelConfig as YAML (the architecture-only format of configs/models/)."""
    atomic_write_bytes(path, yaml.safe_dump(to_dict(mc), sort_keys=False).encode())


def read_model_config(ckpt_dir: str | Path) -> ModelConfig:
    """The ModelConfig stored beside a checkpoint; a clear error when it is missing."""
    path = Path(ckpt_dir) / MODEL_CONFIG_FILE
    if not path.exists():
        raise FileNotFoundError(
            f"{path} is missing: {ckpt_dir} is not a checkpoint written by erpd_megatron "
            "(tools/convert_checkpoint.py hf-to-mcore or the trainer write it)"
        )
    data = yaml.safe_load(path.read_text()) or {}
    return build_dataclass(ModelConfig, data, "model", {})


def copy_tokenizer_files(src: str | Path, dst: str | Path) -> list[str]:
    """Copy the tokenizer / generation-config / chat-template files present in ``src``."""
    src, dst = Path(src), Path(dst)
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    return copied


def _model_sharded_state_dict(model_chunks: list[Any]) -> dict[str, Any]:
    # Unwrapped: megatron's DDP wrapper would prefix every key with "module.", making the
    # files depend on whether the saver trained (DDP) or converted (bare GPTModel).
    chunks = [unwrap_model(c) for c in model_chunks]
    if len(chunks) == 1:
        return {"model": chunks[0].sharded_state_dict()}
    return {f"model{i}": c.sharded_state_dict() for i, c in enumerate(chunks)}


def _sharded_state_dict(
    model_chunks: list[Any],
    optimizer: Any,
    opt_param_scheduler: Any,
    extra: Optional[dict],
    *,
    loading: bool,
    sharding: str = OPTIMIZER_SHARDING,
) -> dict[str, Any]:
    sd = _model_sharded_state_dict(model_chunks)
    if optimizer is not None:
        model_sd = sd if len(model_chunks) > 1 else {"model": sd["model"]}
        # The optimizer maps its state onto the model's sharded tensors.
        sd["optimizer"] = optimizer.sharded_state_dict(
            sd["model"] if len(model_chunks) == 1 else model_sd,
            is_loading=loading,
            metadata={"distrib_optim_sharding_type": sharding},
        )
    if opt_param_scheduler is not None:
        sd["opt_param_scheduler"] = opt_param_scheduler.state_dict()
    if extra is not None:
        sd["extra"] = extra
    return sd


def _layout() -> dict[str, int]:
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        return {}
    return {
        "tp": ps.get_tensor_model_parallel_world_size(),
        "pp": ps.get_pipeline_model_parallel_world_size(),
        "dp": ps.get_data_parallel_world_size(),
        # expert-parallel size (1 for dense models): a MoE checkpoint says where it was made
        "ep": ps.get_expert_model_parallel_world_size(),
    }


def save_checkpoint(
    ckpt_dir: str | Path,
    model_chunks: list[Any],
    *,
    optimizer: Any = None,
    opt_param_scheduler: Any = None,
    extra: Optional[dict] = None,
    model_cfg: Optional[ModelConfig] = None,
    tokenizer_dir: Optional[str | Path] = None,
    hf_config: Optional[dict] = None,
    optimizer_sharding: str = OPTIMIZER_SHARDING,
) -> Path:
    """Save model chunks (+ optimizer, scheduler, ``extra``) to ``ckpt_dir`` atomically; all
    ranks call.

    ``extra`` is a picklable dict (step, epoch, data position, ...) returned by
    :func:`load_checkpoint`. ``model_cfg`` is written as ``model_config.yaml`` (needed to
    load; pass it on every save), ``tokenizer_dir``'s tokenizer files are copied beside it,
    ``hf_config`` (the original HF config.json) is kept for the HF export.
    ``optimizer_sharding``: "dp_reshardable" (default; the optimizer state reloads at another
    DP size only) or "fully_reshardable" (reloads at another TP/PP too; gathers at save).
    Scripts that call this need an ``if __name__ == "__main__":`` guard (the writer forks
    through a spawn-context Manager).
    """
    from megatron.core import dist_checkpointing

    ckpt_dir, tmp = begin_save(ckpt_dir)
    if optimizer_sharding not in OPTIMIZER_SHARDINGS:
        raise ValueError(
            f"optimizer_sharding={optimizer_sharding!r}; expected one of {OPTIMIZER_SHARDINGS}"
        )
    if optimizer is not None:
        ensure_optimizer_state(optimizer)  # a never-stepped optimizer (torch Adam) has no state
    sd = _sharded_state_dict(
        model_chunks,
        optimizer,
        opt_param_scheduler,
        extra,
        loading=False,
        sharding=optimizer_sharding,
    )
    dist_checkpointing.save(sd, str(tmp))
    gpt = unwrap_model(model_chunks[0])
    params = list(gpt.parameters())
    meta = {
        "format": FORMAT,
        "saved_layout": _layout(),
        "padded_vocab_size": getattr(gpt, "vocab_size", None),
        "params_dtype": str(params[0].dtype).removeprefix("torch.") if params else None,
        "has_optimizer": optimizer is not None,
        "optimizer_sharding": optimizer_sharding if optimizer is not None else None,
        "has_scheduler": opt_param_scheduler is not None,
    }
    return finish_save(
        ckpt_dir, tmp, meta, model_cfg=model_cfg, tokenizer_dir=tokenizer_dir, hf_config=hf_config
    )


def begin_save(ckpt_dir: str | Path) -> tuple[Path, Path]:
    """Start an atomic save (all ranks call): ``(ckpt_dir resolved, its fresh .tmp directory)``;
    the caller writes the dist-checkpoint files into the tmp directory, then :func:`finish_save`."""
    ckpt_dir = Path(ckpt_dir).resolve()
    tmp = ckpt_dir.parent / f".{ckpt_dir.name}.tmp"
    if _rank() == 0:
        ckpt_dir.parent.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    _barrier()
    return ckpt_dir, tmp


def finish_save(
    ckpt_dir: Path,
    tmp: Path,
    meta: dict,
    *,
    model_cfg: Optional[ModelConfig] = None,
    tokenizer_dir: Optional[str | Path] = None,
    hf_config: Optional[dict] = None,
) -> Path:
    """Finish a save begun with :func:`begin_save` (all ranks call): size and SHA-256 of every
    file (each hashed by one rank), ``checkpoint.json`` = ``meta`` + ``files``, the model config,
    tokenizer and HF config beside it, and the rename into place (an old one replaced)."""
    _barrier()  # every rank's files complete before they are hashed
    from erpd_megatron.runtime import comm

    digests: dict[str, dict] = {}
    for part in comm.all_gather_object(_hash_part(tmp, _file_names(tmp))):
        digests.update(part)
    if _rank() == 0:
        if model_cfg is not None:
            save_model_config(tmp / MODEL_CONFIG_FILE, model_cfg)
        if tokenizer_dir is not None:
            copy_tokenizer_files(tokenizer_dir, tmp)
        if hf_config is not None:
            atomic_write_json(tmp / "hf_config.json", hf_config)
        rest = [n for n in _file_names(tmp) if n not in digests]  # rank 0's own files above
        digests.update(
            {n: {"bytes": (tmp / n).stat().st_size, "sha256": sha256_file(tmp / n)} for n in rest}
        )
        # "files" is checked by verify_checkpoint_files at load
        atomic_write_json(tmp / META_FILE, {**meta, "files": dict(sorted(digests.items()))})
        old = ckpt_dir.parent / f".{ckpt_dir.name}.old"
        if ckpt_dir.exists():
            if old.exists():
                shutil.rmtree(old)
            ckpt_dir.rename(old)
        tmp.rename(ckpt_dir)
        if old.exists():
            shutil.rmtree(old)
        log.info("saved checkpoint %s", ckpt_dir)
    _barrier()
    return ckpt_dir


def check_checkpoint_dir(ckpt_dir: str | Path) -> Path:
    """Raise a clear FileNotFoundError unless ``ckpt_dir`` is a megatron dist checkpoint."""
    path = Path(ckpt_dir)
    if not path.is_dir():
        hint = ""
        if path.parent.is_dir() and (path.parent / LATEST_FILE).exists():
            hint = (
                f" ({path.parent / LATEST_FILE} exists: did you mean an iter_XXXXXXX subdirectory?)"
            )
        raise FileNotFoundError(f"checkpoint directory {path} does not exist{hint}")
    if not (
        path / "metadata.json"
    ).exists():  # what dist_checkpointing.check_is_distributed_checkpoint reads
        latest = read_latest(path) if (path / LATEST_FILE).exists() else None
        hint = (
            f"; it has a `latest` pointer: load {iter_dir(path, latest)}"
            if latest is not None
            else ""
        )
        if (path / "config.json").exists():
            hint = (
                "; it looks like an HF checkpoint: convert it with tools/convert_checkpoint.py "
                "hf-to-mcore"
            )
        raise FileNotFoundError(f"{path} is not a megatron distributed checkpoint{hint}")
    return path


def check_model_matches(
    ckpt_cfg: ModelConfig, model_cfg: Optional[ModelConfig], gpt: Any, ckpt_dir: Path
) -> None:
    """Compare the checkpoint's architecture with the model about to receive it."""
    if model_cfg is not None:
        fields = (
            "family",
            "num_layers",
            "hidden_size",
            "ffn_hidden_size",
            "num_attention_heads",
            "num_query_groups",
            "kv_channels",
            "vocab_size",
            "add_qkv_bias",
            "qk_layernorm",
            "tie_word_embeddings",
        )
        from erpd_megatron.config.validate import head_dim

        def value(mc: ModelConfig, f: str) -> Any:
            return (
                head_dim(mc) if f == "kv_channels" else getattr(mc, f)
            )  # None means hidden / heads

        diffs = [
            f"{f}: checkpoint {value(ckpt_cfg, f)!r} vs model {value(model_cfg, f)!r}"
            for f in fields
            if value(ckpt_cfg, f) != value(model_cfg, f)
        ]
        if diffs:
            kind = (
                "vocabulary mismatch"
                if any(d.startswith("vocab_size") for d in diffs)
                else "architecture mismatch"
            )
            raise ConfigError(f"{ckpt_dir}: {kind}: " + "; ".join(diffs))
    padded = getattr(gpt, "vocab_size", None)
    if padded is not None and padded < ckpt_cfg.vocab_size:
        raise ConfigError(
            f"{ckpt_dir}: vocabulary mismatch: checkpoint has {ckpt_cfg.vocab_size} tokens but "
            "the model "
            f"only {padded} embedding rows"
        )


def load_checkpoint(
    ckpt_dir: str | Path,
    model_chunks: list[Any],
    *,
    optimizer: Any = None,
    opt_param_scheduler: Any = None,
    strict: bool = True,
    model_cfg: Optional[ModelConfig] = None,
) -> dict:
    """Load a checkpoint into model chunks (+ optimizer, scheduler); return its ``extra`` dict.

    Works at any TP/PP/DP (resharding). ``strict``: every tensor the model (and optimizer)
    asks for must be in the checkpoint. ``model_cfg`` is compared with the checkpoint's
    ``model_config.yaml`` (architecture and vocabulary mismatches are a ConfigError).
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    path = check_checkpoint_dir(ckpt_dir)
    verify_checkpoint_files(path)
    ckpt_cfg = read_model_config(path)
    check_model_matches(ckpt_cfg, model_cfg, unwrap_model(model_chunks[0]), path)
    meta = read_json(path / META_FILE) if (path / META_FILE).exists() else {}
    if optimizer is not None and not meta.get("has_optimizer", True):
        raise ValueError(
            f"{path} has no optimizer state (a converted or model-only checkpoint); "
            "load it without optimizer= and start the optimizer fresh"
        )
    if optimizer is not None:
        _patch_torch_adam_if_needed()
        ensure_optimizer_state(optimizer)
    sharding = meta.get("optimizer_sharding") or OPTIMIZER_SHARDING
    if optimizer is not None and sharding == "dp_reshardable":
        saved = meta.get("saved_layout", {})
        now = _layout()
        if saved and (saved.get("tp"), saved.get("pp")) != (now.get("tp"), now.get("pp")):
            raise ValueError(
                f"{path}: its optimizer state was saved as dp_reshardable at TP={saved.get('tp')} "
                f"PP={saved.get('pp')} and cannot load at TP={now.get('tp')} PP={now.get('pp')}; "
                "load the "
                "model only (optimizer=None), or save with optimizer_sharding='fully_reshardable'"
            )
    sd = _sharded_state_dict(model_chunks, optimizer, None, None, loading=True, sharding=sharding)
    _drop_absent_extra_state(sd, path)
    handling = StrictHandling.RAISE_UNEXPECTED if strict else StrictHandling.LOG_UNEXPECTED
    loaded = dist_checkpointing.load(sd, str(path), strict=handling)
    common = dist_checkpointing.load_common_state_dict(str(path))
    for i, chunk in enumerate(model_chunks):
        key = "model" if len(model_chunks) == 1 else f"model{i}"
        _load_module_state(chunk, loaded[key], strict)
    if optimizer is not None:
        with torch.no_grad():  # fp32 main params are views of leaf parameters
            optimizer.load_state_dict(loaded["optimizer"])
    if opt_param_scheduler is not None:
        if "opt_param_scheduler" not in common:
            raise ValueError(f"{path} has no scheduler state")
        opt_param_scheduler.load_state_dict(common["opt_param_scheduler"])
    log.info("loaded checkpoint %s", path)
    return dict(common.get("extra") or {})


def _drop_absent_extra_state(sd: dict, path: Path) -> None:
    """Do not ask for module ``_extra_state`` objects the checkpoint lacks.

    A checkpoint converted on a CPU (local spec) has no Transformer Engine extra state
    (FP8 scaling metadata) for modules that only TE has; the model keeps its fresh state.
    Tensor keys are identical between the two specs (megatron names the local spec's norms
    after TE's fused ones).
    """
    from megatron.core.dist_checkpointing.mapping import ShardedObject
    from megatron.core.dist_checkpointing.serialization import load_sharded_metadata

    present = set(load_sharded_metadata(str(path)).keys())
    for name in [k for k in sd if k.startswith("model")]:
        chunk = sd[name]
        absent = [
            k
            for k, v in chunk.items()
            if isinstance(v, ShardedObject)
            and v.key.endswith("_extra_state")
            and v.unique_key not in present
        ]
        for k in absent:
            del chunk[k]
        if absent:
            log.info(
                "%s: %d _extra_state objects not in the checkpoint; keeping the model's own",
                path,
                len(absent),
            )


def _patch_torch_adam_if_needed() -> None:
    """megatron's DistributedOptimizer falls back to torch's Adam without Apex / TE, whose
    checkpoint load is broken in megatron-core 0.16 (see the CPU harness); patch it then."""
    from megatron.core.optimizer import distrib_optimizer

    if not getattr(distrib_optimizer, "HAVE_APEX_OR_TE", True):
        from erpd_megatron.runtime.cpu_harness import patch_torch_adam_distributed_optimizer

        patch_torch_adam_distributed_optimizer()


def ensure_optimizer_state(optimizer: Any) -> None:
    """Give a fresh optimizer zero Adam state (``exp_avg``, ``exp_avg_sq``, ``step=0``).

    megatron's DistributedOptimizer.state_dict() with torch's Adam (no Apex / TE, e.g. on a
    CPU) asserts that every parameter has a ``step``, which a never-stepped optimizer lacks,
    so saving it or loading into it fails; megatron's own ``init_state_fn`` omits ``step``.
    Zero moments with step 0 are exactly a fresh Adam; on load they are overwritten.
    """
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if not isinstance(inner, torch.optim.Optimizer):
            continue
        for group in inner.param_groups:
            for p in group["params"]:
                st = inner.state[p]
                if isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)):
                    st.setdefault("exp_avg", torch.zeros_like(p.data))
                    st.setdefault("exp_avg_sq", torch.zeros_like(p.data))
                    st.setdefault("step", torch.tensor(0.0))


def _load_module_state(chunk: Any, state: dict, strict: bool) -> None:
    res = unwrap_model(chunk).load_state_dict(state, strict=False)
    missing = [k for k in res.missing_keys if not k.endswith("_extra_state")]
    unexpected = [k for k in res.unexpected_keys if not k.endswith("_extra_state")]
    if strict and (missing or unexpected):
        raise RuntimeError(
            f"checkpoint does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )


def state_dict_on_cpu(model_chunks: list[Any]) -> dict[str, torch.Tensor]:
    """The tensors of a one-chunk model as CPU tensors (no ``_extra_state``), for tests/export."""
    sd = unwrap_model(model_chunks[0]).state_dict()
    return {k: v.detach().cpu() for k, v in sd.items() if isinstance(v, torch.Tensor)}
