"""The ``hf`` engine: sampling with a transformers causal LM and its KV cache.

The decoding loop is ours rather than ``model.generate`` so that the semantics are explicit
and independent of a checkpoint's ``generation_config.json`` (Qwen ships top_k=20,
top_p=0.95, temperature=0.6 there, which ``generate`` would silently apply):

* prompts are left-padded into a batch (position ids from the attention mask) and
  pre-filled **once** each; the KV cache is then repeated for the prompt's samples;
* each step takes the last logits in float32, divides by the temperature, masks the
  top-p tail, samples from ``softmax`` with a seeded ``torch.Generator`` and records the
  sampled token's ``log_softmax`` under exactly that distribution (so at temperature 1 and
  top_p 1 it is the model's own log-prob, which a teacher-forced pass reproduces);
* finished rows are dropped from the batch and the cache (no compute on padding tails).

A batch holds up to ``batch_size`` sequences; prompts are ordered by length so batches
have little padding. Randomness is seeded per call and per batch, so the same call gives
the same samples on the same machine.
"""

from __future__ import annotations

import inspect
import time
from typing import Any

import torch

from erpd_megatron.rollout.engines import Completion, RolloutEngine, derive_seed
from erpd_megatron.utils.log import get_logger

log = get_logger(__name__)

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Set logits outside the nucleus to -inf: keep the smallest set of most likely tokens
    whose probability reaches ``top_p`` (the most likely token is always kept)."""
    if top_p >= 1.0:
        return logits
    sorted_logits, idx = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    before = torch.cumsum(probs, dim=-1) - probs  # mass of strictly more likely tokens
    remove_sorted = before >= top_p
    remove_sorted[..., 0] = False
    remove = torch.zeros_like(remove_sorted).scatter(-1, idx, remove_sorted)
    return logits.masked_fill(remove, float("-inf"))


def sample_step(
    logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one token per row from ``logits`` ([B, V]); returns (tokens, their log-probs
    under the sampling distribution). ``temperature=0`` is greedy (log-prob of the raw logits)."""
    logits = logits.float()
    if temperature <= 0:
        tokens = logits.argmax(dim=-1)
        logp = torch.log_softmax(logits, dim=-1)
    else:
        if temperature != 1.0:
            logits = logits / temperature
        logp = torch.log_softmax(top_p_filter(logits, top_p), dim=-1)
        tokens = torch.multinomial(logp.exp(), 1, generator=generator).squeeze(-1)
    return tokens, logp.gather(-1, tokens[:, None]).squeeze(-1)


class HFEngine(RolloutEngine):
    """Transformers generation (see module doc). ``device``/``dtype`` "auto": CUDA + bf16
    when a GPU is present, else CPU + fp32."""

    name = "hf"
    logprobs_mode = "processed"

    def __init__(
        self,
        model_path: str,
        *,
        eos_token_ids: list[int],
        pad_token_id: int,
        batch_size: int = 32,
        device: str = "auto",
        dtype: str = "auto",
        model: Any = None,
    ) -> None:
        from transformers import AutoModelForCausalLM

        self.device = torch.device(
            "cuda"
            if device == "auto" and torch.cuda.is_available()
            else ("cpu" if device == "auto" else device)
        )
        if dtype == "auto":
            torch_dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        else:
            torch_dtype = _DTYPES[dtype]
        if model is None:
            model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch_dtype)
        self.model = model.to(self.device).eval()
        self.eos = torch.tensor(sorted(set(eos_token_ids)), device=self.device)
        self.pad_token_id = pad_token_id
        self.batch_size = max(1, batch_size)
        params = inspect.signature(self.model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._keep_kw = "logits_to_keep" if "logits_to_keep" in params else None
        self.tokens_generated = 0
        self.seconds = 0.0

    def close(self) -> None:
        """Drop the model."""
        self.model = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _forward(
        self, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, cache: Any
    ) -> torch.Tensor:
        kwargs = {
            "input_ids": ids,
            "attention_mask": mask,
            "position_ids": pos,
            self._cache_kw: cache,
            "use_cache": True,
        }
        if self._keep_kw:
            kwargs[self._keep_kw] = 1
        return self.model(**kwargs).logits[:, -1, :]

    @torch.inference_mode()
    def _generate_batch(
        self,
        prompts: list[list[int]],
        counts: list[int],
        *,
        temperature: float,
        top_p: float,
        max_new_tokens: int,
        generator: torch.Generator | None,
    ) -> list[Completion]:
        """Sample ``counts[i]`` completions of ``prompts[i]``; returns them prompt-major."""
        from transformers import DynamicCache

        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
            mask[i, width - len(p) :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        try:
            cache = DynamicCache(config=self.model.config)
        except TypeError:  # transformers < 4.56
            cache = DynamicCache()
        logits = self._forward(ids, mask, pos, cache)
        rows = torch.repeat_interleave(
            torch.arange(len(prompts), device=self.device), torch.tensor(counts, device=self.device)
        )
        cache.batch_select_indices(rows)
        logits, mask, last_pos = logits[rows], mask[rows], pos[rows, -1]
        total = len(rows)
        out_tokens: list[list[int]] = [[] for _ in range(total)]
        out_lps: list[list[float]] = [[] for _ in range(total)]
        stopped = [False] * total
        alive = torch.arange(total, device=self.device)  # original row of each live row
        for step in range(max_new_tokens):
            tokens, lps = sample_step(logits, temperature, top_p, generator)
            is_eos = torch.isin(tokens, self.eos)
            for r, t, lp, e in zip(alive.tolist(), tokens.tolist(), lps.tolist(), is_eos.tolist()):
                out_tokens[r].append(t)
                out_lps[r].append(lp)
                stopped[r] = e
            if step == max_new_tokens - 1:
                break
            keep = ~is_eos
            if not bool(keep.any()):
                break
            if not bool(keep.all()):
                idx = keep.nonzero().squeeze(-1)
                cache.batch_select_indices(idx)
                alive, tokens, mask, last_pos = alive[idx], tokens[idx], mask[idx], last_pos[idx]
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            last_pos = last_pos + 1
            logits = self._forward(tokens[:, None], mask, last_pos[:, None], cache)
        return [
            Completion(out_tokens[r], out_lps[r], "stop" if stopped[r] else "length")
            for r in range(total)
        ]

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
        """See :meth:`RolloutEngine.generate`."""
        if self.model is None:
            raise RuntimeError("engine is closed")
        if n <= 0 or max_new_tokens <= 0:
            raise ValueError(
                f"n and max_new_tokens must be positive (n={n}, max_new_tokens={max_new_tokens})"
            )
        if any(len(p) == 0 for p in prompt_token_ids):
            raise ValueError("empty prompt (no token ids)")
        # Work items (prompt, samples) in prompt-length order; a prompt's n samples may span
        # batches.
        order = sorted(range(len(prompt_token_ids)), key=lambda i: (len(prompt_token_ids[i]), i))
        items: list[tuple[int, int]] = []
        for i in order:
            left = n
            while left:
                take = min(left, self.batch_size)
                items.append((i, take))
                left -= take
        batches: list[list[tuple[int, int]]] = []
        cur: list[tuple[int, int]] = []
        for it in items:
            if cur and sum(c for _, c in cur) + it[1] > self.batch_size:
                batches.append(cur)
                cur = []
            cur.append(it)
        if cur:
            batches.append(cur)
        results: list[list[Completion]] = [[] for _ in prompt_token_ids]
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(
                total=len(prompt_token_ids) * n, desc="generate (hf)", unit="seq", leave=False
            )
        t0, new_tokens = time.perf_counter(), 0
        for b, batch in enumerate(batches):
            gen = torch.Generator(device=self.device)
            gen.manual_seed(derive_seed(seed, "batch", b))
            comps = self._generate_batch(
                [prompt_token_ids[i] for i, _ in batch],
                [c for _, c in batch],
                temperature=temperature,
                top_p=top_p,
                max_new_tokens=max_new_tokens,
                generator=gen,
            )
            k = 0
            for i, c in batch:
                results[i].extend(comps[k : k + c])
                k += c
            new_tokens += sum(len(c.token_ids) for c in comps)
            if bar is not None:
                bar.update(len(comps))
                bar.set_postfix(tok_s=f"{new_tokens / max(time.perf_counter() - t0, 1e-9):.0f}")
        if bar is not None:
            bar.close()
        self.tokens_generated += new_tokens
        self.seconds += time.perf_counter() - t0
        return results


__all__ = ["HFEngine", "sample_step", "top_p_filter"]
