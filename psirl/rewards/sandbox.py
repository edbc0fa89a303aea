"""Run model-written Python in an operating-system sandbox and bring back plain values.

Isolation is done by the kernel, through bubblewrap (Debian package ``bubblewrap``, the sandbox
Flatpak uses), not by Python hooks (which code can switch off from a subinterpreter, ctypes or
/proc/self/mem):

- new user, PID, IPC, UTS, network, cgroup and mount namespaces (``--unshare-all``); the program
  runs as uid/gid 65534 inside with no capabilities, cannot create further user namespaces
  (``--disable-userns``), and sees only its own processes (``--proc /proc`` in the new PID
  namespace: no /proc of the trainer, no environ, no mem);
- outside, that uid maps to a random unprivileged uid per run when the trainer is root (bwrap is
  started through ``setpriv``), so RLIMIT_NPROC binds (root is exempt from it) and a signal,
  even by pidfd, cannot reach the trainer (it is not visible, and belongs to another uid);
- a filesystem made of read-only binds of the Python runtime only (the interpreter, its stdlib,
  the system shared libraries it links), a read-only root, a private size-capped tmpfs as
  scratch (/tmp, the working dir), a minimal read-only /dev with a 4 MiB /dev/shm, no /etc, no
  home, no trainer files: everything the program can write is bounded in size;
  the interpreter runs ``-I -S -B`` with a cleared environment (PATH, HOME, TMPDIR, LANG only);
- the network namespace has only a loopback device of its own: 127.0.0.1 of the host is not
  reachable;
- ``--die-with-parent`` and ``--new-session``; the harness lowers RLIMIT_AS, RLIMIT_CPU,
  RLIMIT_FSIZE, RLIMIT_NOFILE, RLIMIT_NPROC and RLIMIT_CORE before the program runs; a wall
  timeout SIGKILLs the process group, and the end of bwrap's PID-1 ends every process inside;
- output is capped (``max_output_kb``); stdin is /dev/null for the program.

When the trainer is root and the runtime lies under a folder other users cannot enter (e.g.
/root/.pyenv), the runtime is bind-mounted onto a world-readable staging folder inside a private
mount namespace (``unshare --mount``) before the uid switch; the host's mounts are untouched.

The program never reports a verdict: psirl/rewards/_sandbox_harness.py evaluates each probe
expression and sends back its value (tagged JSON of exact builtin types) or the exception type;
the grader (psirl/rewards/code.py) compares outside. See the harness for the encoding.

If bubblewrap is missing or cannot create namespaces here, ``run_in_sandbox`` refuses
(SandboxUnavailable) unless ``allow_weak=True``: then the harness runs as a plain subprocess with
the same rlimits, a cleared environment and a temporary working dir, but WITHOUT namespaces
(the program can read files, reach the network and signal processes of the trainer's user).

Cost of one run of a trivial program, start to teardown, median of 20 (``measure_overhead``,
run as ``python -c "from psirl.rewards.sandbox import measure_overhead as m; print(m())"``):
130 ms under bubblewrap as root, 74 ms for the same harness without namespaces, on a 2-core
machine at load ~11 (other jobs running).
"""

from __future__ import annotations

import atexit
import json
import logging
import math
import os
import secrets
import selectors
import shutil
import signal
import stat
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass
from functools import cache
from glob import glob
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

HARNESS = Path(__file__).with_name("_sandbox_harness.py")
_STDERR_TAIL = 2000
_SANDBOX_UID = 65534
_SHM_BYTES = 4 << 20  # /dev/shm (POSIX semaphores, shared memory of multiprocessing)
_SYSTEM_LIB_DIRS = ("/usr/lib", "/usr/lib64", "/lib", "/lib64")
INSTALL_HINT = (
    "install bubblewrap (Debian/Ubuntu: `apt-get install bubblewrap`; Fedora: `dnf install "
    "bubblewrap`; Arch: `pacman -S bubblewrap`) and allow user namespaces"
)


class SandboxUnavailable(RuntimeError):
    """bubblewrap is missing or cannot create namespaces, and the weak mode was not allowed."""


@dataclass(frozen=True)
class SandboxLimits:
    """Limits of one sandboxed run.

    wall_time_s: wall-clock seconds before the whole process group is killed.
    cpu_time_s: RLIMIT_CPU seconds (None: ceil(wall_time_s) + 1, so the wall clock fires first).
    memory_mb: RLIMIT_AS, address space in MiB (Python itself needs ~30-100).
    max_file_mb: RLIMIT_FSIZE, largest file the program may write, MiB.
    max_processes: tasks (processes + threads) the program may add to its own (RLIMIT_NPROC).
    max_open_files: RLIMIT_NOFILE.
    max_output_kb: bytes of result channel read before the run is killed (all missing then).
    scratch_mb: size of the private tmpfs (/tmp, the working dir).
    """

    wall_time_s: float = 5.0
    cpu_time_s: int | None = None
    memory_mb: int = 512
    max_file_mb: int = 16
    max_processes: int = 4
    max_open_files: int = 64
    max_output_kb: int = 1024
    scratch_mb: int = 64

    def __post_init__(self) -> None:
        if not self.wall_time_s > 0:
            raise ValueError(f"wall_time_s: must be > 0, got {self.wall_time_s}")
        for field in ("memory_mb", "max_file_mb", "max_open_files", "max_output_kb", "scratch_mb"):
            if getattr(self, field) < 1:
                raise ValueError(f"{field}: must be >= 1, got {getattr(self, field)}")
        if self.cpu_time_s is not None and self.cpu_time_s < 1:
            raise ValueError(f"cpu_time_s: must be >= 1 or None, got {self.cpu_time_s}")
        if self.max_processes < 0:
            raise ValueError(f"max_processes: must be >= 0, got {self.max_processes}")


@dataclass(frozen=True)
class ProbeValue:
    """What one probe expression gave in the sandbox: a decoded value, or an exception name."""

    ok: bool
    value: Any = None
    error: str | None = None


@dataclass(frozen=True)
class SandboxResult:
    """Outcome of one run.

    values[i]: ProbeValue of probe i, or None if it never reported (crash, early exit, kill,
        malformed line). program_error: exception type the program raised at top level (then
        no probe was evaluated). isolation: "bwrap" or "weak". host_uid: the uid the sandbox
        ran as on the host (None: the trainer's own).
    """

    values: tuple[ProbeValue | None, ...]
    program_error: str | None
    timed_out: bool
    output_overflow: bool
    returncode: int | None
    stderr_tail: str
    duration_s: float
    isolation: str
    host_uid: int | None


# ---------------------------------------------------------------- tagged values (see harness)


def decode_value(item: Any, depth: int = 0) -> Any:
    """Tagged JSON (harness encoding) -> Python builtins; ValueError on anything malformed."""
    if depth > 100:
        raise ValueError("nested too deeply")
    if item is None or type(item) in (bool, int, float, str):
        return item
    if type(item) is not dict or len(item) != 1:
        raise ValueError(f"malformed value {str(item)[:80]!r}")
    ((tag, body),) = item.items()
    if tag == "f" and body in ("nan", "inf", "-inf"):
        return float(body)
    if tag in ("l", "t", "s") and type(body) is list:
        items = [decode_value(x, depth + 1) for x in body]
        return items if tag == "l" else tuple(items) if tag == "t" else set(items)
    if tag == "d" and type(body) is list:
        pairs = []
        for pair in body:
            if type(pair) is not list or len(pair) != 2:
                raise ValueError("malformed dict item")
            pairs.append((decode_value(pair[0], depth + 1), decode_value(pair[1], depth + 1)))
        return dict(pairs)
    if tag == "b" and type(body) is str:
        return bytes.fromhex(body)
    if tag == "u" and type(body) is str:
        raise ValueError(f"unserialisable value of type {body[:80]}")
    raise ValueError(f"malformed value tag {tag!r}")


def encode_value(value: Any, depth: int = 0) -> Any:
    """Python builtins -> tagged JSON (for bindings sent into the sandbox)."""
    if depth > 100:
        raise ValueError("nested too deeply")
    kind = type(value)
    if value is None or kind in (bool, int, str):
        return value
    if kind is float:
        return value if math.isfinite(value) else {"f": repr(value)}
    if kind in (list, tuple):
        return {"l" if kind is list else "t": [encode_value(x, depth + 1) for x in value]}
    if kind in (set, frozenset):
        return {"s": [encode_value(x, depth + 1) for x in value]}
    if kind is dict:
        return {"d": [[encode_value(k, depth + 1), encode_value(v, depth + 1)]
                      for k, v in value.items()]}
    if kind is bytes:
        return {"b": value.hex()}
    raise ValueError(f"cannot send a {kind.__name__} into the sandbox")


# ---------------------------------------------------------------- the runtime and the command


@dataclass(frozen=True)
class _Runtime:
    executable: str
    binds: tuple[str, ...]  # host paths bound read-only at the same path
    symlinks: tuple[tuple[str, str], ...]  # (target, link) created in the sandbox
    masked: tuple[str, ...]  # folders inside the binds hidden by an empty read-only tmpfs


def _covered(path: str, by: list[str]) -> bool:
    return any(path == b or path.startswith(b.rstrip("/") + "/") for b in by)


@cache
def _python_runtime() -> _Runtime:
    """The interpreter, its stdlib (with lib-dynload) and the system library dirs it links."""
    executable = os.path.realpath(sys.executable)
    binds: list[str] = []
    symlinks: list[tuple[str, str]] = []
    for lib_dir in _SYSTEM_LIB_DIRS:
        if os.path.islink(lib_dir):
            symlinks.append((os.readlink(lib_dir), lib_dir))
        elif os.path.isdir(lib_dir):
            binds.append(lib_dir)
    # the stdlib of the BASE interpreter (sysconfig's platstdlib points into a venv)
    stdlib = os.path.realpath(os.path.dirname(os.__file__))
    wanted = [executable, stdlib]
    dynload = sysconfig.get_config_var("DESTSHARED")
    if dynload:
        wanted.append(os.path.realpath(dynload))
    libdir = sysconfig.get_config_var("LIBDIR")
    if libdir and sysconfig.get_config_var("Py_ENABLE_SHARED"):
        wanted += sorted({os.path.realpath(p) for p in glob(os.path.join(libdir, "libpython*.so*"))})
    for path in wanted:
        if os.path.exists(path) and not _covered(path, binds):
            binds.append(path)
    masked = sorted({
        os.path.realpath(p) for p in glob(os.path.join(stdlib, "*-packages")) if os.path.isdir(p)
    })
    return _Runtime(executable, tuple(binds), tuple(symlinks), tuple(masked))


def _others_can_read(path: str) -> bool:
    """True if a process of another, unprivileged uid can reach and read ``path``."""
    try:
        mode = os.stat(path).st_mode
        if not mode & stat.S_IROTH or (stat.S_ISDIR(mode) and not mode & stat.S_IXOTH):
            return False
        parent = os.path.dirname(path)
        while parent and parent != "/":
            if not os.stat(parent).st_mode & stat.S_IXOTH:
                return False
            parent = os.path.dirname(parent)
    except OSError:
        return False
    return True


@cache
def _stage_dir() -> str:
    stage = tempfile.mkdtemp(prefix="psirl-sandbox-stage-")
    os.chmod(stage, 0o755)
    atexit.register(shutil.rmtree, stage, True)
    return stage


def _harness_source() -> str:
    return HARNESS.read_text()


def _bwrap_command(limits: SandboxLimits, info_fd: int) -> tuple[list[str], int | None]:
    """(argv, host uid of the sandbox or None for the trainer's own uid)."""
    runtime = _python_runtime()
    bwrap = shutil.which("bwrap") or "bwrap"
    mounts: list[str] = []
    staged: list[tuple[str, str]] = []
    as_root = os.geteuid() == 0
    for index, path in enumerate(runtime.binds):
        source = path
        if as_root and not _others_can_read(path):
            source = os.path.join(_stage_dir(), str(index))
            if not os.path.exists(source):
                if os.path.isdir(path):
                    os.makedirs(source, mode=0o755, exist_ok=True)
                else:
                    Path(source).touch(mode=0o755)
            staged.append((path, source))
        mounts += ["--ro-bind", source, path]
    for target, link in runtime.symlinks:
        mounts += ["--symlink", target, link]
    for path in runtime.masked:  # the base interpreter's site-packages: not the runtime
        mounts += ["--tmpfs", path, "--remount-ro", path]
    sandbox = [
        bwrap, "--unshare-all", "--unshare-user", "--disable-userns",
        "--uid", str(_SANDBOX_UID), "--gid", str(_SANDBOX_UID),
        "--die-with-parent", "--new-session", "--hostname", "sandbox", "--info-fd", str(info_fd),
        "--clearenv", "--setenv", "PATH", "/usr/bin:/bin", "--setenv", "HOME", "/tmp",
        "--setenv", "TMPDIR", "/tmp", "--setenv", "LANG", "C.UTF-8",
        *mounts,
        "--proc", "/proc", "--dev", "/dev",
        # bwrap's /dev is an unbounded tmpfs: a small /dev/shm, the rest read-only (device
        # nodes such as /dev/null stay writable on a read-only mount)
        "--size", str(_SHM_BYTES), "--tmpfs", "/dev/shm", "--remount-ro", "/dev",
        "--size", str(limits.scratch_mb << 20), "--tmpfs", "/tmp",
        "--remount-ro", "/", "--chdir", "/tmp",
        runtime.executable, "-I", "-S", "-B", "-c", _harness_source(),
    ]
    if not as_root:
        return sandbox, None
    host_uid = 1_000_000 + secrets.randbelow(1_000_000_000)
    switch = [
        shutil.which("setpriv") or "setpriv", f"--reuid={host_uid}", f"--regid={host_uid}",
        "--clear-groups", "--inh-caps=-all", "--bounding-set=-all",
    ]
    if not staged:
        return [*switch, *sandbox], host_uid
    script = (
        'n=$1; shift; while [ "$n" -gt 0 ]; do mount --bind "$1" "$2" || exit 125; '
        'shift 2; n=$((n-1)); done; exec "$@"'
    )
    pairs = [item for pair in staged for item in pair]
    unshare = shutil.which("unshare") or "unshare"
    command = [unshare, "--mount", "--propagation", "private", "/bin/sh", "-c", script, "sh",
               str(len(staged)), *pairs, *switch, *sandbox]
    return command, host_uid


def _weak_command() -> list[str]:
    return [_python_runtime().executable, "-I", "-S", "-B", "-c", _harness_source()]


@cache
def isolation_status() -> tuple[bool, str]:
    """(usable, reason): whether bubblewrap sandboxes work here; probed once per process."""
    if shutil.which("bwrap") is None:
        return False, "bubblewrap (`bwrap`) is not on PATH"
    if os.geteuid() == 0 and (shutil.which("setpriv") is None or shutil.which("unshare") is None):
        return False, "running as root needs `setpriv` and `unshare` (util-linux) to drop the uid"
    try:
        result = _run("X = 20", ["X + 1"], SandboxLimits(wall_time_s=30), {}, weak=False)
    except OSError as error:
        return False, f"bwrap could not start: {error}"
    value = result.values[0] if result.values else None
    if value is None or not value.ok or value.value != 21:
        tail = result.stderr_tail.strip().splitlines()[-1:] or [f"exit {result.returncode}"]
        return False, f"bwrap cannot create its namespaces here: {tail[0]}"
    return True, "bubblewrap"


# ---------------------------------------------------------------- running


def _communicate(
    process: subprocess.Popen, payload: bytes, deadline: float, max_stdout: int
) -> tuple[bytes, bytes, bool, bool]:
    """Feed stdin, read stdout (capped) and stderr (tail) until EOF or the deadline."""
    selector = selectors.DefaultSelector()
    for stream, events in ((process.stdin, selectors.EVENT_WRITE),
                           (process.stdout, selectors.EVENT_READ),
                           (process.stderr, selectors.EVENT_READ)):
        os.set_blocking(stream.fileno(), False)
        selector.register(stream, events)
    out, err = bytearray(), bytearray()
    view = memoryview(payload)
    timed_out = overflow = False
    try:
        while selector.get_map():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                timed_out = True
                break
            for key, _ in selector.select(min(remaining, 1.0)):
                stream = key.fileobj
                if stream is process.stdin:
                    try:
                        written = os.write(stream.fileno(), view[:65536])
                    except (BrokenPipeError, BlockingIOError) as error:
                        written = len(view) if isinstance(error, BrokenPipeError) else 0
                    view = view[written:]
                    if not view:
                        selector.unregister(stream)
                        stream.close()
                    continue
                try:
                    chunk = os.read(stream.fileno(), 65536)
                except BlockingIOError:
                    continue
                if not chunk:
                    selector.unregister(stream)
                    continue
                if stream is process.stdout:
                    out += chunk
                    if len(out) > max_stdout:
                        overflow = True
                        del out[max_stdout:]
                        return bytes(out), bytes(err), timed_out, overflow
                else:
                    err += chunk
                    del err[:-_STDERR_TAIL]
    finally:
        selector.close()
    return bytes(out), bytes(err), timed_out, overflow


def _wait_namespace_gone(info_fd: int, host_uid: int | None, timeout_s: float = 5.0) -> None:
    """Wait until bwrap's PID 1 (host pid from --info-fd) has exited, i.e. the kernel has killed
    every process of the sandbox's PID namespace; killing bwrap only starts that teardown.

    The sandbox never holds the info fd (bwrap keeps it), and the pid is killed only if it runs
    as the sandbox's host uid, so a forged pid could not make the trainer kill anything else.
    """
    os.set_blocking(info_fd, False)
    try:
        info, _ = json.JSONDecoder().raw_decode((os.read(info_fd, 4096) or b"{}").decode())
        pid = int(info.get("child-pid", 0))
    except (OSError, ValueError, TypeError, AttributeError):
        return
    if pid <= 0:
        return
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        uid = int(status.split("\nUid:")[1].split()[0])
    except (OSError, IndexError, ValueError):
        return
    if uid != (os.getuid() if host_uid is None else host_uid):
        return
    try:
        os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    give_up = time.monotonic() + timeout_s
    while time.monotonic() < give_up:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return
        if state in ("Z", "X"):
            return
        time.sleep(0.005)
    logger.warning("sandbox: PID namespace of pid %d still alive %.0f s after the kill", pid,
                   timeout_s)


def _parse(raw: bytes, n_probes: int) -> tuple[tuple[ProbeValue | None, ...], str | None]:
    values: list[ProbeValue | None] = [None] * n_probes
    program_error = None
    # a partial last line (killed mid-write) is dropped by splitting on complete lines only
    for line in raw.split(b"\n")[:-1]:
        head, _, body = line.partition(b" ")
        try:
            index = int(head)
            item = json.loads(body)
        except ValueError:
            continue
        if type(item) is not dict or len(item) != 1:
            continue
        if index == -1 and type(item.get("e")) is str and program_error is None:
            program_error = item["e"][:100]
        elif 0 <= index < n_probes and values[index] is None:
            if "e" in item and type(item["e"]) is str:
                values[index] = ProbeValue(ok=False, error=item["e"][:100])
            elif "v" in item:
                try:
                    values[index] = ProbeValue(ok=True, value=decode_value(item["v"]))
                except (ValueError, TypeError, RecursionError) as error:
                    values[index] = ProbeValue(ok=False, error=f"undecodable: {error}"[:200])
    if program_error is not None:
        values = [None] * n_probes
    return tuple(values), program_error


def _run(
    code: str,
    probes: list[str],
    limits: SandboxLimits,
    bindings: dict[str, Any],
    *,
    weak: bool,
) -> SandboxResult:
    cpu = limits.cpu_time_s or math.ceil(limits.wall_time_s) + 1
    payload = json.dumps({
        "code": code,
        "probes": probes,
        "bindings": {name: encode_value(value) for name, value in bindings.items()},
        "limits": {
            "memory_bytes": limits.memory_mb << 20,
            "cpu_s": cpu,
            "file_bytes": limits.max_file_mb << 20,
            "open_files": limits.max_open_files,
            # bwrap's PID 1 and the harness itself run as the sandbox uid too
            "tasks": limits.max_processes + 2,
        },
    }).encode()
    scratch = None
    info_read, info_write = os.pipe()
    if weak:
        command, host_uid = _weak_command(), None
        scratch = tempfile.mkdtemp(prefix="psirl-sandbox-")
        env = {"PATH": "/usr/bin:/bin", "HOME": scratch, "TMPDIR": scratch, "LANG": "C.UTF-8"}
    else:
        command, host_uid = _bwrap_command(limits, info_write)
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
    started = time.monotonic()
    deadline = started + limits.wall_time_s
    try:
        process = subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=scratch or "/",
            env=env,
            start_new_session=True,
            close_fds=True,
            pass_fds=() if weak else (info_write,),
        )
        os.close(info_write)
        info_write = -1
        try:
            out, err, timed_out, overflow = _communicate(
                process, payload, deadline, limits.max_output_kb << 10
            )
            if not (timed_out or overflow):
                # EOF: normally everything exited; a program that closed its fds may still run
                try:
                    process.wait(timeout=max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    timed_out = True
        finally:
            try:
                os.killpg(process.pid, signal.SIGKILL)  # bwrap's end ends every process inside
            except (ProcessLookupError, PermissionError):
                pass
            process.wait()
            for stream in (process.stdin, process.stdout, process.stderr):
                if stream and not stream.closed:
                    stream.close()
            _wait_namespace_gone(info_read, host_uid)
    finally:
        os.close(info_read)
        if info_write >= 0:
            os.close(info_write)
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    values, program_error = _parse(b"" if overflow else out, len(probes))
    return SandboxResult(
        values=values,
        program_error=program_error,
        timed_out=timed_out,
        output_overflow=overflow,
        returncode=process.returncode,
        stderr_tail=err.decode("utf-8", "replace"),
        duration_s=time.monotonic() - started,
        isolation="weak" if weak else "bwrap",
        host_uid=host_uid,
    )


_warned_weak = False


def run_in_sandbox(
    code: str,
    probes: list[str],
    limits: SandboxLimits | None = None,
    *,
    bindings: dict[str, Any] | None = None,
    allow_weak: bool = False,
) -> SandboxResult:
    """Execute ``code`` as module ``solution``, then evaluate each probe expression in it.

    Args:
        code: the program (Python source), untrusted.
        probes: Python expressions, e.g. ``"add(2, 3)"``; each one's value (or exception type)
            comes back in ``values``. Their namespace is the program's plus ``bindings``.
        limits: SandboxLimits (defaults: 5 s wall, 512 MiB, 64 MiB scratch).
        bindings: names -> builtin values (None/bool/int/float/str/bytes/list/tuple/set/dict)
            made available to the probes.
        allow_weak: if bubblewrap is not usable, run without namespaces instead of raising
            SandboxUnavailable (logged as a warning once per process).

    Returns:
        SandboxResult with one ProbeValue (or None: never reported) per probe.
    """
    global _warned_weak
    limits = limits or SandboxLimits()
    usable, reason = isolation_status()
    if not usable and not allow_weak:
        raise SandboxUnavailable(
            f"refusing to run untrusted code: {reason}. Fix: {INSTALL_HINT}; or accept the "
            "weak sandbox (rlimits and a subprocess only: the program can read files, use the "
            "network and signal your processes) with `reward.allow_weak_sandbox: true`"
        )
    if not usable and not _warned_weak:
        _warned_weak = True
        logger.warning(
            "SANDBOX IS WEAK: %s; untrusted code runs without namespaces (allow_weak_sandbox). "
            "%s", reason, INSTALL_HINT,
        )
    return _run(code, list(probes), limits, dict(bindings or {}),
                weak=not usable)


def measure_overhead(n: int = 20) -> float:
    """Median seconds of one sandboxed run of a trivial program (start + teardown)."""
    times = []
    for _ in range(n):
        result = run_in_sandbox("pass", ["1"])
        times.append(result.duration_s)
    times.sort()
    return times[len(times) // 2]


if __name__ == "__main__":  # python -m psirl.rewards.sandbox: print the start overhead
    usable, reason = isolation_status()
    print(f"isolation: {'bubblewrap' if usable else 'WEAK (' + reason + ')'}")
    print(f"median run of a trivial program over 20 runs: {measure_overhead() * 1000:.1f} ms")
