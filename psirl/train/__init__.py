"""Training loops. `run_config(config)` dispatches on `config.loop`; each loop is one module."""

from __future__ import annotations

import importlib
from pathlib import Path

# loop name -> "module:function"; a plain dict so a missing module fails loudly at lookup.
LOOPS = {
    "sft": "psirl.train.sft:train",
    "online": "psirl.train.online:train",
    "reward_model": "psirl.train.reward_model:train",
    "preference": "psirl.train.preference:train",
    "self_training": "psirl.train.self_training:train",
}


def run_config(config, *, resume: bool = False, quiet: bool = False) -> Path:
    """Run the loop named by `config.loop`; return the run folder."""
    if config.loop not in LOOPS:
        raise ValueError(f"loop: {config.loop!r} is not available; known loops: {sorted(LOOPS)}")
    module_name, fn_name = LOOPS[config.loop].split(":")
    fn = getattr(importlib.import_module(module_name), fn_name)
    return fn(config, resume=resume, quiet=quiet)
