"""Training loops. `run_config(config)` dispatches on `config.loop`; each loop is one module.

The loops (one module each, what `LOOPS` names): sft, online, preference, reward_model,
self_training; their parts: sft_update (the SFT step the preference-free loops share),
preference_data / preference_online (pairs from files or sampled), evaluation, rewards (the
`reward:` section -> RewardFn), compare (several runs, one report).
The run machinery every loop stands on: config (the pydantic config), setup (policy, data,
rollout layer), base (run_loop: checkpoints, resume, locking, non-finite steps), precision (the
bf16 recipe), distributed / fsdp / dcp (data-parallel and sharded training, sharded checkpoints).
"""

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


def run_config(config, *, resume: bool = False, quiet: bool = False, overwrite: bool = False,
               reward_fn=None) -> Path:
    """Run the loop named by `config.loop`; return the run folder.

    The folder is locked for the whole run (a second run or resume of it fails at once). A fresh
    run refuses a folder that holds another run unless `overwrite=True`, which clears it first.
    How the run ended: `psirl.train.base.read_run_status(run_dir)` ("finished", or "stopped"
    by SIGTERM after checkpointing).
    reward_fn: your own reward ``fn(prompts, completions, records) -> list[float]`` (sync or
    ``async def``; a ``tokenizer`` parameter receives the policy's tokenizer) instead of the
    configured `reward:` kind, for the loops that score samples (online, online preference,
    self-training).
    """
    from psirl.train.base import overwrite_run_dir, run_dir_lock

    if config.loop not in LOOPS:
        raise ValueError(f"loop: {config.loop!r} is not available; known loops: {sorted(LOOPS)}")
    _refuse_world_size(config)
    if overwrite and resume:
        raise ValueError("overwrite and resume contradict each other; choose one")
    module_name, fn_name = LOOPS[config.loop].split(":")
    fn = getattr(importlib.import_module(module_name), fn_name)
    kwargs = {}
    if reward_fn is not None:
        if config.loop not in SCORING_LOOPS or (config.loop == "preference"
                                                and not config.preference.online):
            raise ValueError(f"reward_fn: loop {config.loop!r} scores no samples; a reward "
                             f"function is used by {', '.join(SCORING_LOOPS)} (preference with "
                             f"online: true)")
        kwargs["reward_fn"] = reward_fn
    # The loop's run_loop takes the same lock again (re-entrant within this process).
    with run_dir_lock(config.output_dir) as run_dir:
        if overwrite:
            overwrite_run_dir(run_dir)
        return fn(config, resume=resume, quiet=quiet, **kwargs)


def _refuse_world_size(config) -> None:
    """Several torchrun processes with a loop that runs as one process only: one clear error
    before anything is built (online DPO, the reward model and self-training sample or score
    in one process)."""
    import os

    from psirl.train.config import ConfigError

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    parallel = config.loop in ("sft", "online") or (config.loop == "preference"
                                                    and not config.preference.online)
    if world_size > 1 and not parallel:
        what = "online preference" if config.loop == "preference" else config.loop
        raise ConfigError([f"loop: {what!r} runs as one process; launched with torchrun as "
                           f"{world_size} processes. Run it with `psirl train` alone (data-parallel "
                           f"loops: sft, online, offline preference)"])
