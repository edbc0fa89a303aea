"""Built-in synthetic tasks with verifiable rewards (RLVR), small enough for character-level models.

Each task makes prompt records ``{"prompt", "answer", "task", ...}``, scores a completion against
its record with a deterministic verifier (1.0 correct, 0.0 otherwise — the "verifiable oracle"
reward source of ../shared/reference/003_e8bd019fa090e190.txt), and makes SFT examples
``{"prompt", "completion"}`` for a warm start.

- ``AdditionTask(digits=2, terms=2)``: ``"23+58="`` -> ``"81"`` (``terms=3``: ``"23+58+7="``).
- ``CountdownTask(n_numbers=3, max_number=9)``: ``"7 3 2>17:"`` -> an expression such as
  ``"7*2+3"`` over the given numbers (each at most once) with + - * / and parentheses that equals
  the target. Every instance is built from a random expression, so it is solvable by construction
  and its ``answer`` is that reference solution.

Completions are read up to the first newline or end-of-sequence marker, then stripped.

Train / held-out split: a problem belongs to ``split="test"`` when crc32 of its prompt is
divisible by ``HELD_OUT_MODULUS`` (10% of the problem space), otherwise to ``"train"``, so the
two splits never share a problem. The split follows the seed range unless given explicitly:
seeds below ``HELD_OUT_SEED`` (10_000) draw training problems, seeds from it on draw held-out
problems (``make(n, seed=10_000 + s)`` is an evaluation set disjoint from every
``make(m, seed=s')`` with ``s' < 10_000``). ``make(n, seed)`` is a deterministic function of
``(task parameters, split, seed)``.
"""

from __future__ import annotations

import random
import zlib
from collections import Counter
from fractions import Fraction
from typing import Any

from psirl.data.expression import ExpressionError, parse_expression

HELD_OUT_MODULUS = 10
HELD_OUT_SEED = 10_000
SPLITS = ("train", "test")
EOS_MARKERS = ("<|endoftext|>", "<|im_end|>", "<|eot_id|>", "</s>", "<eos>")


def first_answer_line(completion: str) -> str:
    """The part of ``completion`` before the first newline or EOS marker, stripped of spaces."""
    cut = completion.split("\n", 1)[0]
    for marker in EOS_MARKERS:
        cut = cut.split(marker, 1)[0]
    return cut.strip()


def split_of(prompt: str) -> str:
    """``"test"`` if crc32(prompt) % HELD_OUT_MODULUS == 0 else ``"train"``."""
    return "test" if zlib.crc32(prompt.encode("utf-8")) % HELD_OUT_MODULUS == 0 else "train"


def _require(record: dict[str, Any], *keys: str) -> None:
    missing = [key for key in keys if key not in record]
    if missing:
        raise ValueError(f"record: field '{missing[0]}': missing (needed by the task verifier)")


class Task:
    """Base class: subclasses define ``name``, ``_sample(rng) -> record`` and ``reward``."""

    name = "task"

    def _params(self) -> str:
        raise NotImplementedError

    def _sample(self, rng: random.Random) -> dict[str, Any]:
        raise NotImplementedError

    def reward(self, completion: str, record: dict[str, Any]) -> float:
        raise NotImplementedError

    def make(self, n: int, seed: int = 0, split: str | None = None) -> list[dict[str, Any]]:
        """``n`` prompt records of ``split``, a deterministic function of (parameters, split, seed).

        ``split`` None means ``"test"`` if ``seed >= HELD_OUT_SEED`` else ``"train"``. Problems
        are drawn independently (with replacement); a problem is in ``split`` iff
        ``split_of(prompt) == split``.
        """
        if split is None:
            split = "test" if seed >= HELD_OUT_SEED else "train"
        if split not in SPLITS:
            raise ValueError(f"split: unknown split {split!r}; known splits: {', '.join(SPLITS)}")
        if n < 0:
            raise ValueError(f"n: must be >= 0, got {n}")
        rng = random.Random(f"{self.name}|{self._params()}|{split}|{seed}")
        records: list[dict[str, Any]] = []
        attempts = 0
        while len(records) < n:
            attempts += 1
            if attempts > 1000 * (n + 10):
                raise RuntimeError(f"{self.name}: could not draw {n} problems of split {split!r}")
            record = self._sample(rng)
            if split_of(record["prompt"]) == split:
                records.append(record)
        return records

    def sft_examples(self, n: int, seed: int = 0, split: str | None = None) -> list[dict[str, str]]:
        """``n`` SFT records ``{"prompt", "completion"}``, completion = the reference answer."""
        return [
            {"prompt": record["prompt"], "completion": record["answer"]}
            for record in self.make(n, seed, split)
        ]

    def __call__(
        self, prompts: list[str], completions: list[str], records: list[dict[str, Any]]
    ) -> list[float]:
        """RewardFn interface: ``[self.reward(c, r) for c, r in zip(completions, records)]``."""
        return [self.reward(c, r) for c, r in zip(completions, records, strict=True)]


class AdditionTask(Task):
    """``"a+b="`` -> ``str(a+b)`` with ``a, b`` uniform in ``[0, 10**digits)``; with ``terms=k``
    the prompt sums ``k`` such numbers (``"a+b+c="``), e.g. a task a tiny model cannot do in its
    head but can with a calculator (psirl/envs/calculator.py).

    reward = 1.0 iff first_answer_line(completion) == str(sum) (no leading zeros, no spaces).
    """

    name = "addition"

    def __init__(self, digits: int = 2, terms: int = 2):
        if not 1 <= digits <= 18:
            raise ValueError(f"digits: must be in [1, 18], got {digits}")
        if not 2 <= terms <= 10:
            raise ValueError(f"terms: must be in [2, 10], got {terms}")
        self.digits = digits
        self.terms = terms

    def _params(self) -> str:
        # terms=2 keeps the string (and so every problem drawn) of the two-term task it was.
        return f"digits={self.digits}" + (f",terms={self.terms}" if self.terms != 2 else "")

    def _sample(self, rng: random.Random) -> dict[str, Any]:
        numbers = [rng.randrange(10**self.digits) for _ in range(self.terms)]
        return {"prompt": "+".join(map(str, numbers)) + "=", "answer": str(sum(numbers)),
                "task": self.name}

    def reward(self, completion: str, record: dict[str, Any]) -> float:
        _require(record, "answer")
        return 1.0 if first_answer_line(completion) == str(record["answer"]).strip() else 0.0


_PRECEDENCE = {"+": 1, "-": 1, "*": 2, "/": 2}
_ATOM = 3


def _combine(
    op: str, left: tuple[int, str, int], right: tuple[int, str, int]
) -> tuple[int, str, int] | None:
    """Apply ``op`` to (value, text, precedence) triples; None unless the result is natural."""
    a, b = left[0], right[0]
    if op == "+":
        value = a + b
    elif op == "-":
        value = a - b
    elif op == "*":
        value = a * b
    else:
        if b == 0 or a % b:
            return None
        value = a // b
    if value < 0:
        return None
    prec = _PRECEDENCE[op]
    left_text = f"({left[1]})" if left[2] < prec else left[1]
    # The right operand of - and / needs parentheses at equal precedence: a-(b+c) != a-b+c.
    right_needs = right[2] < prec or (right[2] == prec and op in "-/")
    right_text = f"({right[1]})" if right_needs else right[1]
    return value, f"{left_text}{op}{right_text}", prec


class CountdownTask(Task):
    """Reach a target with + - * / from ``n_numbers`` numbers in [1, max_number], each used once.

    Prompt ``"7 3 2>17:"``, reference answer e.g. ``"7*2+3"``. An instance is built by combining
    the numbers pairwise at random (integer intermediates >= 0, exact divisions) until one value
    is left; that value is the target (kept if ``1 <= target <= max_target``).

    reward = 1.0 iff first_answer_line(completion) parses (psirl/data/expression.py) to exactly
    the target and its number literals form a sub-multiset of the given numbers; else 0.0.
    """

    name = "countdown"

    def __init__(self, n_numbers: int = 3, max_number: int = 9, max_target: int = 999):
        if not 2 <= n_numbers <= 6:
            raise ValueError(f"n_numbers: must be in [2, 6], got {n_numbers}")
        if not 2 <= max_number <= 100:
            raise ValueError(f"max_number: must be in [2, 100], got {max_number}")
        if max_target < 1:
            raise ValueError(f"max_target: must be >= 1, got {max_target}")
        self.n_numbers = n_numbers
        self.max_number = max_number
        self.max_target = max_target

    def _params(self) -> str:
        return f"n={self.n_numbers},max={self.max_number},target<={self.max_target}"

    def _sample(self, rng: random.Random) -> dict[str, Any]:
        while True:
            numbers = [rng.randint(1, self.max_number) for _ in range(self.n_numbers)]
            nodes = [(n, str(n), _ATOM) for n in numbers]
            while len(nodes) > 1:
                i, j = rng.sample(range(len(nodes)), 2)
                combined = _combine(rng.choice("+-*/"), nodes[i], nodes[j])
                if combined is None:
                    continue
                nodes = [node for k, node in enumerate(nodes) if k not in (i, j)] + [combined]
            target, solution, _ = nodes[0]
            if 1 <= target <= self.max_target:
                break
        shown = numbers[:]
        rng.shuffle(shown)
        return {
            "prompt": f"{' '.join(map(str, shown))}>{target}:",
            "answer": solution,
            "numbers": shown,
            "target": target,
            "task": self.name,
        }

    def reward(self, completion: str, record: dict[str, Any]) -> float:
        _require(record, "numbers", "target")
        try:
            parsed = parse_expression(first_answer_line(completion))
        except ExpressionError:
            return 0.0
        if Counter(parsed.numbers) - Counter(int(n) for n in record["numbers"]):
            return 0.0  # a number not given, or used more often than given
        return 1.0 if parsed.value == Fraction(int(record["target"])) else 0.0


TASKS: dict[str, type[Task]] = {"addition": AdditionTask, "countdown": CountdownTask}


def get_task(name: str, **kwargs: Any) -> Task:
    """Instantiate the built-in task ``name`` (a key of TASKS) with ``kwargs``."""
    if name not in TASKS:
        raise ValueError(f"task: unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}")
    return TASKS[name](**kwargs)
