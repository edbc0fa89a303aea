"""A tiny, safe arithmetic parser for the countdown task (no eval, no ast of arbitrary code).

Grammar (whitespace ignored), evaluated exactly with ``fractions.Fraction``:

    expr   := term (("+" | "-") term)*
    term   := factor (("*" | "/") factor)*
    factor := NUMBER | "(" expr ")"          NUMBER := [0-9]+

No unary minus, no exponent, no names: anything else is an ExpressionError. Input length and
nesting depth are bounded so a hostile completion cannot exhaust the recursion limit.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

MAX_EXPRESSION_CHARS = 200
MAX_DEPTH = 32


class ExpressionError(ValueError):
    """The text is not a well-formed expression of the grammar, or divides by zero."""


@dataclass(frozen=True)
class ParsedExpression:
    """``value``: exact Fraction; ``numbers``: the integer literals in order of appearance."""

    value: Fraction
    numbers: tuple[int, ...]


class _Parser:
    def __init__(self, text: str):
        self.text = text
        self.pos = 0
        self.numbers: list[int] = []

    def _peek(self) -> str:
        while self.pos < len(self.text) and self.text[self.pos] in " \t":
            self.pos += 1
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def expr(self, depth: int) -> Fraction:
        if depth > MAX_DEPTH:
            raise ExpressionError(f"nesting deeper than {MAX_DEPTH}")
        value = self.term(depth)
        while self._peek() in ("+", "-"):
            op = self.text[self.pos]
            self.pos += 1
            right = self.term(depth)
            value = value + right if op == "+" else value - right
        return value

    def term(self, depth: int) -> Fraction:
        value = self.factor(depth)
        while self._peek() in ("*", "/"):
            op = self.text[self.pos]
            self.pos += 1
            right = self.factor(depth)
            if op == "*":
                value = value * right
            elif right == 0:
                raise ExpressionError("division by zero")
            else:
                value = value / right
        return value

    def factor(self, depth: int) -> Fraction:
        char = self._peek()
        if char == "(":
            self.pos += 1
            value = self.expr(depth + 1)
            if self._peek() != ")":
                raise ExpressionError(f"expected ')' at position {self.pos}")
            self.pos += 1
            return value
        start = self.pos
        while (
            self.pos < len(self.text)
            and self.text[self.pos].isascii()
            and self.text[self.pos].isdigit()
        ):
            self.pos += 1
        if start == self.pos:
            found = repr(char) if char else "end of input"
            raise ExpressionError(f"expected a number or '(' at position {start}, found {found}")
        number = int(self.text[start : self.pos])
        self.numbers.append(number)
        return Fraction(number)


def parse_expression(text: str) -> ParsedExpression:
    """Parse and evaluate ``text`` exactly. Raises ExpressionError on anything outside the grammar.

    Example: ``parse_expression("7*2+3")`` -> value 17, numbers (7, 2, 3).
    """
    if len(text) > MAX_EXPRESSION_CHARS:
        raise ExpressionError(f"longer than {MAX_EXPRESSION_CHARS} characters")
    parser = _Parser(text)
    value = parser.expr(0)
    if parser._peek():
        raise ExpressionError(f"unexpected {parser.text[parser.pos]!r} at position {parser.pos}")
    if not parser.numbers:
        raise ExpressionError("empty expression")
    return ParsedExpression(value=value, numbers=tuple(parser.numbers))
