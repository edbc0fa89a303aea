"""Program run INSIDE the sandbox process by psirl/rewards/sandbox.py (never imported by psirl).

Protocol: the parent starts ``python -I -B <this file>`` with resource limits already applied,
cwd = a fresh scratch dir, a cleared environment, stdout/stderr redirected, and writes one JSON
object on stdin: ``{"nonce", "code", "tests", "scratch", "result_fd"}``.

This harness then
1. installs an audit hook (PEP 578; hooks cannot be removed once added) that, for everything run
   afterwards, blocks: sockets (network), process creation and signals to other processes,
   ctypes, tracing / profiling / gc / frame introspection, rlimit changes, thread creation
   (where the interpreter audits it), and any file write, delete or rename outside the scratch
   dir;
2. executes the model's ``code`` as module ``solution`` (also importable by the tests);
3. executes each test in that namespace; a test passes iff it returns without raising.

Each result is reported through the audit hook itself, which is the only holder of the nonce:
the hook writes ``"<nonce> <index> <0|1>\n"`` to ``result_fd`` only when the report comes from
``_run_test`` with the genuine ``exec``/``compile`` and the test source whose digest it was
given. A program that prints fake results, exits early (``sys.exit(0)``, ``os._exit(0)``) or
crashes the process therefore cannot turn a test into a pass: tests that never report count as
failed. This is defence in depth against reward hacking, not a container: see sandbox.py.
"""

import builtins
import hashlib
import json
import os
import pathlib
import sys
import types

# Events that create, change or delete files: event -> positions of (path args, dir_fd args).
_PATH_EVENTS = {
    "os.remove": ((0,), (1,)),
    "os.rmdir": ((0,), (1,)),
    "os.rename": ((0, 1), (2, 3)),
    "os.mkdir": ((0,), (2,)),
    "os.chmod": ((0,), (2,)),
    "os.chown": ((0,), (3,)),
    "os.link": ((0, 1), (2, 3)),
    "os.symlink": ((0, 1), (2,)),
    "os.truncate": ((0,), ()),
    "os.utime": ((0,), (3,)),
    "os.chflags": ((0,), ()),
    "os.lchflags": ((0,), ()),
    "os.setxattr": ((0,), ()),
    "os.removexattr": ((0,), ()),
    "os.mkfifo": ((0,), (2,)),
    "os.mknod": ((0,), (3,)),
    "shutil.rmtree": ((0,), (1,)),
    "shutil.copyfile": ((0, 1), ()),
    "shutil.copymode": ((0, 1), ()),
    "shutil.copystat": ((0, 1), ()),
    "shutil.copytree": ((0, 1), ()),
    "shutil.move": ((0, 1), ()),
    "shutil.chown": ((0,), ()),
}
_BLOCKED_EVENTS = frozenset(
    {
        "os.system",
        "os.fork",
        "os.forkpty",
        "os.kill",
        "os.killpg",
        "os.startfile",
        "signal.pthread_kill",
        "pty.spawn",
        "subprocess.Popen",
        "sys.settrace",
        "sys.setprofile",
        "sys._current_frames",
        "sys._current_exceptions",
        "gc.get_objects",
        "gc.get_referrers",
        "gc.get_referents",
        "resource.setrlimit",
        "resource.prlimit",
        "os.setuid",
        "os.setgid",
        "webbrowser.open",
        "_thread.start_new_thread",
        "sys.addaudithook",
    }
)
_BLOCKED_PREFIXES = ("socket.", "ctypes.", "os.exec", "os.spawn", "os.posix_spawn", "_winapi.")
_BLOCKED_MODULES = frozenset({"_posixsubprocess", "_ctypes"})
# Frame access would let the program read the test sources (and the expected answers in them).
_FRAME_ATTRIBUTES = frozenset({"tb_frame", "gi_frame", "cr_frame", "ag_frame", "f_back"})
_TRUSTED_PATH_TYPES = (str, bytes, pathlib.PosixPath, pathlib.PurePosixPath)
_WRITE_MODE_CHARS = "wax+"
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
RESULT_EVENT = "psirl.sandbox.result"


def _run_test(index, src, namespace, exec_=exec, compile_=compile, audit_=sys.audit):
    """Run test ``index`` (source ``src``) in ``namespace`` and report whether it raised."""
    try:
        exec_(compile_(src, f"<test {index}>", "exec"), namespace)
        passed = True
    except BaseException:  # noqa: BLE001 - SystemExit / KeyboardInterrupt in a test = failure
        passed = False
    audit_(RESULT_EVENT, index, passed)


def _make_hook(nonce, digests, result_fd, scratch):
    """The audit hook; the nonce and the expected test digests live only in this closure."""
    prefix = scratch.rstrip(os.sep) + os.sep
    realpath, fspath, fsdecode = os.path.realpath, os.fspath, os.fsdecode
    isabs, join, readlink = os.path.isabs, os.path.join, os.readlink
    getframe, write, sha256 = sys._getframe, os.write, hashlib.sha256
    run_code, real_exec, real_compile = _run_test.__code__, builtins.exec, builtins.compile
    reported = set()
    state = {"reporting": False}

    def inside(path):
        if type(path) is int:
            return True  # an fd already opened (and checked) by this process
        if type(path) not in _TRUSTED_PATH_TYPES:
            return False  # a custom os.PathLike could answer differently when really opened
        try:
            resolved = realpath(fspath(path))
        except (TypeError, ValueError, OSError):
            return False
        if isinstance(resolved, bytes):
            resolved = fsdecode(resolved)
        return resolved == scratch or resolved.startswith(prefix) or resolved == os.devnull

    def inside_at(path, dir_fd):
        """Like inside(), for a path that may be relative to an open directory ``dir_fd``."""
        if dir_fd is None or dir_fd == -1 or type(path) is int:
            return inside(path)
        if type(path) not in _TRUSTED_PATH_TYPES:
            return False
        text = fsdecode(fspath(path))
        if isabs(text):
            return inside(text)
        try:
            base = readlink(f"/proc/self/fd/{int(dir_fd)}")
        except (OSError, ValueError, TypeError):
            return False
        return inside(join(base, text))

    def deny(what):
        raise PermissionError(f"sandbox: {what} is blocked")

    def hook(event, args):
        if event == "open":
            path, mode, flags = args
            if isinstance(mode, str):
                writing = any(char in mode for char in _WRITE_MODE_CHARS)
            else:
                writing = bool((flags or 0) & _WRITE_FLAGS)
                # os.open may resolve a relative path against dir_fd, which the event omits.
                if writing and isinstance(path, str | bytes) and not isabs(path):
                    deny(f"os.open for writing with relative path {path!r}")
            if writing and not inside(path):
                deny(f"writing outside the scratch dir ({path!r})")
        elif event in _PATH_EVENTS:
            path_positions, dir_fd_positions = _PATH_EVENTS[event]
            dir_fds = [args[i] for i in dir_fd_positions if i < len(args)]
            for k, i in enumerate(path_positions):
                if i >= len(args):
                    continue
                dir_fd = dir_fds[min(k, len(dir_fds) - 1)] if dir_fds else None
                if not inside_at(args[i], dir_fd):
                    deny(f"{event} outside the scratch dir ({args[i]!r})")
        elif event in _BLOCKED_EVENTS or event.startswith(_BLOCKED_PREFIXES):
            deny("network access" if event.startswith("socket.") else event)
        elif event == "import" and args[0] in _BLOCKED_MODULES:
            raise ImportError(f"sandbox: importing {args[0]} is blocked")
        elif event == "sys._getframe":
            if not state["reporting"]:
                # ValueError is what sys._getframe raises for a too-deep stack; stdlib callers
                # (logging, typing, namedtuple, enum) catch it and fall back.
                raise ValueError("sandbox: frame access is blocked")
        elif event == "object.__getattr__" and args[1] in _FRAME_ATTRIBUTES:
            deny(f"frame access ({args[1]})")
        elif event == RESULT_EVENT:
            index, passed = args
            state["reporting"] = True
            try:
                frame = getframe(1)
            finally:
                state["reporting"] = False
            local = frame.f_locals
            src = local.get("src")
            if (
                frame.f_code is run_code
                and local.get("exec_") is real_exec
                and local.get("compile_") is real_compile
                and type(index) is int
                and 0 <= index < len(digests)
                and type(src) is str
                and sha256(src.encode()).hexdigest() == digests[index]
                and index not in reported
            ):
                reported.add(index)
                write(result_fd, f"{nonce} {index} {1 if passed is True else 0}\n".encode())

    return hook


def _main():
    config = json.loads(sys.stdin.read())
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    tests = tuple(config["tests"])
    scratch = os.path.realpath(config["scratch"])
    digests = tuple(hashlib.sha256(test.encode()).hexdigest() for test in tests)
    sys.addaudithook(_make_hook(config.pop("nonce"), digests, config["result_fd"], scratch))
    code = config.pop("code")
    del config
    module = types.ModuleType("solution")
    module.__file__ = os.path.join(scratch, "solution.py")
    sys.modules["solution"] = module
    namespace = module.__dict__
    try:
        exec(compile(code, module.__file__, "exec"), namespace)
    except BaseException as error:  # noqa: BLE001 - the program's failure fails every test
        print(f"solution raised {type(error).__name__}: {error}", file=sys.stderr)
        return
    for index, src in enumerate(tests):
        _run_test(index, src, namespace)


if __name__ == "__main__":
    _main()
