"""The interface every generation engine implements (HFEngine, VLLMEngine)."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from torch import nn

from .batch import RolloutBatch, SamplingParams


@runtime_checkable
class Engine(Protocol):
    """Samples completions for the online loop and receives the trainer's new weights.

    generate(prompts, params) -> RolloutBatch: ``params.n`` completions per prompt, rows of a
        prompt consecutive, with behaviour log-probs of the sampled tokens under the
        temperature-scaled softmax (top-p / top-k not applied to the log-probs).
    sync(model) -> None: make the next ``generate`` sample from ``model``'s current weights.

    Optional (not part of the runtime check, so an engine without it still is an Engine):
    generate_ids(prompt_ids: list[list[int]], params, *, row_seeds, stream_offsets)
        -> RolloutBatch: ``generate`` from exact token ids (no tokenisation, no BOS added), row r
        drawing from the random stream ``row_seeds[r]`` from draw ``stream_offsets[r]`` on
        (psirl/rollout/seeding.py). Multi-turn episodes need it (psirl/rollout/episode.py): each
        turn continues from the ids sampled so far, never from re-tokenised text, and from the
        episode's own stream. ``HFEngine`` has it.
    """

    def generate(self, prompts: list[str], params: SamplingParams) -> RolloutBatch: ...

    def sync(self, model: nn.Module) -> None: ...
