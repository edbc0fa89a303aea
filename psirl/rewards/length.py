"""DAPO's overlong soft punishment: a length penalty that ramps up in the last tokens of the budget.

With L_max the length budget, L_cache the soft window and L the completion length
(DAPO, Yu et al. 2025, arXiv:2503.14476, "Overlong Reward Shaping"; DAPO itself is summarised
in ../shared/reference/002_51bc6b7a5ef2c181.txt, and length gaming as a reward hack in
../shared/reference/003_e8bd019fa090e190.txt):

    R_length(L) = 0                                 if L <= L_max - L_cache
                = ((L_max - L_cache) - L) / L_cache if L_max - L_cache < L <= L_max
                = -1                                if L > L_max

and the reward returned is ``penalty * R_length(L)`` (add it to the task reward, e.g. with
WeightedReward). The ramp is linear: -1/L_cache per token inside the window, reaching -1 at
L = L_max, so a completion cut at the generation cap gets the full penalty.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from psirl.rewards.base import check_batch


def overlong_penalty(length: int, max_length: int, cache_length: int) -> float:
    """R_length(L) of the module docstring (a float in [-1, 0])."""
    soft_start = max_length - cache_length
    if length <= soft_start:
        return 0.0
    if length <= max_length:
        return (soft_start - length) / cache_length
    return -1.0


class LengthPenalty:
    """RewardFn ``r_i = penalty * R_length(len_i)`` with DAPO's overlong soft punishment.

    Length ``len_i`` is measured in tokens of ``tokenizer`` (``add_special_tokens=False``) when
    one is given, else by ``length_fn(completion)``, else in characters (exact for the
    character-level tiny models of the tests and the demo).
    """

    def __init__(
        self,
        max_length: int,
        cache_length: int,
        *,
        penalty: float = 1.0,
        tokenizer: Any = None,
        length_fn: Callable[[str], int] | None = None,
        name: str = "length_penalty",
    ):
        if max_length < 1:
            raise ValueError(f"max_length: must be >= 1, got {max_length}")
        if not 1 <= cache_length <= max_length:
            raise ValueError(
                f"cache_length: must be in [1, max_length={max_length}], got {cache_length}"
            )
        if tokenizer is not None and length_fn is not None:
            raise ValueError("tokenizer, length_fn: give at most one")
        self.max_length = max_length
        self.cache_length = cache_length
        self.penalty = float(penalty)
        self.tokenizer = tokenizer
        self.length_fn = length_fn
        self.name = name

    def length(self, completion: str) -> int:
        """Completion length in tokens (tokenizer), by length_fn, or in characters."""
        if self.tokenizer is not None:
            return len(self.tokenizer(completion, add_special_tokens=False)["input_ids"])
        if self.length_fn is not None:
            return int(self.length_fn(completion))
        return len(completion)

    def __call__(
        self, prompts: list[str], completions: list[str], records: list[dict[str, Any]]
    ) -> list[float]:
        check_batch(prompts, completions, records)
        return [
            self.penalty
            * overlong_penalty(self.length(completion), self.max_length, self.cache_length)
            for completion in completions
        ]
