"""AnswerVerifier, FormatReward, TaskReward on hand-made answers."""

from __future__ import annotations

import re
from fractions import Fraction

import pytest

from psirl.data import AdditionTask, CountdownTask
from psirl.rewards import (
    AnswerVerifier,
    FormatReward,
    TaskReward,
    extract_answer_is,
    extract_boxed,
    extract_last_number,
    parse_number,
)


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("42", Fraction(42)),
        ("-1,234.5", Fraction(-2469, 2)),
        ("3/4", Fraction(3, 4)),
        (r"\frac{3}{4}", Fraction(3, 4)),
        (r"-\dfrac{1}{2}", Fraction(-1, 2)),
        ("1e-3", Fraction(1, 1000)),
        (".5", Fraction(1, 2)),
        ("$42.", Fraction(42)),
        ("42 apples", Fraction(42)),
        ("x2", None),
        ("1/0", None),
        ("none", None),
    ],
)
def test_parse_number(text, value):
    assert parse_number(text) == value


def test_extractors():
    assert extract_boxed(r"so \boxed{\frac{1}{2}} and \boxed{7}") == "7"
    assert extract_boxed(r"\boxed{a{b}c}") == "a{b}c"
    assert extract_boxed(r"\boxed{unclosed") is None
    assert extract_answer_is("The answer is 12 apples.\nThanks") == "12 apples"
    assert extract_answer_is("work...\n#### 72") == "72"
    assert extract_answer_is("no conclusion") is None
    assert extract_last_number("3+4 = 7. Done in v1.2.3") == "7"
    assert extract_last_number("ratio 3/4") == "3/4"


@pytest.mark.parametrize(
    ("completion", "reward"),
    [
        (r"Thus \boxed{72}.", 1.0),
        (r"\boxed{72.0}", 1.0),
        ("The answer is 72.", 1.0),
        ("Answer: 72 dollars", 1.0),
        ("I computed 70 then 72", 1.0),  # last-number fallback
        (r"\boxed{71} though 72 appears later", 0.0),  # boxed wins over last number
        ("The answer is 71. Also 72", 0.0),  # 'answer is' wins over last number
        ("seventy-two", 0.0),
        ("", 0.0),
    ],
)
def test_answer_verifier_numeric(completion, reward):
    verifier = AnswerVerifier()
    assert verifier([""], [completion], [{"answer": "72"}]) == [reward]


def test_answer_verifier_tolerance_fractions_and_reference_forms():
    verifier = AnswerVerifier(abs_tol=1e-3)
    assert verifier.score("0.6667", "2/3") == 1.0
    assert verifier.score("0.667", "2/3") == 1.0
    assert verifier.score("0.66", "2/3") == 0.0
    assert AnswerVerifier().score(r"\boxed{\frac{2}{3}}", "0.6666666666666666") == 1.0
    assert AnswerVerifier().score("#### 1,000", "Natalia sold 1000 clips.\n#### 1000") == 1.0
    with pytest.raises(ValueError, match="field 'answer': reference 'blue' is not a number"):
        AnswerVerifier().score("1", "blue")
    with pytest.raises(ValueError, match=r"records\[0\]: field 'answer': missing"):
        AnswerVerifier()([""], ["1"], [{}])


def test_answer_verifier_exact_mode():
    verifier = AnswerVerifier(mode="exact")
    assert verifier.score(r"\boxed{Paris}", "paris") == 1.0
    assert verifier.score("The answer is  New   York.", "new york") == 1.0
    assert verifier.score("Paris", "Paris") == 1.0
    assert verifier.score("Paris, France", "Paris") == 0.0
    assert AnswerVerifier(mode="exact", case_sensitive=True).score("paris", "Paris") == 0.0


def test_format_reward():
    think = FormatReward(
        r"<think>.*</think>\s*<answer>.*</answer>", flags=re.DOTALL, full_match=True
    )
    assert think(
        ["", "", ""],
        [
            "<think>a\nb</think> <answer>1</answer>",
            "<answer>1</answer>",
            "x <think></think><answer>1</answer>",
        ],
        [{}, {}, {}],
    ) == [1.0, 0.0, 0.0]
    assert FormatReward(r"\d+", reward=0.5)(["", ""], ["a1", "b"], [{}, {}]) == [0.5, 0.0]
    with pytest.raises(ValueError, match="invalid regular expression"):
        FormatReward("(")


def test_task_reward_wraps_task_verifiers():
    addition = TaskReward(AdditionTask())
    assert addition.name == "task/addition"
    assert addition(["1+2=", "1+2="], ["3", "4"], [{"answer": "3"}, {"answer": "3"}]) == [1.0, 0.0]
    countdown = TaskReward(CountdownTask())
    record = {"numbers": [7, 3, 2], "target": 17}
    assert countdown(["", ""], ["7*2+3", "7+3+2"], [record, record]) == [1.0, 0.0]
