"""The vllm engine: its worker process on a fake vLLM package (CPU), the missing-vLLM error,
the explicit shutdown, and a real run on a GPU with vLLM (skipped with the reason elsewhere).

The fake ``vllm`` is a real package on the worker's ``PYTHONPATH`` (the worker is a separate
interpreter, as in production where it runs on ``.venv-vllm``)."""

from __future__ import annotations

import importlib.util
import json
import os
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from erpd_megatron.rollout import vllm_engine
from erpd_megatron.rollout.engines import EngineError
from erpd_megatron.rollout.vllm_engine import VLLMEngine
from erpd_megatron.rollout.vllm_worker import completion_tuple

# vLLM here, or in the venv the worker runs on (.venv-vllm / ERPD_VLLM_PYTHON)
HAVE_VLLM = (
    importlib.util.find_spec("vllm") is not None or vllm_engine.vllm_python() != os.sys.executable
)
HAVE_GPU = torch.cuda.is_available()

FAKE_VLLM = """
import json, os

LOG = os.environ["FAKE_VLLM_LOG"]


def _log(**kw):
    with open(LOG, "a") as f:
        f.write(json.dumps(kw) + "\\n")


class SamplingParams:
    def __init__(self, **kw):
        self.__dict__.update(kw)


class _LP:
    def __init__(self, v):
        self.logprob = v


class _Out:
    def __init__(self, **kw):
        self.__dict__.update(kw)


class LLM:
    def __init__(self, **kw):
        if os.environ.get("FAKE_VLLM_OLD") and "logprobs_mode" in kw:
            raise TypeError("__init__() got an unexpected keyword argument 'logprobs_mode'")
        _log(event="init", kw=kw, pid=os.getpid())

    def generate(self, prompts, params, use_tqdm=True):
        _log(event="generate", prompts=prompts, params=[p.__dict__ for p in params])
        outs = []
        for p, sp in zip(prompts, params):
            comps = []
            for j in range(sp.n):
                ids = [5 + j, 6, 2] if j % 2 == 0 else [7] * sp.max_tokens
                lps = [{t: _LP(-0.5 - k)} for k, t in enumerate(ids)]
                finish = "stop" if j % 2 == 0 else "length"
                comps.append(_Out(token_ids=ids, logprobs=lps, finish_reason=finish))
            outs.append(_Out(outputs=comps, prompt_token_ids=p["prompt_token_ids"]))
        return outs

    def shutdown(self):
        _log(event="shutdown", pid=os.getpid())
"""


@pytest.fixture()
def gpu_visible(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


@pytest.fixture()
def fake_vllm(tmp_path, monkeypatch):
    site = tmp_path / "site"
    (site / "vllm").mkdir(parents=True)
    (site / "vllm" / "__init__.py").write_text(textwrap.dedent(FAKE_VLLM))
    log = tmp_path / "vllm.log"
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("FAKE_VLLM_LOG", str(log))
    monkeypatch.setenv(vllm_engine.VLLM_PYTHON_ENV, os.sys.executable)

    def events() -> list[dict]:
        return [json.loads(x) for x in log.read_text().splitlines()] if log.exists() else []

    return events


@pytest.mark.parametrize("accept", [True, False])
def test_worker_on_a_fake_vllm(monkeypatch, gpu_visible, fake_vllm, accept):
    if not accept:
        monkeypatch.setenv("FAKE_VLLM_OLD", "1")
    eng = VLLMEngine("/m", eos_token_ids=[2, 3], tensor_parallel_size=2, max_model_len=64, seed=1)
    assert eng.logprobs_mode == ("processed" if accept else "raw")
    worker_pid = eng.proc.pid
    init = next(e for e in fake_vllm() if e["event"] == "init")
    kw = init["kw"]
    assert init["pid"] == worker_pid != os.getpid()  # vLLM lives in the worker, not here
    assert kw["tensor_parallel_size"] == 2 and kw["max_model_len"] == 64 and kw["tokenizer"] == "/m"
    assert ("logprobs_mode" in kw) == accept
    groups = eng.generate([[1, 2, 3], [4]], 2, max_new_tokens=4, seed=9, progress=False)
    gen = [e for e in fake_vllm() if e["event"] == "generate"][-1]
    assert gen["prompts"] == [{"prompt_token_ids": [1, 2, 3]}, {"prompt_token_ids": [4]}]
    p0, p1 = gen["params"]
    assert (p0["n"], p0["temperature"], p0["top_p"], p0["max_tokens"], p0["logprobs"]) == (
        2,
        1.0,
        1.0,
        4,
        0,
    )
    assert p0["stop_token_ids"] == [2, 3] and p0["seed"] != p1["seed"]
    again = eng.generate([[1, 2, 3], [4]], 2, max_new_tokens=4, seed=9, progress=False)
    assert [
        p["seed"] for p in [e for e in fake_vllm() if e["event"] == "generate"][-1]["params"]
    ] == [p0["seed"], p1["seed"]]  # seeded per prompt
    assert [[c.token_ids for c in g] for g in groups] == [[c.token_ids for c in g] for g in again]
    c0, c1 = groups[0]
    assert (
        c0.token_ids == [5, 6, 2]
        and c0.logprobs == [-0.5, -1.5, -2.5]
        and c0.finish_reason == "stop"
    )
    assert c1.finish_reason == "length" and len(c1.logprobs) == 4
    proc = eng.proc
    eng.close()
    # the engine was shut down explicitly in the worker, and the worker is gone
    assert [e["pid"] for e in fake_vllm() if e["event"] == "shutdown"] == [worker_pid]
    assert proc.poll() == 0 and eng.proc is None
    with pytest.raises(RuntimeError, match="closed"):
        eng.generate([[1]], 1)
    eng.close()  # idempotent


def test_missing_logprobs_is_an_error():
    with pytest.raises(RuntimeError, match="no log-probs"):
        completion_tuple(SimpleNamespace(token_ids=[1], logprobs=None, finish_reason="stop"))


@pytest.mark.skipif(
    importlib.util.find_spec("vllm") is not None, reason="vLLM is installed in this interpreter"
)
def test_missing_vllm_names_make_install_vllm(monkeypatch, gpu_visible):
    monkeypatch.setenv(
        vllm_engine.VLLM_PYTHON_ENV, os.sys.executable
    )  # an interpreter without vLLM
    with pytest.raises(ImportError, match=r"make install-vllm.*rollout\.engine=hf"):
        VLLMEngine("/m", eos_token_ids=[2])
    monkeypatch.setenv(vllm_engine.VLLM_PYTHON_ENV, "/nonexistent/python")
    with pytest.raises(ImportError, match="cannot run the vLLM interpreter"):
        VLLMEngine("/m", eos_token_ids=[2])


def test_vllm_python_resolution(monkeypatch):
    monkeypatch.setenv(vllm_engine.VLLM_PYTHON_ENV, "/opt/v/bin/python")
    assert vllm_engine.vllm_python() == "/opt/v/bin/python"
    monkeypatch.delenv(vllm_engine.VLLM_PYTHON_ENV)
    venv = Path(vllm_engine.__file__).resolve().parents[2] / ".venv-vllm" / "bin" / "python"
    assert vllm_engine.vllm_python() == (str(venv) if venv.exists() else os.sys.executable)


def test_no_gpu_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(EngineError, match="needs a CUDA GPU"):
        VLLMEngine("/m", eos_token_ids=[2])


@pytest.mark.gpu
@pytest.mark.skipif(not HAVE_GPU, reason="needs a CUDA GPU")
@pytest.mark.skipif(not HAVE_VLLM, reason="vLLM is not installed (make install-vllm)")
def test_vllm_logprobs_match_a_teacher_forced_pass(tmp_path):
    from transformers import AutoModelForCausalLM

    from .conftest import make_tiny_model, make_tokenizer

    model_dir = make_tiny_model(
        tmp_path / "m", hidden=128, heads=2
    )  # head dim 64: supported by vLLM kernels
    tok = make_tokenizer()
    eng = VLLMEngine(
        str(model_dir),
        eos_token_ids=[tok.eos_token_id],
        dtype="float32",
        gpu_memory_utilization=0.3,
        max_model_len=128,
    )
    prompt = tok("What is 2+3?")["input_ids"]
    (group,) = eng.generate([prompt], 4, max_new_tokens=16, seed=3, progress=False)
    eng.close()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).cuda().eval()
    for c in group:
        assert len(c.token_ids) == len(c.logprobs)
        ids = torch.tensor([prompt + c.token_ids]).cuda()
        with torch.no_grad():
            lp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)[len(prompt) - 1 : -1]
        ref = lp.gather(-1, torch.tensor(c.token_ids).cuda()[:, None]).squeeze(-1).cpu()
        assert (ref - torch.tensor(c.logprobs)).abs().max() < 1e-3


def test_module_documents_the_logprobs_mode():
    assert "processed_logprobs" in (vllm_engine.__doc__ or "")
