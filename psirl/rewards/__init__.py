"""Reward functions behind one interface: ``fn(prompts, completions, records) -> list[float]``.

Verifiers (answers, regex formats, built-in tasks, unit tests in a sandbox), a learned reward
model, an LLM judge, weighted sums, length penalties, and SafeReward to isolate failures.
RewardModelReward imports torch/transformers only when constructed.
"""

from psirl.rewards.base import (
    PerSampleReward,
    RewardFn,
    SafeReward,
    WeightedReward,
    check_batch,
    reward_metrics,
    reward_name,
)
from psirl.rewards.code import CodeTestsReward, extract_code
from psirl.rewards.judge import DEFAULT_JUDGE_TEMPLATE, JudgeError, LLMJudgeReward
from psirl.rewards.length import LengthPenalty, overlong_penalty
from psirl.rewards.reward_model import RewardModelReward
from psirl.rewards.sandbox import SandboxLimits, SandboxResult, run_in_sandbox
from psirl.rewards.verifiers import (
    AnswerVerifier,
    FormatReward,
    TaskReward,
    extract_answer_is,
    extract_boxed,
    extract_last_number,
    parse_number,
)

__all__ = [
    "DEFAULT_JUDGE_TEMPLATE",
    "AnswerVerifier",
    "CodeTestsReward",
    "FormatReward",
    "JudgeError",
    "LLMJudgeReward",
    "LengthPenalty",
    "PerSampleReward",
    "RewardFn",
    "RewardModelReward",
    "SafeReward",
    "SandboxLimits",
    "SandboxResult",
    "TaskReward",
    "WeightedReward",
    "check_batch",
    "extract_answer_is",
    "extract_boxed",
    "extract_code",
    "extract_last_number",
    "overlong_penalty",
    "parse_number",
    "reward_metrics",
    "reward_name",
    "run_in_sandbox",
]
