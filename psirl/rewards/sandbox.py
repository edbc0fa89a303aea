"""Run model-written Python against unit tests in a sandboxed subprocess.

Layers of isolation (each one alone is not enough; together they make executing sampled code
during RL routine rather than reckless):

- a separate process: ``python -I -B`` (isolated mode: no PYTHON* variables, no user site, no
  script dir on sys.path, no .pyc writes), a cleared environment, cwd/HOME/TMPDIR = a fresh
  scratch directory that is deleted afterwards, stdin/stdout/stderr not connected to the trainer;
- resource limits applied in ``preexec_fn`` before exec: RLIMIT_AS (memory), RLIMIT_CPU (CPU
  seconds), RLIMIT_FSIZE (largest file), RLIMIT_NPROC (processes/threads; not enforced for
  root), RLIMIT_NOFILE, RLIMIT_CORE = 0;
- a wall-clock timeout after which the whole process group (own session) is SIGKILLed;
- no network: a new, empty network namespace (``unshare -n``, or ``unshare -rn`` as an
  unprivileged user) when the system allows it, and always the harness's audit hook, which
  raises on every ``socket.*`` event before the model's code runs;
- the audit hook of psirl/rewards/_sandbox_harness.py, which also blocks process creation,
  signals, ctypes, frame / gc introspection and file changes outside the scratch dir, and is the
  only party that can report a passed test (with a per-run nonce).

The last point targets reward hacking (../shared/reference/003_e8bd019fa090e190.txt): code that
exits early with status 0, prints fake results or reads the tests to hard-code their answers
earns nothing. It is defence in depth, not a security boundary against a determined adversary
with kernel exploits: run untrusted models at scale inside a container or VM as well.
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import cache
from pathlib import Path

logger = logging.getLogger(__name__)

HARNESS = Path(__file__).with_name("_sandbox_harness.py")
_MAX_RESULT_BYTES = 1 << 20
_STDERR_TAIL = 2000


@dataclass(frozen=True)
class SandboxLimits:
    """Limits of one sandboxed run.

    wall_time_s: wall-clock seconds before the process group is killed.
    cpu_time_s: RLIMIT_CPU seconds (None: ceil(wall_time_s) + 1, so the wall clock fires first).
    memory_mb: RLIMIT_AS, address space in MiB (Python itself needs ~30-100).
    max_file_mb: RLIMIT_FSIZE, largest file the program may write, MiB.
    max_processes: RLIMIT_NPROC (ignored by the kernel for root; the audit hook still blocks
        fork/exec/threads).
    max_open_files: RLIMIT_NOFILE.
    network_namespace: "auto" (use unshare when it works), "require" (error if not), "off".
    """

    wall_time_s: float = 5.0
    cpu_time_s: int | None = None
    memory_mb: int = 512
    max_file_mb: int = 16
    max_processes: int = 1
    max_open_files: int = 64
    network_namespace: str = "auto"

    def __post_init__(self) -> None:
        if not self.wall_time_s > 0:
            raise ValueError(f"wall_time_s: must be > 0, got {self.wall_time_s}")
        for field in ("memory_mb", "max_file_mb", "max_open_files"):
            if getattr(self, field) < 1:
                raise ValueError(f"{field}: must be >= 1, got {getattr(self, field)}")
        if self.cpu_time_s is not None and self.cpu_time_s < 1:
            raise ValueError(f"cpu_time_s: must be >= 1 or None, got {self.cpu_time_s}")
        if self.max_processes < 0:
            raise ValueError(f"max_processes: must be >= 0, got {self.max_processes}")
        if self.network_namespace not in ("auto", "require", "off"):
            raise ValueError(
                f"network_namespace: must be 'auto', 'require' or 'off', "
                f"got {self.network_namespace!r}"
            )


@dataclass(frozen=True)
class SandboxResult:
    """Outcome of one run: ``passed[i]`` is True iff test i ran and raised nothing.

    Tests that never reported (the program crashed, exited early or was killed) are False.
    ``fraction_passed`` = sum(passed) / len(passed) (0.0 for no tests).
    """

    passed: tuple[bool, ...]
    timed_out: bool
    returncode: int | None
    stderr_tail: str
    duration_s: float
    network_namespace: bool

    @property
    def fraction_passed(self) -> float:
        return sum(self.passed) / len(self.passed) if self.passed else 0.0


@cache
def network_namespace_prefix(python: str = sys.executable) -> tuple[str, ...] | None:
    """Command prefix that runs a program in a new, empty network namespace, or None.

    Tries ``unshare -n`` (root / CAP_SYS_ADMIN) then ``unshare -rn`` (unprivileged user
    namespaces); the result is probed once per interpreter and cached.
    """
    unshare = shutil.which("unshare")
    if unshare is None:
        return None
    for prefix in ((unshare, "-n"), (unshare, "-rn")):
        try:
            probe = subprocess.run(
                [*prefix, python, "-I", "-c", "pass"],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                timeout=10,
                check=False,
            )
        except (OSError, subprocess.SubprocessError):
            continue
        if probe.returncode == 0:
            return prefix
    logger.info("sandbox: no network namespace available; relying on the audit hook alone")
    return None


def _lower_limit(kind: int, value: int) -> None:
    """Set soft and hard limit to ``value``, never above the current hard limit."""
    _, hard = resource.getrlimit(kind)
    if hard != resource.RLIM_INFINITY:
        value = min(value, hard)
    resource.setrlimit(kind, (value, value))


def _preexec(limits: SandboxLimits):
    cpu = limits.cpu_time_s or math.ceil(limits.wall_time_s) + 1
    memory = limits.memory_mb * 1024 * 1024
    file_size = limits.max_file_mb * 1024 * 1024

    def apply_limits() -> None:  # runs in the child between fork and exec: keep it minimal
        _lower_limit(resource.RLIMIT_AS, memory)
        _lower_limit(resource.RLIMIT_CPU, cpu)
        _lower_limit(resource.RLIMIT_FSIZE, file_size)
        _lower_limit(resource.RLIMIT_NOFILE, limits.max_open_files)
        _lower_limit(resource.RLIMIT_CORE, 0)
        _lower_limit(resource.RLIMIT_NPROC, limits.max_processes)

    return apply_limits


def _remove_tree(path: str) -> None:
    """Delete the scratch dir even if the program removed permissions from its contents."""

    def make_writable_and_retry(function, target, _excinfo):  # noqa: ANN001 - shutil callback
        try:
            os.chmod(os.path.dirname(target), 0o700)
            os.chmod(target, 0o700)
            function(target)
        except OSError:
            pass

    shutil.rmtree(path, onerror=make_writable_and_retry)
    if os.path.exists(path):
        logger.warning("sandbox: could not fully delete scratch dir %s", path)


def _read_available(fd: int) -> bytes:
    os.set_blocking(fd, False)
    chunks, size = [], 0
    while size < _MAX_RESULT_BYTES:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            break
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def _parse_results(raw: bytes, nonce: str, n_tests: int) -> tuple[bool, ...]:
    passed = [False] * n_tests
    seen: set[int] = set()
    for line in raw.decode("utf-8", "replace").splitlines():
        parts = line.split(" ")
        if len(parts) != 3 or parts[0] != nonce or parts[2] not in ("0", "1"):
            continue
        if not parts[1].isdigit() or not 0 <= int(parts[1]) < n_tests:
            continue
        index = int(parts[1])
        if index not in seen:
            seen.add(index)
            passed[index] = parts[2] == "1"
    return tuple(passed)


def run_in_sandbox(
    code: str,
    tests: list[str],
    limits: SandboxLimits | None = None,
    *,
    scratch_root: str | Path | None = None,
    python: str = sys.executable,
) -> SandboxResult:
    """Execute ``code`` as module ``solution``, then each test source in its namespace.

    Args:
        code: the program (Python source) to test.
        tests: Python sources, one per test, e.g. ``"assert add(2, 3) == 5"``; a test passes iff
            it runs without raising. Tests share the program's namespace and may also
            ``from solution import f``.
        limits: SandboxLimits (defaults: 5 s wall, 512 MiB, no network).
        scratch_root: parent folder of the per-run scratch dir (default: the system temp dir).
        python: interpreter to run (default: the current one).

    Returns:
        SandboxResult with one bool per test.
    """
    limits = limits or SandboxLimits()
    tests = list(tests)
    prefix: tuple[str, ...] = ()
    if limits.network_namespace != "off":
        found = network_namespace_prefix(python)
        if found is None and limits.network_namespace == "require":
            raise RuntimeError("network_namespace='require' but `unshare -n` is not usable here")
        prefix = found or ()
    nonce = secrets.token_hex(16)
    scratch = tempfile.mkdtemp(prefix="psirl-sandbox-", dir=scratch_root)
    read_fd, write_fd = os.pipe()
    started = time.monotonic()
    timed_out = False
    try:
        payload = json.dumps(
            {
                "nonce": nonce,
                "code": code,
                "tests": tests,
                "scratch": scratch,
                "result_fd": write_fd,
            }
        ).encode()
        env = {"PATH": "/usr/bin:/bin", "HOME": scratch, "TMPDIR": scratch, "LANG": "C.UTF-8"}
        with tempfile.TemporaryFile() as stderr:
            process = subprocess.Popen(
                [*prefix, python, "-I", "-B", str(HARNESS)],
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                cwd=scratch,
                env=env,
                pass_fds=(write_fd,),
                start_new_session=True,
                preexec_fn=_preexec(limits),
            )
            os.close(write_fd)
            write_fd = -1
            try:
                process.communicate(payload, timeout=limits.wall_time_s)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                try:
                    os.killpg(process.pid, signal.SIGKILL)  # also kills anything it started
                except (ProcessLookupError, PermissionError):
                    pass
                process.wait()
            passed = _parse_results(_read_available(read_fd), nonce, len(tests))
            stderr.seek(max(0, stderr.seek(0, os.SEEK_END) - _STDERR_TAIL))
            stderr_tail = stderr.read().decode("utf-8", "replace")
    finally:
        os.close(read_fd)
        if write_fd >= 0:
            os.close(write_fd)
        _remove_tree(scratch)
    return SandboxResult(
        passed=passed,
        timed_out=timed_out,
        returncode=process.returncode,
        stderr_tail=stderr_tail,
        duration_s=time.monotonic() - started,
        network_namespace=bool(prefix),
    )
