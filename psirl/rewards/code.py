"""Reward for generated code: the fraction of a record's unit tests that pass in the sandbox.

    r_i = (number of tests of record i that pass) / (number of tests of record i)

The program is the completion's last fenced code block (or the whole completion), run by
psirl/rewards/sandbox.py; see there for the isolation and the anti-reward-hacking design
(../shared/reference/003_e8bd019fa090e190.txt: code tests are a verifiable reward, but a
policy will exploit a test runner that trusts the program's own exit status or output).
"""

from __future__ import annotations

import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from psirl.rewards.base import check_batch
from psirl.rewards.sandbox import SandboxLimits, SandboxResult, run_in_sandbox

_FENCE = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL | re.IGNORECASE)


def extract_code(completion: str) -> str:
    """The last fenced code block (```python ... ```, closing fence optional) or the whole text."""
    blocks = _FENCE.findall(completion)
    return blocks[-1] if blocks else completion


class CodeTestsReward:
    """RewardFn: fraction of ``record[tests_key]`` (Python test sources) passed by the completion.

    Each test is a source string such as ``"assert add(2, 3) == 5"`` run in the program's
    namespace; it passes iff it raises nothing. ``max_workers`` samples run in parallel (one
    sandboxed process each). ``last_results`` keeps the SandboxResults of the last batch and
    ``metrics()`` reports the timeouts of the last batch.

    What the sandbox cannot judge is the tests' own strength: ``assert f(x) == 3`` also passes
    for an object whose ``__eq__`` always returns True. Write tests that pin the type too
    (``assert type(f(x)) is int and f(x) == 3``) when rewarding a policy that may learn this.
    """

    def __init__(
        self,
        *,
        tests_key: str = "tests",
        limits: SandboxLimits | None = None,
        max_workers: int | None = None,
        scratch_root: str | Path | None = None,
        name: str = "code_tests",
    ):
        self.tests_key = tests_key
        self.limits = limits or SandboxLimits()
        self.max_workers = max_workers or min(4, os.cpu_count() or 1)
        self.scratch_root = scratch_root
        self.name = name
        self.last_results: list[SandboxResult] = []

    def _tests(self, record: dict[str, Any], index: int) -> list[str]:
        if self.tests_key not in record:
            raise ValueError(f"records[{index}]: field '{self.tests_key}': missing")
        tests = record[self.tests_key]
        if isinstance(tests, str):
            tests = [tests]
        if not isinstance(tests, list | tuple) or not tests:
            raise ValueError(
                f"records[{index}]: field '{self.tests_key}': expected a non-empty list of "
                f"Python test sources, got {type(tests).__name__}"
            )
        if not all(isinstance(test, str) for test in tests):
            raise ValueError(f"records[{index}]: field '{self.tests_key}': tests must be strings")
        return list(tests)

    def __call__(
        self, prompts: list[str], completions: list[str], records: list[dict[str, Any]]
    ) -> list[float]:
        check_batch(prompts, completions, records)
        jobs = [
            (extract_code(completion), self._tests(record, index))
            for index, (completion, record) in enumerate(zip(completions, records, strict=True))
        ]
        with ThreadPoolExecutor(max_workers=self.max_workers) as pool:
            results = list(
                pool.map(
                    lambda job: run_in_sandbox(
                        job[0], job[1], self.limits, scratch_root=self.scratch_root
                    ),
                    jobs,
                )
            )
        self.last_results = results
        return [result.fraction_passed for result in results]

    def metrics(self) -> dict[str, float]:
        timeouts = sum(result.timed_out for result in self.last_results)
        return {f"reward/{self.name}/timeouts": float(timeouts)}
