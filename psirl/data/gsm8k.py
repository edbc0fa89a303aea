r"""GSM8K / MATH-format JSONL files (users bring them) as psirl prompt records.

GSM8K rows are ``{"question", "answer"}`` where ``answer`` is a worked solution ending
``#### 72``; MATH rows are ``{"problem", "solution"}`` with the answer in the last ``\boxed{}``.
Each becomes ``{"prompt", "answer", "solution"}``: ``answer`` is the final answer alone (read by
psirl.rewards.verifiers.extract_reference, never the solution's first number), ``solution`` the
worked text, so AnswerVerifier scores against the right value either way.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from psirl.data.errors import DataError

# (question field, solution field) of the supported formats, tried in this order.
FORMATS = {"gsm8k": ("question", "answer"), "math": ("problem", "solution")}
DEFAULT_INSTRUCTION = "{question}\nGive the final answer after '####'."


def math_record(row: dict[str, Any], where: str, instruction: str = DEFAULT_INSTRUCTION) -> dict:
    """One prompt record of a GSM8K or MATH row (format detected by its fields)."""
    from psirl.rewards.verifiers import extract_reference

    for name, (question_key, solution_key) in FORMATS.items():
        if question_key in row and solution_key in row:
            question, solution = row[question_key], row[solution_key]
            for key, value in ((question_key, question), (solution_key, solution)):
                if not isinstance(value, str) or not value.strip():
                    raise DataError(f"{where}: field '{key}': expected non-empty text")
            answer = extract_reference(solution)
            if name == "math" and "\\boxed" not in solution:
                raise DataError(f"{where}: field 'solution': no \\boxed{{}} answer in it")
            return {
                "prompt": instruction.format(question=question),
                "answer": answer,
                "solution": solution,
                "format": name,
            }
    raise DataError(
        f"{where}: expected GSM8K fields 'question' + 'answer' or MATH fields 'problem' + "
        f"'solution'; found {sorted(row)}"
    )


def is_math_format(path: str | Path) -> bool:
    """True for a JSONL file whose first record has GSM8K or MATH fields and no `prompt`."""
    path = Path(path)
    if path.suffix.lower() not in (".jsonl", ".ndjson") or not path.is_file():
        return False
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    return False  # load_records reports it with the line number
                return isinstance(row, dict) and "prompt" not in row and any(
                    q in row and a in row for q, a in FORMATS.values())
    return False


def read_math_jsonl(path: str | Path, *, instruction: str = DEFAULT_INSTRUCTION,
                    limit: int | None = None) -> list[dict[str, Any]]:
    """Prompt records of a GSM8K / MATH JSONL file; DataError names the file and line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found (psirl reads local files only)")
    records = []
    with path.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{line_number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{where}: invalid JSON: {error.msg}") from None
            if not isinstance(row, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
            records.append(math_record(row, where, instruction))
            if limit is not None and len(records) >= limit:
                break
    if not records:
        raise DataError(f"{path}: file has no records")
    return records


def write_math_records(src: str | Path, out: str | Path, **kwargs: Any) -> int:
    """Convert a GSM8K / MATH JSONL file into psirl prompt records at ``out``; return the count."""
    records = read_math_jsonl(src, **kwargs)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")
    return len(records)
