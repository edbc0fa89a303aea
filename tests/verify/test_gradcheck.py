"""`psirl gradcheck`: the full table reproduces the references' claims; JSON and printing work."""

import json

import pytest
from rich.console import Console

from psirl.verify import gradcheck


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    path = tmp_path_factory.mktemp("gc") / "gradcheck.json"
    out = gradcheck.run_gradcheck(seed=0, n_batches=1024, json_path=str(path))
    out["_json_path"] = path
    return out


def test_every_expectation_holds(result):
    assert result["ok"], [r for r in result["rows"] if not r["ok"]]
    assert len(result["rows"]) == len(gradcheck.KL_SETTINGS) * 10
    cells = {(c["estimator"], c["placement"]): c["verdict"] for c in result["kl_table"]}
    assert cells == {
        ("k1", "reward"): "unbiased",
        ("k3", "reward"): "biased",
        ("k1", "loss"): "zero in expectation",
        ("k3", "loss"): "biased",
        **gradcheck.KL_VARIANT_CELLS,
    }
    # The straight-through variants and TRL's ratio-corrected k3 in the loss have the expected
    # gradient of the per-state reverse KL (k2's), and k3 in the loss the forward KL's.
    consistent = {(c["estimator"], c["placement"]): c["consistent_with"] for c in result["kl_table"]}
    for est in ("k1+", "k3+", "low_var_kl+", "k3_ratio"):
        assert "per-state reverse KL" in consistent[(est, "loss")], est
    assert "per-state forward KL(ref||pi)" in consistent[("k3", "loss")]
    assert result["variance_order"]["ok"]
    assert [(e["estimator"], e["verdict"]) for e in result["estimator_table"]] == [
        (name, want) for name, want, _ in gradcheck.ESTIMATOR_CASES
    ]
    assert [(e["clip"], e["verdict"]) for e in result["loss_table"]] == [
        (rule, want) for rule, _, want, _ in gradcheck.LOSS_CASES
    ]
    assert [a["verdict"] for a in result["aggregation_table"]] == [
        a[3] for a in gradcheck.AGGREGATION_CASES
    ]


def test_json_round_trip(result):
    data = json.loads(result["_json_path"].read_text())
    assert data["ok"] is True
    assert {r["preset"] for r in data["rows"]} >= {"reinforce", "rloo", "grpo", "ppo"}
    row = data["rows"][0]
    for key in ("cosine", "relative_bias", "var_per_sample", "p_value", "verdict", "expected"):
        assert key in row


def test_tables_render(result):
    console = Console(record=True, width=160)
    console.print(gradcheck.format_table(result))
    console.print(gradcheck.format_kl_table(result))
    console.print(gradcheck.format_aggregation_table(result))
    console.print(gradcheck.format_variance_order(result))
    text = console.export_text()
    assert "zero in expectation" in text
    assert "dr_grpo" in text
    assert "holds" in text


def test_main_exit_code(monkeypatch, capsys):
    monkeypatch.setattr(gradcheck, "DEFAULT_N_BATCHES", 1024)
    assert gradcheck.main(None, 3) == 0
    assert "all expectations hold" in capsys.readouterr().out


def test_expected_verdicts_follow_the_references():
    none, k1r, _, k3r, k1l, k2l, k3l = gradcheck.KL_SETTINGS
    assert gradcheck.expected_verdict("leave_one_out", none)[0] == "unbiased"
    assert gradcheck.expected_verdict("leave_one_out", k1r)[0] == "unbiased"
    assert gradcheck.expected_verdict("group_mean_std", none)[0] == "biased"
    for kl in (k3r, k1l, k2l, k3l):
        assert gradcheck.expected_verdict("none", kl)[0] == "biased"
