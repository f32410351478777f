"""The vLLM worker process behind :class:`~erpd_megatron.rollout.vllm_engine.VLLMEngine`.

    python -m erpd_megatron.rollout.vllm_worker   # started by VLLMEngine, never by hand

It runs on the vLLM venv's interpreter and imports nothing of the project but this module and
:mod:`erpd_megatron.rollout.engines` (no Megatron, no Transformer Engine). Requests arrive on
stdin, replies leave on the file descriptor ``$ERPD_VLLM_REPLY_FD`` (vLLM prints to stdout),
both as length-prefixed pickles of plain values: ``init`` (build ``vllm.LLM``), ``generate``
(one batch) and ``close`` (shut the engine down and exit).
"""

from __future__ import annotations

import importlib
import math
import os
import sys
import traceback
from typing import Any

from erpd_megatron.rollout.engines import derive_seed
from erpd_megatron.rollout.vllm_engine import read_message, send_message


def construct(
    factory: Any, kwargs: dict[str, Any], optional: tuple[str, ...]
) -> tuple[Any, set[str]]:
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


def completion_tuple(c: Any) -> tuple[list[int], list[float], str]:
    """One vLLM ``CompletionOutput`` (with ``logprobs=0``) as (token ids, log-probs, finish
    reason)."""
    token_ids = [int(t) for t in c.token_ids]
    if c.logprobs is None:
        raise RuntimeError("vLLM returned no log-probs; SamplingParams(logprobs=0) was ignored")
    lps = []
    for t, entry in zip(token_ids, c.logprobs):
        lp = entry[t]
        lps.append(float(getattr(lp, "logprob", lp)))
    if len(lps) != len(token_ids):
        raise RuntimeError(f"vLLM returned {len(lps)} log-probs for {len(token_ids)} tokens")
    if any(math.isnan(x) for x in lps):
        print("warning: vLLM returned NaN log-probs", file=sys.stderr)
    return token_ids, lps, "length" if c.finish_reason == "length" else "stop"


def shutdown(llm: Any) -> None:
    """Stop the engine explicitly: ``LLM.shutdown()`` where this vLLM has it, else the V1
    engine-core client's ``shutdown()`` (``vllm/v1/engine/llm_engine.py``: ``self.engine_core =
    EngineCoreClient.make_client(...)``; ``vllm/v1/engine/core_client.py``: ``shutdown``), which
    ends the ``EngineCore`` process. The worker exits right after, which frees the rest."""
    stop = getattr(llm, "shutdown", None)
    if callable(stop):
        stop()
        return
    core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if core is not None and callable(getattr(core, "shutdown", None)):
        core.shutdown()


def serve(requests: Any, replies: Any) -> int:
    """Answer requests until ``close`` or EOF."""
    vllm = llm = None
    while True:
        try:
            msg = read_message(requests)
        except EOFError:
            msg = {"cmd": "close"}
        cmd = msg["cmd"]
        try:
            if cmd == "init":
                try:
                    vllm = importlib.import_module("vllm")
                except ImportError as e:
                    send_message(replies, {"error": f"{type(e).__name__}: {e}", "kind": "import"})
                    return 1
                llm, dropped = construct(
                    vllm.LLM,
                    msg["kwargs"],
                    ("logprobs_mode", "generation_config", "enable_expert_parallel"),
                )
                if "enable_expert_parallel" in dropped:
                    print("vllm_worker: this vLLM has no enable_expert_parallel", file=sys.stderr)
                send_message(
                    replies, {"logprobs_mode": "raw" if "logprobs_mode" in dropped else "processed"}
                )
            elif cmd == "generate":
                params = []
                for i in range(len(msg["prompts"])):
                    kw = dict(
                        n=msg["n"],
                        temperature=msg["temperature"],
                        top_p=msg["top_p"],
                        max_tokens=msg["max_new_tokens"],
                        logprobs=0,
                        seed=derive_seed(msg["seed"], "prompt", i) % (2**31),
                        stop_token_ids=msg["stop_token_ids"],
                        detokenize=False,
                    )
                    params.append(construct(vllm.SamplingParams, kw, ("detokenize",))[0])
                prompts = [{"prompt_token_ids": p} for p in msg["prompts"]]
                outputs = llm.generate(prompts, params, use_tqdm=msg["progress"])
                send_message(
                    replies,
                    {"groups": [[completion_tuple(c) for c in out.outputs] for out in outputs]},
                )
            elif cmd == "close":
                if llm is not None:
                    shutdown(llm)
                try:
                    send_message(replies, {"closed": True})
                except (BrokenPipeError, OSError):
                    pass
                return 0
            else:
                send_message(replies, {"error": f"unknown request {cmd!r}"})
        except Exception as e:
            send_message(replies, {"error": f"{type(e).__name__}: {e}\n{traceback.format_exc()}"})
            return 1


def main() -> int:
    """Worker entry point (see the module doc)."""
    replies = os.fdopen(int(os.environ["ERPD_VLLM_REPLY_FD"]), "wb")
    return serve(sys.stdin.buffer, replies)


if __name__ == "__main__":
    sys.exit(main())
