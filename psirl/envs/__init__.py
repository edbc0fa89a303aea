"""Built-in environments for multi-turn episodes (psirl/rollout/episode.py), one per module.

``build_env_factory(name, kwargs)`` turns ``env.name`` of the config into a factory of fresh
environments: a built-in name from ``ENVIRONMENTS`` or a user class given as ``module:Class``
(imported on use, like custom rewards).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

ENVIRONMENTS: dict[str, str] = {
    "calculator": "psirl.envs.calculator:CalculatorEnv",
    "python_tool": "psirl.envs.python_tool:PythonToolEnv",
}


def resolve_env_class(name: str) -> type:
    """The class named by a built-in name or ``module:Class``; ValueError naming ``env.name``."""
    target = ENVIRONMENTS.get(name, name)
    if ":" not in target:
        raise ValueError(f"env.name: {name!r} is neither a built-in environment "
                         f"({', '.join(ENVIRONMENTS)}) nor 'module:Class'")
    module_name, attr = target.split(":", 1)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"env.name: cannot import module {module_name!r} ({exc})") from exc
    cls = getattr(module, attr, None)
    if cls is None:
        raise ValueError(f"env.name: module {module_name!r} has no attribute {attr!r}")
    if not (callable(getattr(cls, "reset", None)) and callable(getattr(cls, "step", None))):
        raise ValueError(f"env.name: {name!r} has no reset(record) and step(turn) methods")
    return cls


def build_env_factory(name: str, kwargs: dict[str, Any] | None = None) -> Callable[[], Any]:
    """A function making a fresh environment per episode: ``Class(**kwargs)``. The class is
    built once here so that a bad keyword fails at load time, naming ``env.kwargs``."""
    cls = resolve_env_class(name)
    kwargs = dict(kwargs or {})
    try:
        cls(**kwargs)
    except TypeError as exc:
        raise ValueError(f"env.kwargs: {name!r} does not accept {sorted(kwargs)} ({exc})") from exc
    return lambda: cls(**kwargs)
