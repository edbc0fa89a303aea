"""Reward for generated code: the fraction of a record's tests passed, decided by the trainer.

    r_i = (number of tests of record i that pass) / (number of tests of record i)

The program is ``record[prefix_key]`` (e.g. HumanEval's prompt with its imports) followed by the
completion's code block: the last fenced block that defines ``record[entry_point_key]`` if the
record names one, else the last block (or the whole completion without fences).

Grading happens OUTSIDE the sandbox (psirl/rewards/sandbox.py). Each test source is parsed here
(``ast``) into its assert statements; every sub-expression that needs the program (a call of
its function, one of its names) becomes a *probe* that the sandbox evaluates and returns as a
plain value (tagged JSON of exact builtin types, or the exception type). Everything else -- the
expected values, ``==``, ``not``, ``and``, ``abs``, ``type(x) is int``, ``isinstance``,
``math.isclose`` -- is evaluated here, on those values, with the real builtins. So:

- the expected values and the polarity of each check never enter the sandbox: a program that
  reads its memory, its output channel or the probes learns the inputs only;
- an object whose ``__eq__`` is always True, or a shadowed ``type``/``isinstance``, cannot
  cross the boundary (only exact builtin values do; ``type`` is the trainer's);
- a program that exits early, crashes, prints fake lines or patches the harness can at most
  choose the values of its probes, which any program can do by returning them.

Supported test sources: ``assert`` statements (any message ignored), assignments and ``for``
loops over values computable without the program (unrolled), ``if`` on such values,
``import math`` / ``from solution import ...`` / ``print(...)`` (no-ops), ``import random`` (a
``random.Random(0)`` evaluated in the trainer: the same cases every time), docstrings, and
functions such as
HumanEval's ``def check(candidate): ...`` when the source calls them (``check(add)``, or
``check(entry_point)`` meaning the record's entry point). Anything else -- a function defined and
never called, a helper of the test used inside an assert, a ``while`` loop, a print -- is a
ValueError naming the record, field, test and line: the trainer could not grade it without
trusting the program.
"""

from __future__ import annotations

import ast
import copy
import json
import math
import operator
import os
import random
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from psirl.rewards.base import check_batch
from psirl.rewards.sandbox import (
    INSTALL_HINT,
    ProbeValue,
    SandboxLimits,
    SandboxResult,
    SandboxUnavailable,
    encode_value,
    isolation_status,
    run_in_sandbox,
)

_FENCE = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL | re.IGNORECASE)
_MAX_UNROLL = 10_000  # loop / comprehension items unrolled per test source
_MAX_STATEMENTS = 10_000  # statements compiled per record after unrolling (each may be a probe)
_MAX_STEPS = 100_000  # iterations of a comprehension evaluated in the trainer
_MAX_SIZE = 1_000_000  # longest sequence / largest int (bits) the trusted evaluator builds


def extract_code(completion: str, entry_point: str | None = None) -> str:
    """The code to run from a completion.

    The last fenced block (```python ... ```, closing fence optional) that defines
    ``entry_point`` (``def name(`` or ``name =``) when given and one does, else the last fenced
    block, else the whole text.
    """
    blocks = _FENCE.findall(completion)
    if not blocks:
        return completion
    if entry_point:
        defines = re.compile(
            rf"^[ \t]*(?:(?:async[ \t]+)?def[ \t]+{re.escape(entry_point)}[ \t]*\(|"
            rf"{re.escape(entry_point)}[ \t]*=)",
            re.MULTILINE,
        )
        defining = [block for block in blocks if defines.search(block)]
        if defining:
            return defining[-1]
    return blocks[-1]


# ---------------------------------------------------------------- the trusted evaluator


class _Unsupported(Exception):
    """Syntax the trusted evaluator does not handle (a compile-time error of the test)."""


class _ProbeFailed(Exception):
    """A probe raised, never reported, or gave an undecodable value: the check fails."""


_TRUSTED_FUNCTIONS: dict[str, Any] = {
    f.__name__: f
    for f in (abs, all, any, bool, chr, dict, divmod, float, frozenset, int, isinstance, len,
              list, max, min, ord, repr, round, set, sorted, str, sum, tuple, type, bytes)
}
_TRUSTED_FUNCTIONS.update({"range": range, "reversed": reversed, "zip": zip,
                           "enumerate": enumerate})
_MATH = {name: getattr(math, name) for name in (
    "isclose", "fabs", "sqrt", "floor", "ceil", "isnan", "isinf", "isfinite", "pi", "e", "inf",
    "nan", "log", "log2", "log10", "exp", "gcd", "trunc")}
_METHODS = frozenset({
    "lower", "upper", "strip", "lstrip", "rstrip", "split", "rsplit", "join", "startswith",
    "endswith", "count", "index", "find", "rfind", "replace", "keys", "values", "items", "get",
    "isdigit", "isalpha", "isalnum", "isspace", "isupper", "islower", "title", "capitalize",
    "splitlines", "casefold", "copy", "is_integer", "union", "intersection", "difference",
    "issubset", "issuperset", "symmetric_difference",
})
_RANDOM_FUNCTIONS = frozenset({"randint", "choice", "random", "uniform", "randrange"})
_METHOD_RECEIVERS = (str, bytes, list, tuple, dict, set, frozenset, int, float)
_TRUSTED_NAMES = frozenset(_TRUSTED_FUNCTIONS) | {"math"}
_BINOPS = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
    ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod,
    ast.Pow: operator.pow, ast.LShift: operator.lshift, ast.RShift: operator.rshift,
    ast.BitOr: operator.or_, ast.BitAnd: operator.and_, ast.BitXor: operator.xor,
}
_CMPOPS = {
    ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le,
    ast.Gt: operator.gt, ast.GtE: operator.ge, ast.Is: operator.is_, ast.IsNot: operator.is_not,
    ast.In: lambda a, b: a in b, ast.NotIn: lambda a, b: a not in b,
}
_UNARY = {ast.Not: operator.not_, ast.USub: operator.neg, ast.UAdd: operator.pos,
          ast.Invert: operator.invert}


def _size(value: Any) -> int:
    if type(value) is int:
        return value.bit_length()
    try:
        return len(value)
    except TypeError:
        return 0


def _binop(op: ast.operator, left: Any, right: Any) -> Any:
    """One binary operation on trainer-side values, refusing results too large to build."""
    kind = type(op)
    if kind not in _BINOPS:
        raise _Unsupported(f"operator {kind.__name__}")
    if kind is ast.Pow and type(right) is int and abs(right) * max(_size(left), 1) > _MAX_SIZE:
        raise ValueError("power too large")
    if kind is ast.LShift and type(right) is int and right > _MAX_SIZE:
        raise ValueError("shift too large")
    if kind is ast.Mod and type(left) in (str, bytes):
        raise ValueError("%-formatting is not evaluated (its width could be huge)")
    if kind is ast.Mult:
        for seq, n in ((left, right), (right, left)):
            if type(n) is int and type(seq) in (str, bytes, list, tuple) and len(seq) * n > _MAX_SIZE:
                raise ValueError("repetition too large")
    return _BINOPS[kind](left, right)


def _check_iterable(value: Any) -> Any:
    if type(value) is range and len(value) > _MAX_SIZE:
        raise ValueError("range too large")
    return value


def _bind(target: ast.expr, value: Any, env: dict[str, Any]) -> None:
    if isinstance(target, ast.Name):
        env[target.id] = value
    elif isinstance(target, ast.Tuple | ast.List):
        items = list(value)
        if len(items) != len(target.elts):
            raise ValueError("unpacking: wrong number of values")
        for sub, item in zip(target.elts, items, strict=True):
            _bind(sub, item, env)
    else:
        raise _Unsupported(f"assignment target {type(target).__name__}")


def _comprehension_items(generators: list[ast.comprehension], env: dict[str, Any]):
    """Environments of every iteration of ``for ... in ... if ...`` clauses (capped)."""
    envs = [dict(env)]
    steps = 0
    for generator in generators:
        if generator.is_async:
            raise _Unsupported("async comprehension")
        next_envs = []
        for scope in envs:
            for item in _check_iterable(_teval(generator.iter, scope)):
                steps += 1
                if steps > _MAX_STEPS:
                    raise ValueError("comprehension runs too long")
                inner = dict(scope)
                _bind(generator.target, item, inner)
                if all(_teval(cond, inner) for cond in generator.ifs):
                    next_envs.append(inner)
                    if len(next_envs) > _MAX_UNROLL:
                        raise ValueError("comprehension too large")
        envs = next_envs
    return envs


def _teval(node: ast.expr, env: dict[str, Any]) -> Any:
    """Evaluate a test expression in the trainer: builtin values and whitelisted functions only.

    ``env`` maps names to trainer-side values; a value that is a _ProbeFailed instance raises
    it when read (the probe failed, so does the check).
    """
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name):
        if node.id in env:
            value = env[node.id]
            if isinstance(value, _ProbeFailed):
                raise value
            return value
        if node.id in _TRUSTED_FUNCTIONS:
            return _TRUSTED_FUNCTIONS[node.id]
        raise _Unsupported(f"name {node.id!r}")
    if isinstance(node, ast.Tuple | ast.List | ast.Set):
        if any(isinstance(e, ast.Starred) for e in node.elts):
            raise _Unsupported("starred element")
        items = [_teval(e, env) for e in node.elts]
        return {ast.Tuple: tuple, ast.List: list, ast.Set: set}[type(node)](items)
    if isinstance(node, ast.Dict):
        if any(k is None for k in node.keys):
            raise _Unsupported("** in a dict display")
        return {_teval(k, env): _teval(v, env) for k, v in zip(node.keys, node.values,
                                                                strict=True)}
    if isinstance(node, ast.UnaryOp):
        return _UNARY[type(node.op)](_teval(node.operand, env))
    if isinstance(node, ast.BinOp):
        return _binop(node.op, _teval(node.left, env), _teval(node.right, env))
    if isinstance(node, ast.BoolOp):
        is_and = isinstance(node.op, ast.And)
        value = None
        for operand in node.values:
            value = _teval(operand, env)
            if bool(value) != is_and:
                return value
        return value
    if isinstance(node, ast.Compare):
        left = _teval(node.left, env)
        for op, comparator in zip(node.ops, node.comparators, strict=True):
            right = _teval(comparator, env)
            if not _CMPOPS[type(op)](left, right):
                return False
            left = right
        return True
    if isinstance(node, ast.IfExp):
        return _teval(node.body if _teval(node.test, env) else node.orelse, env)
    if isinstance(node, ast.Subscript):
        container = _teval(node.value, env)
        if isinstance(node.slice, ast.Slice):
            parts = [None if p is None else _teval(p, env)
                     for p in (node.slice.lower, node.slice.upper, node.slice.step)]
            return container[slice(*parts)]
        return container[_teval(node.slice, env)]
    if isinstance(node, ast.Attribute):
        if isinstance(node.value, ast.Name) and node.value.id == "math" and "math" not in env:
            if node.attr in _MATH:
                return _MATH[node.attr]
            raise _Unsupported(f"math.{node.attr}")
        receiver = _teval(node.value, env)
        if type(receiver) is random.Random and node.attr in _RANDOM_FUNCTIONS:
            return getattr(receiver, node.attr)
        if node.attr not in _METHODS or type(receiver) not in _METHOD_RECEIVERS:
            raise _Unsupported(f"attribute .{node.attr}")
        return getattr(receiver, node.attr)
    if isinstance(node, ast.Call):
        if not isinstance(node.func, ast.Name | ast.Attribute):
            raise _Unsupported("call of a computed function")
        function = _teval(node.func, env)
        if any(isinstance(a, ast.Starred) for a in node.args) or any(
            k.arg is None for k in node.keywords
        ):
            raise _Unsupported("* or ** arguments")
        args = [_check_iterable(_teval(a, env)) for a in node.args]
        kwargs = {k.arg: _teval(k.value, env) for k in node.keywords}
        if function in (bytes, bytearray) and args and type(args[0]) is int and args[0] > _MAX_SIZE:
            raise ValueError("bytes too large")
        result = function(*args, **kwargs)
        if type(result) is range:
            return _check_iterable(result)  # lazy; a large one is refused where it is iterated
        if type(result) in (zip, enumerate, reversed) or type(result).__name__.endswith(
            "iterator"
        ):
            return list(result)  # materialise lazy builtins (bounded by the capped inputs)
        return result
    if isinstance(node, ast.ListComp | ast.SetComp | ast.GeneratorExp):
        items = [_teval(node.elt, scope) for scope in _comprehension_items(node.generators, env)]
        return set(items) if isinstance(node, ast.SetComp) else items
    if isinstance(node, ast.DictComp):
        return {_teval(node.key, scope): _teval(node.value, scope)
                for scope in _comprehension_items(node.generators, env)}
    raise _Unsupported(type(node).__name__)


# ---------------------------------------------------------------- compiling tests into probes


def _bound_names(node: ast.AST) -> set[str]:
    """Names bound inside ``node`` (comprehension targets, lambda / walrus targets)."""
    bound = set()
    for sub in ast.walk(node):
        if isinstance(sub, ast.comprehension):
            bound |= {n.id for n in ast.walk(sub.target) if isinstance(n, ast.Name)}
        elif isinstance(sub, ast.Lambda):
            bound |= {a.arg for a in ast.walk(sub.args) if isinstance(a, ast.arg)}
        elif isinstance(sub, ast.NamedExpr):
            bound.add(sub.target.id)
    return bound


def _free_names(node: ast.AST) -> set[str]:
    loaded = {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}
    return loaded - _bound_names(node)


class _TestError(ValueError):
    """A test source the trainer cannot grade; the message says why and where."""


@dataclass
class CompiledTests:
    """The checks of a record's tests, with the probes the sandbox must evaluate.

    probes[k] (expression source) and bindings (trainer values those sources use) go into the
    sandbox; tests[j] is a list of assert expressions over ``env`` plus ``__probe<k>`` names,
    evaluated here by ``grade``.
    """

    probes: list[str] = field(default_factory=list)
    bindings: dict[str, Any] = field(default_factory=dict)
    env: dict[str, Any] = field(default_factory=dict)
    tests: list[list[ast.expr]] = field(default_factory=list)

    def grade(self, values: tuple[ProbeValue | None, ...]) -> list[bool]:
        """One bool per test: True iff every assert of it evaluates truthy in the trainer."""
        env = dict(self.env)
        for k, value in enumerate(values):
            env[f"__probe{k}"] = (value.value if value is not None and value.ok
                                  else _ProbeFailed(value.error if value else "no value"))
        passed = []
        for asserts in self.tests:
            try:
                passed.append(all(bool(_teval(check, env)) for check in asserts))
            except Exception:  # noqa: BLE001 - any failure of the trusted check fails the test
                passed.append(False)
        return passed


class _Compiler:
    def __init__(self, where: str, entry_point: str | None):
        self.where = where
        self.entry_point = entry_point
        self.out = CompiledTests()
        self._probe_index: dict[str, int] = {}
        self._counter = 0
        self.steps = 0
        self.rng = random.Random(0)

    # -- helpers
    def fail(self, message: str, node: ast.AST | None = None) -> _TestError:
        line = f" line {node.lineno}" if node is not None and hasattr(node, "lineno") else ""
        return _TestError(f"{self.where}{line}: {message}")

    def _const(self, value: Any) -> ast.expr:
        self._counter += 1
        name = f"__v{self._counter}"
        self.out.env[name] = value
        return ast.Name(id=name, ctx=ast.Load())

    def _substitute(self, node: ast.expr, aliases: dict[str, ast.expr]) -> ast.expr:
        """Replace free names that alias program expressions (``candidate`` -> ``add``)."""
        bound = _bound_names(node)

        class Replace(ast.NodeTransformer):
            def visit_Name(self, name: ast.Name) -> ast.expr:  # noqa: N802 - ast API
                if name.id in aliases and name.id not in bound:
                    return copy.deepcopy(aliases[name.id])
                return name

        return Replace().visit(copy.deepcopy(node))

    def _program_names(self, node: ast.expr, scope: dict[str, Any]) -> set[str]:
        return {n for n in _free_names(node) if n not in scope and n not in _TRUSTED_NAMES}

    def _probe(self, node: ast.expr, scope: dict[str, Any]) -> ast.expr:
        """Send ``node`` to the sandbox; trainer values it reads travel as bindings."""
        bound = _bound_names(node)
        binds: dict[str, Any] = {}

        class Rename(ast.NodeTransformer):
            def visit_Name(self, name: ast.Name) -> ast.expr:  # noqa: N802 - ast API
                if name.id in scope and name.id not in bound:
                    binds[name.id] = scope[name.id]
                    return ast.Name(id=f"_psirl_{name.id}", ctx=ast.Load())
                return name

        source = ast.unparse(Rename().visit(copy.deepcopy(node)))
        try:
            encoded = {f"_psirl_{k}": encode_value(v) for k, v in binds.items()}
        except ValueError as error:
            raise self.fail(f"a value used in `{source}` cannot be sent: {error}", node) from None
        key = json.dumps([source, encoded], sort_keys=True)
        if key not in self._probe_index:
            k = len(self.out.probes)
            # each probe gets its own binding names, so equal names of two loops do not clash
            for name in binds:
                source = re.sub(rf"\b_psirl_{re.escape(name)}\b", f"_psirl{k}_{name}", source)
                self.out.bindings[f"_psirl{k}_{name}"] = binds[name]
            self.out.probes.append(source)
            self._probe_index[key] = k
        return ast.Name(id=f"__probe{self._probe_index[key]}", ctx=ast.Load())

    # -- expressions
    def expr(self, node: ast.expr, scope: dict[str, Any]) -> ast.expr:
        """Rewrite ``node`` into a trainer-evaluable expression over values and probes."""
        if not self._program_names(node, scope):
            try:
                return self._const(_teval(node, scope))
            except _Unsupported as error:
                raise self.fail(f"unsupported in a test: {error} in `{ast.unparse(node)}`",
                                node) from None
            except Exception as error:  # noqa: BLE001 - a test expression that always raises
                raise self.fail(f"`{ast.unparse(node)}` raises {type(error).__name__}: {error}",
                                node) from None
        if isinstance(node, ast.Compare):
            return ast.Compare(left=self.expr(node.left, scope), ops=node.ops,
                               comparators=[self.expr(c, scope) for c in node.comparators])
        if isinstance(node, ast.BoolOp):
            return ast.BoolOp(op=node.op, values=[self.expr(v, scope) for v in node.values])
        if isinstance(node, ast.UnaryOp):
            return ast.UnaryOp(op=node.op, operand=self.expr(node.operand, scope))
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            return ast.BinOp(left=self.expr(node.left, scope), op=node.op,
                             right=self.expr(node.right, scope))
        if isinstance(node, ast.IfExp):
            return ast.IfExp(test=self.expr(node.test, scope), body=self.expr(node.body, scope),
                             orelse=self.expr(node.orelse, scope))
        if isinstance(node, ast.Tuple | ast.List | ast.Set) and not any(
            isinstance(e, ast.Starred) for e in node.elts
        ):
            return type(node)(elts=[self.expr(e, scope) for e in node.elts], ctx=ast.Load())
        if isinstance(node, ast.Subscript):
            sub = node.slice
            if isinstance(sub, ast.Slice):
                sub = ast.Slice(*[None if p is None else self.expr(p, scope)
                                  for p in (sub.lower, sub.upper, sub.step)])
            else:
                sub = self.expr(sub, scope)
            return ast.Subscript(value=self.expr(node.value, scope), slice=sub, ctx=ast.Load())
        if isinstance(node, ast.Call) and self._trusted_callee(node.func, scope) and not any(
            isinstance(a, ast.Starred) for a in node.args
        ) and all(k.arg is not None for k in node.keywords):
            func = node.func
            if isinstance(func, ast.Attribute) and not (
                isinstance(func.value, ast.Name) and func.value.id == "math"
            ):
                func = ast.Attribute(value=self.expr(func.value, scope), attr=func.attr,
                                     ctx=ast.Load())
            return ast.Call(func=func, args=[self.arg(a, scope) for a in node.args],
                            keywords=[ast.keyword(arg=k.arg, value=self.expr(k.value, scope))
                                      for k in node.keywords])
        if isinstance(node, ast.ListComp | ast.SetComp | ast.GeneratorExp):
            return self.unroll(node, scope)
        if isinstance(node, ast.Lambda | ast.DictComp | ast.NamedExpr | ast.Await | ast.Yield
                      | ast.YieldFrom | ast.Starred):
            raise self.fail(f"unsupported around the program: `{ast.unparse(node)}`", node)
        return self._probe(node, scope)

    def arg(self, node: ast.expr, scope: dict[str, Any]) -> ast.expr:
        return self.expr(node, scope)

    def _trusted_callee(self, func: ast.expr, scope: dict[str, Any]) -> bool:
        if isinstance(func, ast.Name):
            return func.id in _TRUSTED_FUNCTIONS and func.id not in scope
        if isinstance(func, ast.Attribute):
            if isinstance(func.value, ast.Name) and func.value.id == "math":
                return func.attr in _MATH
            return func.attr in _METHODS
        return False

    def unroll(self, node: ast.ListComp | ast.SetComp | ast.GeneratorExp, scope) -> ast.expr:
        """A comprehension over trainer values, with the program inside: one element each."""
        try:
            scopes = _comprehension_items(node.generators, scope)
        except _Unsupported as error:
            raise self.fail(f"comprehension over program values is unsupported ({error}): "
                            f"`{ast.unparse(node)}`", node) from None
        elts = [self.expr(node.elt, inner) for inner in scopes]
        return (ast.Set if isinstance(node, ast.SetComp) and elts else ast.List)(
            elts=elts, ctx=ast.Load()) if elts else self._const(
            set() if isinstance(node, ast.SetComp) else [])

    # -- statements
    def statements(self, body: list[ast.stmt], scope: dict[str, Any], aliases, functions,
                   checks: list[ast.expr]) -> None:
        for stmt in body:
            self.statement(stmt, scope, aliases, functions, checks)

    def statement(self, stmt: ast.stmt, scope, aliases, functions, checks) -> None:
        self.steps += 1
        if self.steps > _MAX_STATEMENTS:
            raise self.fail(f"more than {_MAX_STATEMENTS} statements after unrolling loops",
                            stmt)
        if isinstance(stmt, ast.Assert):
            checks.append(self.expr(self._substitute(stmt.test, aliases), scope))
        elif isinstance(stmt, ast.Pass) or (
            isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant)
        ):
            return
        elif isinstance(stmt, ast.Import) and all(a.name == "math" and a.asname is None
                                                  for a in stmt.names):
            return
        elif isinstance(stmt, ast.Import) and [(a.name, a.asname) for a in stmt.names] == [
            ("random", None)
        ]:
            scope["random"] = self.rng  # seeded: the same cases at every compile
        elif isinstance(stmt, ast.ImportFrom) and stmt.module == "random" and all(
            a.name in _RANDOM_FUNCTIONS for a in stmt.names
        ):
            for alias in stmt.names:
                scope[alias.asname or alias.name] = getattr(self.rng, alias.name)
        elif isinstance(stmt, ast.Expr) and "print" not in functions and (
            (isinstance(stmt.value, ast.Call) and isinstance(stmt.value.func, ast.Name)
             and stmt.value.func.id == "print")
            or (isinstance(stmt.value, ast.Name) and stmt.value.id == "print")
        ):
            return  # a test's progress output: nothing to check
        elif isinstance(stmt, ast.ImportFrom) and stmt.module == "solution":
            return
        elif isinstance(stmt, ast.FunctionDef):
            functions[stmt.name] = stmt
        elif isinstance(stmt, ast.Assign) and len(stmt.targets) == 1:
            value = self._substitute(stmt.value, aliases)
            target = stmt.targets[0]
            if self._program_names(value, scope):
                if not isinstance(target, ast.Name):
                    raise self.fail("unpacking a program value is unsupported", stmt)
                aliases[target.id] = value
                scope.pop(target.id, None)
            else:
                try:
                    _bind(target, _teval(value, scope), scope)
                except Exception as error:  # noqa: BLE001
                    raise self.fail(f"cannot evaluate `{ast.unparse(stmt)}`: {error}",
                                    stmt) from None
                for name in _free_names(target):
                    aliases.pop(name, None)
        elif isinstance(stmt, ast.For) and not stmt.orelse:
            iterable = self._substitute(stmt.iter, aliases)
            if self._program_names(iterable, scope):
                raise self.fail("a `for` loop over a program value cannot be graded outside "
                                "the sandbox", stmt)
            items = list(_check_iterable(_teval(iterable, scope)))
            if len(items) > _MAX_UNROLL:
                raise self.fail(f"loop of {len(items)} items (max {_MAX_UNROLL})", stmt)
            for item in items:
                _bind(stmt.target, item, scope)
                self.statements(stmt.body, scope, aliases, functions, checks)
        elif isinstance(stmt, ast.If):
            test = self._substitute(stmt.test, aliases)
            if self._program_names(test, scope):
                raise self.fail("an `if` on a program value cannot be graded outside the "
                                "sandbox", stmt)
            branch = stmt.body if _teval(test, scope) else stmt.orelse
            self.statements(branch, scope, aliases, functions, checks)
        elif (isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Call)
              and isinstance(stmt.value.func, ast.Name) and stmt.value.func.id in functions):
            self.call(stmt.value, scope, aliases, functions, checks)
        else:
            raise self.fail(
                f"unsupported statement `{ast.unparse(stmt)[:60]}`: tests are assert "
                "statements (optionally in a check(candidate) function that the source calls)",
                stmt,
            )

    def call(self, call: ast.Call, scope, aliases, functions, checks) -> None:
        """Inline ``check(add)``: the function's body with its parameters bound."""
        function = functions[call.func.id]
        params = [a.arg for a in function.args.args]
        if call.keywords or len(call.args) != len(params) or function.args.vararg:
            raise self.fail(f"call of {function.name}() must pass its {len(params)} "
                            "parameter(s) positionally", call)
        inner_scope, inner_aliases = dict(scope), dict(aliases)
        for param, arg in zip(params, call.args, strict=True):
            if (isinstance(arg, ast.Name) and arg.id == "entry_point" and arg.id not in scope
                    and arg.id not in aliases):
                if not self.entry_point:
                    raise self.fail("check(entry_point) needs the record's entry point field",
                                    call)
                arg = ast.Name(id=self.entry_point, ctx=ast.Load())
            arg = self._substitute(arg, aliases)
            if self._program_names(arg, scope):
                inner_aliases[param] = arg
                inner_scope.pop(param, None)
            else:
                inner_scope[param] = _teval(arg, scope)
                inner_aliases.pop(param, None)
        self.called.add(function.name)
        self.statements(function.body, inner_scope, inner_aliases, functions, checks)

    def test(self, source: str) -> list[ast.expr]:
        try:
            tree = ast.parse(source)
        except SyntaxError as error:
            raise _TestError(f"{self.where} line {error.lineno}: syntax error: {error.msg}") from None
        checks: list[ast.expr] = []
        functions: dict[str, ast.FunctionDef] = {}
        self.called: set[str] = set()
        self.statements(tree.body, {}, {}, functions, checks)
        never_called = sorted(set(functions) - self.called)
        if never_called:
            hint = self.entry_point or "<entry point>"
            raise self.fail(
                f"defines {', '.join(n + '()' for n in never_called)} but never calls it, so "
                f"nothing would be checked; add a call such as `{never_called[0]}({hint})` "
                "(HumanEval: append `check(entry_point)`)"
            )
        if not checks:
            raise self.fail("contains no assert statement, so nothing would be checked")
        return checks


@lru_cache(maxsize=4096)
def _compile_cached(tests: tuple[str, ...], entry_point: str | None, where: str) -> CompiledTests:
    compiler = _Compiler(where, entry_point)
    for j, source in enumerate(tests):
        compiler.where = f"{where} (test {j})"
        compiler.out.tests.append(compiler.test(source))
    return compiler.out


def compile_tests(tests: list[str], entry_point: str | None = None,
                  where: str = "tests") -> CompiledTests:
    """Parse test sources into trainer-side checks and sandbox probes (see the module doc).

    Raises ValueError (prefixed with ``where``, the test index and line) for a source the
    trainer cannot grade without trusting the program.
    """
    return _compile_cached(tuple(tests), entry_point, where)


# ---------------------------------------------------------------- the reward


class CodeTestsReward:
    """RewardFn: fraction of ``record[tests_key]`` (Python test sources) the completion passes.

    Each test source (e.g. ``"assert add(2, 3) == 5"``, or HumanEval's ``check`` function plus
    ``check(entry_point)``) passes iff all its asserts hold, judged by the trainer on values
    the sandbox returns (module doc). The program is ``record[prefix_key]`` (optional) plus the
    completion's code (``extract_code`` with ``record[entry_point_key]``, optional).
    ``max_workers`` samples run in parallel, one sandbox each.

    Raises SandboxUnavailable at construction if bubblewrap cannot isolate programs here,
    unless ``allow_weak_sandbox`` (then every batch logs it in ``metrics()``:
    ``reward/<name>/weak_sandbox`` = 1). ``metrics()`` also gives the timeouts and the samples
    whose program raised at top level, for the last batch.
    """

    def __init__(
        self,
        *,
        tests_key: str = "tests",
        prefix_key: str = "prefix",
        entry_point_key: str = "entry_point",
        limits: SandboxLimits | None = None,
        max_workers: int | None = None,
        allow_weak_sandbox: bool = False,
        name: str = "code_tests",
    ):
        usable, reason = isolation_status()
        if not usable and not allow_weak_sandbox:
            raise SandboxUnavailable(
                f"code reward refuses to run untrusted code: {reason}. Fix: {INSTALL_HINT}; or "
                "set `reward.allow_weak_sandbox: true` to run it with rlimits only (the program "
                "can then read your files, use the network and signal your processes)"
            )
        self.weak = not usable
        self.allow_weak_sandbox = allow_weak_sandbox
        self.tests_key = tests_key
        self.prefix_key = prefix_key
        self.entry_point_key = entry_point_key
        self.limits = limits or SandboxLimits()
        self.max_workers = max_workers or min(4, os.cpu_count() or 1)
        self.name = name
        self.last_results: list[SandboxResult] = []
        self.last_passed: list[list[bool]] = []

    def _field(self, record: dict[str, Any], index: int, key: str) -> str | None:
        value = record.get(key)
        if value is not None and not isinstance(value, str):
            raise ValueError(f"records[{index}]: field '{key}': expected a string, got "
                             f"{type(value).__name__}")
        return value

    def _compiled(self, record: dict[str, Any], index: int) -> CompiledTests:
        if self.tests_key not in record:
            raise ValueError(f"records[{index}]: field '{self.tests_key}': missing")
        tests = record[self.tests_key]
        if isinstance(tests, str):
            tests = [tests]
        if not isinstance(tests, list | tuple) or not tests:
            raise ValueError(
                f"records[{index}]: field '{self.tests_key}': expected a non-empty list of "
                f"Python test sources, got {type(tests).__name__}"
            )
        if not all(isinstance(test, str) for test in tests):
            raise ValueError(f"records[{index}]: field '{self.tests_key}': tests must be strings")
        entry_point = self._field(record, index, self.entry_point_key)
        return compile_tests(list(tests), entry_point, f"records[{index}]: field "
                                                       f"'{self.tests_key}'")

    def validate(self, records: list[dict[str, Any]]) -> None:
        """Raise the first ValueError a record's tests would give (call once before a run:
        inside the training loop SafeReward would turn it into fallback rewards)."""
        for index, record in enumerate(records):
            self._compiled(record, index)
            self._field(record, index, self.prefix_key)

    def __call__(
        self, prompts: list[str], completions: list[str], records: list[dict[str, Any]]
    ) -> list[float]:
        check_batch(prompts, completions, records)
        jobs = []
        for index, (completion, record) in enumerate(zip(completions, records, strict=True)):
            compiled = self._compiled(record, index)
            entry_point = self._field(record, index, self.entry_point_key)
            prefix = self._field(record, index, self.prefix_key) or ""
            code = extract_code(completion, entry_point)
            program = f"{prefix}\n{code}" if prefix else code
            jobs.append((program, compiled))

        def run(job: tuple[str, CompiledTests]) -> SandboxResult:
            program, compiled = job
            return run_in_sandbox(program, compiled.probes, self.limits,
                                  bindings=compiled.bindings,
                                  allow_weak=self.allow_weak_sandbox)

        with ThreadPoolExecutor(max_workers=self.max_workers) as pool:
            results = list(pool.map(run, jobs))
        self.last_results = results
        self.last_passed = [compiled.grade(result.values)
                            for (_, compiled), result in zip(jobs, results, strict=True)]
        return [sum(passed) / len(passed) for passed in self.last_passed]

    def metrics(self) -> dict[str, float]:
        results = self.last_results
        return {
            f"reward/{self.name}/timeouts": float(sum(r.timed_out for r in results)),
            f"reward/{self.name}/program_errors": float(
                sum(r.program_error is not None for r in results)),
            f"reward/{self.name}/weak_sandbox": float(self.weak),
        }
