"""Local stand-ins for what the README's round reads: a tiny HF Qwen3 that matches
``configs/models/qwen3-tiny.yaml`` (the tiny-cpu recipe), a word-level tokenizer whose
vocabulary holds ``\\boxed{0}`` .. ``\\boxed{9}`` (so that a random model earns some reward and
the rollout groups carry signal), and GSM8K-style train / held-out prompt files."""

from __future__ import annotations

from pathlib import Path

VOCAB = 256  # configs/models/qwen3-tiny.yaml vocab_size


def save_tokenizer(out: Path) -> None:
    """A word-level tokenizer with exactly VOCAB entries, ten of them boxed digits."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    boxed = [f"\\boxed{{{d}}}" for d in range(10)]
    words = [f"w{i}" for i in range(VOCAB - len(specials) - len(boxed))]
    vocab = {t: i for i, t in enumerate(words + boxed + specials)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
    ).save_pretrained(out)


_QWEN3_TINY = dict(  # configs/models/qwen3-tiny.yaml and qwen3-moe-tiny.yaml share these
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    max_position_embeddings=512,
    rope_theta=1e6,
    rms_norm_eps=1e-6,
    bos_token_id=VOCAB - 3,
    eos_token_id=VOCAB - 2,
    pad_token_id=VOCAB - 1,
)


def _save(model, out: Path) -> Path:
    model.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    save_tokenizer(out)
    return out


def save_tiny_qwen3(out: Path, seed: int = 0) -> Path:
    """A random Qwen3ForCausalLM with the architecture of configs/models/qwen3-tiny.yaml."""
    import torch
    import transformers as tf

    cfg = tf.Qwen3Config(**_QWEN3_TINY, num_hidden_layers=4, tie_word_embeddings=True)
    torch.manual_seed(seed)
    return _save(tf.Qwen3ForCausalLM(cfg).eval(), out)


def save_tiny_qwen3_moe(out: Path, seed: int = 0) -> Path:
    """A random Qwen3MoeForCausalLM with the architecture of configs/models/qwen3-moe-tiny.yaml
    (both layers sparse) and the same tokenizer."""
    import torch
    import transformers as tf

    cfg = tf.Qwen3MoeConfig(
        **_QWEN3_TINY,
        num_hidden_layers=2,
        tie_word_embeddings=False,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        router_aux_loss_coef=0.01,
    )
    torch.manual_seed(seed)
    return _save(tf.Qwen3MoeForCausalLM(cfg).eval(), out)


def write_prompts(path: Path, n: int, offset: int = 0) -> Path:
    """GSM8K-style rows (question / answer with ``#### d``), one-digit answers."""
    import pandas as pd

    rows = [
        {"question": f"w{i} w{i + 1} w{i + 2}", "answer": f"w{i}\n#### {(i + offset) % 10}"}
        for i in range(n)
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_parquet(path) if path.suffix == ".parquet" else pd.DataFrame(
        rows
    ).to_json(path, orient="records", lines=True)
    return path
