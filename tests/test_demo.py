"""`psirl demo` end to end in its quick mode, run twice into the same folder."""

from __future__ import annotations

import json

from psirl.demo import run_demo


def test_quick_demo_runs_and_can_be_run_again(tmp_path):
    first = run_demo(tmp_path, quick=True, control=False)
    marker = tmp_path / "grpo" / "metrics.jsonl"
    first_lines = marker.read_text().splitlines()
    (tmp_path / "notes.txt").write_text("mine")  # not the demo's: must survive the re-run

    second = run_demo(tmp_path, quick=True, control=False)  # a used output_dir is replaced

    assert (tmp_path / "notes.txt").read_text() == "mine"
    for result in (first, second):
        acc = result["grpo"]
        assert all(0.0 <= acc[k] <= 1.0 for k in ("sampled_before", "greedy_before",
                                                    "sampled_after_last3_mean", "greedy_after"))
    # Same seed, same machine: the re-run repeats the first run's metrics (timings aside).
    strip = [{k: v for k, v in json.loads(line).items() if not k.startswith(("time", "perf"))}
             for line in marker.read_text().splitlines()]
    assert strip == [{k: v for k, v in json.loads(line).items() if not k.startswith(("time", "perf"))}
                     for line in first_lines]
