"""Generation engines behind one interface, and the HF-checkpoint helpers they share.

An engine samples ``n`` completions for each tokenised prompt and reports, for every
sampled token, its log-probability under the sampling distribution::

    with make_engine(cfg.rollout, tokenizer) as engine:
        groups = engine.generate(prompt_token_ids, n=16, temperature=1.0, top_p=1.0,
                                 max_new_tokens=1024, seed=7)
    groups[i][j].token_ids, groups[i][j].logprobs, groups[i][j].finish_reason

Engines: ``hf`` (:class:`~erpd_megatron.rollout.hf_engine.HFEngine`, transformers with a KV
cache; the CPU default) and ``vllm`` (:class:`~erpd_megatron.rollout.vllm_engine.VLLMEngine`,
offline ``LLM`` with tensor parallelism within a node; needs the ``[gpu]`` extra). Both are
seeded per call; the hf engine is bit-reproducible for the same call on the same machine.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from erpd_megatron.config.schema import RolloutConfig

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "spiece.model",
)
WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin", "model*.bin")


class CheckpointError(ValueError):
    """An HF checkpoint or tokenizer directory is unusable; the message says what is missing."""


class EngineError(RuntimeError):
    """An engine cannot run here (no GPU for vLLM, too few GPUs for its tensor parallel size)."""


@dataclass
class Completion:
    """One sampled response."""

    token_ids: list[int]
    """Sampled token ids (the EOS token included when the sample stopped on it)."""
    logprobs: list[float]
    """Log-prob of each sampled token under the sampling distribution (same length)."""
    finish_reason: str
    """"stop" (an EOS token was sampled) or "length" (max_new_tokens reached)."""


class RolloutEngine(ABC):
    """The engine interface shared by rollouts and evaluation."""

    name: str = "base"
    """Engine name recorded in manifests."""
    logprobs_mode: str = "processed"
    """"processed": log-probs after temperature / top-p (the sampling distribution);
    "raw": of the model's logits (vLLM V1 default). They coincide at temperature 1, top_p 1."""

    @abstractmethod
    def generate(
        self,
        prompt_token_ids: list[list[int]],
        n: int,
        *,
        temperature: float = 1.0,
        top_p: float = 1.0,
        max_new_tokens: int = 1024,
        seed: int = 0,
        progress: bool = True,
    ) -> list[list[Completion]]:
        """Sample ``n`` completions per prompt; returns one list of ``n`` per prompt, in order.

        ``temperature=0`` is greedy decoding (log-probs then of the raw distribution).
        """

    def close(self) -> None:  # noqa: B027 - optional hook, a no-op by default
        """Release the model (GPU memory)."""

    def __enter__(self) -> RolloutEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def derive_seed(seed: int, *parts: object) -> int:
    """A 63-bit seed derived from ``seed`` and labels (shard, batch, prompt) by hashing."""
    text = ":".join(str(p) for p in (seed, *parts))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") & ((1 << 63) - 1)


# ---------------------------------------------------------------------------- checkpoints


def check_hf_checkpoint(path: str | None) -> None:
    """Raise :class:`CheckpointError` unless ``path`` is a local HF model directory with
    ``config.json`` and weights (hub names are left to transformers / vLLM)."""
    if not path:
        raise CheckpointError(
            "rollout.model_path is not set: give an HF-format checkpoint directory"
        )
    p = Path(path).expanduser()
    if not p.exists():
        if path.startswith((".", "/", "~")) or path.count("/") != 1:
            raise CheckpointError(f"rollout.model_path {path}: no such directory")
        return  # an "org/name" hub id (e.g. Qwen/Qwen2.5-7B), left to transformers / vLLM
    if not p.is_dir():
        raise CheckpointError(f"rollout.model_path {path}: not a directory")
    if not (p / "config.json").exists():
        raise CheckpointError(
            f"{path}: no config.json; is this an HF-format checkpoint (save_pretrained)? "
            "Megatron checkpoints must be converted with tools/convert_checkpoint.py first"
        )
    if not any(any(p.glob(pat)) for pat in WEIGHT_PATTERNS):
        raise CheckpointError(f"{path}: no weight files ({', '.join(WEIGHT_PATTERNS)})")


def load_tokenizer(path: str) -> Any:
    """Load the tokenizer of a checkpoint, with a clear error when it has none.

    A missing pad token is set to the EOS token (generation pads on the left).
    """
    from transformers import AutoTokenizer

    p = Path(path).expanduser()
    if p.is_dir() and not any((p / f).exists() for f in TOKENIZER_FILES):
        raise CheckpointError(
            f"{path}: no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...); save one with "
            f"tokenizer.save_pretrained('{path}') or set rollout.tokenizer_path"
        )
    try:
        tok = AutoTokenizer.from_pretrained(str(p) if p.exists() else path)
    except Exception as e:
        raise CheckpointError(
            f"{path}: the tokenizer cannot be loaded ({type(e).__name__}: {e})"
        ) from e
    if tok.pad_token_id is None:
        if tok.eos_token_id is None:
            raise CheckpointError(f"{path}: the tokenizer has neither a pad nor an EOS token")
        tok.pad_token = tok.eos_token
    return tok


def eos_token_ids(model_path: str, tokenizer: Any) -> list[int]:
    """Stop tokens: the tokenizer's EOS plus the checkpoint's ``generation_config.eos_token_id``
    (which may be a list, e.g. Qwen instruct models stop on ``<|im_end|>`` and
    ``<|endoftext|>``)."""
    ids: list[int] = []
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    gen = Path(model_path).expanduser() / "generation_config.json"
    if gen.exists():
        import json

        value = json.loads(gen.read_text()).get("eos_token_id")
        for v in value if isinstance(value, list) else [value]:
            if v is not None and int(v) not in ids:
                ids.append(int(v))
    if not ids:
        raise CheckpointError(
            f"{model_path}: no EOS token in the tokenizer or generation_config.json"
        )
    return ids


def model_fingerprint(
    path: str, *, full_hash_below: int = 64 << 20, edge_bytes: int = 4 << 20
) -> str:
    """A quick content fingerprint of a checkpoint directory
    (:func:`erpd_megatron.utils.files.dir_fingerprint`); a hub id gives ``"hub:<id>"``."""
    from erpd_megatron.utils.files import dir_fingerprint

    p = Path(path).expanduser()
    if not p.is_dir():
        return f"hub:{path}"
    return dir_fingerprint(p, full_hash_below=full_hash_below, edge_bytes=edge_bytes)


# ---------------------------------------------------------------------------- factory


def make_engine(
    rc: RolloutConfig, tokenizer: Any, *, model_path: str | None = None
) -> RolloutEngine:
    """Build the engine ``rc.engine`` for ``rc.model_path`` (or ``model_path``)."""
    path = model_path or rc.model_path
    check_hf_checkpoint(path)
    assert path is not None
    stops = eos_token_ids(path, tokenizer)
    if rc.engine == "hf":
        from erpd_megatron.rollout.hf_engine import HFEngine

        return HFEngine(
            path,
            eos_token_ids=stops,
            pad_token_id=int(tokenizer.pad_token_id),
            batch_size=rc.batch_size,
            device=rc.hf_device,
            dtype=rc.hf_dtype,
        )
    if rc.engine == "vllm":
        from erpd_megatron.rollout.vllm_engine import VLLMEngine

        return VLLMEngine(
            path,
            eos_token_ids=stops,
            tokenizer_path=rc.tokenizer_path,
            tensor_parallel_size=rc.vllm_tensor_parallel_size,
            gpu_memory_utilization=rc.vllm_gpu_memory_utilization,
            dtype=rc.vllm_dtype,
            max_model_len=rc.max_prompt_tokens + rc.max_new_tokens,
            seed=rc.seed,
        )
    raise ValueError(f"unknown rollout.engine '{rc.engine}' (hf or vllm)")


__all__ = [
    "CheckpointError",
    "Completion",
    "EngineError",
    "RolloutEngine",
    "check_hf_checkpoint",
    "derive_seed",
    "eos_token_ids",
    "load_tokenizer",
    "make_engine",
    "model_fingerprint",
]
