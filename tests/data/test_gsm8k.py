"""GSM8K / MATH JSONL reader: final answers extracted from worked solutions, errors located."""

import json

import pytest

from psirl.data.errors import DataError
from psirl.data.gsm8k import read_math_jsonl, write_math_records
from psirl.data.records import load_records
from psirl.rewards.verifiers import AnswerVerifier

ROWS = [
    {
        "question": "Natalia sold clips to 48 of her friends in April, and then she sold half as "
        "many clips in May. How many clips did Natalia sell altogether in April and May?",
        "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = "
        "<<48+24=72>>72 clips altogether in April and May.\n#### 72",
    },
    {
        "problem": "What is $\\frac{1}{2} + \\frac{1}{4}$?",
        "solution": "Using 4 as the denominator, $\\frac{2}{4}+\\frac{1}{4}=\\boxed{\\frac{3}{4}}$.",
    },
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def test_reads_both_formats_with_final_answers(tmp_path):
    records = read_math_jsonl(write_jsonl(tmp_path / "in.jsonl", ROWS))
    assert [r["answer"] for r in records] == ["72", "\\frac{3}{4}"]
    assert [r["format"] for r in records] == ["gsm8k", "math"]
    assert records[0]["prompt"].startswith("Natalia sold clips")
    verifier = AnswerVerifier()
    scores = verifier(
        [r["prompt"] for r in records], ["#### 72", "\\boxed{0.75}"], records
    )
    assert scores == [1.0, 1.0]
    assert verifier([records[0]["prompt"]], ["#### 24"], records[:1]) == [0.0]


def test_written_records_load_as_prompt_records(tmp_path):
    out = tmp_path / "out.jsonl"
    assert write_math_records(write_jsonl(tmp_path / "in.jsonl", ROWS), out) == 2
    assert [r["answer"] for r in load_records(out, kind="prompt")] == ["72", "\\frac{3}{4}"]


def test_bad_rows_name_file_line_and_field(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [ROWS[0], {"question": "q"}])
    with pytest.raises(DataError, match=r"bad.jsonl:2: expected GSM8K fields"):
        read_math_jsonl(path)
    path = write_jsonl(tmp_path / "bad2.jsonl", [{"problem": "p", "solution": "no box, 3"}])
    with pytest.raises(DataError, match=r"bad2.jsonl:1: field 'solution': no \\boxed"):
        read_math_jsonl(path)


def test_eval_records_read_a_gsm8k_file_directly(tmp_path):
    from types import SimpleNamespace

    from psirl.data.gsm8k import is_math_format
    from psirl.train.setup import eval_records

    path = write_jsonl(tmp_path / "gsm8k_test.jsonl", ROWS)
    assert is_math_format(path)
    plain = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "1+1=", "answer": "2"}])
    assert not is_math_format(plain)
    config = SimpleNamespace(data=SimpleNamespace(eval_path=str(path)),
                             eval=SimpleNamespace(n=1))
    records = eval_records(config, None)
    assert [r["answer"] for r in records] == ["72"]
