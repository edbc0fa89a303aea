"""The reward interface, failure isolation and weighted combination.

A reward function maps a batch of B samples to B floats:

    RewardFn(prompts: list[str], completions: list[str], records: list[dict]) -> list[float]

where ``records[i]`` is the data record prompt i came from (it carries ``answer``, ``tests``...).
Reward sources (verifier, learned reward model, LLM judge) and why their flaws get exploited by
the policy (reward hacking) are covered in ../shared/reference/003_e8bd019fa090e190.txt.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

logger = logging.getLogger(__name__)


@runtime_checkable
class RewardFn(Protocol):
    """``fn(prompts, completions, records) -> list[float]``, one float per sample (len B each)."""

    def __call__(
        self, prompts: list[str], completions: list[str], records: list[dict[str, Any]]
    ) -> list[float]: ...


def reward_name(fn: Any) -> str:
    """A reward's display name: its ``name`` attribute, else function / class name."""
    name = getattr(fn, "name", None)
    if isinstance(name, str) and name:
        return name
    return getattr(fn, "__name__", None) or type(fn).__name__


def reward_metrics(fn: Any) -> dict[str, float]:
    """``fn.metrics()`` if the reward exposes one, else ``{}``."""
    metrics = getattr(fn, "metrics", None)
    return dict(metrics()) if callable(metrics) else {}


def check_batch(prompts: Sequence[Any], completions: Sequence[Any], records: Sequence[Any]) -> int:
    """Return B after checking the three lists have the same length (ValueError naming them)."""
    sizes = {"prompts": len(prompts), "completions": len(completions), "records": len(records)}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"reward batch: lists differ in length: {sizes}")
    return sizes["completions"]


class SafeReward:
    """Wrap a reward so that a sample whose scoring fails gets ``fallback`` and the run goes on.

    r_i = fn(...)_i if scoring sample i returned a finite number, else ``fallback``.

    The batch is scored in one call; if that call raises (or returns the wrong number of
    values), each sample is rescored alone so only the failing ones fall back. A raised
    exception, a non-number or a NaN/inf all count as failures. The first failure of this
    reward is logged with ``logging.warning`` including the exception; later ones are only
    counted: ``failures`` (total), ``last_failures`` (last batch), and ``metrics()`` ->
    ``{"reward/<name>/failures": total, "reward/<name>/failure_rate": last batch fraction}``.
    """

    def __init__(self, fn: RewardFn, fallback: float = 0.0, name: str | None = None):
        if not math.isfinite(fallback):
            raise ValueError(f"fallback: must be a finite float, got {fallback}")
        self.fn = fn
        self.fallback = float(fallback)
        self.name = name or reward_name(fn)
        self.failures = 0
        self.last_failures = 0
        self._last_batch = 0
        self._logged = False

    def _note_failure(self, what: str, error: BaseException | None) -> None:
        self.failures += 1
        self.last_failures += 1
        if not self._logged:
            self._logged = True
            logger.warning(
                "reward %r failed (%s: %r); using fallback %s. Later failures of this reward "
                "are counted in metrics (reward/%s/failures), not logged.",
                self.name,
                what,
                error,
                self.fallback,
                self.name,
                exc_info=error,
            )

    def _value(self, value: Any, what: str) -> float:
        try:
            number = float(value)
        except (TypeError, ValueError) as error:
            self._note_failure(what, error)
            return self.fallback
        if not math.isfinite(number):
            self._note_failure(what, ValueError(f"non-finite reward {number}"))
            return self.fallback
        return number

    def _score_one(self, prompt: str, completion: str, record: dict[str, Any], index: int) -> float:
        try:
            values = list(self.fn([prompt], [completion], [record]))
            if len(values) != 1:
                raise ValueError(f"returned {len(values)} values for 1 sample")
        except Exception as error:  # the point of SafeReward: any scoring error -> fallback
            self._note_failure(f"sample {index}", error)
            return self.fallback
        return self._value(values[0], f"sample {index}")

    def __call__(
        self, prompts: list[str], completions: list[str], records: list[dict[str, Any]]
    ) -> list[float]:
        size = check_batch(prompts, completions, records)
        self.last_failures = 0
        self._last_batch = size
        try:
            values = list(self.fn(prompts, completions, records))
            if len(values) != size:
                raise ValueError(f"returned {len(values)} values for {size} samples")
        except TimeoutError as error:  # rescoring a hung reward per sample would hang B times
            for i in range(size):
                self._note_failure(f"sample {i}", error)
            return [self.fallback] * size
        except Exception:  # rescore per sample to isolate the failing ones
            return [
                self._score_one(p, c, r, i)
                for i, (p, c, r) in enumerate(zip(prompts, completions, records, strict=True))
            ]
        return [self._value(v, f"sample {i}") for i, v in enumerate(values)]

    def metrics(self) -> dict[str, float]:
        rate = self.last_failures / self._last_batch if self._last_batch else 0.0
        return {
            f"reward/{self.name}/failures": float(self.failures),
            f"reward/{self.name}/failure_rate": rate,
            **reward_metrics(self.fn),
        }


Component = tuple[str, RewardFn, float] | tuple[RewardFn, float]


class WeightedReward:
    """Weighted sum of rewards: r_i = sum_k w_k * r_k,i.

    ``components``: ``[(name, fn, weight), ...]`` (or ``(fn, weight)``, named by reward_name).
    After each call, ``last_components[name]`` holds the per-sample values of component k and
    ``metrics()`` returns ``{"reward/<name>": mean_i r_k,i, ...}`` plus the components' own
    metrics — watch these separately: a total that rises while one component is gamed is the
    reward-hacking signature of ../shared/reference/003_e8bd019fa090e190.txt.
    """

    def __init__(self, components: Sequence[Component], name: str = "weighted"):
        if not components:
            raise ValueError("components: at least one (name, fn, weight) is needed")
        self.name = name
        self.components: list[tuple[str, RewardFn, float]] = []
        for index, component in enumerate(components):
            if len(component) == 3:
                comp_name, fn, weight = component  # type: ignore[misc]
            elif len(component) == 2:
                fn, weight = component  # type: ignore[misc]
                comp_name = reward_name(fn)
            else:
                raise ValueError(
                    f"components[{index}]: expected (name, fn, weight) or (fn, weight)"
                )
            if not callable(fn):
                raise ValueError(f"components[{index}] ({comp_name!r}): fn is not callable")
            if not math.isfinite(float(weight)):
                raise ValueError(f"components[{index}] ({comp_name!r}): weight must be finite")
            if any(comp_name == existing for existing, _, _ in self.components):
                raise ValueError(f"components[{index}]: duplicate component name {comp_name!r}")
            self.components.append((comp_name, fn, float(weight)))
        self.last_components: dict[str, list[float]] = {}

    def __call__(
        self, prompts: list[str], completions: list[str], records: list[dict[str, Any]]
    ) -> list[float]:
        size = check_batch(prompts, completions, records)
        totals = [0.0] * size
        self.last_components = {}
        for comp_name, fn, weight in self.components:
            values = [float(v) for v in fn(prompts, completions, records)]
            if len(values) != size:
                raise ValueError(
                    f"component {comp_name!r}: returned {len(values)} values for {size} samples"
                )
            self.last_components[comp_name] = values
            totals = [total + weight * value for total, value in zip(totals, values, strict=True)]
        return totals

    def metrics(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for comp_name, fn, _ in self.components:
            values = self.last_components.get(comp_name)
            if values:
                out[f"reward/{comp_name}"] = sum(values) / len(values)
            out.update(reward_metrics(fn))
        return out


class PerSampleReward:
    """Lift a per-sample ``score(completion, record) -> float`` to the batch RewardFn interface:
    r_i = score(completions[i], records[i])."""

    def __init__(self, score: Callable[[str, dict[str, Any]], float], name: str | None = None):
        self.score = score
        self.name = name or getattr(score, "__name__", None) or "reward"

    def __call__(
        self, prompts: list[str], completions: list[str], records: list[dict[str, Any]]
    ) -> list[float]:
        check_batch(prompts, completions, records)
        return [float(self.score(c, r)) for c, r in zip(completions, records, strict=True)]


class ShuffledReward:
    """A negative control: the wrapped rewards, randomly permuted across the batch.

    r'_i = r_{π(i)} with π a permutation drawn from a hash of the batch's completions (so a
    resumed run draws the same π for the same batch). The reward's distribution is unchanged but
    its link to each sample is cut: a policy trained on it must not improve on the gold metric,
    so a gain in the real run is shown to come from the reward signal.
    """

    def __init__(self, fn: RewardFn, name: str | None = None):
        self.fn = fn
        self.name = name or f"shuffled({reward_name(fn)})"

    def __call__(
        self, prompts: list[str], completions: list[str], records: list[dict[str, Any]]
    ) -> list[float]:
        import hashlib
        import random

        values = list(self.fn(prompts, completions, records))
        digest = hashlib.sha256("\x00".join(completions).encode("utf-8")).digest()
        random.Random(int.from_bytes(digest[:8], "little")).shuffle(values)
        return values

    def metrics(self) -> dict[str, float]:
        return reward_metrics(self.fn)
