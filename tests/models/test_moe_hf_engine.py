"""The hf rollout engine generates with a tiny Qwen3-MoE on CPU (transformers'
``Qwen3MoeForCausalLM``: 3 layers, one of them dense through ``mlp_only_layers``): batched,
left-padded prompts of different lengths, each sample's recorded log-probs equal a
teacher-forced pass of the same model on prompt + response alone."""

from __future__ import annotations

import torch

from erpd_megatron.rollout.hf_engine import HFEngine
from tests.models.hf_fixtures import VOCAB, save_hf_model


def test_hf_engine_generates_with_the_tiny_moe(tmp_path):
    path = save_hf_model("qwen3_moe", tmp_path / "moe")
    eos = 299  # the tiny Qwen3-MoE's eos_token_id
    eng = HFEngine(str(path), eos_token_ids=[eos], pad_token_id=0, batch_size=4)
    assert type(eng.model).__name__ == "Qwen3MoeForCausalLM"
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, VOCAB - 3, (n,), generator=g).tolist() for n in (3, 7, 12)]
    groups = eng.generate(prompts, 3, max_new_tokens=10, seed=5, progress=False)
    assert [len(x) for x in groups] == [3, 3, 3]
    worst = 0.0
    for p, group in zip(prompts, groups):
        for c in group:
            assert 1 <= len(c.token_ids) == len(c.logprobs) <= 10
            ids = torch.tensor([p + c.token_ids])
            with torch.no_grad():
                lp = torch.log_softmax(eng.model(input_ids=ids).logits[0].double(), -1)
            ref = lp[len(p) - 1 : -1].gather(-1, torch.tensor(c.token_ids)[:, None])[:, 0]
            worst = max(worst, (ref - torch.tensor(c.logprobs, dtype=torch.float64)).abs().max())
    assert worst < 1e-5, worst
    # different samples of a prompt differ (sampled at temperature 1, seeded per sample)
    assert len({tuple(c.token_ids) for c in groups[2]}) > 1
    eng.close()


def test_vllm_engine_asks_for_expert_parallel_on_moe_checkpoints(tmp_path):
    from erpd_megatron.rollout.vllm_engine import expert_parallel_kwargs

    moe = save_hf_model("qwen3_moe", tmp_path / "moe")
    dense = save_hf_model("qwen3", tmp_path / "dense")
    assert expert_parallel_kwargs(str(moe), 2) == {"enable_expert_parallel": True}
    assert expert_parallel_kwargs(str(moe), 1) == {}  # one GPU: nothing to spread
    assert expert_parallel_kwargs(str(dense), 8) == {}
    assert expert_parallel_kwargs(str(tmp_path / "missing"), 8) == {}
