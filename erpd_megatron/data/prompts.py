"""Prompt sets for rollouts and evaluation: loading, column conventions, rendering, selection.

A prompt set is anything :mod:`datasets` reads: a local ``.parquet``/``.jsonl``/``.json``/
``.csv``/``.arrow`` file, a directory of such files or one written by ``save_to_disk``, or a
hub dataset name. The question and reference-answer columns follow one of the common math
conventions (``prompt_format``):

==========  =========================  =============================================
format      columns                    reference answer
==========  =========================  =============================================
gsm8k       ``question`` / ``answer``  the text after the last ``####`` ("1,000" -> "1000")
math        ``problem`` / ``solution`` the last ``\\boxed{...}`` of the solution (an
                                       ``answer`` column wins when present, as in MATH-500)
polaris     ``problem`` or ``prompt``  the ``answer`` column (DAPO, Polaris, DeepScaleR)
            / ``answer``
custom      ``question_key`` /         normalised like the others (``####`` or boxed)
            ``answer_key``
auto        detected from the columns in the order gsm8k, polaris, math
==========  =========================  =============================================

A question stored as a chat (a list of ``{"role", "content"}`` messages) is reduced to the
content of its last user message; ``answer_key`` may be a dotted path into a struct column
(``reward_model.ground_truth`` for verl-style DAPO files).

Selection is deterministic: the rows are visited in a seeded random order, each prompt is
rendered (template, optionally the tokenizer's chat template) and tokenised, prompts longer
than ``max_prompt_tokens`` are counted and skipped, and the first ``num_prompts`` that fit
form the set; their order is the group index of the rollout data.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from erpd_megatron.utils.log import get_logger

log = get_logger(__name__)

FORMATS = ("gsm8k", "math", "polaris", "custom")
_LOCAL_BUILDERS = {
    ".parquet": "parquet",
    ".jsonl": "json",
    ".json": "json",
    ".csv": "csv",
    ".arrow": "arrow",
}


class PromptDataError(ValueError):
    """The prompt set cannot be used as configured; the message says what and how to fix it."""


@dataclass(frozen=True)
class PromptColumns:
    """Which columns hold the question and the reference answer, and how to read them."""

    format: str
    """Resolved convention: gsm8k, math, polaris or custom."""
    question: str
    """Question column."""
    answer: str
    """Reference column (may be a dotted path into a struct column)."""


@dataclass(frozen=True)
class SelectedPrompt:
    """One prompt of a rollout / evaluation set, rendered and tokenised."""

    group_index: int
    """Position in the set (0..P-1): the group index of its samples."""
    prompt_id: int
    """Row index of the prompt in the source split (stable across selections)."""
    question: str
    """The raw question text."""
    text: str
    """The prompt text given to the model (template and chat template applied)."""
    token_ids: list[int]
    """Token ids of ``text`` (special tokens as the tokenizer / chat template adds them)."""
    reference: str
    """Normalised reference answer the verifier compares to."""


@dataclass
class PromptSelection:
    """The selected prompts and the counts the manifest reports."""

    prompts: list[SelectedPrompt]
    """The set, in group order."""
    columns: PromptColumns
    """The resolved column convention."""
    dataset_rows: int
    """Rows in the source split."""
    examined: int
    """Rows visited to fill the set (the filter was applied to these)."""
    filtered_too_long: int
    """Visited rows skipped because the rendered prompt exceeded max_prompt_tokens."""
    filtered_empty: int = 0
    """Visited rows skipped because the question or the reference was empty."""
    stats: dict[str, Any] = field(default_factory=dict)
    """Extra facts (prompt token lengths) for logs and the manifest."""

    def summary(self) -> dict[str, Any]:
        """The counts as a JSON-able mapping (for the manifest)."""
        return {
            "format": self.columns.format,
            "question_column": self.columns.question,
            "answer_column": self.columns.answer,
            "dataset_rows": self.dataset_rows,
            "examined": self.examined,
            "selected": len(self.prompts),
            "filtered_too_long": self.filtered_too_long,
            "filtered_empty": self.filtered_empty,
            **self.stats,
        }


# ---------------------------------------------------------------------------- answer text


def extract_last_boxed(text: str, max_chars: int | None = None) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) in ``text``; None if there is none.

    Braces are matched with a linear scan (escaped ``\\{``/``\\}`` do not count); an unclosed
    box, or content longer than ``max_chars``, gives None. ``\\boxed 5`` (no braces) gives "5".
    """
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    i = start + (6 if text.startswith("\\boxed", start) else 5)
    n = len(text)
    while i < n and text[i] == " ":
        i += 1
    if i >= n:
        return None
    if text[i] != "{":
        m = re.match(r"[^\s$]+", text[i : i + (max_chars or 1000) + 1])
        return m.group(0) if m else None
    depth, j = 0, i
    limit = n if max_chars is None else min(n, i + max_chars + 2)
    while j < limit:
        c = text[j]
        if c == "\\":
            j += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j]
        j += 1
    return None


_NUMBER_WITH_COMMAS = re.compile(r"[-+]?\d{1,3}(,\d{3})+(\.\d+)?")


def normalize_reference(answer: Any) -> str:
    """The final answer of a reference: after the last ``####`` (GSM8K), else the last boxed
    content (MATH solutions), else the stripped text. Thousands separators are removed from
    plain numbers ("1,000" -> "1000")."""
    s = "" if answer is None else str(answer).strip()
    if "####" in s:
        s = s.rsplit("####", 1)[1].strip()
    elif "\\boxed" in s or "\\fbox" in s:
        boxed = extract_last_boxed(s)
        if boxed is not None:
            s = boxed.strip()
    if _NUMBER_WITH_COMMAS.fullmatch(s):
        s = s.replace(",", "")
    return s


# ---------------------------------------------------------------------------- loading


def load_prompt_dataset(source: str, split: str = "train", config_name: str | None = None) -> Any:
    """Load one split of a prompt set with :mod:`datasets` (see the module docstring).

    Errors name the source: a missing local path, an unknown split (with the splits that
    exist), a hub name that cannot be reached.
    """
    import datasets

    if not source:
        raise PromptDataError(
            "rollout.dataset is not set: give a local file/directory or a hub name"
        )
    path = Path(os.path.expanduser(source))
    looks_local = (
        path.exists() or source.startswith((".", "/", "~")) or path.suffix in _LOCAL_BUILDERS
    )
    if looks_local and not path.exists():
        raise PromptDataError(f"prompt set {source}: no such file or directory")
    try:
        if path.is_file():
            builder = _LOCAL_BUILDERS.get(path.suffix)
            if builder is None:
                raise PromptDataError(
                    f"prompt set {source}: unsupported file type '{path.suffix}' "
                    f"(use one of {', '.join(sorted(_LOCAL_BUILDERS))})"
                )
            ds = datasets.load_dataset(builder, data_files=str(path), split="train")
        elif path.is_dir() and (
            (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()
        ):
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                ds = _pick_split(ds, split, source)
        elif path.is_dir():
            dd = datasets.load_dataset(str(path))
            ds = _pick_split(dd, split, source)
        else:
            dd = datasets.load_dataset(source, config_name)
            ds = _pick_split(dd, split, source)
    except PromptDataError:
        raise
    except (
        Exception
    ) as e:  # datasets raises many types (FileNotFound, ConnectionError, ValueError...)
        raise PromptDataError(
            f"prompt set {source} (split {split}): cannot be loaded: {type(e).__name__}: {e}"
        ) from e
    if len(ds) == 0:
        raise PromptDataError(f"prompt set {source} (split {split}) has no rows")
    return ds


def _pick_split(dd: Any, split: str, source: str) -> Any:
    if split in dd:
        return dd[split]
    raise PromptDataError(f"prompt set {source}: no split '{split}'; it has {', '.join(dd)}")


def resolve_columns(
    column_names: Sequence[str],
    prompt_format: str = "auto",
    question_key: str | None = None,
    answer_key: str | None = None,
    *,
    source: str = "prompt set",
) -> PromptColumns:
    """Map a column list to the question/answer columns of ``prompt_format`` (see module doc).

    Explicit ``question_key``/``answer_key`` win over the convention. A missing column is an
    error naming it and listing the columns that exist.
    """
    cols = list(column_names)
    have = set(cols)

    def pick(*options: str) -> str | None:
        return next((c for c in options if c in have), None)

    if prompt_format == "auto":
        if question_key and answer_key:
            fmt = "custom"
        elif {"question", "answer"} <= have:
            fmt = "gsm8k"
        elif "answer" in have and pick("problem", "prompt"):
            fmt = "polaris"
        elif {"problem", "solution"} <= have:
            fmt = "math"
        elif "prompt" in have and "reward_model" in have:
            fmt, answer_key = "custom", answer_key or "reward_model.ground_truth"
            question_key = question_key or "prompt"
        else:
            raise PromptDataError(
                f"{source}: cannot detect the prompt format from columns {cols}; set "
                "rollout.prompt_format (gsm8k: question/answer, math: problem/solution, polaris: "
                "problem|prompt/answer) or rollout.question_key and rollout.answer_key"
            )
    else:
        fmt = prompt_format
    if fmt not in FORMATS:
        raise PromptDataError(
            f"{source}: unknown prompt_format '{fmt}' (one of auto, {', '.join(FORMATS)})"
        )
    defaults = {
        "gsm8k": ("question", "answer"),
        "math": ("problem", pick("answer", "solution") or "solution"),
        "polaris": (pick("problem", "prompt", "question") or "problem", "answer"),
        "custom": (question_key, answer_key),
    }[fmt]
    q = question_key or defaults[0]
    a = answer_key or defaults[1]
    if not q or not a:
        raise PromptDataError(
            f"{source}: prompt_format custom needs rollout.question_key and rollout.answer_key"
        )
    for role, name in (("question", q), ("answer", a)):
        if name.split(".")[0] not in have:
            raise PromptDataError(
                f"{source}: {role} column '{name}' (format {fmt}) not found; columns are {cols}"
            )
    return PromptColumns(format=fmt, question=q, answer=a)


def question_text(value: Any) -> str:
    """The question as text; a chat (list of messages) gives its last user message."""
    if isinstance(value, list):
        users = [m for m in value if isinstance(m, dict) and m.get("role", "user") == "user"]
        if users:
            return str(users[-1].get("content", "")).strip()
        return ""
    return "" if value is None else str(value).strip()


def _dig(value: Any, path: list[str]) -> Any:
    for key in path:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def render_prompt(
    question: str,
    template: str = "{question}",
    tokenizer: Any = None,
    use_chat_template: bool = False,
) -> str:
    """Apply the template (``{question}`` is replaced; other braces, e.g. ``\\boxed{}``, are kept)
    and, optionally, the tokenizer's chat template as one user turn with the generation prompt."""
    if "{question}" not in template:
        raise PromptDataError(f"prompt_template {template!r} has no '{{question}}' placeholder")
    text = template.replace("{question}", question)
    if use_chat_template:
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise PromptDataError(
                "use_chat_template is true but the tokenizer has no chat template; set "
                "rollout.use_chat_template=false or use a tokenizer with a chat_template"
            )
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )
    return text


def tokenize_prompts(texts: list[str], tokenizer: Any, use_chat_template: bool) -> list[list[int]]:
    """Token ids of rendered prompts. A chat template already holds its special tokens, so
    they are not added a second time; a plain prompt gets the tokenizer's (e.g. BOS)."""
    enc = tokenizer(texts, add_special_tokens=not use_chat_template)
    return [list(map(int, ids)) for ids in enc["input_ids"]]


def select_prompts(
    dataset: Any,
    tokenizer: Any,
    *,
    num_prompts: int,
    seed: int,
    max_prompt_tokens: int,
    prompt_format: str = "auto",
    question_key: str | None = None,
    answer_key: str | None = None,
    template: str = "{question}",
    use_chat_template: bool = False,
    source: str = "prompt set",
    chunk: int = 512,
) -> PromptSelection:
    """Choose ``num_prompts`` prompts of a loaded split (see module doc); all when fewer exist.

    Raises :class:`PromptDataError` when the split is empty, a column is missing, or every
    examined prompt was filtered (naming the limit and the shortest prompt seen).
    """
    if num_prompts <= 0:
        raise PromptDataError(f"num_prompts must be positive, got {num_prompts}")
    n = len(dataset)
    if n == 0:
        raise PromptDataError(f"{source} has no rows")
    columns = resolve_columns(
        dataset.column_names, prompt_format, question_key, answer_key, source=source
    )
    order = np.random.default_rng(seed).permutation(n)
    q_col, a_path = columns.question, columns.answer.split(".")
    selected: list[SelectedPrompt] = []
    examined = too_long = empty = 0
    shortest = None
    for lo in range(0, n, chunk):
        idx = [int(i) for i in order[lo : lo + chunk]]
        rows = dataset.select(idx)
        qs = [question_text(v) for v in rows[q_col]]
        refs = [
            normalize_reference(_dig(v, a_path[1:]) if len(a_path) > 1 else v)
            for v in rows[a_path[0]]
        ]
        keep = [k for k in range(len(idx)) if qs[k] and refs[k]]
        texts = [render_prompt(qs[k], template, tokenizer, use_chat_template) for k in keep]
        encoded = dict(
            zip(
                keep,
                zip(texts, tokenize_prompts(texts, tokenizer, use_chat_template) if texts else []),
            )
        )
        for k in range(len(idx)):  # visit rows in the seeded order until the set is full
            if len(selected) >= num_prompts:
                break
            if k not in encoded:
                empty += 1
                continue
            text, tok = encoded[k]
            examined += 1
            shortest = len(tok) if shortest is None else min(shortest, len(tok))
            if len(tok) > max_prompt_tokens:
                too_long += 1
                continue
            selected.append(
                SelectedPrompt(
                    group_index=len(selected),
                    prompt_id=idx[k],
                    question=qs[k],
                    text=text,
                    token_ids=tok,
                    reference=refs[k],
                )
            )
        if len(selected) >= num_prompts:
            break
    if not selected:
        detail = f"; the shortest has {shortest} tokens" if shortest is not None else ""
        raise PromptDataError(
            f"{source}: all {examined} prompts were filtered out (longer than max_prompt_tokens="
            f"{max_prompt_tokens}{detail}, empty: {empty}); raise rollout.max_prompt_tokens"
        )
    if len(selected) < num_prompts:
        log.warning(
            "%s: only %d prompts available after filtering (asked for %d)",
            source,
            len(selected),
            num_prompts,
        )
    if too_long:
        log.info(
            "%s: %d of %d examined prompts longer than %d tokens were skipped",
            source,
            too_long,
            examined,
            max_prompt_tokens,
        )
    lengths = np.array([len(p.token_ids) for p in selected])
    stats = {"prompt_tokens_mean": float(lengths.mean()), "prompt_tokens_max": int(lengths.max())}
    return PromptSelection(
        prompts=selected,
        columns=columns,
        dataset_rows=n,
        examined=examined,
        filtered_too_long=too_long,
        filtered_empty=empty,
        stats=stats,
    )


def load_prompt_set(
    source: str,
    tokenizer: Any,
    *,
    split: str = "train",
    config_name: str | None = None,
    num_prompts: int,
    seed: int = 0,
    max_prompt_tokens: int = 1024,
    prompt_format: str = "auto",
    question_key: str | None = None,
    answer_key: str | None = None,
    template: str = "{question}",
    use_chat_template: bool = False,
) -> PromptSelection:
    """Load a split and select prompts from it: :func:`load_prompt_dataset` + :func:`select_prompts`
    (the one entry point rollouts and evaluation share)."""
    ds = load_prompt_dataset(source, split, config_name)
    return select_prompts(
        ds,
        tokenizer,
        num_prompts=num_prompts,
        seed=seed,
        max_prompt_tokens=max_prompt_tokens,
        prompt_format=prompt_format,
        question_key=question_key,
        answer_key=answer_key,
        template=template,
        use_chat_template=use_chat_template,
        source=f"prompt set {source} ({split})",
    )


__all__ = [
    "PromptColumns",
    "PromptDataError",
    "PromptSelection",
    "SelectedPrompt",
    "extract_last_boxed",
    "load_prompt_dataset",
    "load_prompt_set",
    "normalize_reference",
    "question_text",
    "render_prompt",
    "resolve_columns",
    "select_prompts",
    "tokenize_prompts",
]
