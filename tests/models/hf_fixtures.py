"""Tiny random HF models (Llama with GQA + llama3 RoPE scaling, Qwen2 with QKV bias and tied
embeddings, Qwen3 with qk-norm and head_dim != hidden/heads; Qwen3-MoE with a dense layer
between sparse ones and renormalised top-k, Qwen2-MoE with a gated shared expert, tied
embeddings and plain top-k probabilities) saved to directories, plus helpers shared by the
model tests and their gloo workers."""

from __future__ import annotations

from pathlib import Path

import torch

FAMILIES = ("llama", "qwen2", "qwen3")
MOE_FAMILIES = ("qwen3_moe", "qwen2_moe")
EXPERTS = 4
VOCAB = 300  # pads to 384 at TP=1 and 512 at TP=2: padding matters
COMMON = dict(
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=VOCAB,
    rms_norm_eps=1e-6,
)


def make_hf_model(family: str, seed: int = 0) -> torch.nn.Module:
    """A tiny random ``*ForCausalLM`` (weights ~ N(0, 0.1) so that logits are not near zero)."""
    import transformers as tf

    if family == "llama":
        cfg = tf.LlamaConfig(
            **COMMON,
            num_hidden_layers=4,
            max_position_embeddings=16384,
            rope_theta=500000.0,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
            },
            tie_word_embeddings=False,
            bos_token_id=298,
            eos_token_id=299,
        )
        cls = tf.LlamaForCausalLM
    elif family == "qwen2":
        cfg = tf.Qwen2Config(
            **COMMON,
            num_hidden_layers=2,
            max_position_embeddings=512,
            rope_theta=1e6,
            tie_word_embeddings=True,
            bos_token_id=298,
            eos_token_id=299,
        )
        cls = tf.Qwen2ForCausalLM
    elif family == "qwen3":
        cfg = tf.Qwen3Config(
            **COMMON,
            num_hidden_layers=2,
            head_dim=32,
            max_position_embeddings=512,
            rope_theta=1e6,
            tie_word_embeddings=False,
            bos_token_id=298,
            eos_token_id=299,
        )
        cls = tf.Qwen3ForCausalLM
    elif family == "qwen3_moe":
        cfg = tf.Qwen3MoeConfig(
            **COMMON,
            num_hidden_layers=3,
            head_dim=32,
            max_position_embeddings=512,
            rope_theta=1e6,
            tie_word_embeddings=False,
            num_experts=EXPERTS,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            norm_topk_prob=True,
            mlp_only_layers=[1],
            bos_token_id=298,
            eos_token_id=299,
        )
        cls = tf.Qwen3MoeForCausalLM
    elif family == "qwen2_moe":
        cfg = tf.Qwen2MoeConfig(
            **COMMON,
            num_hidden_layers=2,
            max_position_embeddings=512,
            rope_theta=1e6,
            tie_word_embeddings=True,
            num_experts=EXPERTS,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=48,
            norm_topk_prob=False,
            bos_token_id=298,
            eos_token_id=299,
        )
        cls = tf.Qwen2MoeForCausalLM
    else:
        raise ValueError(family)
    torch.manual_seed(seed)
    model = cls(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.1)
    return model.eval()


def save_tokenizer(out: Path) -> None:
    """A word-level tokenizer with VOCAB entries (tokenizer.json + tokenizer_config.json)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(VOCAB - 3)}
    vocab.update({"<unk>": VOCAB - 3, "<s>": VOCAB - 2, "</s>": VOCAB - 1})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    ).save_pretrained(out)


def save_hf_model(
    family: str, out: Path, *, shard: bool = False, dtype: torch.dtype = torch.float32
) -> Path:
    """Save a tiny model, its tokenizer and its generation config.

    The weights are sharded safetensors with an index when ``shard``.
    """
    model = make_hf_model(family).to(dtype)
    model.save_pretrained(out, max_shard_size="100KB" if shard else "5GB")
    model.generation_config.save_pretrained(out)
    save_tokenizer(out)
    return out


def sample_ids(batch: int = 2, seq: int = 24, seed: int = 1) -> torch.Tensor:
    """Token ids, including ids near the top of the real vocabulary."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch, seq), generator=g)
    ids[0, -1] = VOCAB - 1
    return ids


def hf_logits(hf_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    """Reference logits from transformers (fp32)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|."""
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()
