"""The rollout layer every sampling loop goes through: render prompts, generate, score.

    records --render (chat template or plain text)--> prompt texts
            --engine.generate(n=G)-----------------> RolloutBatch (rows of a prompt consecutive)
            --reward_fn(prompts, completions, per-row records)--> rewards [B]

Online RL, online DPO, self-training and evaluation hold one ``Sampler``; so the exact string the
engine sees for a record is the same in every loop (``render``), and the engine (HF or vLLM) and
the reward are chosen once, from the config, by the code that builds the Sampler.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from psirl.data.templates import render_prompt

from .batch import RolloutBatch, SamplingParams
from .engine import Engine

__all__ = ["Sampler", "ScoredRollouts"]

RewardFn = Callable[[list[str], list[str], list[dict]], list[float]]
# (engine, records, params) -> psirl.rollout.episode.EpisodeBatch
EpisodeFn = Callable[[Any, list[dict], SamplingParams], Any]


@dataclass
class ScoredRollouts:
    """One generate + score round.

    batch: the engine's RolloutBatch (B = len(records) x n rows; ``batch.prompts`` are the
        rendered prompt texts). rewards: [B] float32 on the CPU. records: the B per-row records
        (row i came from records[batch.group_ids[i]] of the call).
    """

    batch: RolloutBatch
    rewards: torch.Tensor
    records: list[dict]
    metrics: dict[str, float] = field(default_factory=dict)


class Sampler:
    """Render, generate and score with one engine and one reward.

    engine: any ``Engine`` (psirl.rollout.build_engine builds the configured one).
    tokenizer: the policy's tokenizer (its chat template renders conversational prompts).
    reward_fn: ``fn(prompts, completions, records) -> list[float]`` (None: generate only).
    chat: ``data.chat`` -- True templates plain-string prompts too, False never templates (a
        conversational record is then an error), None templates exactly the conversational ones.
    episodes: multi-turn rollouts, ``fn(engine, records, params) -> EpisodeBatch``
        (psirl.rollout.episode): ``sample`` then runs episodes whose environment gives the
        rewards (and per-turn rewards in ``batch.token_rewards``); single-turn generation is the
        one-turn case of the same batch layout.
    """

    def __init__(self, engine: Engine, tokenizer: Any, reward_fn: RewardFn | None = None, *,
                 chat: bool | None = None, episodes: EpisodeFn | None = None):
        self.engine = engine
        self.tokenizer = tokenizer
        self.reward_fn = reward_fn
        self.chat = chat
        self.episodes = episodes

    def render(self, records: Sequence[dict]) -> list[str]:
        """The text the engine is given for each record's ``prompt`` (str or list of messages)."""
        return [render_prompt(self.tokenizer, r["prompt"], chat=self.chat) for r in records]

    def generate(self, records: Sequence[dict], params: SamplingParams,
                 texts: Sequence[str] | None = None) -> tuple[RolloutBatch, list[dict]]:
        """``params.n`` completions per record. texts: the prompts to send instead of the
        rendered records (STaR's hinted prompts); rows still map to ``records``."""
        prompts = list(texts) if texts is not None else self.render(records)
        batch = self.engine.generate(prompts, params)
        return batch, [records[int(g)] for g in batch.group_ids]

    def score(self, prompts: list[str], completions: list[str], records: list[dict]) -> torch.Tensor:
        """[B] float32 rewards of the reward function (a RuntimeError if there is none)."""
        if self.reward_fn is None:
            raise RuntimeError("Sampler.score: this sampler was built without a reward function")
        values = self.reward_fn(prompts, completions, records)
        return torch.tensor([float(v) for v in values], dtype=torch.float32)

    def sample(self, records: Sequence[dict], params: SamplingParams) -> ScoredRollouts:
        """Generate ``params.n`` completions per record and score each against its record
        (with ``episodes``: run multi-turn episodes; the environment's returns are the rewards)."""
        if self.episodes is not None:
            episodes = self.episodes(self.engine, list(records), params)
            per_row = [records[int(g)] for g in episodes.batch.group_ids]
            return ScoredRollouts(batch=episodes.batch, rewards=episodes.rewards.float().cpu(),
                                  records=per_row, metrics=dict(episodes.metrics))
        batch, per_row = self.generate(records, params)
        rewards = self.score(batch.prompts, batch.completions, per_row)
        return ScoredRollouts(batch=batch, rewards=rewards, records=per_row)

    def sync(self, model) -> None:
        """Push the trainer's current weights to the engine."""
        self.engine.sync(model)
