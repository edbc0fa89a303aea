"""Verifiable rewards (RLVR): answer matching, format regexes, built-in task verifiers.

A verifier is a deterministic oracle, reward 1.0 or 0.0 — the reward source with nothing learned
to over-optimise (../shared/reference/003_e8bd019fa090e190.txt, "RM vs verifier"). It can still be
gamed through its parser, so the extraction rules below are explicit and ordered.
"""

from __future__ import annotations

import math
import re
from fractions import Fraction
from typing import Any

from psirl.rewards.base import check_batch

# A number as written in answers: 42  -1,234.5  .5  1e-3  (fractions a/b are handled around it)
_UNSIGNED = r"(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)(?:[eE][-+]?\d+)?"
_SIGNED = r"[-+]?" + _UNSIGNED
_NUMBER_TOKEN = re.compile(r"(?<![\w.])" + _SIGNED + r"(?:\s*/\s*" + _UNSIGNED + r")?(?![\w.]*\d)")
_EXACT_NUMBER = re.compile(_SIGNED)
_EXACT_FRACTION = re.compile(
    r"([-+]?)\(?\s*(" + _SIGNED + r")\s*\)?\s*/\s*\(?\s*(" + _SIGNED + r")\s*\)?"
)
_ANSWER_IS = re.compile(
    r"(?:final answer|answer)\s*(?:is|:|=)\s*:?\s*(?P<answer>[^\n]+)", re.IGNORECASE
)
_HASHES = re.compile(r"####\s*(?P<answer>[^\n]+)")
_FRAC = re.compile(r"\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}")
EXTRACTORS = ("boxed", "answer_is", "last_number")


def extract_boxed(text: str) -> str | None:
    r"""Content of the last ``\boxed{...}`` (or ``\fbox{...}``), with nested braces balanced."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    brace = text.find("{", start)
    if brace < 0:
        return None
    depth = 0
    for index in range(brace, len(text)):
        if text[index] == "{":
            depth += 1
        elif text[index] == "}":
            depth -= 1
            if depth == 0:
                return text[brace + 1 : index].strip()
    return None  # unbalanced: no answer rather than a guess


def extract_answer_is(text: str) -> str | None:
    """Text after the last "answer is / answer: / final answer =" or GSM8K's "####", up to EOL."""
    matches = list(_ANSWER_IS.finditer(text)) + list(_HASHES.finditer(text))
    if not matches:
        return None
    last = max(matches, key=lambda match: match.start())
    return last.group("answer").strip().rstrip(".").strip()


def extract_last_number(text: str) -> str | None:
    """The last number-looking token (integer, decimal, a/b fraction, scientific) in ``text``."""
    matches = _NUMBER_TOKEN.findall(text)
    return matches[-1] if matches else None


def _exact_value(text: str) -> Fraction | None:
    """Value of ``text`` if the whole string is one number or fraction, else None."""
    fraction = _EXACT_FRACTION.fullmatch(text)
    if fraction:
        sign = -1 if fraction.group(1) == "-" else 1
        numerator = Fraction(fraction.group(2).replace(",", ""))
        denominator = Fraction(fraction.group(3).replace(",", ""))
        return sign * numerator / denominator if denominator != 0 else None
    if _EXACT_NUMBER.fullmatch(text):
        return Fraction(text.replace(",", ""))
    return None


def _clean_number_text(text: str) -> str:
    """``text`` without ``$``, ``\\$``, ``\\,``, ``\\!``, a trailing period; ``\\frac{a}{b}`` as a/b."""
    cleaned = text.replace("\\$", "").replace("$", "").replace("\\,", "").replace("\\!", "")
    return _FRAC.sub(r"(\1)/(\2)", cleaned).strip().rstrip(".").strip()


def parse_number(text: str) -> Fraction | None:
    r"""Exact value of an answer string, or None.

    Accepts ``42``, ``-1,234.5``, ``3/4``, ``\frac{3}{4}``, ``-\dfrac{1}{2}``, ``1e-3``, ``.5``,
    ignoring ``$``, ``\$``, ``\,``, a trailing period and surrounding spaces. If the whole
    string is not a number, the first number inside it is used (``"42 apples"`` -> 42).
    """
    cleaned = _clean_number_text(text)
    value = _exact_value(cleaned)
    if value is not None:
        return value
    first = _NUMBER_TOKEN.search(cleaned)
    return _exact_value(first.group(0)) if first else None


def extract_reference(reference: str) -> str:
    r"""The answer part of a reference solution, GSM8K / MATH formats first.

    Order: the whole string if it is one number; the text after the last ``#### `` (GSM8K); the
    last ``\boxed{...}`` (MATH); "the answer is X"; else the last number of the solution. A
    worked solution's first number is an intermediate value (GSM8K "48/2 = <<48/2=24>>24 ...
    #### 72"), never the answer, so it is never used.
    """
    text = str(reference).strip()
    if _exact_value(_clean_number_text(text)) is not None:
        return text
    hashes = list(_HASHES.finditer(text))
    if hashes:
        return hashes[-1].group("answer").strip().rstrip(".").strip()
    for extractor in (extract_boxed, extract_answer_is, extract_last_number):
        found = extractor(text)
        if found:
            return found
    return text


def _reference_text(reference: str) -> str:
    r"""Exact-mode reference: after the last ``####`` or inside the last ``\boxed{}``, else all."""
    hashes = list(_HASHES.finditer(reference))
    if hashes:
        return hashes[-1].group("answer").strip()
    return extract_boxed(reference) or reference


def reference_number(reference: str) -> Fraction | None:
    """Exact value of a reference answer or worked solution (see extract_reference), or None."""
    return parse_number(extract_reference(reference))


def normalise_text(text: str, case_sensitive: bool = False) -> str:
    """Collapse whitespace, strip a trailing period, casefold unless ``case_sensitive``."""
    collapsed = " ".join(text.split()).rstrip(".").strip()
    return collapsed if case_sensitive else collapsed.casefold()


class AnswerVerifier:
    """Reward 1.0 if the completion's answer matches ``record[answer_key]``, else 0.0.

    Extraction (first rule that finds something wins, order set by ``extractors``):
    ``"boxed"`` last \\boxed{...}; ``"answer_is"`` "the answer is X" / "Answer: X" / "#### X";
    ``"last_number"`` the last number in the text (numeric mode only).

    - ``mode="numeric"``: the completion's extracted answer parsed by parse_number; the
      reference by reference_number (a bare number, else after the last "####" (GSM8K), else
      the last \\boxed{} (MATH), else "answer is", else its last number - never its first);
      match iff |pred - ref| <= abs_tol + rel_tol * |ref|.
    - ``mode="exact"``: extracted answer (or, with no rule matching, the whole completion)
      equals the reference after normalise_text.
    """

    def __init__(
        self,
        mode: str = "numeric",
        *,
        answer_key: str = "answer",
        abs_tol: float = 1e-6,
        rel_tol: float = 1e-9,
        extractors: tuple[str, ...] = EXTRACTORS,
        case_sensitive: bool = False,
        name: str = "answer",
    ):
        if mode not in ("numeric", "exact"):
            raise ValueError(f"mode: must be 'numeric' or 'exact', got {mode!r}")
        unknown = [e for e in extractors if e not in EXTRACTORS]
        if unknown:
            raise ValueError(f"extractors: unknown {unknown}; known: {', '.join(EXTRACTORS)}")
        if abs_tol < 0 or rel_tol < 0:
            raise ValueError("abs_tol, rel_tol: must be >= 0")
        self.mode = mode
        self.answer_key = answer_key
        self.abs_tol = abs_tol
        self.rel_tol = rel_tol
        self.extractors = extractors
        self.case_sensitive = case_sensitive
        self.name = name

    def extract(self, text: str) -> str | None:
        """The answer string of ``text`` by the first matching extractor, or None."""
        for extractor in self.extractors:
            if extractor == "boxed":
                found = extract_boxed(text)
            elif extractor == "answer_is":
                found = extract_answer_is(text)
            elif self.mode == "numeric":
                found = extract_last_number(text)
            else:
                found = None
            if found:
                return found
        return None

    def _reference_number(self, reference: str) -> Fraction | None:
        return reference_number(reference)

    def score(self, completion: str, reference: Any) -> float:
        """1.0 if ``completion`` answers ``reference`` (see class docstring), else 0.0."""
        reference = str(reference)
        if self.mode == "exact":
            found = self.extract(completion)
            candidate = found if found is not None else completion
            same = normalise_text(candidate, self.case_sensitive) == normalise_text(
                _reference_text(reference), self.case_sensitive
            )
            return 1.0 if same else 0.0
        expected = self._reference_number(reference)
        if expected is None:
            raise ValueError(f"field '{self.answer_key}': reference {reference!r} is not a number")
        found = self.extract(completion)
        predicted = parse_number(found) if found else None
        if predicted is None:
            return 0.0
        if predicted == expected:
            return 1.0
        error = abs(float(predicted) - float(expected))
        return (
            1.0
            if math.isfinite(error) and error <= self.abs_tol + self.rel_tol * abs(float(expected))
            else 0.0
        )

    def __call__(
        self, prompts: list[str], completions: list[str], records: list[dict[str, Any]]
    ) -> list[float]:
        check_batch(prompts, completions, records)
        scores = []
        for index, (completion, record) in enumerate(zip(completions, records, strict=True)):
            if self.answer_key not in record:
                raise ValueError(f"records[{index}]: field '{self.answer_key}': missing")
            scores.append(self.score(completion, record[self.answer_key]))
        return scores


class FormatReward:
    """Reward ``reward`` if the completion matches ``pattern`` (re.search, or re.fullmatch with
    ``full_match=True``), else 0.0. E.g. ``FormatReward(r"<think>.*</think>\\s*<answer>.*</answer>",
    flags=re.DOTALL, full_match=True)``."""

    def __init__(
        self,
        pattern: str,
        *,
        flags: int = 0,
        full_match: bool = False,
        reward: float = 1.0,
        name: str = "format",
    ):
        try:
            self.regex = re.compile(pattern, flags)
        except re.error as error:
            raise ValueError(f"pattern: invalid regular expression {pattern!r}: {error}") from None
        self.full_match = full_match
        self.reward = float(reward)
        self.name = name

    def __call__(
        self, prompts: list[str], completions: list[str], records: list[dict[str, Any]]
    ) -> list[float]:
        check_batch(prompts, completions, records)
        match = self.regex.fullmatch if self.full_match else self.regex.search
        return [self.reward if match(completion) else 0.0 for completion in completions]


class TaskReward:
    """Reward of a built-in task (psirl/data/tasks.py).

    r_i = task.reward(completion_i, record_i)
    """

    def __init__(self, task: Any, name: str | None = None):
        if not callable(getattr(task, "reward", None)):
            raise ValueError(f"task: {task!r} has no reward(completion, record) method")
        self.task = task
        self.name = name or f"task/{getattr(task, 'name', type(task).__name__)}"

    def __call__(
        self, prompts: list[str], completions: list[str], records: list[dict[str, Any]]
    ) -> list[float]:
        check_batch(prompts, completions, records)
        return [float(self.task.reward(c, r)) for c, r in zip(completions, records, strict=True)]
