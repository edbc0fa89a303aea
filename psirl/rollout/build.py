"""The one place an engine is built from a run's config (`rollout.engine`).

Every loop that samples (online, online DPO, self-training, evaluation) holds an ``Engine`` made
here, so choosing vLLM over transformers is one config value. A new engine is one module plus one
entry in ``ENGINES`` (the name -> builder table below) and one value of ``rollout.engine``.
"""

from __future__ import annotations

import importlib

from .engine import Engine

# engine name -> "module:function(config, model, tokenizer) -> Engine"; imported on use, so an
# engine's optional dependency (vllm) is only needed by the runs that choose it.
ENGINES: dict[str, str] = {
    "hf": "psirl.rollout.hf_engine:engine_from_config",
    "vllm": "psirl.rollout.vllm_engine:engine_from_config",
}


def build_engine(config, model, tokenizer) -> Engine:
    """The engine named by ``config.rollout.engine``, sampling from ``model``'s weights."""
    name = config.rollout.engine
    if name not in ENGINES:
        raise ValueError(f"rollout.engine: unknown engine {name!r}; known: {', '.join(ENGINES)}")
    module_name, func = ENGINES[name].split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise RuntimeError(
            f"rollout.engine: {name!r} needs a package that is not installed ({exc}); "
            f"install psirl[{name}]"
        ) from exc
    return getattr(module, func)(config, model, tokenizer)
