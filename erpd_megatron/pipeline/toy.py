"""The embedded default task: verifiable multi-step arithmetic with a boxed answer.

A problem is a chain ``a+b-c`` of small integers; the reference solution works it out step
by step and ends with the answer in ``\\boxed{}``, which the math verifier checks::

    prompt:   17+5-9=
    solution: 17+5=22;22-9=13;\\boxed{13}

Everything is generated deterministically from a seed: the train, validation and test
splits (disjoint problems, written as JSON lines that ``datasets`` loads, Polaris-style
``problem/answer`` columns), a character-level tokenizer built with ``tokenizers`` and saved
in Hugging Face format (so the demo goes through the same HF <-> Megatron path as real
models), and the supervised data the tiny base is trained on from scratch.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

DIGITS = "0123456789"
CHARS = list(DIGITS + "+-=;}")
BOXED = "\\boxed{"
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]


@dataclass(frozen=True)
class Problem:
    """One arithmetic chain and its worked solution."""

    terms: tuple[int, ...]
    ops: tuple[str, ...]

    @property
    def prompt(self) -> str:
        """The question: ``a+b-c=``."""
        s = str(self.terms[0])
        for op, t in zip(self.ops, self.terms[1:]):
            s += f"{op}{t}"
        return s + "="

    @property
    def answer(self) -> int:
        """The value of the chain."""
        v = self.terms[0]
        for op, t in zip(self.ops, self.terms[1:]):
            v = v + t if op == "+" else v - t
        return v

    @property
    def solution(self) -> str:
        """Step-by-step working ending in the boxed answer."""
        v, steps = self.terms[0], []
        for op, t in zip(self.ops, self.terms[1:]):
            nv = v + t if op == "+" else v - t
            steps.append(f"{v}{op}{t}={nv}")
            v = nv
        return ";".join(steps) + f";{BOXED}{v}}}"


def make_problems(
    n: int,
    *,
    seed: int,
    max_term: int = 20,
    num_terms: tuple[int, int] = (2, 3),
    exclude: set[str] | None = None,
) -> list[Problem]:
    """``n`` distinct problems with non-negative intermediate values (the tokenizer has no
    minus sign for negative numbers), none whose prompt is in ``exclude``."""
    rng = random.Random(seed)
    seen = set(exclude or ())
    out: list[Problem] = []
    while len(out) < n:
        k = rng.randint(*num_terms)
        terms = [rng.randint(1, max_term) for _ in range(k)]
        ops, v = [], terms[0]
        for t in terms[1:]:
            op = "-" if rng.random() < 0.5 and v - t >= 0 else "+"
            v = v + t if op == "+" else v - t
            ops.append(op)
        p = Problem(tuple(terms), tuple(ops))
        if p.prompt in seen:
            continue
        seen.add(p.prompt)
        out.append(p)
    return out


SPLITS = ("train", "validation", "test")


def write_splits(
    out_dir: str | Path,
    *,
    train: int,
    seed: int,
    validation: int = 0,
    test: int | None = None,
    heldout: int | None = None,
) -> dict[str, Path]:
    """Write ``train.jsonl``, ``validation.jsonl`` and ``test.jsonl`` (pairwise disjoint
    prompts) with ``problem``/``answer``/``solution`` columns; returns their paths.

    Validation is drawn first from ``seed + 1`` (the generator and seed of the former single
    held-out split, so earlier looks at that split were looks at validation), test from
    ``seed + 2`` excluding validation, train from ``seed`` excluding both. Settings are chosen
    on validation only; the reported table uses test only (docs/demo_protocol.md).

    ``heldout`` is the former name of ``test``; ``heldout.jsonl`` is written too, a copy of
    ``test.jsonl`` under the name earlier callers read (``erpd study``)."""
    test = heldout if test is None else test
    if test is None:
        raise TypeError("write_splits needs the size of the test split (test=)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    val = make_problems(validation, seed=seed + 1)
    test_ = make_problems(test, seed=seed + 2, exclude={p.prompt for p in val})
    tr = make_problems(train, seed=seed, exclude={p.prompt for p in val + test_})
    paths = {}
    for name, probs in zip(SPLITS, (tr, val, test_)):
        path = out / f"{name}.jsonl"
        path.write_text(
            "".join(
                json.dumps({"problem": p.prompt, "answer": str(p.answer), "solution": p.solution})
                + "\n"
                for p in probs
            )
        )
        paths[name] = path
    paths["heldout"] = out / "heldout.jsonl"
    paths["heldout"].write_text(paths["test"].read_text())
    return paths


def char_tokenizer(chars: list[str], specials: list[str] = SPECIALS):
    """A character-level ``PreTrainedTokenizerFast`` (BPE without merges) over ``specials +
    chars`` (ids in that order); BOS is prepended to plain text."""
    from tokenizers import Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(specials + chars)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", vocab["<s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
    )


def build_tokenizer(out_dir: str | Path | None = None):
    """The task's character-level tokenizer with ``\\boxed{`` as one added token. Saved with
    ``save_pretrained`` when ``out_dir`` is given."""
    fast = char_tokenizer(CHARS)
    fast.add_tokens([BOXED])
    if out_dir is not None:
        fast.save_pretrained(out_dir)
    return fast


def unboxed(solution: str) -> str:
    """The same working with the final answer written plainly (``...;13``): no ``\\boxed{}``,
    so the verifier scores it 0 whatever the arithmetic."""
    head, _, tail = solution.rpartition(BOXED)
    return head + tail.rstrip("}")


def sft_records(
    problems_file: str | Path, tokenizer, *, unboxed_fraction: float = 0.0, seed: int = 0
) -> list:
    """The supervised data of the base as rollout records: reference solutions with reward 1
    (Stage 1's ``ce`` loss trains on reward-1 responses: supervised fine-tuning).

    A random ``unboxed_fraction`` of them end with the plain answer instead of the boxed one,
    so the base, like many real base models, follows the answer format only part of the time:
    a behaviour that RL can learn from any prompt and that carries over to every prompt."""
    from erpd_megatron.data.rollouts import RolloutRecord

    rng = random.Random(seed)
    recs = []
    for i, line in enumerate(Path(problems_file).read_text().splitlines()):
        row = json.loads(line)
        text = unboxed(row["solution"]) if rng.random() < unboxed_fraction else row["solution"]
        prompt = tokenizer(row["problem"])["input_ids"]
        resp = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        recs.append(
            RolloutRecord(
                sample_id=i,
                prompt_id=i,
                group_index=i,
                sample_index=0,
                prompt_token_ids=prompt,
                response_token_ids=resp,
                reward=1.0,
                finish_reason="stop",
                engine_logprobs=[0.0] * len(resp),
                prompt_text=row["problem"],
                response_text=text,
                reference=row["answer"],
            )
        )
    return recs
