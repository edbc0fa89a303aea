"""The reward function a run's `reward:` config section describes, wrapped so one bad sample
cannot stop the run (SafeReward: fallback value, failure count in the metrics)."""

from __future__ import annotations

import logging
import math
import os
from typing import Any

from psirl.rewards.base import SafeReward, WeightedReward, reward_metrics, reward_name

logger = logging.getLogger(__name__)

# Rewards beyond +-1e6 are taken as a bug in the reward (wrong units, an overflow): as float32
# their square overflows in the advantage's std (1e30 ** 2 = inf), so one such sample would turn
# the whole batch's advantages into NaN. Decision: such a reward counts as a failed sample, like
# NaN / inf (SafeReward: `reward.fallback` instead, counted in reward/<name>/failures, the
# first one logged with its value), never clamped: a clamp would silently change the objective.
MAX_ABS_REWARD = 1e6


def _build(section, task, tokenizer=None):
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
    if kind == "python":
        from psirl.rewards.python import PythonReward, import_function

        if section.function is None:
            raise ValueError("reward.function: not set; name your reward as 'module:function' "
                             "or pass reward_fn= to train() / run_config()")
        return PythonReward(import_function(section.function), tokenizer=tokenizer,
                            timeout_s=section.timeout_s)
    if kind == "length":
        from psirl.rewards.length import LengthPenalty

        if tokenizer is None:
            raise ValueError("reward.kind: 'length' counts tokens and needs the policy's tokenizer")
        return LengthPenalty(section.max_tokens, section.cache_tokens, penalty=section.penalty,
                             tokenizer=tokenizer)
    if kind == "weighted":
        return WeightedReward([(f"{c.reward.kind}{i}", _build(c.reward, task, tokenizer), c.weight)
                               for i, c in enumerate(section.components)])
    raise ValueError(f"reward.kind: unknown kind {kind!r}")


class RewardScaleGuard:
    """Pass rewards through, but a finite value with |r| > MAX_ABS_REWARD becomes NaN, which
    the SafeReward around it counts as a failure (logged here once, with the value)."""

    def __init__(self, fn, max_abs: float = MAX_ABS_REWARD):
        self.fn = fn
        self.max_abs = max_abs
        self.name = reward_name(fn)
        self._logged = False

    def __call__(self, prompts, completions, records) -> list[Any]:
        out = []
        for i, value in enumerate(self.fn(prompts, completions, records)):
            try:
                number = float(value)
            except (TypeError, ValueError):
                out.append(value)  # SafeReward reports the non-number
                continue
            if math.isfinite(number) and abs(number) > self.max_abs:
                if not self._logged:
                    self._logged = True
                    logger.warning("reward %r gave %g for sample %d, beyond +-%g: counted as a "
                                   "failed sample (reward.fallback); later ones only counted",
                                   self.name, number, i, self.max_abs)
                number = math.nan
            out.append(number)
        return out

    def metrics(self) -> dict[str, float]:
        return reward_metrics(self.fn)

    def __getattr__(self, attr):  # close(), limits, ... of the wrapped reward
        if attr == "fn":
            raise AttributeError(attr)
        return getattr(self.fn, attr)


def build_reward(config, task, tokenizer=None, reward_fn=None):
    """RewardFn for `config.reward`, with per-sample failures (an exception, a non-number, NaN,
    inf, |r| > MAX_ABS_REWARD or a timeout) replaced by `reward.fallback` and counted in the
    metrics.

    tokenizer: the policy's, for rewards that count tokens or ask for it. reward_fn: a Python
    callable ``fn(prompts, completions, records) -> list[float]`` (or async) that replaces the
    configured kind (``train(config, reward_fn=...)``); it gets the same failure handling,
    `reward.shuffle` and, when the section is `kind: python`, its `timeout_s`.
    """
    if reward_fn is not None:
        from psirl.rewards.python import PythonReward

        timeout = config.reward.timeout_s if config.reward.kind == "python" else None
        inner = PythonReward(reward_fn, tokenizer=tokenizer, timeout_s=timeout)
    else:
        inner = _build(config.reward, task, tokenizer)
    fn = SafeReward(RewardScaleGuard(inner), fallback=config.reward.fallback,
                    name=reward_name(inner))
    if config.reward.shuffle:
        from psirl.rewards.base import ShuffledReward

        return ShuffledReward(fn)
    return fn


def validate_reward(fn, records: list[dict]) -> None:
    """Run every `validate(records)` of the reward and its parts before training starts, so a
    record the reward cannot score (code tests that never call `check`, a missing field) is a
    clear error naming it, not a fallback reward in every step."""
    seen: set[int] = set()
    stack = [fn]
    while stack:
        part = stack.pop()
        if part is None or id(part) in seen:
            continue
        seen.add(id(part))
        validate = getattr(type(part), "validate", None)
        if callable(validate):
            part.validate(records)
        stack.append(part.__dict__.get("fn") if hasattr(part, "__dict__") else None)
        stack.extend(c[1] for c in getattr(part, "components", []) or [])
