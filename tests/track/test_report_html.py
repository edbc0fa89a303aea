"""report.html and the comparison report: self-contained, right sections, exact table values."""

from __future__ import annotations

import base64
import re

from psirl.track.metrics import MetricsLogger
from psirl.track.report import (
    best_direction,
    config_differences,
    group_metrics,
    numeric_series,
    run_labels,
    write_compare_report,
    write_report,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _fake_run(run_dir, lr, reward_scale=1.0, steps=6):
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(f"loop: online\noptim:\n  lr: {lr}\n  batch_size: 8\n")
    with MetricsLogger(run_dir) as logger:
        for s in range(1, steps + 1):
            m = {
                "reward/mean": reward_scale * s / steps,
                "kl/mean": 0.01 * s,
                "loss": 1.0 / s,
                "time/step_s": 0.5,
                "phase": "train",
            }
            if s % 3 == 0:
                m["eval/accuracy"] = s / 10
            logger.log(s, m)
    return run_dir


def _assert_self_contained(text):
    assert "http://" not in text and "https://" not in text
    assert "<script" not in text and "<link" not in text
    images = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)
    assert images
    for b64 in images:
        assert base64.b64decode(b64).startswith(PNG_SIGNATURE)
    return images


def test_helpers():
    assert group_metrics(
        ["loss", "time/step_s", "reward/std", "eval/accuracy", "reward/mean", "zeta/x"]
    ) == [
        ("eval", ["eval/accuracy"]),
        ("reward", ["reward/mean", "reward/std"]),
        ("time", ["time/step_s"]),
        ("zeta", ["zeta/x"]),
        ("other", ["loss"]),
    ]
    assert [
        best_direction(n) for n in ("loss/policy", "eval/accuracy", "reward/mean", "kl/mean")
    ] == [None, "max", "max", None]  # no "best" loss: a loss is not a quality measure
    records = [{"step": 1, "time": 9.0, "a": 1, "b": "x", "c": True}, {"step": 2, "a": 2.5}]
    assert numeric_series(records) == {"a": ([1, 2], [1.0, 2.5])}


def test_report_is_self_contained_with_sections_and_values(tmp_path):
    run = _fake_run(tmp_path / "my-run", lr=0.001)
    out = write_report(run)
    assert out == run / "report.html"
    text = out.read_text()
    images = _assert_self_contained(text)
    # The main gold-vs-reward chart, then the folded charts: eval, reward, kl, other
    # (time/step_s is constant: listed, not drawn).
    assert len(images) == 5
    assert "<h1>my-run</h1>" in text
    assert ("<details><summary>Config</summary><pre>loop: online\noptim:\n  lr: 0.001\n"
            "  batch_size: 8\n</pre></details>") in text
    heads = re.findall(r"<h2>([^<]+)</h2>", text)
    assert heads == ["Gold metric vs training reward", "Diagnostics", "Key metrics"]
    assert text.index('class="verdict') < text.index("<h2>")  # the verdict comes first
    assert "<details><summary>All metrics (4 charts)</summary>" in text
    assert "constant over the run (not drawn): time/step_s" in text
    assert re.findall(r"<h3>([^<]+)</h3>", text) == ["eval (held-out)", "reward", "kl", "other"]
    # Key metrics: final, min, max, best (step) - best only for gold metrics and the reward.
    assert (
        "<tr><td>eval/accuracy</td><td>0.6</td><td>0.3</td><td>0.6</td><td>0.6 (step 6)</td></tr>"
        in text
    )
    assert "<tr><td>kl/mean</td><td>0.06</td><td>0.01</td><td>0.06</td><td>—</td></tr>" in text
    assert "<tr><td>loss</td>" not in text  # losses are charted (folded), not rated
    assert "best evaluation by eval/accuracy: step 6 (0.6)" in text
    assert "phase" not in text  # non-numeric metric skipped


def test_report_tolerates_torn_line_and_custom_out(tmp_path):
    run = _fake_run(tmp_path / "r", lr=0.1, steps=2)
    with open(run / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 3, "reward/me')
    out = write_report(run, tmp_path / "elsewhere" / "rep.html")
    assert out.is_file() and "<tr><td>reward/mean</td><td>1</td>" in out.read_text()


def test_report_of_empty_run(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("")
    text = write_report(tmp_path).read_text()
    assert "no numeric metrics recorded yet" in text and "no config.yaml" in text


def test_compare_report(tmp_path):
    a = _fake_run(tmp_path / "grpo", lr=0.001)
    b = _fake_run(tmp_path / "dr_grpo", lr=0.002, reward_scale=0.5)
    write_report(a)
    out = write_compare_report([a, b], tmp_path / "cmp" / "compare.html")
    text = out.read_text()
    assert len(_assert_self_contained(text)) == 1
    assert "<th>run</th><th>reward/mean</th><th>eval/accuracy</th><th>kl/mean</th>" in text
    assert "<tr><td>grpo</td><td>1</td><td>0.6</td><td>0.06</td></tr>" in text
    assert "<tr><td>dr_grpo</td><td>0.5</td><td>0.6</td><td>0.06</td></tr>" in text
    assert "not recorded by any run: entropy/mean, response/length_mean" in text
    assert "<tr><td>optim.lr</td><td>0.001</td><td>0.002</td></tr>" in text
    assert '<a href="../grpo/report.html">grpo</a>' in text
    assert config_differences([a, b]) == [["optim.lr", "0.001", "0.002"]]


def test_run_labels_disambiguate_repeated_names(tmp_path):
    assert run_labels([tmp_path / "x" / "run", tmp_path / "y" / "run", tmp_path / "z"]) == [
        "x/run",
        "y/run",
        "z",
    ]
