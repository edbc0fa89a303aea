"""SafeReward, WeightedReward, PerSampleReward and the DAPO overlong penalty on exact values."""

from __future__ import annotations

import logging
import math

import pytest

from psirl.rewards import (
    LengthPenalty,
    PerSampleReward,
    RewardFn,
    SafeReward,
    WeightedReward,
    overlong_penalty,
)


def constant(value):
    def reward(prompts, completions, records):
        return [value] * len(completions)

    reward.__name__ = f"const_{value}"
    return reward


def length_reward(prompts, completions, records):
    return [float(len(c)) for c in completions]


def fragile(prompts, completions, records):
    """Raises on completions containing 'boom'; returns NaN for 'nan'."""
    out = []
    for completion in completions:
        if "boom" in completion:
            raise RuntimeError(f"cannot score {completion!r}")
        out.append(math.nan if completion == "nan" else 1.0)
    return out


def batch(*completions):
    return [""] * len(completions), list(completions), [{}] * len(completions)


def test_safe_reward_isolates_failures_and_counts_them(caplog):
    safe = SafeReward(fragile, fallback=-1.0)
    assert isinstance(safe, RewardFn)
    with caplog.at_level(logging.WARNING, logger="psirl.rewards.base"):
        assert safe(*batch("ok", "boom1", "nan", "ok")) == [1.0, -1.0, -1.0, 1.0]
        assert safe(*batch("boom2", "ok")) == [-1.0, 1.0]
    assert safe.failures == 3
    assert safe.last_failures == 1
    assert safe.metrics() == {"reward/fragile/failures": 3.0, "reward/fragile/failure_rate": 0.5}
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1  # logged once per reward fn, with the exception
    assert "cannot score 'boom1'" in warnings[0].getMessage()
    assert warnings[0].exc_info is not None


def test_safe_reward_without_failures_is_transparent():
    safe = SafeReward(length_reward, name="len")
    assert safe(*batch("a", "abc")) == [1.0, 3.0]
    assert safe.metrics() == {"reward/len/failures": 0.0, "reward/len/failure_rate": 0.0}


def test_safe_reward_wrong_number_of_values_falls_back_per_sample():
    def broken(prompts, completions, records):
        return [0.5]  # always one value, whatever the batch size

    safe = SafeReward(broken, fallback=0.0)
    assert safe(*batch("a", "b", "c")) == [0.5, 0.5, 0.5]  # rescored alone, each is fine
    assert safe.failures == 0
    non_numeric = SafeReward(lambda p, c, r: ["high"] * len(c), fallback=0.25)
    assert non_numeric(*batch("a", "b")) == [0.25, 0.25]
    assert non_numeric.failures == 2


def test_weighted_reward_exact_sums_and_component_means():
    weighted = WeightedReward(
        [("len", length_reward, 0.5), ("bonus", constant(2.0), -1.5), (constant(1.0), 0.25)]
    )
    # r = 0.5*len - 1.5*2 + 0.25*1
    assert weighted(*batch("ab", "abcdef")) == [0.5 * 2 - 3.0 + 0.25, 0.5 * 6 - 3.0 + 0.25]
    assert weighted.last_components == {
        "len": [2.0, 6.0],
        "bonus": [2.0, 2.0],
        "const_1.0": [1.0, 1.0],
    }
    assert weighted.metrics() == {"reward/len": 4.0, "reward/bonus": 2.0, "reward/const_1.0": 1.0}


def test_weighted_reward_includes_component_metrics_and_validates():
    weighted = WeightedReward([("safe", SafeReward(fragile, name="fragile"), 1.0)])
    assert weighted(*batch("boom", "ok")) == [0.0, 1.0]
    assert weighted.metrics() == {
        "reward/safe": 0.5,
        "reward/fragile/failures": 1.0,
        "reward/fragile/failure_rate": 0.5,
    }
    with pytest.raises(ValueError, match="duplicate component name 'a'"):
        WeightedReward([("a", length_reward, 1.0), ("a", length_reward, 1.0)])
    with pytest.raises(ValueError, match="weight must be finite"):
        WeightedReward([("a", length_reward, math.inf)])
    with pytest.raises(ValueError, match="lists differ in length"):
        weighted(["p"], ["a", "b"], [{}, {}])


def test_per_sample_reward():
    reward = PerSampleReward(
        lambda completion, record: float(completion == record["answer"]), "match"
    )
    assert reward(["p", "p"], ["4", "5"], [{"answer": "4"}, {"answer": "4"}]) == [1.0, 0.0]
    assert reward.name == "match"


def test_overlong_penalty_closed_form():
    # L_max = 10, L_cache = 4: no penalty up to 6, then -(L-6)/4, -1 beyond 10.
    expected = {0: 0.0, 6: 0.0, 7: -0.25, 8: -0.5, 9: -0.75, 10: -1.0, 11: -1.0, 100: -1.0}
    for length, value in expected.items():
        assert overlong_penalty(length, 10, 4) == value


def test_length_penalty_in_characters_and_tokens():
    penalty = LengthPenalty(max_length=10, cache_length=4, penalty=2.0)
    assert penalty(*batch("x" * 6, "x" * 8, "x" * 12)) == [0.0, -1.0, -2.0]

    class WordTokenizer:
        def __call__(self, text, add_special_tokens=True):
            return {"input_ids": text.split()}

    words = LengthPenalty(max_length=4, cache_length=2, tokenizer=WordTokenizer())
    assert words(*batch("a b", "a b c", "a b c d e")) == [0.0, -0.5, -1.0]
    with pytest.raises(ValueError, match="cache_length"):
        LengthPenalty(max_length=4, cache_length=5)
