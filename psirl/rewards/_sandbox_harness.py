"""Program run INSIDE the sandbox by psirl/rewards/sandbox.py (never imported by psirl).

It is passed to ``python -I -S -B -c`` (so no file of the trainer is visible in the sandbox) and
reads one JSON object on stdin: ``{"code", "probes", "bindings", "limits"}``. It then

1. lowers its own resource limits (address space, CPU seconds, file size, open files, tasks,
   core size) before any untrusted code runs; an unprivileged process cannot raise them again;
2. keeps the result channel (the original stdout) on a private fd and points fd 1 at stderr, so
   the program's prints cannot garble it;
3. executes ``code`` as module ``solution``; if it raises (SystemExit included), it reports the
   exception type and evaluates nothing;
4. evaluates each probe (a Python expression) in the program's namespace plus ``bindings`` and
   writes one line per probe: ``<index> <tagged JSON>``.

A line carries a VALUE, never a verdict: ``{"v": x}`` with x in the tagged encoding below, or
``{"e": "<exception type name>"}``. The grader (psirl/rewards/code.py) holds the expected values
and the assert structure, and decides outside. Nothing here is trusted: the program may rewrite
this harness, the channel or its own memory, which lets it choose the values it reports, which
is what any program can do by returning them; it never sees what would earn a pass.

Tagged encoding (only exact builtin types cross; a subclass or any other object does not):
None/bool/int/str -> JSON; float -> JSON or {"f": "nan"|"inf"|"-inf"}; list -> {"l": [...]};
tuple -> {"t": [...]}; set/frozenset -> {"s": [...]}; dict -> {"d": [[k, v], ...]};
bytes -> {"b": hex}. Anything else -> {"u": "<type name>"} (unserialisable: fails any check).
"""

import json
import os
import resource
import sys
import types

_MAX_DEPTH = 100


def _limit(kind, value):
    _, hard = resource.getrlimit(kind)
    if hard != resource.RLIM_INFINITY:
        value = min(value, hard)
    resource.setrlimit(kind, (value, value))


def _encode(value, depth=0):
    if depth > _MAX_DEPTH:
        raise ValueError("nested too deeply")
    kind = type(value)
    if value is None or kind is bool or kind is str:
        return value
    if kind is int:
        if value.bit_length() > 10000:
            raise ValueError("int too large")
        return value
    if kind is float:
        if value != value:
            return {"f": "nan"}
        if value in (float("inf"), float("-inf")):
            return {"f": "inf" if value > 0 else "-inf"}
        return value
    if kind is list or kind is tuple:
        return {"l" if kind is list else "t": [_encode(item, depth + 1) for item in value]}
    if kind is set or kind is frozenset:
        return {"s": [_encode(item, depth + 1) for item in value]}
    if kind is dict:
        return {"d": [[_encode(k, depth + 1), _encode(v, depth + 1)] for k, v in value.items()]}
    if kind is bytes:
        return {"b": value.hex()}
    return {"u": kind.__name__ if isinstance(kind.__name__, str) else "object"}


def _main():
    payload = json.loads(sys.stdin.buffer.read())
    limits = payload["limits"]
    _limit(resource.RLIMIT_CORE, 0)
    _limit(resource.RLIMIT_AS, limits["memory_bytes"])
    _limit(resource.RLIMIT_CPU, limits["cpu_s"])
    _limit(resource.RLIMIT_FSIZE, limits["file_bytes"])
    _limit(resource.RLIMIT_NOFILE, limits["open_files"])
    _limit(resource.RLIMIT_NPROC, limits["tasks"])
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    channel = os.dup(1)  # the result channel; fd 1 becomes stderr for the program's prints
    os.dup2(2, 1)
    write = os.write

    def report(index, item):
        try:
            line = json.dumps(item, separators=(",", ":"))
        except (TypeError, ValueError):
            line = '{"u":"unserialisable"}'
        write(channel, f"{index} {line}\n".encode())

    module = types.ModuleType("solution")
    module.__file__ = "solution.py"
    sys.modules["solution"] = module
    namespace = module.__dict__
    code, probes, bindings = payload["code"], payload["probes"], payload["bindings"]
    del payload
    try:
        exec(compile(code, "solution.py", "exec"), namespace)
    except BaseException as error:  # noqa: BLE001 - any failure of the program fails all tests
        print(f"solution raised {type(error).__name__}: {error}", file=sys.stderr)
        report(-1, {"e": type(error).__name__})
        return
    namespace.update({name: _decode(value) for name, value in bindings.items()})
    for index, source in enumerate(probes):
        try:
            value = eval(compile(source, f"<probe {index}>", "eval"), namespace)
            item = {"v": _encode(value)}
        except BaseException as error:  # noqa: BLE001 - SystemExit in a probe fails that probe
            item = {"e": type(error).__name__}
        report(index, item)


def _decode(item):
    if isinstance(item, dict):
        (tag, body), = item.items()
        if tag == "f":
            return float(body)
        if tag == "l":
            return [_decode(x) for x in body]
        if tag == "t":
            return tuple(_decode(x) for x in body)
        if tag == "s":
            return {_decode(x) for x in body}
        if tag == "d":
            return {_decode(k): _decode(v) for k, v in body}
        if tag == "b":
            return bytes.fromhex(body)
        raise ValueError(f"unknown tag {tag!r}")
    return item


_main()
