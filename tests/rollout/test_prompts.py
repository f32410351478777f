"""Prompt sets: formats by column convention, loading, rendering, filtering and errors."""

from __future__ import annotations

import pytest

from erpd_megatron.data.prompts import (
    PromptDataError,
    load_prompt_dataset,
    load_prompt_set,
    render_prompt,
    resolve_columns,
    select_prompts,
)

from .conftest import CHAT_TEMPLATE, GSM_ROWS, make_tokenizer, write_jsonl


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.mark.parametrize(
    "columns,fmt,q,a",
    [
        (["question", "answer"], "gsm8k", "question", "answer"),
        (["problem", "solution"], "math", "problem", "solution"),
        (["problem", "solution", "answer", "level"], "polaris", "problem", "answer"),  # MATH-500
        (["problem", "answer"], "polaris", "problem", "answer"),  # Polaris
        (["prompt", "answer"], "polaris", "prompt", "answer"),  # processed DAPO
        (
            ["prompt", "reward_model", "data_source"],
            "custom",
            "prompt",
            "reward_model.ground_truth",
        ),  # verl DAPO
    ],
)
def test_auto_detects_formats(columns, fmt, q, a):
    c = resolve_columns(columns)
    assert (c.format, c.question, c.answer) == (fmt, q, a)


def test_explicit_formats_and_missing_columns():
    assert resolve_columns(["problem", "solution", "answer"], "math").answer == "answer"
    assert resolve_columns(["q", "a"], "custom", "q", "a").question == "q"
    with pytest.raises(
        PromptDataError,
        match="answer column 'answer' \\(format gsm8k\\) not found; "
        "columns are \\['question', 'final'\\]",
    ):
        resolve_columns(["question", "final"], "gsm8k")
    with pytest.raises(
        PromptDataError, match="cannot detect the prompt format from columns \\['text'\\]"
    ):
        resolve_columns(["text"])
    with pytest.raises(PromptDataError, match="needs rollout.question_key"):
        resolve_columns(["q", "a"], "custom")
    with pytest.raises(PromptDataError, match="question column 'qq'"):
        resolve_columns(["q", "a"], "custom", "qq", "a")


def test_gsm8k_jsonl_selection_is_seeded_and_normalised(tmp_path, tok):
    path = write_jsonl(tmp_path / "p.jsonl", GSM_ROWS)
    s1 = load_prompt_set(str(path), tok, num_prompts=4, seed=3, max_prompt_tokens=100)
    s2 = load_prompt_set(str(path), tok, num_prompts=4, seed=3, max_prompt_tokens=100)
    s3 = load_prompt_set(str(path), tok, num_prompts=4, seed=4, max_prompt_tokens=100)
    assert [p.prompt_id for p in s1.prompts] == [p.prompt_id for p in s2.prompts]
    assert [p.prompt_id for p in s1.prompts] != [p.prompt_id for p in s3.prompts]
    assert [p.group_index for p in s1.prompts] == [0, 1, 2, 3]
    for p in s1.prompts:
        row = GSM_ROWS[p.prompt_id]
        assert (
            p.question == row["question"] and p.reference == row["answer"].split("####")[1].strip()
        )
        assert (
            p.token_ids == tok(row["question"])["input_ids"] and p.token_ids[0] == tok.bos_token_id
        )
    assert s1.summary()["format"] == "gsm8k" and s1.dataset_rows == 10
    everything = load_prompt_set(str(path), tok, num_prompts=100, seed=0, max_prompt_tokens=100)
    assert len(everything.prompts) == 10  # all when fewer exist


def test_math_parquet_and_directory_loading(tmp_path, tok):
    import datasets

    rows = {
        "problem": ["Find x.", "Find y."],
        "solution": ["So $x=\\boxed{\\frac{1}{2}}$.", "Thus \\boxed{3}."],
    }
    ds = datasets.Dataset.from_dict(rows)
    ds.to_parquet(str(tmp_path / "m.parquet"))
    sel = load_prompt_set(str(tmp_path / "m.parquet"), tok, num_prompts=2, seed=0)
    assert (
        sorted(p.reference for p in sel.prompts) == ["3", "\\frac{1}{2}"]
        and sel.columns.format == "math"
    )
    ds.save_to_disk(str(tmp_path / "saved"))
    assert len(load_prompt_dataset(str(tmp_path / "saved"))) == 2
    datasets.DatasetDict({"test": ds}).save_to_disk(str(tmp_path / "saved_dict"))
    assert len(load_prompt_dataset(str(tmp_path / "saved_dict"), "test")) == 2
    with pytest.raises(PromptDataError, match="no split 'train'; it has test"):
        load_prompt_dataset(str(tmp_path / "saved_dict"), "train")


def test_chat_messages_and_nested_answers(tmp_path, tok):
    rows = [
        {
            "prompt": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": "What is 1+1?"},
            ],
            "reward_model": {"ground_truth": "2", "style": "rule"},
        }
    ]
    path = write_jsonl(tmp_path / "dapo.jsonl", rows)
    sel = load_prompt_set(str(path), tok, num_prompts=1)
    assert sel.prompts[0].question == "What is 1+1?" and sel.prompts[0].reference == "2"


def test_templates_and_chat_template(tok):
    assert (
        render_prompt("Q?", "Solve: {question}\nPut the answer in \\boxed{}.")
        == "Solve: Q?\nPut the answer in \\boxed{}."
    )
    with pytest.raises(PromptDataError, match="placeholder"):
        render_prompt("Q?", "no placeholder")
    assert render_prompt("Q?", tokenizer=tok, use_chat_template=True) == "<s>user: Q?\nassistant:"
    plain = make_tokenizer()
    plain.chat_template = None
    with pytest.raises(PromptDataError, match="no chat template"):
        render_prompt("Q?", tokenizer=plain, use_chat_template=True)
    assert CHAT_TEMPLATE


def test_chat_template_tokens_are_not_doubled(tmp_path, tok):
    path = write_jsonl(tmp_path / "p.jsonl", GSM_ROWS[:2])
    sel = load_prompt_set(str(path), tok, num_prompts=2, use_chat_template=True)
    for p in sel.prompts:
        assert p.text.startswith("<s>user: ") and p.token_ids.count(tok.bos_token_id) == 1


def test_length_filter_counts_and_all_filtered_error(tmp_path, tok):
    rows = GSM_ROWS[:4] + [{"question": "x" * 200, "answer": "#### 1"}]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    sel = load_prompt_set(str(path), tok, num_prompts=10, max_prompt_tokens=40)
    assert len(sel.prompts) == 4 and sel.filtered_too_long == 1 and sel.examined == 5
    assert sel.summary()["filtered_too_long"] == 1
    with pytest.raises(
        PromptDataError,
        match="all 5 prompts were filtered out \\(longer than max_prompt_tokens=5; "
        "the shortest has 15 tokens",
    ):
        load_prompt_set(str(path), tok, num_prompts=10, max_prompt_tokens=5)


def test_empty_and_missing_sources(tmp_path, tok):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(PromptDataError, match="empty.jsonl"):
        load_prompt_set(str(tmp_path / "empty.jsonl"), tok, num_prompts=1)
    import datasets

    with pytest.raises(PromptDataError, match="has no rows"):
        select_prompts(
            datasets.Dataset.from_dict({"question": [], "answer": []}),
            tok,
            num_prompts=1,
            seed=0,
            max_prompt_tokens=10,
        )
    with pytest.raises(PromptDataError, match="no such file"):
        load_prompt_dataset(str(tmp_path / "nope.jsonl"))
    with pytest.raises(PromptDataError, match="unsupported file type"):
        (tmp_path / "x.txt").write_text("hi")
        load_prompt_dataset(str(tmp_path / "x.txt"))
    with pytest.raises(PromptDataError, match="not set"):
        load_prompt_dataset("")


def test_empty_rows_are_skipped_and_counted(tmp_path, tok):
    rows = GSM_ROWS[:3] + [{"question": "", "answer": "#### 1"}, {"question": "Q?", "answer": ""}]
    sel = load_prompt_set(str(write_jsonl(tmp_path / "p.jsonl", rows)), tok, num_prompts=10)
    assert len(sel.prompts) == 3 and sel.filtered_empty == 2 and sel.examined == 3
    one = load_prompt_set(str(write_jsonl(tmp_path / "q.jsonl", rows)), tok, num_prompts=1, seed=0)
    assert one.examined + one.filtered_empty <= 5 and len(one.prompts) == 1
