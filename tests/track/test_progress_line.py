"""The per-step summary line and the progress bar wrapper."""

from __future__ import annotations

import io

from rich.console import Console

from psirl.track.progress import StepProgress, format_value, summary_line

METRICS = {
    "reward/mean": 0.53125,
    "eval/accuracy": 0.4,
    "kl/mean": 0.0021349,
    "loss": -0.0132,
    "time/tokens_per_s": 12345.6,
    "phase": "rollout",
}


def test_format_value():
    assert [
        format_value(v) for v in (0.53125, -0.0132, 1234.5, 12345.6, 7, True, float("nan"))
    ] == [
        "0.5312",
        "-0.0132",
        "1234",
        "12346",
        "7",
        "True",
        "nan",
    ]


def test_summary_line_labels_and_skips_missing():
    keys = (
        "reward/mean",
        "eval/accuracy",
        "kl/mean",
        "loss",
        "time/tokens_per_s",
        "absent",
        ("mode", "phase"),
    )
    assert summary_line(12, METRICS, keys, total=100) == (
        "step 12/100 | reward 0.5312 | acc 0.4 | kl 0.002135 | loss -0.0132 | tok/s 12346 | mode rollout"
    )
    assert summary_line(3, {"loss": 1.0}) == "step 3 | loss 1"


def _console():
    return Console(file=io.StringIO(), width=200, force_terminal=False)


def test_step_progress_prints_one_line_per_step():
    console = _console()
    with StepProgress(3, "sft", initial=1, console=console) as progress:
        for step in (2, 3):
            progress.advance(summary_line(step, {"loss": 0.5 / step}, ("loss",)))
        assert progress.summary_line(3, {"loss": 0.25}, ("loss",)) == "step 3/3 | loss 0.25"
    out = console.file.getvalue()
    assert "step 2 | loss 0.25\nstep 3 | loss 0.1667\nstep 3/3 | loss 0.25\n" in out


def test_step_progress_disabled_is_silent():
    console = _console()
    with StepProgress(2, "x", disable=True, console=console) as progress:
        progress.advance("step 1 | loss 1")
    assert console.file.getvalue() == ""
