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


# Loops that score samples with a reward, and so accept `reward_fn=`.
SCORING_LOOPS = ("online", "preference", "self_training")


def run_config(config, *, resume: bool = False, quiet: bool = False, reward_fn=None) -> Path:
    """Run the loop named by `config.loop`; return the run folder.

    reward_fn: your own reward ``fn(prompts, completions, records) -> list[float]`` (sync or
    ``async def``; a ``tokenizer`` parameter receives the policy's tokenizer) instead of the
    configured `reward:` kind, for the loops that score samples (online, online preference,
    self-training).
    """
    if config.loop not in LOOPS:
        raise ValueError(f"loop: {config.loop!r} is not available; known loops: {sorted(LOOPS)}")
    module_name, fn_name = LOOPS[config.loop].split(":")
    fn = getattr(importlib.import_module(module_name), fn_name)
    if reward_fn is None:
        return fn(config, resume=resume, quiet=quiet)
    if config.loop not in SCORING_LOOPS or (config.loop == "preference"
                                            and not config.preference.online):
        raise ValueError(f"reward_fn: loop {config.loop!r} scores no samples; a reward function "
                         f"is used by {', '.join(SCORING_LOOPS)} (preference with online: true)")
    return fn(config, resume=resume, quiet=quiet, reward_fn=reward_fn)
