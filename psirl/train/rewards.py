"""The reward function a run's `reward:` config section describes, wrapped so one bad sample
cannot stop the run (SafeReward: fallback value, failure count in the metrics)."""

from __future__ import annotations

import os

from psirl.rewards.base import SafeReward, WeightedReward


def _build(section, task, tokenizer):
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


def build_reward(config, task, tokenizer=None, reward_fn=None):
    """RewardFn for `config.reward`, with per-sample failures replaced by `reward.fallback`.

    tokenizer: the policy's, for rewards that count tokens or ask for it. reward_fn: a Python
    callable ``fn(prompts, completions, records) -> list[float]`` (or async) that replaces the
    configured kind (``train(config, reward_fn=...)``); it gets the same failure handling,
    `reward.shuffle` and, when the section is `kind: python`, its `timeout_s`.
    """
    if reward_fn is not None:
        from psirl.rewards.python import PythonReward

        timeout = getattr(config.reward, "timeout_s", None) if config.reward.kind == "python" else None
        fn = PythonReward(reward_fn, tokenizer=tokenizer, timeout_s=timeout)
    else:
        fn = _build(config.reward, task, tokenizer)
    fn = SafeReward(fn, fallback=config.reward.fallback)
    if config.reward.shuffle:
        from psirl.rewards.base import ShuffledReward

        return ShuffledReward(fn)
    return fn
