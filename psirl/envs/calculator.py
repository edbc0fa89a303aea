"""Calculator environment: the model may write ``<calc>EXPR</calc>``, reads the value, answers.

An episode on an arithmetic record ``{"prompt", "answer"}`` (e.g. the built-in ``addition`` and
``countdown`` tasks' records):

    prompt        12+34+56=
    model turn 1  <calc>12+34+56</calc>          (the turn stops at "</calc>")
    env turn 1    <result>102</result>
    model turn 2  102</s>                        (no tool call: the final answer)

A turn with a ``<calc>`` call gets its value back (or ``<result>error</result>``) and the episode
goes on; the first turn without a call is the answer: reward 1 when its first line, stripped,
equals ``record["answer"]``, else 0 (``done``). The expression is evaluated in-process by
``safe_eval``: an ``ast`` walk over numbers, + - * / // % ** and unary signs, with bounded
exponents and magnitudes; names, calls, attributes and everything else are rejected, so no
sandbox is needed.
"""

from __future__ import annotations

import ast
import operator
import re
from typing import Any

from psirl.rollout.episode import EnvStep

MAX_ABS = 10**12  # larger intermediate values are an error (keeps ** and * bounded)
MAX_EXPONENT = 32
MAX_EXPRESSION_CHARS = 200

_BINARY = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}


def safe_eval(expression: str) -> int | float:
    """Value of an arithmetic expression; ValueError for anything else (names, calls, huge
    numbers, division by zero). Integers stay integers; a float result that is whole is
    returned as an int (``6/3`` -> 2)."""
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise ValueError(f"expression longer than {MAX_EXPRESSION_CHARS} characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError as exc:
        raise ValueError(f"not an expression: {exc.msg}") from None

    def walk(node: ast.AST) -> int | float:
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return node.value
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            return _UNARY[type(node.op)](walk(node.operand))
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            left, right = walk(node.left), walk(node.right)
            if isinstance(node.op, ast.Pow) and abs(right) > MAX_EXPONENT:
                raise ValueError(f"exponent {right} larger than {MAX_EXPONENT}")
            try:
                value = _BINARY[type(node.op)](left, right)
            except ZeroDivisionError:
                raise ValueError("division by zero") from None
            if isinstance(value, complex) or abs(value) > MAX_ABS:
                raise ValueError("value out of range")
            return value
        raise ValueError(f"{type(node).__name__} is not allowed in a calculator expression")

    value = walk(tree)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def format_number(value: int | float) -> str:
    """``102`` -> "102", ``2.5`` -> "2.5", floats to at most 6 significant decimals."""
    return str(value) if isinstance(value, int) else f"{value:.6g}"


def final_answer_reward(turn: str, record: dict[str, Any]) -> float:
    """1.0 when the first line of ``turn``, stripped, equals ``str(record["answer"])``."""
    if "answer" not in record:
        raise KeyError("record: the environment needs an 'answer' field to score the answer")
    lines = turn.strip().splitlines()
    return float(bool(lines) and lines[0].strip() == str(record["answer"]).strip())


class ToolCallEnv:
    """The shared turn logic of the tool environments: a turn with a tool call (``self._call``
    matches) gets the tool's observation (``call``); a turn without one is the final answer,
    scored by ``final_answer_reward`` against the record, and ends the episode."""

    _call: re.Pattern
    record: dict[str, Any]

    def reset(self, record: dict[str, Any]) -> str:
        self.record = record
        return record["prompt"]

    def step(self, turn: str) -> EnvStep:
        match = self._call.search(turn)
        if match is None:
            correct = final_answer_reward(turn, self.record)
            return EnvStep(reward=correct, done=True,
                           metrics={"tool_call": 0.0, "correct": correct})
        return self.call(match)

    def call(self, match: re.Match) -> EnvStep:
        raise NotImplementedError


class CalculatorEnv(ToolCallEnv):
    """Multi-step arithmetic with a calculator tool (see the module docstring).

    open_tag / close_tag: the call syntax (default ``<calc>`` ... ``</calc>``; the close tag is a
    stop string of the model's turns); result_template: the observation, ``{value}`` replaced by
    the value or "error"; call_bonus: reward added to a turn whose call evaluates (0 by
    default: only the answer counts).
    """

    def __init__(
        self,
        open_tag: str = "<calc>",
        close_tag: str = "</calc>",
        result_template: str = "<result>{value}</result>",
        call_bonus: float = 0.0,
    ):
        self.open_tag, self.close_tag = open_tag, close_tag
        self.result_template = result_template
        self.call_bonus = float(call_bonus)
        self.stop = (close_tag,)
        self._call = re.compile(re.escape(open_tag) + r"(.*?)(?:" + re.escape(close_tag) + r"|$)",
                                re.DOTALL)
        self.record: dict[str, Any] = {}

    def demonstration(self, record: dict[str, Any]) -> list[tuple[str, bool]]:
        """The oracle episode on ``record`` as (text, written_by_model) segments, for an SFT
        cold start on tool use (train/sft.py with an ``env:`` section):

            [("<calc>12+34</calc>", True), ("<result>46</result>", False), ("46", True)]

        The expression is ``record["expression"]``, else the prompt without its trailing "="
        (the built-in ``addition`` task's "12+34="). ValueError (naming the record's prompt) when
        the calculator's value of it is not ``record["answer"]``: the demonstration would teach
        a wrong answer. The segments are the turns ``run_episodes`` would hold, the model's final
        turn without its EOS (the SFT loop appends it).
        """
        if "answer" not in record:
            raise KeyError("record: a demonstration needs an 'answer' field")
        expression = str(record.get("expression", record["prompt"].strip().removesuffix("=")))
        value = format_number(safe_eval(expression))
        answer = str(record["answer"]).strip()
        if value != answer:
            raise ValueError(f"record {record['prompt']!r}: the calculator gives {value} for "
                             f"{expression!r}, not the answer {answer!r}")
        return [(f"{self.open_tag}{expression}{self.close_tag}", True),
                (self.result_template.format(value=value), False),
                (answer, True)]

    def call(self, match: re.Match) -> EnvStep:
        try:
            value, ok = format_number(safe_eval(match.group(1))), 1.0
        except ValueError:
            value, ok = "error", 0.0
        return EnvStep(observation=self.result_template.format(value=value),
                       reward=self.call_bonus * ok,
                       metrics={"tool_call": 1.0, "tool_ok": ok})
