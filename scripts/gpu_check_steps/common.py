"""Shared pieces of scripts/gpu_check.py: paths, the child-process runner, random inputs
(a random Qwen3, random rollouts) and :class:`Check`, the step runner and its summary."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
TINY = ROOT / "configs/recipes/tiny-cpu.yaml"
H100_BF16_DENSE_FLOPS = 989e12  # H100/H200 SXM dense bf16 peak (NVIDIA datasheet), for MFU


class StepFailed(RuntimeError):
    """A step's check did not hold; the message is its figure."""


def _env() -> dict[str, str]:
    e = dict(os.environ, PYTHONWARNINGS="ignore", PYTHONUNBUFFERED="1")
    e["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), e.get("PYTHONPATH", "")) if p)
    return e


def run(cmd: list[str], log: Path, timeout: float, *, nproc: int = 1) -> str:
    """Run a command (torchrun with ``nproc`` > 1), output to ``log``; StepFailed on a non-zero
    exit."""
    from erpd_megatron.pipeline.runner import python_command

    cmd = python_command(nproc) + cmd[1:]
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        try:
            code = subprocess.run(
                cmd, env=_env(), cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, timeout=timeout
            ).returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    text = log.read_text(errors="replace")
    if code != 0:
        tail = "\n".join(text.splitlines()[-25:])
        raise StepFailed(
            f"`{' '.join(cmd[:6])} ...` exited {code} after {time.perf_counter() - t0:.0f}s "
            f"(log {log}):\n{tail}"
        )
    return text


def child_result(text: str) -> dict[str, Any]:
    """The last ``RESULT {json}`` line of a child's output."""
    lines = [x for x in text.splitlines() if x.startswith("RESULT ")]
    if not lines:
        raise StepFailed("the child printed no RESULT line")
    return json.loads(lines[-1][len("RESULT ") :])


def read_jsonl(path: Path) -> list[dict]:
    """Records of a JSONL file (empty when missing)."""
    return (
        [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []
    )


# ------------------------------------------------------------------------------ inputs


def save_random_qwen3(out: Path, *, vocab: int = 512, seed: int = 0) -> Path:
    """A small random HF Qwen3 (qk-norm, GQA, head_dim 64: vLLM's and TE's kernels take it) with
    a word-level tokenizer and a generation config."""
    import torch
    import transformers as tf
    from tokenizers import Tokenizer, models, pre_tokenizers

    cfg = tf.Qwen3Config(
        hidden_size=256,
        intermediate_size=512,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        num_hidden_layers=2,
        vocab_size=vocab,
        max_position_embeddings=1024,
        rope_theta=1e6,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        bos_token_id=vocab - 2,
        eos_token_id=vocab - 1,
    )
    torch.manual_seed(seed)
    model = tf.Qwen3ForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.05)
    model.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    words = {f"w{i}": i for i in range(vocab - 3)}
    words.update({"<unk>": vocab - 3, "<s>": vocab - 2, "</s>": vocab - 1})
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tf.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    ).save_pretrained(out)
    return out


def write_random_rollouts(
    out: Path, *, vocab: int, prompts: int, group: int, max_len: int, seed: int = 0
) -> Path:
    """A rollout set of random sequences (prompts and responses of max_len // 4 up to below
    max_len // 2 tokens) with a learnable reward (first response token even); an existing one
    (a rerun with the same ``--out``) is reused."""
    if (out / "manifest.json").exists():
        return out

    from erpd_megatron.data.synthetic import write_synthetic_rollouts

    lengths = (max_len // 4, max_len // 2 - 1)
    write_synthetic_rollouts(
        out,
        prompts=prompts,
        group=group,
        vocab=vocab,
        prompt_len=lengths,
        response_len=lengths,
        seed=seed,
        prompts_per_shard=max(1, prompts // 2),
    )
    return out


# ------------------------------------------------------------------------------ child modes


class Check:
    """The steps of one run, their results and the summary."""

    def __init__(self, out: Path, cpu_dry: bool, budget: float = 1e9) -> None:
        self.out, self.cpu_dry, self.budget = out, cpu_dry, budget
        self.results: list[dict[str, Any]] = []
        self.t0 = time.perf_counter()
        self.over_budget = False

    def step(
        self, name: str, fn: Callable[[], tuple[str, dict[str, Any]]], *, skip: str | None = None
    ) -> bool:
        """Run one step; print PASS/FAIL/SKIP with its figure."""
        t0 = time.perf_counter()
        if not skip and t0 - self.t0 > self.budget:
            skip = f"over the time budget ({self.budget:.0f}s): not run"
            self.over_budget = True
        if skip:
            status, figure, data = "SKIP", skip, {}
        else:
            try:
                figure, data = fn()
                status = "PASS"
            except Exception as e:  # every failure is a FAIL line, the run goes on
                status, figure, data = "FAIL", f"{type(e).__name__}: {e}", {}
        secs = time.perf_counter() - t0
        print(f"{status} {name}: {figure} ({secs:.0f}s)", flush=True)
        self.results.append(
            {"step": name, "status": status, "figure": figure, "seconds": round(secs, 1), **data}
        )
        return status == "PASS"

    def summary(self) -> dict[str, Any]:
        """The JSON summary (also written to ``out/summary.json``)."""
        import torch

        counts = {s: sum(r["status"] == s for r in self.results) for s in ("PASS", "FAIL", "SKIP")}
        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
        s = {
            "mode": "cpu-dry" if self.cpu_dry else "gpu",
            "gpu": gpu,
            "ok": counts["FAIL"] == 0 and not self.over_budget,
            "over_budget": self.over_budget,
            **counts,
            "seconds": round(time.perf_counter() - self.t0, 1),
            "steps": self.results,
        }
        (self.out / "summary.json").write_text(json.dumps(s, indent=1))
        return s
