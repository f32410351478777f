"""The math verifier: a table of answer forms, adversarial answers under the pool's timeout,
and a pool that survives hanging, crashing and raising reward functions."""

from __future__ import annotations

import time

import pytest

from erpd_megatron.data.prompts import extract_last_boxed, normalize_reference
from erpd_megatron.rollout.reward_pool import RewardPool, RewardPoolError
from erpd_megatron.rollout.verifier import (
    RewardFnError,
    math_reward,
    math_reward_lenient,
    resolve_reward_fn,
)

B = "\\boxed"
# (response, reference, expected reward)
TABLE = [
    # integers and signs
    (f"The answer is {B}{{42}}.", "42", 1.0),
    (f"{B}{{42}}", "#### 42", 1.0),
    (f"{B}{{ 42 }}", "42", 1.0),
    (f"{B}{{43}}", "42", 0.0),
    (f"{B}{{-3}}", "-3", 1.0),
    (f"{B}{{3}}", "-3", 0.0),
    (f"{B}{{1000}}", "1,000", 1.0),
    (f"{B}{{1,000}}", "1000", 1.0),
    (f"{B}{{1{{,}}000}}", "1000", 1.0),
    (f"{B}{{007}}", "7", 1.0),
    # fractions and decimals
    (f"{B}{{\\frac{{1}}{{2}}}}", "0.5", 1.0),
    (f"{B}{{0.5}}", "\\frac{1}{2}", 1.0),
    (f"{B}{{\\dfrac{{1}}{{2}}}}", "\\frac12", 1.0),
    (f"{B}{{\\tfrac{{3}}{{4}}}}", "0.75", 1.0),
    (f"{B}{{1/4}}", "0.25", 1.0),
    (f"{B}{{2/4}}", "\\frac{1}{2}", 1.0),
    (f"{B}{{\\frac{{1}}{{3}}}}", "\\frac{1}{2}", 0.0),
    (f"{B}{{10.0}}", "10", 1.0),
    (f"{B}{{0.333}}", "\\frac{1}{3}", 0.0),
    (f"{B}{{-\\frac{{5}}{{2}}}}", "-2.5", 1.0),
    # radicals, pi, expressions
    (f"{B}{{\\sqrt{{8}}}}", "2\\sqrt{2}", 1.0),
    (f"{B}{{\\frac{{\\sqrt{{3}}}}{{2}}}}", "\\sqrt{3}/2", 1.0),
    (f"{B}{{2\\pi}}", "2\\pi", 1.0),
    (f"{B}{{\\pi}}", "2\\pi", 0.0),
    (f"{B}{{x^2+2x+1}}", "(x+1)^2", 1.0),
    (f"{B}{{2^{{10}}}}", "1024", 1.0),
    # percent, units, currency, degrees, text
    (f"{B}{{50\\%}}", "50\\%", 1.0),
    (f"{B}{{50}}", "50\\%", 1.0),
    (f"{B}{{5\\text{{ cm}}}}", "5", 1.0),
    (f"{B}{{5 cm}}", "5", 1.0),
    (f"{B}{{\\$12}}", "12", 1.0),
    (f"{B}{{90^\\circ}}", "90", 1.0),
    (f"{B}{{\\text{{(A)}}}}", "A", 1.0),
    # equations, sets, intervals, tuples
    (f"{B}{{x=3}}", "3", 1.0),
    (f"{B}{{3}}", "x = 3", 1.0),
    (f"{B}{{\\{{2, 1\\}}}}", "\\{1,2\\}", 1.0),
    (f"{B}{{[0,1)}}", "[0,1)", 1.0),
    (f"{B}{{(0,1)}}", "[0,1)", 0.0),
    (f"{B}{{(1, 2)}}", "(1,2)", 1.0),
    # which answer counts
    (f"First {B}{{1}}, finally {B}{{2}}.", "2", 1.0),
    (f"First {B}{{2}}, finally {B}{{1}}.", "2", 0.0),
    (f"{B}{{\\frac{{1}}{{2}}}} and more text", "\\frac{1}{2}", 1.0),
    ("The answer is 42.", "42", 0.0),  # no boxed answer
    ("", "42", 0.0),
    (f"{B}{{}}", "42", 0.0),
    (f"{B}{{42", "42", 0.0),  # unclosed box
    (f"{B}{{42}}", "", 0.0),  # no reference
    # MATH-style solution as the reference
    (f"{B}{{\\frac{{1}}{{2}}}}", "So we get $x = \\boxed{\\frac{1}{2}}$.", 1.0),
    (f"{B}{{7}}", "Natalia sold 48/2 = 24 clips.\n#### 7", 1.0),
]


@pytest.mark.parametrize("response,reference,expected", TABLE)
def test_math_reward_table(response, reference, expected):
    assert math_reward(response, reference) == expected


def test_table_is_large():
    assert len(TABLE) >= 40


def test_reference_normalisation_and_boxed_extraction():
    assert normalize_reference("Step one.\n#### 1,234") == "1234"
    assert normalize_reference("thus $\\boxed{\\frac{a}{b}}$ and \\boxed{7}") == "7"
    assert normalize_reference("  5 ") == "5"
    assert extract_last_boxed("a \\boxed{x{y}z} b") == "x{y}z"
    assert extract_last_boxed("\\boxed 5 and") == "5"
    assert extract_last_boxed("\\fbox{3}") == "3"
    assert extract_last_boxed("\\boxed{\\{1\\}}") == "\\{1\\}"
    assert extract_last_boxed("none") is None
    assert extract_last_boxed("\\boxed{" + "1" * 100 + "}", max_chars=10) is None


def test_lenient_reward_uses_math_verify_extraction():
    assert math_reward_lenient("The final answer is $42$.", "42") == 1.0
    assert math_reward_lenient("The final answer is $41$.", "42") == 0.0
    assert math_reward_lenient(f"{B}{{42}}", "42") == 1.0


ADVERSARIAL = [
    f"{B}{{9^{{9^{{9^{{9}}}}}}}}",
    f"{B}{{10^{{100000000}}}}",
    f"{B}{{10**100000000}}",
    "10**100000000",
    f"{B}{{9**9**9**9}}",
    f"{B}{{2^{{2^{{2^{{2^{{2^{{2}}}}}}}}}}}}",
    "x" * 5_000_000,
    f"{B}{{" + "1" * 5_000_000 + "}",
    f"{B}{{" + "{" * 10_000 + "1" + "}" * 10_000 + "}",
    f"{B}{{" + "\\frac{" * 10_000 + "1}{2}" * 10_000 + "}",
    f"{B}{{" + "(" * 10_000 + "1" + ")" * 10_000 + "}",
]


def test_adversarial_answers_score_zero_within_timeout():
    timeout = 2.0
    with RewardPool(
        "erpd_megatron.rollout.verifier:math_reward", timeout=timeout, num_workers=2
    ) as pool:
        assert pool.map([f"{B}{{4}}"], ["4"]) == [1.0]  # workers ready before timing
        t0 = time.monotonic()
        rewards = pool.map(ADVERSARIAL + [f"{B}{{5}}"], ["5"] * len(ADVERSARIAL) + ["5"])
        elapsed = time.monotonic() - t0
        assert rewards[:-1] == [0.0] * len(ADVERSARIAL)
        assert rewards[-1] == 1.0  # the pool still works after the timeouts
        assert max(pool.last_durations) <= timeout + 0.5, pool.last_durations
        assert elapsed < 30, elapsed
        assert pool.map([f"{B}{{6}}"] * 3, ["6"] * 3) == [1.0] * 3


def test_pool_survives_hanging_crashing_and_raising_rewards():
    with RewardPool("tests.rollout.rewards:hang", timeout=1.0, num_workers=2) as pool:
        t0 = time.monotonic()
        assert pool.map(["ok", "hang", "ok", "hang", "ok"], [""] * 5) == [1.0, 0.0, 1.0, 0.0, 1.0]
        assert pool.stats["timeouts"] == 2 and time.monotonic() - t0 < 20
    with RewardPool("tests.rollout.rewards:crash", timeout=5.0, num_workers=1) as pool:
        assert pool.map(["crash", "ok", "crash", "ok"], [""] * 4) == [0.0, 1.0, 0.0, 1.0]
        assert pool.stats["crashes"] == 2
    with RewardPool("tests.rollout.rewards:boom", timeout=5.0, num_workers=1) as pool:
        assert pool.map(["boom", "nan", "fine"], [""] * 3) == [0.0, 0.0, 0.5]
        assert pool.stats["errors"] == 2


def test_reward_fn_errors_are_clear():
    with pytest.raises(RewardFnError, match="cannot be imported"):
        resolve_reward_fn("no_such_module_xyz:f")
    with pytest.raises(RewardFnError, match="has no attribute 'nope'"):
        resolve_reward_fn("erpd_megatron.rollout.verifier:nope")
    with pytest.raises(RewardFnError, match="expected 'module:function'"):
        resolve_reward_fn("justaname")
    assert resolve_reward_fn("erpd_megatron.rollout.verifier.math_reward") is math_reward
    with pytest.raises(RewardFnError):
        RewardPool("no_such_module_xyz:f")


def test_pool_rejects_bad_arguments():
    with pytest.raises(ValueError, match="timeout"):
        RewardPool("tests.rollout.rewards:boom", timeout=0)
    with RewardPool("tests.rollout.rewards:boom", timeout=5, num_workers=1) as pool:
        with pytest.raises(ValueError, match="references"):
            pool.map(["a"], [])
    with pytest.raises(RewardPoolError, match="closed"):
        pool.map(["a"], ["b"])
