"""Reward-hacking diagnostics on synthetic metric curves with known outcomes (reference 003)."""

from __future__ import annotations

import base64
import math
import re

import pytest

from psirl.track.diagnostics import (
    ALARM,
    OK,
    SKIPPED,
    WATCH,
    check_kl_growth,
    check_length_drift,
    check_proxy_vs_gold,
    default_window,
    gold_metric,
    metric_series,
    pearson,
    reward_hacking_report,
    smooth,
)
from psirl.track.metrics import MetricsLogger
from psirl.track.report import write_report

STEPS = range(1, 61)


def _records(curves, steps=STEPS, eval_every=10, eval_curves=None):
    """Records like the online loop's: one per step (train metrics), plus eval metrics every
    `eval_every` steps and at step 0 (where only the eval metrics are logged)."""
    records = []
    eval_curves = eval_curves or {}
    if eval_curves:
        records.append({"step": 0, "time": 0.0, **{k: f(0) for k, f in eval_curves.items()}})
    for s in steps:
        rec = {"step": s, "time": float(s), **{k: f(s) for k, f in curves.items()}}
        if eval_curves and s % eval_every == 0:
            rec.update({k: f(s) for k, f in eval_curves.items()})
        records.append(rec)
    return records


def _healthy():
    """Proxy and gold rise together, KL to 3 nats, entropy to 70%, length +12%."""
    return _records(
        {
            "reward/mean": lambda s: 0.2 + 0.01 * s,
            "task/accuracy": lambda s: 0.15 + 0.01 * s,
            "kl/mean": lambda s: 0.05 * s,
            "entropy/mean": lambda s: 1.0 - 0.005 * s,
            "response/length_mean": lambda s: 10.0 + 0.02 * s,
            "response/truncated_frac": lambda s: 0.0,
        },
        eval_curves={"eval/accuracy": lambda s: 0.1 + 0.01 * s},
    )


def _inverted_u(s):
    return 0.7 - 0.6 * ((s - 30) / 30) ** 2  # 0.1 at steps 0 and 60, 0.7 at step 30


def _over_optimised(noise=0.0):
    """Proxy rises monotonically 0.1 -> 0.9 while gold traces an inverted U peaking at step 30."""
    wiggle = lambda s: noise * math.sin(7.0 * s)  # noqa: E731 (deterministic "noise")
    return _records(
        {
            "reward/mean": lambda s: 0.1 + 0.8 * s / 60 + wiggle(s),
            "task/accuracy": lambda s: _inverted_u(s) + wiggle(s + 1),
            "kl/mean": lambda s: 0.1 * s,
        },
        eval_every=5,
        eval_curves={"eval/accuracy": lambda s: _inverted_u(s) + wiggle(s + 2)},
    )


def _by_check(report):
    return {f["check"]: f for f in report["findings"]}


# --------------------------------------------------------------------------- helpers


def test_series_helpers_exact():
    recs = [
        {"step": 2, "a": 5.0},
        {"step": 1, "a": 1, "b": "x"},
        {"step": 3, "a": float("nan")},
        {"step": 2, "a": 7.0},  # logged twice: last wins
        {"step": 4, "a": True},
    ]
    assert metric_series(recs, "a") == ([1, 2], [1.0, 7.0])
    assert metric_series(recs, "b") == ([], [])
    assert smooth([1.0, 2.0, 3.0, 4.0, 5.0], 3) == [1.5, 2.0, 3.0, 4.0, 4.5]
    assert smooth([1.0, 5.0], 1) == [1.0, 5.0]
    assert [default_window(n) for n in (1, 19, 20, 60, 100)] == [1, 1, 3, 7, 11]
    assert pearson([1.0, 2.0, 3.0], [2.0, 4.0, 6.0]) == pytest.approx(1.0)
    assert pearson([1.0, 2.0, 3.0], [3.0, 1.0, 2.0]) == pytest.approx(-0.5)
    assert pearson([1.0, 2.0], [1.0, 1.0]) is None
    with pytest.raises(ValueError, match="window"):
        smooth([1.0], 0)


# --------------------------------------------------------------------------- whole runs


@pytest.mark.parametrize("window", [1, None])
def test_healthy_run_is_all_ok(window):
    report = reward_hacking_report(_healthy(), window=window)
    assert report["overall"] == OK
    # Every check ran except zero-signal groups (no sampling/zero_signal_frac in these curves).
    assert report["counts"] == {OK: 5, WATCH: 0, ALARM: 0, SKIPPED: 1}
    assert report["steps"] == [0, 60]
    checks = _by_check(report)
    assert all(f["severity"] == OK for f in report["findings"] if f["check"] != "zero_signal")
    assert all("reference 003" in f["explanation"] for f in report["findings"])
    if window == 1:
        pg = checks["proxy_vs_gold"]["numbers"]
        assert pg["gold_metric"] == "eval/accuracy"  # held-out gold preferred
        assert (pg["gold_peak_step"], pg["proxy_peak_step"]) == (60, 60)
        assert pg["gold_start"] == pytest.approx(0.1) and pg["gold_end"] == pytest.approx(0.7)
        assert pg["gold_drop"] == 0.0 and pg["correlation"] == pytest.approx(1.0)
        kl = checks["kl_growth"]["numbers"]
        assert kl["kl_start"] == pytest.approx(0.05) and kl["kl_end"] == pytest.approx(3.0)
        # (3.0 - 0.05) nats / (0.8 - 0.21) proxy = 5 nats per unit of proxy gain.
        assert kl["kl_per_proxy_gain"] == pytest.approx(5.0)
        assert kl["kl_at_gold_peak"] == pytest.approx(3.0)
        ent = checks["entropy_collapse"]["numbers"]
        assert ent["entropy_left"] == pytest.approx(0.7 / 0.995)
        ln = checks["length_drift"]["numbers"]
        assert ln["length_change"] == pytest.approx(1.18 / 10.02)
        assert ln["truncation_rise"] == 0.0


def test_over_optimised_run_alarms_with_peak_steps():
    checks = _by_check(reward_hacking_report(_over_optimised(), window=1))
    pg = checks["proxy_vs_gold"]
    assert pg["severity"] == ALARM
    n = pg["numbers"]
    assert n["gold_metric"] == "eval/accuracy"
    assert (n["gold_peak_step"], n["proxy_peak_step"]) == (30, 60)
    assert n["gold_start"] == pytest.approx(0.1) and n["gold_peak"] == pytest.approx(0.7)
    assert n["gold_drop"] == pytest.approx(0.6) and n["gold_given_back"] == pytest.approx(1.0)
    # Proxy 0.5 at the gold peak, 0.9 at the end, range 0.9 - 0.1133: (0.9 - 0.5) / 0.78667.
    assert n["proxy_rise_after_gold_peak"] == pytest.approx(0.4 / (0.8 - 0.8 / 60))
    assert "peaked at step 30" in pg["explanation"] and "inverted U" in pg["explanation"]
    assert "reference 003" in pg["explanation"]
    # KL 6 nats is below the watch level; the KL at the gold peak is the KL of step 30.
    assert checks["kl_growth"]["severity"] == OK
    assert checks["kl_growth"]["numbers"]["kl_at_gold_peak"] == pytest.approx(3.0)


def test_over_optimised_run_alarms_through_noise_with_default_smoothing():
    pg = _by_check(reward_hacking_report(_over_optimised(noise=0.03)))["proxy_vs_gold"]
    assert pg["severity"] == ALARM
    assert abs(pg["numbers"]["gold_peak_step"] - 30) <= 5  # eval every 5 steps
    assert pg["numbers"]["proxy_peak_step"] >= 55


def test_gold_falling_from_the_start_and_partial_giveback():
    falling = _records(
        {"reward/mean": lambda s: 0.01 * s, "task/accuracy": lambda s: 0.8 - 0.005 * s}
    )
    pg = check_proxy_vs_gold(falling, window=1)
    assert pg["severity"] == ALARM and pg["numbers"]["gold_given_back"] is None
    assert pg["numbers"]["gold_peak_step"] == 1 and "losing all" in pg["explanation"]

    # Gold up to 0.7 at step 40, then down to 0.55 at 60: gave back 0.15 of 0.6 = 25% -> watch.
    def gold(s):
        return 0.1 + 0.015 * s if s <= 40 else 0.7 - 0.0075 * (s - 40)

    partial = _records({"reward/mean": lambda s: 0.01 * s, "task/accuracy": gold})
    pg = check_proxy_vs_gold(partial, window=1)
    assert pg["severity"] == WATCH
    assert pg["numbers"]["gold_given_back"] == pytest.approx(0.25 / (1 - 0.015 / 0.6))
    assert (pg["numbers"]["gold_peak_step"], pg["numbers"]["proxy_peak_step"]) == (40, 60)


def test_proxy_equal_to_gold_verifier_is_ok():
    same = lambda s: min(1.0, 0.02 * s)  # noqa: E731
    pg = check_proxy_vs_gold(_records({"reward/mean": same, "task/accuracy": same}))
    assert pg["severity"] == OK and pg["numbers"]["proxy_is_gold"] is True
    assert "equals the gold verifier" in pg["explanation"]


def test_entropy_collapse():
    collapsing = _records({"entropy/mean": lambda s: 2.0 - 1.9 * (s - 1) / 59})  # 2.0 -> 0.1
    found = _by_check(reward_hacking_report(collapsing, window=1))["entropy_collapse"]
    assert found["severity"] == ALARM
    assert found["numbers"]["entropy_left"] == pytest.approx(0.05)
    assert "5%" in found["explanation"]
    to_20 = _records({"entropy/mean": lambda s: 2.0 - 1.6 * (s - 1) / 59})  # 2.0 -> 0.4
    found = _by_check(reward_hacking_report(to_20, window=1))["entropy_collapse"]
    assert found["severity"] == WATCH and found["numbers"]["entropy_left"] == pytest.approx(0.2)
    deterministic = _records({"entropy/mean": lambda s: 0.0})
    found = _by_check(reward_hacking_report(deterministic))["entropy_collapse"]
    assert found["severity"] == SKIPPED


def test_length_drift():
    doubling = _records(
        {
            "response/length_mean": lambda s: 10.0 + 10.0 * (s - 1) / 59,  # 10 -> 20
            "response/truncated_frac": lambda s: 0.3 * (s - 1) / 59,  # 0 -> 0.3
        }
    )
    found = check_length_drift(doubling, window=1)
    assert found["severity"] == ALARM
    assert found["numbers"]["length_change"] == pytest.approx(1.0)
    assert found["numbers"]["truncation_rise"] == pytest.approx(0.3)
    assert "+100%" in found["explanation"] and "length bias" in found["explanation"]

    milder = _records(
        {
            "response/length_mean": lambda s: 10.0 + 6.0 * (s - 1) / 59,  # +60%
            "response/truncated_frac": lambda s: 0.1 * (s - 1) / 59,  # +0.1
        }
    )
    assert check_length_drift(milder, window=1)["severity"] == WATCH

    # Doubling with no truncation but a rising gold metric: longer answers pay off -> watch.
    paying = _records(
        {
            "response/length_mean": lambda s: 10.0 + 10.0 * (s - 1) / 59,
            "task/accuracy": lambda s: 0.2 + 0.01 * s,
        }
    )
    found = check_length_drift(paying, window=1)
    assert found["severity"] == WATCH and found["numbers"]["gold_change"] == pytest.approx(0.59)

    shrinking = _records({"response/length_mean": lambda s: 20.0 - 0.2 * s})
    found = check_length_drift(shrinking, window=1)
    assert found["severity"] == OK and found["numbers"]["length_change"] < -0.5


def test_kl_levels_drift_and_reset():
    assert check_kl_growth(_records({"kl/mean": lambda s: 0.5 * s}), window=1)["severity"] == ALARM
    high = check_kl_growth(_records({"kl/mean": lambda s: 0.2 * s}), window=1)  # 12 nats
    assert high["severity"] == WATCH and high["numbers"]["kl_end"] == pytest.approx(12.0)
    flat_proxy = _records({"kl/mean": lambda s: 0.05 * s, "reward/mean": lambda s: 0.5})
    drift = check_kl_growth(flat_proxy, window=1)
    assert drift["severity"] == WATCH and drift["numbers"]["kl_per_proxy_gain"] is None
    assert "did not rise" in drift["explanation"]
    # Reference reset after step 40: KL is measured from step 41 (back to 0.1 nats).
    reset = _records({"kl/mean": lambda s: 0.1 * (s if s <= 40 else s - 40)})
    next(r for r in reset if r["step"] == 40)["kl/ref_reset"] = 1.0
    found = check_kl_growth(reset, window=1)
    assert found["numbers"]["measured_from_step"] == 41
    assert found["numbers"]["kl_start"] == pytest.approx(0.1)
    assert found["numbers"]["kl_end"] == pytest.approx(2.0)


def test_missing_metrics_and_few_steps_are_skipped():
    no_gold = _records({"reward/mean": lambda s: 0.01 * s, "kl/mean": lambda s: 0.01 * s})
    assert gold_metric(no_gold) is None
    checks = _by_check(reward_hacking_report(no_gold))
    pg = checks["proxy_vs_gold"]
    assert pg["severity"] == SKIPPED
    assert pg["explanation"].startswith("Skipped: no eval/accuracy / eval/accuracy_greedy")
    assert checks["gold_progress"]["severity"] == SKIPPED
    assert checks["kl_growth"]["severity"] == OK
    assert checks["entropy_collapse"]["severity"] == SKIPPED
    assert "entropy/mean" in checks["entropy_collapse"]["explanation"]

    # Two eval points are not a curve: gold is skipped, the proxy alone is not enough.
    sparse = _records({"reward/mean": lambda s: 0.1 * s}, steps=range(1, 3))
    report = reward_hacking_report(sparse)
    assert report["overall"] == SKIPPED and report["counts"][SKIPPED] == 6

    sft_like = [{"step": s, "loss": 1.0 / s} for s in range(1, 10)]
    assert reward_hacking_report(sft_like)["overall"] == SKIPPED
    assert reward_hacking_report([])["steps"] is None
    with pytest.raises(ValueError, match="window"):
        reward_hacking_report(sft_like, window=0)


# --------------------------------------------------------------------------- report.html


def _write_run(run_dir, records):
    run_dir.mkdir(parents=True)
    with MetricsLogger(run_dir) as logger:
        for rec in records:
            logger.log(rec["step"], {k: v for k, v in rec.items() if k not in ("step", "time")})
    return run_dir


def test_report_has_verdict_diagnostics_and_main_figure(tmp_path):
    run = _write_run(tmp_path / "hacked", _over_optimised())
    text = write_report(run).read_text()
    heads = re.findall(r"<h2>([^<]+)</h2>", text)
    assert heads == ["Gold metric vs training reward", "Diagnostics", "Key metrics"]
    verdict = text.split('<div class="verdict sev-alarm"><b>')[1].split("</div>")[0]
    assert verdict.startswith("ALARM: Proxy vs gold</b>")
    assert "peaked at step 30" in verdict
    section = text.split("<h2>Diagnostics</h2>")[1].split("<h2>Key metrics</h2>")[0]
    assert '<tr><td>Proxy vs gold</td><td class="sev-alarm">alarm</td>' in section
    assert "gold_peak_step = 30; proxy_peak_step = 60" in section
    assert "not enough data for: Zero-signal groups, Entropy collapse" in section
    figure = re.findall(
        r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)" alt="gold metric vs training', text
    )
    assert len(figure) == 1 and base64.b64decode(figure[0]).startswith(b"\x89PNG\r\n\x1a\n")
    assert "best evaluation by eval/accuracy: step 30" in text


def test_report_without_rl_metrics_has_a_note_and_no_main_figure(tmp_path):
    run = _write_run(tmp_path / "sft", [{"step": s, "loss": 1.0 / s} for s in range(1, 6)])
    text = write_report(run).read_text()
    assert '<div class="verdict sev-skipped"><b>No verdict</b>' in text
    assert "no diagnostics" in text and "gold metric vs training" not in text
