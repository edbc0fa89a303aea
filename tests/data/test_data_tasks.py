"""Synthetic tasks: formats, determinism, disjoint splits, verifiers on hand-made answers."""

from __future__ import annotations

import re
import zlib
from fractions import Fraction

import pytest

from psirl.data import (
    TASKS,
    AdditionTask,
    CountdownTask,
    ExpressionError,
    get_task,
    parse_expression,
)


def test_addition_records_are_correct_sums_and_deterministic():
    task = AdditionTask(digits=2)
    records = task.make(200, seed=7)
    for record in records:
        match = re.fullmatch(r"(\d{1,2})\+(\d{1,2})=", record["prompt"])
        assert match, record
        assert record["answer"] == str(int(match.group(1)) + int(match.group(2)))
    assert task.make(200, seed=7) == records
    assert task.make(200, seed=8) != records


@pytest.mark.parametrize(
    ("completion", "reward"),
    [
        ("81", 1.0),
        (" 81 ", 1.0),
        ("81\n23+1=24", 1.0),
        ("81<|endoftext|>junk", 1.0),
        ("81</s>", 1.0),
        ("8", 0.0),
        ("081", 0.0),
        ("81x", 0.0),
        ("", 0.0),
        ("\n81", 0.0),
    ],
)
def test_addition_reward_reads_the_first_line(completion, reward):
    assert AdditionTask().reward(completion, {"prompt": "23+58=", "answer": "81"}) == reward


def test_splits_are_disjoint_and_follow_the_hash_rule():
    for task in (AdditionTask(digits=2), CountdownTask()):
        train = {r["prompt"] for r in task.make(400, seed=0, split="train")}
        test = {r["prompt"] for r in task.make(100, seed=0, split="test")}
        assert train.isdisjoint(test)
        assert all(zlib.crc32(p.encode()) % 10 == 0 for p in test)
        assert all(zlib.crc32(p.encode()) % 10 != 0 for p in train)
    # Without an explicit split, seeds from HELD_OUT_SEED on draw held-out problems.
    task = AdditionTask()
    assert task.make(50, seed=10_000) == task.make(50, seed=10_000, split="test")
    assert task.make(50, seed=9_999) == task.make(50, seed=9_999, split="train")
    with pytest.raises(ValueError, match="unknown split 'valid'"):
        AdditionTask().make(1, split="valid")


def test_countdown_instances_are_solved_by_their_reference():
    task = CountdownTask(n_numbers=3, max_number=9)
    records = task.make(500, seed=1)
    for record in records:
        numbers, target = record["numbers"], record["target"]
        assert record["prompt"] == f"{' '.join(map(str, numbers))}>{target}:"
        assert len(numbers) == 3 and all(1 <= n <= 9 for n in numbers)
        assert 1 <= target <= 999
        parsed = parse_expression(record["answer"])
        assert parsed.value == target
        assert sorted(parsed.numbers) == sorted(numbers)
        assert task.reward(record["answer"], record) == 1.0
    assert task.make(500, seed=1) == records
    bigger = CountdownTask(n_numbers=4, max_number=20).make(200, seed=2)
    assert all(CountdownTask().reward(r["answer"], r) == 1.0 for r in bigger)


@pytest.mark.parametrize(
    ("completion", "reward"),
    [
        ("7*2+3", 1.0),
        ("2*7+3", 1.0),
        ("3+7*2\nmore text", 1.0),
        (" 7 * 2 + 3 ", 1.0),
        ("(7+3)*2", 0.0),  # 20
        ("7*2+3+3", 0.0),  # 3 used twice
        ("7*2+4-1", 0.0),  # 4 and 1 not given
        ("14+3", 0.0),  # 14 not given
        ("7/0", 0.0),
        ("7**2", 0.0),
        ("-7+24", 0.0),
        ("__import__('os').system('true')", 0.0),
        ("", 0.0),
        ("(" * 200 + "7" + ")" * 200, 0.0),
        ("7*2+3=17", 0.0),
    ],
)
def test_countdown_verifier_on_hand_made_answers(completion, reward):
    record = {"prompt": "7 3 2>17:", "numbers": [7, 3, 2], "target": 17}
    assert CountdownTask().reward(completion, record) == reward


def test_countdown_sub_multiset_allows_repeated_given_numbers():
    record = {"prompt": "2 2 5>9:", "numbers": [2, 2, 5], "target": 9}
    assert CountdownTask().reward("2+2+5", record) == 1.0
    assert CountdownTask().reward("2*2+5", record) == 1.0
    assert CountdownTask().reward("2+2+2+3", record) == 0.0


def test_parse_expression_exact_values():
    assert parse_expression("7*2+3").value == 17
    assert parse_expression("8/(3-1)").value == 4
    assert parse_expression("1/3+1/3").value == Fraction(2, 3)
    assert parse_expression("2-3-4").value == -5  # left associative
    assert parse_expression("2/4/2").value == Fraction(1, 4)
    assert parse_expression("2*(3+4)").numbers == (2, 3, 4)
    for bad in ["2**3", "-3", "a", "3 3", "(3", "3)", "", "1/(2-2)", "٣+1"]:
        with pytest.raises(ExpressionError):
            parse_expression(bad)


def test_sft_examples_complete_with_the_reference_answer():
    for name in TASKS:
        task = get_task(name)
        examples = task.sft_examples(20, seed=3)
        records = task.make(20, seed=3)
        assert [e["prompt"] for e in examples] == [r["prompt"] for r in records]
        assert all(
            task.reward(e["completion"], r) == 1.0 for e, r in zip(examples, records, strict=True)
        )


def test_get_task_registry():
    assert set(TASKS) == {"addition", "countdown"}
    assert get_task("addition", digits=3).digits == 3
    with pytest.raises(ValueError) as info:
        get_task("sorting")
    assert str(info.value) == "task: unknown task 'sorting'; known tasks: addition, countdown"
