"""The ``vllm`` engine: offline ``vllm.LLM`` on the GPUs of one node (tensor parallel), in a
child process of its own.

**Why a child process.** vLLM pins an exact torch, which would replace the torch that
Transformer Engine was built against, so it lives in its own venv (``make install-vllm``:
``.venv-vllm``); and GPU memory is not reliably freed by ``del llm`` in the process that made
it (vLLM issues 21073 and 6544). Each engine therefore runs ``python -m
erpd_megatron.rollout.vllm_worker`` on the vLLM venv's interpreter (``ERPD_VLLM_PYTHON``, else
``<repo>/.venv-vllm/bin/python`` when it exists, else this interpreter). :meth:`VLLMEngine.close`
asks the worker to shut its engine down (``LLM.shutdown()`` where vLLM has it, else
``llm.llm_engine.engine_core.shutdown()``, the V1 ``EngineCoreClient`` that stops the
``EngineCore`` process) and exit; the exit of the process group releases every byte of GPU
memory, so ``erpd evaluate`` can load the next model. One model per worker.

Sampling is ``SamplingParams(n, temperature, top_p, max_tokens, logprobs=0, seed)`` per prompt,
with the checkpoint's EOS tokens as stop tokens and no other processing (no top-k, no
penalties, whatever the checkpoint's generation config says). ``logprobs=0`` returns the
sampled token's log-prob. vLLM V1 reports log-probs of the raw logits unless the engine is
built with ``logprobs_mode="processed_logprobs"``; this engine asks for processed log-probs
and, on a vLLM that lacks the option, falls back to raw and records ``logprobs_mode = "raw"``
(identical at temperature 1, top_p 1, the rollout setting). Each prompt's requests are seeded
from the call's seed and the prompt's index, so results do not depend on how vLLM schedules
the batch.
"""

from __future__ import annotations

import os
import pickle
import signal
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any, BinaryIO

from erpd_megatron.rollout.engines import Completion, EngineError, RolloutEngine
from erpd_megatron.utils.log import get_logger

log = get_logger(__name__)

GPU_EXTRA_HINT = (
    "install vLLM in its own venv: `make install-vllm` (creates .venv-vllm; set ERPD_VLLM_PYTHON "
    "to use another interpreter)"
)
VLLM_PYTHON_ENV = "ERPD_VLLM_PYTHON"
_REPO = Path(__file__).resolve().parents[2]


MOE_EXPERT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts")
"""HF config.json keys of the routed-expert count (Qwen2/3-MoE, Mixtral, DeepSeek)."""


def expert_parallel_kwargs(model_path: str, tensor_parallel_size: int) -> dict[str, Any]:
    """``enable_expert_parallel=True`` for an MoE checkpoint on more than one GPU, else {}.

    vLLM's ``ParallelConfig.enable_expert_parallel`` (vllm/config/parallel.py: "Use expert
    parallelism instead of tensor parallelism for MoE layers"; an ``EngineArgs`` field that
    ``vllm.LLM(**kwargs)`` passes through) places whole experts on the engine's TP x DP ranks
    (``expert_placement_strategy="linear"``: rank r holds experts [r*E/n, (r+1)*E/n)), the
    layout of the trainer's EP, instead of slicing every expert's width over TP. The
    Qwen3-MoE recipes of NeMo-RL and Megatron-Bridge run vLLM this way.
    """
    import json

    if tensor_parallel_size <= 1:
        return {}
    cfg = Path(model_path) / "config.json"
    try:
        hf = json.loads(cfg.read_text())
    except (OSError, ValueError):
        return {}
    hf = hf.get("text_config", hf)
    experts = max(int(hf.get(k) or 0) for k in MOE_EXPERT_KEYS)
    return {"enable_expert_parallel": True} if experts > 1 else {}


def vllm_python() -> str:
    """The interpreter that runs vLLM: ``$ERPD_VLLM_PYTHON``, else the repository's
    ``.venv-vllm`` when it exists, else this interpreter."""
    explicit = os.environ.get(VLLM_PYTHON_ENV)
    if explicit:
        return explicit
    venv = _REPO / ".venv-vllm" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def send_message(f: BinaryIO, obj: Any) -> None:
    """Write one length-prefixed pickle (plain lists, dicts, numbers and strings only)."""
    data = pickle.dumps(obj, protocol=4)
    f.write(struct.pack("<Q", len(data)) + data)
    f.flush()


def read_message(f: BinaryIO) -> Any:
    """Read one message written by :func:`send_message`; EOFError when the peer is gone."""
    head = f.read(8)
    if len(head) < 8:
        raise EOFError("the vLLM worker closed its pipe")
    (n,) = struct.unpack("<Q", head)
    data = f.read(n)
    if len(data) < n:
        raise EOFError("the vLLM worker closed its pipe mid-message")
    return pickle.loads(data)


class VLLMEngine(RolloutEngine):
    """vLLM offline inference in a worker process (see module doc)."""

    name = "vllm"

    def __init__(
        self,
        model_path: str,
        *,
        eos_token_ids: list[int],
        tokenizer_path: str | None = None,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.85,
        dtype: str = "bfloat16",
        max_model_len: int | None = None,
        seed: int = 0,
        python: str | None = None,
        start_timeout: float = 1800.0,
    ) -> None:
        import torch

        if not torch.cuda.is_available():
            raise EngineError(
                "rollout.engine=vllm needs a CUDA GPU and none is visible; use rollout.engine=hf"
            )
        if torch.cuda.device_count() < tensor_parallel_size:
            raise EngineError(
                f"rollout.vllm_tensor_parallel_size={tensor_parallel_size} but only "
                f"{torch.cuda.device_count()} GPUs are visible"
            )
        self.eos_token_ids = list(eos_token_ids)
        self.python = python or vllm_python()
        self.proc: subprocess.Popen | None = None
        kwargs = dict(
            model=model_path,
            tokenizer=tokenizer_path or model_path,
            tensor_parallel_size=tensor_parallel_size,
            gpu_memory_utilization=gpu_memory_utilization,
            dtype=dtype,
            seed=seed,
            max_model_len=max_model_len,
            logprobs_mode="processed_logprobs",
            generation_config="vllm",
            **expert_parallel_kwargs(model_path, tensor_parallel_size),
        )
        self._start(kwargs)
        reply = self._request({"cmd": "init", "kwargs": kwargs}, timeout=start_timeout)
        self.logprobs_mode = reply["logprobs_mode"]
        if self.logprobs_mode == "raw":
            log.warning(
                "this vLLM has no logprobs_mode; recorded log-probs are of the raw logits "
                "(equal to the sampling distribution only at temperature 1, top_p 1)"
            )

    # ---- the worker process ------------------------------------------------------------
    def _start(self, kwargs: dict[str, Any]) -> None:
        rfd, wfd = os.pipe()  # the worker's replies: its stdout stays free for vLLM's prints
        env = dict(os.environ, ERPD_VLLM_REPLY_FD=str(wfd))
        env.setdefault("PYTHONPATH", "")
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_REPO), env["PYTHONPATH"]) if p)
        try:
            self.proc = subprocess.Popen(
                [self.python, "-m", "erpd_megatron.rollout.vllm_worker"],
                stdin=subprocess.PIPE,
                env=env,
                pass_fds=(wfd,),
                start_new_session=True,
            )
        except OSError as e:
            os.close(rfd)
            raise ImportError(
                f"rollout.engine=vllm: cannot run the vLLM interpreter {self.python} ({e}); "
                f"{GPU_EXTRA_HINT}"
            ) from e
        finally:
            os.close(wfd)
        self._replies = os.fdopen(rfd, "rb")
        log.info("vLLM worker pid %d (%s) for %s", self.proc.pid, self.python, kwargs["model"])

    def _request(self, msg: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
        if self.proc is None:
            raise RuntimeError("engine is closed")
        assert self.proc.stdin is not None
        try:
            send_message(self.proc.stdin, msg)
            reply = read_message(self._replies)
        except (EOFError, BrokenPipeError) as e:
            code = self.proc.poll()
            self._kill()
            raise RuntimeError(f"the vLLM worker died (exit code {code}): see its log above") from e
        if "error" in reply:
            self._kill()
            if reply.get("kind") == "import":
                raise ImportError(
                    f"rollout.engine=vllm needs vLLM, which {self.python} cannot import "
                    f"({reply['error']}); {GPU_EXTRA_HINT}, or use rollout.engine=hf"
                )
            raise RuntimeError(f"vLLM worker: {reply['error']}")
        return reply

    def _kill(self) -> None:
        """Terminate the worker's process group (vLLM's EngineCore and TP workers with it)."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=30)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait()
        self._replies.close()

    def close(self) -> None:
        """Shut the engine down in the worker and end the worker (frees its GPU memory)."""
        if self.proc is None:
            return
        try:
            self._request({"cmd": "close"})
            self.proc.wait(timeout=120)
        except Exception as e:  # a dead or stuck worker: its process group is killed below
            log.warning("vLLM worker did not exit cleanly (%s); killing its process group", e)
        self._kill()

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
        reply = self._request(
            {
                "cmd": "generate",
                "prompts": [list(map(int, p)) for p in prompt_token_ids],
                "n": n,
                "temperature": temperature,
                "top_p": top_p,
                "max_new_tokens": max_new_tokens,
                "seed": seed,
                "progress": progress,
                "stop_token_ids": self.eos_token_ids,
            }
        )
        return [
            [Completion(list(t), list(lp), r) for t, lp, r in group] for group in reply["groups"]
        ]


__all__ = ["GPU_EXTRA_HINT", "VLLMEngine", "read_message", "send_message", "vllm_python"]
