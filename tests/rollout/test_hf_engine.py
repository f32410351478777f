"""The hf engine: recorded log-probs equal a teacher-forced pass, seeding, batching, sampling
rules."""

from __future__ import annotations

import pytest
import torch

from erpd_megatron.rollout.engines import derive_seed
from erpd_megatron.rollout.hf_engine import HFEngine, sample_step, top_p_filter

from .conftest import make_tokenizer

PROMPTS = ["What is 2+3?", "Hi", "What is 12+30? Think step by step.", "Compute 7*8."]


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def engine(tiny_model, tok):
    eng = HFEngine(
        str(tiny_model),
        eos_token_ids=[tok.eos_token_id],
        pad_token_id=tok.pad_token_id,
        batch_size=6,
    )
    yield eng
    eng.close()


def teacher_forced(model, prompt, response, temperature=1.0):
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double() / temperature
    lp = torch.log_softmax(logits, -1)[len(prompt) - 1 : -1]
    return lp.gather(-1, torch.tensor(response)[:, None]).squeeze(-1)


def test_logprobs_equal_teacher_forced_pass(engine, tok):
    prompts = [tok(p)["input_ids"] for p in PROMPTS]  # different lengths: left padding in a batch
    groups = engine.generate(prompts, 4, max_new_tokens=24, seed=11, progress=False)
    assert [len(g) for g in groups] == [4] * len(prompts)
    worst, reasons = 0.0, set()
    for p, g in zip(prompts, groups):
        for c in g:
            assert len(c.token_ids) == len(c.logprobs) and 1 <= len(c.token_ids) <= 24
            reasons.add(c.finish_reason)
            if c.finish_reason == "stop":
                assert (
                    c.token_ids[-1] == tok.eos_token_id and tok.eos_token_id not in c.token_ids[:-1]
                )
            else:
                assert len(c.token_ids) == 24 and tok.eos_token_id not in c.token_ids
            ref = teacher_forced(engine.model, p, c.token_ids)
            worst = max(
                worst, (ref - torch.tensor(c.logprobs, dtype=torch.float64)).abs().max().item()
            )
    assert worst < 1e-5, worst
    assert reasons == {"stop", "length"}


def test_temperature_and_top_p_logprobs_follow_the_sampling_distribution(engine, tok):
    prompt = tok(PROMPTS[0])["input_ids"]
    (group,) = engine.generate(
        [prompt], 3, temperature=0.7, max_new_tokens=12, seed=1, progress=False
    )
    for c in group:
        ref = teacher_forced(engine.model, prompt, c.token_ids, temperature=0.7)
        assert (ref - torch.tensor(c.logprobs, dtype=torch.float64)).abs().max().item() < 1e-5
    (group,) = engine.generate([prompt], 3, top_p=0.5, max_new_tokens=12, seed=1, progress=False)
    for c in group:  # under top-p the log-prob is of the renormalised nucleus: >= the model's own
        ref = teacher_forced(engine.model, prompt, c.token_ids)
        assert all(lp >= r - 1e-6 for lp, r in zip(c.logprobs, ref.tolist()))


def test_seeded_and_independent_of_splitting_n_over_batches(engine, tok, tiny_model):
    prompts = [tok(p)["input_ids"] for p in PROMPTS[:2]]
    a = engine.generate(prompts, 4, max_new_tokens=10, seed=5, progress=False)
    b = engine.generate(prompts, 4, max_new_tokens=10, seed=5, progress=False)
    c = engine.generate(prompts, 4, max_new_tokens=10, seed=6, progress=False)
    ids = lambda gs: [x.token_ids for g in gs for x in g]  # noqa: E731
    assert ids(a) == ids(b) and ids(a) != ids(c)
    assert [x.logprobs for g in a for x in g] == [x.logprobs for g in b for x in g]
    small = HFEngine(
        str(tiny_model),
        eos_token_ids=[tok.eos_token_id],
        pad_token_id=tok.pad_token_id,
        batch_size=3,
    )
    d = small.generate(prompts, 7, max_new_tokens=5, seed=5, progress=False)  # n > batch_size
    assert [len(g) for g in d] == [7, 7] and small.tokens_generated > 0


def test_greedy_is_deterministic_across_samples(engine, tok):
    (group,) = engine.generate(
        [tok("Hi")["input_ids"]], 3, temperature=0.0, max_new_tokens=8, seed=0, progress=False
    )
    assert group[0].token_ids == group[1].token_ids == group[2].token_ids


def test_top_p_filter_keeps_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = torch.isfinite(top_p_filter(logits, 0.7))
    assert kept.tolist() == [[True, True, False, False]]
    assert torch.isfinite(top_p_filter(logits, 0.5)).tolist() == [[True, False, False, False]]
    assert torch.isfinite(top_p_filter(logits, 0.01)).sum() == 1
    assert torch.equal(top_p_filter(logits, 1.0), logits)
    gen = torch.Generator().manual_seed(0)
    tokens, lps = sample_step(logits.repeat(200, 1), 1.0, 0.7, gen)
    assert set(tokens.tolist()) <= {0, 1}
    expected = torch.log(torch.tensor([0.5, 0.3]) / 0.8)
    assert torch.allclose(lps, expected[tokens], atol=1e-6)


def test_bad_arguments(engine):
    with pytest.raises(ValueError, match="positive"):
        engine.generate([[1, 2]], 0, max_new_tokens=3)
    with pytest.raises(ValueError, match="empty prompt"):
        engine.generate([[]], 1, max_new_tokens=3)
    assert derive_seed(1, "shard", 0) != derive_seed(1, "shard", 1) == derive_seed(1, "shard", 1)
