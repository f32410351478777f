"""Math answer verification: the default reward ``math_reward(response_text, reference)``.

The response's final answer is the content of its last ``\\boxed{...}`` (no boxed answer
scores 0); the reference is normalised (GSM8K ``#### 42`` -> ``42``, a MATH solution -> its
last boxed answer, see :func:`erpd_megatron.data.prompts.normalize_reference`). Both are
parsed and compared by ``math-verify`` (LaTeX, fractions vs decimals, percent, units, sets,
intervals, equations ``x = 3`` vs ``3``...). No model output is ever passed to ``eval``.

Cheap guards reject answers that cannot be legitimate (longer than :data:`MAX_ANSWER_CHARS`,
braces nested deeper than :data:`MAX_BRACE_DEPTH`) before any parsing. Everything else that
can be slow (``9^{9^{9^{9}}}``) or crash is contained by running the reward in the worker
pool of :mod:`erpd_megatron.rollout.reward_pool`, which kills a worker past its timeout.

A reward function is any importable ``module:function(response_text, reference) -> float``
(``rollout.reward_fn``); :func:`resolve_reward_fn` loads one.
"""

from __future__ import annotations

import importlib
import logging
import threading
from collections.abc import Callable

from erpd_megatron.data.prompts import extract_last_boxed, normalize_reference

MAX_ANSWER_CHARS = 1000
"""Boxed answers longer than this score 0 without being parsed."""
MAX_BRACE_DEPTH = 48
"""Boxed answers with braces nested deeper than this score 0 without being parsed."""
INNER_TIMEOUT_S = 3
"""math-verify's own (signal-based) timeout per parse / comparison, when on the main thread."""

# math-verify logs the whole offending string on a timeout; a megabyte answer would flood logs.
logging.getLogger("math_verify").setLevel(logging.ERROR)
logging.getLogger("latex2sympy2_extended").setLevel(logging.ERROR)


def brace_depth(text: str) -> int:
    """Maximum nesting depth of ``{}`` in ``text`` (escaped braces ignored)."""
    depth = best = 0
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == "{":
            depth += 1
            best = max(best, depth)
        elif c == "}":
            depth = max(depth - 1, 0)
        i += 1
    return best


def _inner_timeout() -> int | None:
    # signal.alarm only works on the main thread; elsewhere rely on the pool's timeout.
    return INNER_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None


def answers_match(reference: str, answer: str) -> bool:
    """True when math-verify judges ``answer`` equal to ``reference``.

    Both are LaTeX-ish strings without ``\\boxed``. Falls back to exact string equality when
    the reference cannot be parsed.
    """
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    config = [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]
    t = _inner_timeout()
    gold = parse(f"\\boxed{{{reference}}}", extraction_config=config, parsing_timeout=t)
    if not gold:
        return answer.strip() == reference.strip()
    pred = parse(f"\\boxed{{{answer}}}", extraction_config=config, parsing_timeout=t)
    if not pred:
        return False
    return bool(verify(gold, pred, timeout_seconds=t))


def _guarded(answer: str | None) -> bool:
    return (
        answer is not None
        and answer.strip() != ""
        and len(answer) <= MAX_ANSWER_CHARS
        and brace_depth(answer) <= MAX_BRACE_DEPTH
    )


def math_reward(response_text: str, reference: str) -> float:
    """1.0 when the last ``\\boxed{...}`` of the response equals the reference, else 0.0.

    ``reference`` may be a bare answer, a GSM8K answer with ``####`` or a MATH solution.
    Any parsing failure counts as wrong. Run it through the reward pool for a hard timeout.
    """
    answer = extract_last_boxed(response_text or "", max_chars=MAX_ANSWER_CHARS)
    ref = normalize_reference(reference)
    if not ref or not _guarded(answer):
        return 0.0
    try:
        return 1.0 if answers_match(ref, answer) else 0.0  # type: ignore[arg-type]
    except Exception:  # math-verify / sympy errors on odd input: wrong, not fatal
        return 0.0


def math_reward_lenient(response_text: str, reference: str) -> float:
    """Like :func:`math_reward`, but when there is no boxed answer math-verify's own extraction
    ("final answer is ...", the last LaTeX expression) looks at the last 2,000 characters."""
    if extract_last_boxed(response_text or "", max_chars=MAX_ANSWER_CHARS) is not None:
        return math_reward(response_text, reference)
    ref = normalize_reference(reference)
    if not ref:
        return 0.0
    try:
        from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

        config = [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]
        t = _inner_timeout()
        gold = parse(f"\\boxed{{{ref}}}", extraction_config=config, parsing_timeout=t)
        tail = (response_text or "")[-2000:]
        if brace_depth(tail) > MAX_BRACE_DEPTH:
            return 0.0
        pred = parse(tail, parsing_timeout=t)
        return 1.0 if gold and pred and verify(gold, pred, timeout_seconds=t) else 0.0
    except Exception:
        return 0.0


class RewardFnError(ValueError):
    """``rollout.reward_fn`` does not name an importable callable."""


def resolve_reward_fn(path: str) -> Callable[[str, str], float]:
    """Import ``module:function`` (or ``module.function``) and return the callable."""
    if ":" in path:
        module_name, _, attr = path.partition(":")
    else:
        module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        raise RewardFnError(f"reward_fn '{path}': expected 'module:function'")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:
        raise RewardFnError(
            f"reward_fn '{path}': module '{module_name}' cannot be imported ({type(e).__name__}: "
            f"{e})"
        ) from e
    fn = getattr(module, attr, None)
    if fn is None:
        raise RewardFnError(f"reward_fn '{path}': module '{module_name}' has no attribute '{attr}'")
    if not callable(fn):
        raise RewardFnError(f"reward_fn '{path}': '{attr}' is not callable")
    return fn


__all__ = [
    "MAX_ANSWER_CHARS",
    "MAX_BRACE_DEPTH",
    "RewardFnError",
    "answers_match",
    "brace_depth",
    "math_reward",
    "math_reward_lenient",
    "resolve_reward_fn",
]
