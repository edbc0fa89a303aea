"""Your own reward function as a RewardFn: imported from "module:function", sync or async,
optionally given the tokenizer, with a wall-clock timeout.

    fn(prompts: list[str], completions: list[str], records: list[dict]) -> list[float]
    async def fn(prompts, completions, records) -> list[float]
    fn(prompts, completions, records, tokenizer) -> list[float]   # wants the policy's tokenizer

A call that exceeds the timeout raises ``RewardTimeout``; wrapped in ``SafeReward`` (as every
configured reward is) its samples get the fallback and are counted. The hung call keeps running in
a daemon thread (Python cannot kill a thread) but the run, and its SIGTERM handling, go on.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["PythonReward", "RewardTimeout", "import_function"]


class RewardTimeout(TimeoutError):
    """A user reward call ran longer than its timeout."""


def import_function(spec: str) -> Callable:
    """The callable named by "module:attr" (module found on sys.path or in the working dir)."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"reward.function: {spec!r}: expected 'module:function'")
    cwd = str(Path.cwd())
    if cwd not in sys.path:
        sys.path.append(cwd)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"reward.function: cannot import module {module_name!r} ({exc})") from exc
    fn = getattr(module, attr, None)
    if fn is None:
        raise ValueError(f"reward.function: module {module_name!r} has no attribute {attr!r}")
    if not callable(fn):
        raise ValueError(f"reward.function: {spec!r} is not callable")
    return fn


def _accepts_tokenizer(fn: Callable) -> bool:
    try:
        return "tokenizer" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


class PythonReward:
    """RewardFn calling a user function with a timeout (module docstring).

    fn: the function (or any callable); tokenizer: passed as ``tokenizer=`` when fn takes it;
    timeout_s: None for no timeout.
    """

    def __init__(self, fn: Callable, *, tokenizer: Any = None, timeout_s: float | None = 60.0,
                 name: str | None = None):
        self.fn = fn
        self.tokenizer = tokenizer
        self.timeout_s = timeout_s
        self.name = name or getattr(fn, "__name__", None) or type(fn).__name__
        self._kwargs = {"tokenizer": tokenizer} if _accepts_tokenizer(fn) else {}
        self.timeouts = 0

    def _call(self, prompts, completions, records):
        out = self.fn(prompts, completions, records, **self._kwargs)
        if inspect.isawaitable(out):
            out = asyncio.run(_awaited(out))
        return list(out)

    def __call__(self, prompts: list[str], completions: list[str],
                 records: list[dict[str, Any]]) -> list[float]:
        if self.timeout_s is None:
            return self._call(prompts, completions, records)
        box: dict[str, Any] = {}

        def target():
            try:
                box["value"] = self._call(prompts, completions, records)
            except BaseException as exc:  # re-raised in the caller's thread
                box["error"] = exc

        thread = threading.Thread(target=target, name=f"reward-{self.name}", daemon=True)
        thread.start()
        thread.join(self.timeout_s)
        if thread.is_alive():
            self.timeouts += 1
            raise RewardTimeout(f"reward {self.name!r}: no result after {self.timeout_s} s "
                                f"(reward.timeout_s) for a batch of {len(completions)}")
        if "error" in box:
            raise box["error"]
        return box["value"]

    def metrics(self) -> dict[str, float]:
        return {f"reward/{self.name}/timeouts": float(self.timeouts)}


async def _awaited(awaitable):
    return await awaitable
