"""The vllm engine: the adapter on a fake vLLM (CPU), the missing-extra error, and a real run
on a GPU with vLLM (skipped with the reason elsewhere)."""

from __future__ import annotations

import importlib.util
import sys
import types
from types import SimpleNamespace

import pytest
import torch

from erpd_megatron.rollout import vllm_engine
from erpd_megatron.rollout.engines import EngineError
from erpd_megatron.rollout.vllm_engine import VLLMEngine, completion_from_vllm, import_vllm

HAVE_VLLM = importlib.util.find_spec("vllm") is not None
HAVE_GPU = torch.cuda.is_available()


def fake_vllm(accept_logprobs_mode: bool) -> types.ModuleType:
    mod = types.ModuleType("vllm")
    calls: dict = {}

    class SamplingParams:
        def __init__(self, **kw):
            self.__dict__.update(kw)

    class LLM:
        def __init__(self, **kw):
            if not accept_logprobs_mode and "logprobs_mode" in kw:
                raise TypeError("__init__() got an unexpected keyword argument 'logprobs_mode'")
            calls["llm"] = kw

        def generate(self, prompts, params, use_tqdm=True):
            calls["generate"] = (prompts, params)
            outs = []
            for p, sp in zip(prompts, params):
                comps = []
                for j in range(sp.n):
                    ids = [5 + j, 6, 2] if j % 2 == 0 else [7] * sp.max_tokens
                    lps = [{t: SimpleNamespace(logprob=-0.5 - k)} for k, t in enumerate(ids)]
                    comps.append(SimpleNamespace(token_ids=ids, logprobs=lps,
                                                 finish_reason="stop" if j % 2 == 0 else "length"))
                outs.append(SimpleNamespace(outputs=comps, prompt_token_ids=p["prompt_token_ids"]))
            return outs

    mod.LLM, mod.SamplingParams, mod.calls = LLM, SamplingParams, calls
    return mod


@pytest.fixture()
def gpu_visible(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


@pytest.mark.parametrize("accept", [True, False])
def test_adapter_on_a_fake_vllm(monkeypatch, gpu_visible, accept):
    fake = fake_vllm(accept)
    monkeypatch.setitem(sys.modules, "vllm", fake)
    eng = VLLMEngine("/m", eos_token_ids=[2, 3], tensor_parallel_size=2, max_model_len=64, seed=1)
    assert eng.logprobs_mode == ("processed" if accept else "raw")
    kw = fake.calls["llm"]
    assert kw["tensor_parallel_size"] == 2 and kw["max_model_len"] == 64 and kw["tokenizer"] == "/m"
    groups = eng.generate([[1, 2, 3], [4]], 2, max_new_tokens=4, seed=9, progress=False)
    prompts, params = fake.calls["generate"]
    assert prompts == [{"prompt_token_ids": [1, 2, 3]}, {"prompt_token_ids": [4]}]
    p0 = params[0]
    assert (p0.n, p0.temperature, p0.top_p, p0.max_tokens, p0.logprobs) == (2, 1.0, 1.0, 4, 0)
    assert p0.stop_token_ids == [2, 3] and p0.seed != params[1].seed
    again = eng.generate([[1, 2, 3], [4]], 2, max_new_tokens=4, seed=9, progress=False)
    assert [p.seed for p in fake.calls["generate"][1]] == [p.seed for p in params]  # seeded per prompt
    assert [[c.token_ids for c in g] for g in groups] == [[c.token_ids for c in g] for g in again]
    c0, c1 = groups[0]
    assert c0.token_ids == [5, 6, 2] and c0.logprobs == [-0.5, -1.5, -2.5] and c0.finish_reason == "stop"
    assert c1.finish_reason == "length" and len(c1.logprobs) == 4
    eng.close()


def test_missing_logprobs_is_an_error():
    with pytest.raises(RuntimeError, match="no log-probs"):
        completion_from_vllm(SimpleNamespace(token_ids=[1], logprobs=None, finish_reason="stop"))


def test_missing_vllm_names_the_gpu_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError
    with pytest.raises(ImportError, match=r"\[gpu\]"):
        import_vllm()
    with pytest.raises(ImportError, match="rollout.engine=hf"):
        VLLMEngine("/m", eos_token_ids=[2])


def test_no_gpu_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", fake_vllm(True))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(EngineError, match="needs a CUDA GPU"):
        VLLMEngine("/m", eos_token_ids=[2])


@pytest.mark.gpu
@pytest.mark.skipif(not HAVE_GPU, reason="needs a CUDA GPU")
@pytest.mark.skipif(not HAVE_VLLM, reason="vLLM is not installed (pip install -e '.[gpu]')")
def test_vllm_logprobs_match_a_teacher_forced_pass(tmp_path):
    from transformers import AutoModelForCausalLM

    from .conftest import make_tiny_model, make_tokenizer

    model_dir = make_tiny_model(tmp_path / "m", hidden=128, heads=2)  # head dim 64: supported by vLLM kernels
    tok = make_tokenizer()
    eng = VLLMEngine(str(model_dir), eos_token_ids=[tok.eos_token_id], dtype="float32",
                     gpu_memory_utilization=0.3, max_model_len=128)
    prompt = tok("What is 2+3?")["input_ids"]
    (group,) = eng.generate([prompt], 4, max_new_tokens=16, seed=3, progress=False)
    eng.close()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).cuda().eval()
    for c in group:
        assert len(c.token_ids) == len(c.logprobs)
        ids = torch.tensor([prompt + c.token_ids]).cuda()
        with torch.no_grad():
            lp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)[len(prompt) - 1:-1]
        ref = lp.gather(-1, torch.tensor(c.token_ids).cuda()[:, None]).squeeze(-1).cpu()
        assert (ref - torch.tensor(c.logprobs)).abs().max() < 1e-3


def test_module_documents_the_logprobs_mode():
    assert "processed_logprobs" in (vllm_engine.__doc__ or "")
