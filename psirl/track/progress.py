"""Console progress for long loops: a rich progress bar plus one compact summary line per step.

    with StepProgress(total_steps=100, description="online") as progress:
        for step in range(100):
            metrics = ...
            progress.advance(summary_line(step + 1, metrics, ("reward/mean", "kl/mean", "loss")))

prints lines such as ``step 12 | reward 0.531 | kl 0.00213 | loss -0.0132`` above the bar.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

# Short labels for the usual metric names; any other name is shown as is.
SUMMARY_LABELS = {
    "reward/mean": "reward",
    "eval/accuracy": "acc",
    "eval/accuracy_greedy": "acc_greedy",
    "eval/env_success": "success",  # multi-turn runs: held-out episodes ended by a right answer
    "eval/env_success_sampled": "success_sampled",
    "kl/mean": "kl",
    "loss/total": "loss",
    "loss/policy": "loss",
    "entropy/mean": "entropy",
    "response/length_mean": "len",
    "perf/tokens_per_s": "tok/s",
    "time/tokens_per_s": "tok/s",
    "time/step_s": "s/step",
}
DEFAULT_SUMMARY_KEYS = (
    "reward/mean",
    "eval/accuracy",
    "kl/mean",
    "loss",
    "loss/total",
    "perf/tokens_per_s",
    "time/tokens_per_s",
)


def format_value(value: Any) -> str:
    """Compact number: 4 significant digits ('0.531', '-0.0132', '1234'), integers >= 1e4 without
    decimals ('12346'); ints, bools, strings and NaN as themselves."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if not math.isfinite(value):
        return str(value)
    if abs(value) >= 1e4:
        return f"{value:.0f}"
    return f"{value:.4g}"


def summary_line(
    step: int,
    metrics: Mapping[str, Any],
    keys: Sequence[str | tuple[str, str]] = DEFAULT_SUMMARY_KEYS,
    *,
    total: int | None = None,
) -> str:
    """One compact line: 'step 12/100 | reward 0.531 | acc 0.4 | kl 0.00213 | loss -0.0132'.

    keys: metric names (labelled via SUMMARY_LABELS, e.g. "reward/mean" -> "reward") or
    (label, name) pairs; names missing from `metrics` are skipped. Returns the string;
    `StepProgress.advance(line)` prints it.
    """
    head = f"step {step}" + (f"/{total}" if total is not None else "")
    parts = [head]
    seen: set[str] = set()
    for key in keys:
        label, name = key if isinstance(key, tuple) else (SUMMARY_LABELS.get(key, key), key)
        if name in metrics and label not in seen:
            parts.append(f"{label} {format_value(metrics[name])}")
            seen.add(label)
    return " | ".join(parts)


class StepProgress:
    """Context manager around a rich progress bar over `total_steps` steps.

    initial: steps already done (a resumed run starts its bar there). disable: no bar, no lines
    (quiet mode). console: a rich Console (default: stdout).
    """

    def __init__(
        self,
        total_steps: int,
        description: str = "train",
        *,
        initial: int = 0,
        disable: bool = False,
        console: Console | None = None,
    ):
        self.total_steps = int(total_steps)
        self.description = description
        self.initial = int(initial)
        self.disable = disable
        self.console = console or Console(highlight=False)
        self._progress: Progress | None = None
        self._task = None

    def __enter__(self) -> StepProgress:
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=self.console,
            disable=self.disable,
        )
        self._progress.start()
        self._task = self._progress.add_task(
            self.description, total=self.total_steps, completed=self.initial
        )
        return self

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def print(self, line: str) -> None:
        """Print `line` above the bar (nothing when disabled)."""
        if not self.disable:
            self.console.print(line, markup=False, highlight=False, soft_wrap=True)

    def advance(self, line: str | None = None, steps: int = 1) -> None:
        """Print the step's summary line (if given) and move the bar `steps` forward."""
        if line:
            self.print(line)
        if self._progress is not None:
            self._progress.advance(self._task, steps)

    def summary_line(
        self,
        step: int,
        metrics: Mapping[str, Any],
        keys: Sequence[str | tuple[str, str]] = DEFAULT_SUMMARY_KEYS,
    ) -> str:
        """Print `summary_line(step, metrics, keys, total=total_steps)` and return it (the bar is
        not moved; call `advance()` for that)."""
        line = summary_line(step, metrics, keys, total=self.total_steps)
        self.print(line)
        return line
