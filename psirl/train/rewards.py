"""The reward function a run's `reward:` config section describes, wrapped so one bad sample
cannot stop the run (SafeReward: fallback value, failure count in the metrics)."""

from __future__ import annotations

import os

from psirl.rewards.base import SafeReward, WeightedReward


def _build(section, task):
    """Unwrapped reward function for one config section (recursive for `weighted`)."""
    kind = section.kind
    if kind == "task":
        from psirl.rewards.verifiers import TaskReward

        return TaskReward(task)
    if kind == "verifier":
        from psirl.rewards.verifiers import AnswerVerifier

        return AnswerVerifier(section.mode, answer_key=section.answer_key, abs_tol=section.tolerance)
    if kind == "format":
        from psirl.rewards.verifiers import FormatReward

        return FormatReward(section.pattern, reward=section.value)
    if kind == "code":
        from psirl.rewards.code import CodeTestsReward
        from psirl.rewards.sandbox import SandboxLimits

        limits = SandboxLimits(wall_time_s=section.timeout_s, memory_mb=section.memory_mb)
        return CodeTestsReward(tests_key=section.tests_key, limits=limits,
                               allow_weak_sandbox=section.allow_weak_sandbox)
    if kind == "reward_model":
        from psirl.rewards.reward_model import RewardModelReward

        return RewardModelReward(section.path, batch_size=section.batch_size)
    if kind == "judge":
        from psirl.rewards.judge import LLMJudgeReward

        kwargs = {"timeout_s": section.timeout_s, "max_retries": section.max_retries}
        if section.prompt_template is not None:
            kwargs["prompt_template"] = section.prompt_template
        api_key = os.environ.get(section.api_key_env) if section.api_key_env else None
        return LLMJudgeReward(section.base_url, section.model, api_key=api_key, **kwargs)
    if kind == "weighted":
        return WeightedReward([(f"{c.reward.kind}{i}", _build(c.reward, task), c.weight)
                               for i, c in enumerate(section.components)])
    raise ValueError(f"reward.kind: unknown kind {kind!r}")


def build_reward(config, task):
    """RewardFn for `config.reward`, with per-sample failures replaced by `reward.fallback`."""
    fn = SafeReward(_build(config.reward, task), fallback=config.reward.fallback)
    if config.reward.shuffle:
        from psirl.rewards.base import ShuffledReward

        return ShuffledReward(fn)
    return fn
