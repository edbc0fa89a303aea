"""CodeTestsReward and its sandbox: limits, isolation, and resistance to test-runner hacks."""

from __future__ import annotations

import socket
import threading

import pytest

from psirl.rewards import CodeTestsReward, SandboxLimits, extract_code, run_in_sandbox
from psirl.rewards.sandbox import network_namespace_prefix

ADD_TESTS = ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"]
FAST = SandboxLimits(wall_time_s=5.0)


def score(code: str, tests=ADD_TESTS, limits=FAST, **kwargs) -> float:
    reward = CodeTestsReward(limits=limits, **kwargs)
    return reward(["p"], [code], [{"tests": tests}])[0]


def test_correct_code_gets_one_and_half_correct_gets_half():
    assert score("def add(a, b):\n    return a + b\n") == 1.0
    assert score("def add(a, b):\n    return 3\n") == 0.5  # passes the first test only
    assert score("def add(a, b):\n    return a - b\n") == 0.0  # 1-2 != 3 and -1-1 != 0


def test_batch_of_completions_with_fenced_code():
    reward = CodeTestsReward(limits=FAST, max_workers=2)
    completions = [
        "Here you go:\n```python\ndef add(a, b):\n    return a + b\n```\nDone.",
        "```\ndef add(a, b):\n    return 3\n```",
        "def add(a, b): return b + a",
        "```python\nsyntax error(\n```",
    ]
    records = [{"tests": ADD_TESTS}] * 4
    assert reward([""] * 4, completions, records) == [1.0, 0.5, 1.0, 0.0]
    assert reward.metrics() == {"reward/code_tests/timeouts": 0.0}


def test_extract_code():
    assert extract_code("a\n```python\nx = 1\n```\nb\n```py\ny = 2\n```") == "y = 2\n"
    assert extract_code("```python\nz = 3\n") == "z = 3\n"  # unterminated fence
    assert extract_code("plain = 1") == "plain = 1"


def test_tests_can_import_the_solution_module_and_share_state():
    tests = ["from solution import add\nassert add(2, 2) == 4", "assert CALLS == []"]
    assert score("CALLS = []\ndef add(a, b):\n    return a + b\n", tests) == 1.0


def test_infinite_loop_is_killed_at_the_wall_time():
    result = run_in_sandbox(
        "while True:\n    pass\n", ["assert True"], SandboxLimits(wall_time_s=1.0)
    )
    assert result.timed_out
    assert result.passed == (False,)
    assert result.duration_s < 4.0


def test_cpu_limit_kills_busy_code_before_the_wall_time():
    limits = SandboxLimits(wall_time_s=20.0, cpu_time_s=1)
    result = run_in_sandbox("while True:\n    pass\n", ["assert True"], limits)
    assert not result.timed_out
    assert result.returncode is not None and result.returncode < 0  # killed by SIGXCPU/SIGKILL
    assert result.duration_s < 10.0


def test_huge_allocation_fails_under_the_memory_limit():
    code = "blob = bytearray(4 * 1024 ** 3)\ndef add(a, b):\n    return a + b\n"
    result = run_in_sandbox(code, ADD_TESTS, SandboxLimits(memory_mb=256))
    assert result.passed == (False, False)
    assert "MemoryError" in result.stderr_tail


def test_tests_time_out_individually_after_earlier_passes():
    code = "def add(a, b):\n    while a < 0:\n        pass\n    return a + b\n"
    result = run_in_sandbox(code, ADD_TESTS, SandboxLimits(wall_time_s=1.0))
    assert result.timed_out
    assert result.passed == (True, False)
    assert result.fraction_passed == 0.5


@pytest.mark.parametrize("namespace", ["auto", "off"])
def test_network_is_blocked(namespace):
    # A real listener in this (trainer) process: the sandbox must not reach it.
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.1)
    port = server.getsockname()[1]
    accepted = []

    def accept():
        try:
            accepted.append(server.accept())
        except OSError:
            pass

    code = (
        "import socket\n"
        f"socket.create_connection(('127.0.0.1', {port}), timeout=1).sendall(b'x')\n"
        "def add(a, b):\n    return a + b\n"
    )
    try:
        result = run_in_sandbox(code, ADD_TESTS, SandboxLimits(network_namespace=namespace))
        thread = threading.Thread(target=accept)
        thread.start()
        thread.join()
    finally:
        server.close()
    assert result.passed == (False, False)
    assert "network access is blocked" in result.stderr_tail
    assert accepted == []


def test_network_namespace_alone_has_no_route_out():
    """Without the audit hook's help (socket created before it matters), the namespace is empty."""
    prefix = network_namespace_prefix()
    if prefix is None:
        pytest.skip("unshare -n is not usable on this machine")
    import subprocess
    import sys

    probe = subprocess.run(
        [
            *prefix,
            sys.executable,
            "-I",
            "-c",
            "import socket\ntry:\n    socket.create_connection(('1.1.1.1', 53), timeout=1)\n"
            "    print('connected')\nexcept OSError as e:\n    print('blocked', e.errno)",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert probe.stdout.startswith("blocked")


def test_files_are_written_only_inside_a_scratch_dir_that_is_deleted(tmp_path):
    scratch_root = tmp_path / "scratch"
    scratch_root.mkdir()
    outside = tmp_path / "outside.txt"
    code = (
        "import os\n"
        "open('inside.txt', 'w').write('ok')\n"
        "os.makedirs('sub/dir')\n"
        "open('sub/dir/f.txt', 'w').write('ok')\n"
        "SCRATCH = os.getcwd()\n"
        "try:\n"
        f"    open({str(outside)!r}, 'w').write('escaped')\n"
        "    ESCAPED = True\n"
        "except PermissionError:\n"
        "    ESCAPED = False\n"
    )
    tests = [
        "assert open('inside.txt').read() == 'ok'",
        "assert ESCAPED is False",
        f"assert SCRATCH.startswith({str(scratch_root)!r})",
    ]
    result = run_in_sandbox(code, tests, FAST, scratch_root=scratch_root)
    assert result.passed == (True, True, True)
    assert not outside.exists()
    assert list(scratch_root.iterdir()) == []  # the scratch dir was removed


def test_symlink_escape_and_deletion_outside_are_blocked(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    code = (
        "import os\n"
        "BLOCKED = []\n"
        "for attempt in [\n"
        f"    lambda: os.symlink({str(tmp_path)!r}, 'link'),\n"
        f"    lambda: os.remove({str(victim)!r}),\n"
        f"    lambda: open({str(victim)!r}, 'a'),\n"
        "]:\n"
        "    try:\n"
        "        attempt()\n"
        "    except PermissionError:\n"
        "        BLOCKED.append(True)\n"
    )
    result = run_in_sandbox(code, ["assert BLOCKED == [True, True, True]"], FAST)
    assert result.passed == (True,)
    assert victim.read_text() == "keep"


@pytest.mark.parametrize(
    "hack",
    [
        "import sys\nsys.exit(0)",
        "import os\nos._exit(0)",
        "raise SystemExit(0)",
        # fake result lines on stdout and on every plausible fd
        "import os\nfor fd in range(1, 20):\n    try:\n        os.write(fd, b'x 0 1\\nx 1 1\\n')\n"
        "    except OSError:\n        pass",
        # forge a report through the audit event
        "import sys\nsys.audit('psirl.sandbox.result', 0, True)\n"
        "sys.audit('psirl.sandbox.result', 1, True)",
        # call the harness's runner with a fake exec or a trivial test source
        "import __main__\n__main__._run_test(0, 'pass', {})\n"
        "__main__._run_test(1, 'assert add(1, 2) == 3', {}, exec_=lambda *a: None)",
        # read the tests (and their expected values) from the harness's frames
        "import sys\nTESTS = sys._getframe(1).f_locals['tests']",
        "try:\n    1 / 0\nexcept ZeroDivisionError as e:\n    f = e.__traceback__.tb_frame.f_back",
        # tamper with the process: children, native code, tracing, signals to the trainer
        "import subprocess\nsubprocess.run(['true'])",
        "import ctypes",
        "import sys\nsys.settrace(lambda *a: None)",
        "import os\nos.kill(os.getppid(), 0)",
        "import gc\ngc.get_objects()",
        "import resource\nresource.setrlimit(resource.RLIMIT_CPU, (100, 100))",
    ],
)
def test_test_runner_hacks_earn_nothing(hack):
    # Every hack is followed by a wrong add(), so only a forged pass could score.
    code = hack + "\ndef add(a, b):\n    return 0\n"
    result = run_in_sandbox(code, ["assert add(1, 2) == 3", "assert add(2, 2) == 4"], FAST)
    assert result.passed == (False, False), result.stderr_tail


def test_ordinary_library_use_still_works():
    code = (
        "import collections, dataclasses, enum, functools, json, logging, math, re, typing\n"
        "import tempfile, warnings\n"
        "T = typing.TypeVar('T')\n"
        "Point = collections.namedtuple('Point', 'x y', defaults=(0,))\n"
        "class Color(enum.Enum):\n    RED = 1\n"
        "@dataclasses.dataclass\nclass Box:\n    size: int\n"
        "@functools.lru_cache\ndef fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n"
        "logging.getLogger('x').warning('log line')\n"
        "warnings.warn('a warning')\n"
        "handle, name = tempfile.mkstemp()\n"
        "json.dump({'a': 1}, open(name, 'w'))\n"
    )
    tests = [
        "assert fib(20) == 6765",
        "assert Point(1).y == 0",
        "assert json.load(open(name)) == {'a': 1}",
    ]
    result = run_in_sandbox(code, tests, FAST)
    assert result.passed == (True, True, True), result.stderr_tail


def test_missing_tests_field_names_record_and_field():
    with pytest.raises(ValueError, match=r"records\[1\]: field 'tests': missing"):
        CodeTestsReward(limits=FAST)(["", ""], ["x = 1", "x = 1"], [{"tests": ["pass"]}, {}])
