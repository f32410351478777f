"""Fixtures of the rollout tests: a tiny random Llama with a character-level tokenizer,
and small prompt files, all made here (no hub access)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

CHARS = list(
    "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ +-*/=^\\{}()[].,?!:$#%'\n"
)
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"
)


def make_tokenizer(directory: Path | None = None):
    """A character-level PreTrainedTokenizerFast (BPE without merges), BOS added to plain text."""
    from erpd_megatron.pipeline.toy import char_tokenizer

    fast = char_tokenizer(CHARS, SPECIALS)
    fast.chat_template = CHAT_TEMPLATE
    if directory is not None:
        fast.save_pretrained(directory)
    return fast


def make_tiny_model(
    directory: Path, *, with_tokenizer: bool = True, seed: int = 0, hidden: int = 32, heads: int = 4
) -> Path:
    """Save a random LlamaForCausalLM (hidden 32, 2 layers) and its tokenizer to ``directory``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = make_tokenizer()
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        max_position_embeddings=512,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        initializer_range=0.2,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(directory)
    if with_tokenizer:
        tok.save_pretrained(directory)
    return directory


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    """Write rows as JSON lines."""
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


GSM_ROWS = [
    {"question": f"What is {a} + {b}?", "answer": f"{a} plus {b} is {a + b}.\n#### {a + b}"}
    for a, b in [
        (1, 2),
        (3, 4),
        (10, 5),
        (7, 8),
        (20, 22),
        (6, 6),
        (9, 1),
        (12, 30),
        (2, 2),
        (5, 50),
    ]
]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """Directory of the tiny random model with its tokenizer."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture()
def gsm_file(tmp_path) -> Path:
    """A GSM8K-style jsonl prompt file with 10 rows."""
    return write_jsonl(tmp_path / "prompts.jsonl", GSM_ROWS)


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny models run faster on one thread, and much faster on a loaded machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
