"""The report's verdict on the runs of issue 14 (metric curves reproducing the recorded start,
peak and end values): the shuffled-reward control and the proxy-vs-gold collapse of iterative
DPO against a learned reward model alarm; 13 honest runs stay quiet."""

from __future__ import annotations

import math
import random
import re

import pytest

from psirl.track.diagnostics import ALARM, OK, WATCH, reward_hacking_report, verdict
from psirl.track.metrics import MetricsLogger
from psirl.track.report import write_report

EVAL_STEPS = list(range(0, 301, 25))  # 13 evaluations, as in the demo (eval.every 25)


def _interp(points, step):
    """Piecewise-linear curve through (step, value) points."""
    for (s0, v0), (s1, v1) in zip(points, points[1:], strict=False):
        if s0 <= step <= s1:
            return v0 + (v1 - v0) * (step - s0) / (s1 - s0)
    return points[-1][1]


def _run(gold_points, reward_points, zero_points=None, seed=0, gold_noise=0.0, noise=0.0,
         gold="eval/accuracy_greedy"):
    rng = random.Random(seed)
    records = []
    for step in range(0, 301):
        rec = {"step": step}
        if step > 0:
            rec["reward/mean"] = _interp(reward_points, step) + rng.gauss(0, noise)
            rec["kl/mean"] = 0.01 * step
            if zero_points is not None:
                rec["sampling/zero_signal_frac"] = min(
                    1.0, max(0.0, _interp(zero_points, step) + rng.gauss(0, noise)))
        if step in EVAL_STEPS:
            rec[gold] = min(1.0, max(0.0, _interp(gold_points, step) + rng.gauss(0, gold_noise)))
        records.append(rec)
    return records


def shuffled_control(seed=0):
    """GRPO on permuted rewards: held-out accuracy 0.76 -> 0.535, zero-signal groups 0.4 -> 0.9
    (the batch reward is a permutation of the real one, so its mean falls with the policy)."""
    return _run([(0, 0.76), (300, 0.535)], [(0, 0.72), (300, 0.52)],
                zero_points=[(0, 0.4), (300, 0.9)], seed=seed, gold_noise=0.02, noise=0.03)


def iterative_dpo_against_reward_model():
    """Gold 0.76 -> 0.365 while the learned proxy rose 2.10 -> 2.76, most of it before the gold
    peak: only ~4% of the proxy's range came after it (why the old alarm stayed quiet)."""
    proxy = [(0, 2.10), (100, 2.735), (300, 2.76)]
    gold = [(0, 0.76), (125, 0.78), (300, 0.365)]
    return _run(gold, proxy, gold="eval/accuracy")


def honest_runs():
    """13 honest runs: gold and reward rise together (various speeds, noise, saturation)."""
    runs = []
    for seed in range(13):
        rng = random.Random(100 + seed)
        start = rng.uniform(0.2, 0.5)
        end = min(0.97, start + rng.uniform(0.1, 0.45))
        bend = rng.choice([50, 100, 150, 250])
        gold = [(0, start), (bend, start + 0.7 * (end - start)), (300, end)]
        reward = [(0, start + 0.05), (bend, start + 0.05 + 0.7 * (end - start)),
                  (300, end + 0.03)]
        # zero-signal groups rise as groups become all-correct (saturation) or stay flat
        zero_end = 0.85 if end + 0.03 >= 0.85 else 0.35
        runs.append(_run(gold, reward, zero_points=[(0, 0.3), (300, zero_end)], seed=seed,
                         gold_noise=0.02, noise=0.03))
    return runs


def _by_check(report):
    return {f["check"]: f for f in report["findings"]}


def test_shuffled_control_alarms_on_gold_and_zero_signal():
    report = reward_hacking_report(shuffled_control())
    checks = _by_check(report)
    assert checks["gold_progress"]["severity"] == ALARM
    assert checks["gold_progress"]["numbers"]["gold_change"] == pytest.approx(-0.225, abs=0.05)
    assert checks["zero_signal"]["severity"] == ALARM
    assert checks["proxy_vs_gold"]["severity"] == OK  # reward and gold fell together
    assert "fell together" in checks["proxy_vs_gold"]["explanation"]
    assert checks["zero_signal"]["numbers"]["zero_signal_end"] == pytest.approx(0.9, abs=0.05)
    found = verdict(report)
    assert found["severity"] == ALARM
    assert found["headline"].startswith("ALARM: Gold metric progress")  # proxy_vs_gold is ok
    assert "made the policy worse" in found["reason"]


def test_proxy_vs_gold_alarms_when_the_proxy_rose_before_the_gold_peak():
    report = reward_hacking_report(iterative_dpo_against_reward_model())
    pg = _by_check(report)["proxy_vs_gold"]
    assert pg["numbers"]["proxy_rise_after_gold_peak"] < 0.1  # the old rule's blind spot
    assert pg["severity"] == ALARM
    assert pg["numbers"]["gold_net_change"] == pytest.approx(0.365 - 0.76)
    assert "fell from 0.76 to 0.365" in pg["explanation"]
    found = verdict(report)  # both alarm; the verdict names the more specific diagnosis
    assert found["severity"] == ALARM and found["headline"] == "ALARM: Proxy vs gold (+1 more alarm)"


@pytest.mark.parametrize("index", range(13))
def test_honest_runs_stay_quiet(index):
    report = reward_hacking_report(honest_runs()[index])
    severities = {f["check"]: f["severity"] for f in report["findings"]}
    assert ALARM not in severities.values(), severities
    assert severities["gold_progress"] == OK
    assert severities["proxy_vs_gold"] in (OK, WATCH)
    found = verdict(report)
    assert found["severity"] in (OK, WATCH)


def _write(run_dir, records, config):
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(config)
    with MetricsLogger(run_dir) as logger:
        for rec in records:
            logger.log(rec["step"], {k: v for k, v in rec.items() if k != "step"})
    return run_dir


def test_report_of_the_control_leads_with_the_alarm_and_the_control_note(tmp_path):
    run = _write(tmp_path / "grpo_shuffled", shuffled_control(),
                 "loop: online\nreward:\n  kind: verifier\n  shuffle: true\n")
    text = write_report(run).read_text()
    body = text.split("<body>")[1]
    first = re.search(r'<div class="verdict sev-(\w+)"><b>([^<]+)</b>', body)
    assert first.group(1) == "alarm" and first.group(2).startswith("ALARM: Gold metric progress")
    assert body.index('class="verdict') < body.index("<h2>")
    assert "shuffled-reward control" in body
    honest = _write(tmp_path / "grpo", honest_runs()[0], "loop: online\n")
    text = write_report(honest).read_text()
    assert '<div class="verdict sev-ok"><b>OK</b>' in text
    assert "shuffled-reward control" not in text


def test_main_chart_is_large_and_smoothed(tmp_path):
    """1000 x 460 px; a noisy 300-step reward is drawn smoothed (window 31) over the raw line."""
    import base64
    import io

    from matplotlib.image import imread

    run = _write(tmp_path / "run", honest_runs()[1], "loop: online\n")
    text = write_report(run).read_text()
    uri = re.search(r'<img src="data:image/png;base64,([^"]+)" alt="gold metric vs training',
                    text).group(1)
    image = imread(io.BytesIO(base64.b64decode(uri)), format="png")
    assert image.shape[:2] == (460, 1000)
    assert math.isfinite(float(image.mean()))


def test_identical_gold_curves_are_drawn_once():
    from psirl.track.report import gold_names

    series = {"eval/accuracy_greedy": ([0, 1], [0.1, 0.2]),
              "eval/pass@1_greedy": ([0, 1], [0.1, 0.2]),
              "eval/pass@4": ([0, 1], [0.3, 0.4]), "reward/mean": ([1], [0.5])}
    assert gold_names(series) == ["eval/accuracy_greedy", "eval/pass@4"]
