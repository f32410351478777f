"""The ``vllm`` engine: offline ``vllm.LLM`` on the GPUs of one node (tensor parallel).

vLLM is imported lazily; without it (or without a GPU) building the engine is a clear error
naming the ``[gpu]`` extra. Sampling is ``SamplingParams(n, temperature, top_p, max_tokens,
logprobs=0, seed)`` per prompt, with the checkpoint's EOS tokens as stop tokens and no other
processing (no top-k, no penalties, whatever the checkpoint's generation config says).
``logprobs=0`` returns the sampled token's log-prob. vLLM V1 reports log-probs of the raw
logits unless the engine is built with ``logprobs_mode="processed_logprobs"``; this engine
asks for processed log-probs and, on a vLLM that lacks the option, falls back to raw and
records ``logprobs_mode = "raw"`` (identical at temperature 1, top_p 1, the rollout setting).
Each prompt's requests are seeded from the call's seed and the prompt's index, so results do
not depend on how vLLM schedules the batch.
"""

from __future__ import annotations

import importlib
import math
from typing import Any

from erpd_megatron.rollout.engines import Completion, EngineError, RolloutEngine, derive_seed
from erpd_megatron.utils.log import get_logger

log = get_logger(__name__)

GPU_EXTRA_HINT = "install the GPU extra: pip install -e '.[gpu]' (vllm, transformer-engine)"


def import_vllm() -> Any:
    """Import vllm or raise an ImportError that names the ``[gpu]`` extra."""
    try:
        return importlib.import_module("vllm")
    except ImportError as e:
        raise ImportError(f"rollout.engine=vllm needs vLLM, which is not installed ({e}); {GPU_EXTRA_HINT}, "
                          "or use rollout.engine=hf") from e


def _construct(factory: Any, kwargs: dict[str, Any], optional: tuple[str, ...]) -> tuple[Any, set[str]]:
    """Call ``factory(**kwargs)``, dropping optional keywords an older vLLM rejects."""
    dropped: set[str] = set()
    while True:
        try:
            return factory(**kwargs), dropped
        except TypeError as e:
            bad = next((k for k in optional if k in kwargs and k in str(e)), None)
            if bad is None:
                raise
            dropped.add(bad)
            kwargs = {k: v for k, v in kwargs.items() if k != bad}


class VLLMEngine(RolloutEngine):
    """vLLM offline inference (see module doc)."""

    name = "vllm"

    def __init__(self, model_path: str, *, eos_token_ids: list[int], tokenizer_path: str | None = None,
                 tensor_parallel_size: int = 1, gpu_memory_utilization: float = 0.85, dtype: str = "bfloat16",
                 max_model_len: int | None = None, seed: int = 0) -> None:
        vllm = import_vllm()
        import torch

        if not torch.cuda.is_available():
            raise EngineError("rollout.engine=vllm needs a CUDA GPU and none is visible; use rollout.engine=hf")
        if torch.cuda.device_count() < tensor_parallel_size:
            raise EngineError(f"rollout.vllm_tensor_parallel_size={tensor_parallel_size} but only "
                               f"{torch.cuda.device_count()} GPUs are visible")
        self._vllm = vllm
        self.eos_token_ids = list(eos_token_ids)
        kwargs = dict(model=model_path, tokenizer=tokenizer_path or model_path,
                      tensor_parallel_size=tensor_parallel_size, gpu_memory_utilization=gpu_memory_utilization,
                      dtype=dtype, seed=seed, max_model_len=max_model_len,
                      logprobs_mode="processed_logprobs", generation_config="vllm")
        self.llm, dropped = _construct(vllm.LLM, kwargs, ("logprobs_mode", "generation_config"))
        self.logprobs_mode = "raw" if "logprobs_mode" in dropped else "processed"
        if "logprobs_mode" in dropped:
            log.warning("this vLLM has no logprobs_mode; recorded log-probs are of the raw logits "
                        "(equal to the sampling distribution only at temperature 1, top_p 1)")

    def close(self) -> None:
        """Drop the LLM (frees GPU memory when nothing else holds it)."""
        self.llm = None
        try:
            import gc

            import torch

            gc.collect()
            torch.cuda.empty_cache()
        except Exception:  # best effort
            pass

    def generate(self, prompt_token_ids: list[list[int]], n: int, *, temperature: float = 1.0,
                 top_p: float = 1.0, max_new_tokens: int = 1024, seed: int = 0,
                 progress: bool = True) -> list[list[Completion]]:
        """See :meth:`RolloutEngine.generate`."""
        if self.llm is None:
            raise RuntimeError("engine is closed")
        sp = self._vllm.SamplingParams
        params = []
        for i in range(len(prompt_token_ids)):
            kw = dict(n=n, temperature=temperature, top_p=top_p, max_tokens=max_new_tokens,
                      logprobs=0, seed=derive_seed(seed, "prompt", i) % (2**31), stop_token_ids=self.eos_token_ids,
                      detokenize=False)
            params.append(_construct(sp, kw, ("detokenize",))[0])
        prompts = [{"prompt_token_ids": list(p)} for p in prompt_token_ids]
        outputs = self.llm.generate(prompts, params, use_tqdm=progress)
        return [[completion_from_vllm(c) for c in out.outputs] for out in outputs]


def completion_from_vllm(c: Any) -> Completion:
    """Convert one vLLM ``CompletionOutput`` (with ``logprobs=0``) to a :class:`Completion`."""
    token_ids = [int(t) for t in c.token_ids]
    if c.logprobs is None:
        raise RuntimeError("vLLM returned no log-probs; SamplingParams(logprobs=0) was ignored")
    lps = []
    for t, entry in zip(token_ids, c.logprobs):
        lp = entry[t]
        lps.append(float(getattr(lp, "logprob", lp)))
    if len(lps) != len(token_ids):
        raise RuntimeError(f"vLLM returned {len(lps)} log-probs for {len(token_ids)} tokens")
    reason = "length" if c.finish_reason == "length" else "stop"
    if any(math.isnan(x) for x in lps):
        log.warning("vLLM returned NaN log-probs")
    return Completion(token_ids, lps, reason)


__all__ = ["GPU_EXTRA_HINT", "VLLMEngine", "completion_from_vllm", "import_vllm"]
