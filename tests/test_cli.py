"""The `psirl` command: a thin shell over the library (`algorithms`, `report`, `train`)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from typer.testing import CliRunner

from psirl.cli import app
from psirl.track.metrics import MetricsLogger, read_metrics

PRESET_NAMES = {"reinforce", "reinforce_pp", "rloo", "ppo", "grpo", "dr_grpo", "dapo", "gspo",
                "cispo"}


def invoke(*args: str):
    return CliRunner().invoke(app, list(args))


def test_algorithms_json_lists_the_nine_presets():
    result = invoke("algorithms", "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    rows = out["presets"]
    assert {"remax", "gpg", "opo", "grpo_passk"} <= set(out["catalog"]["advantage_estimators"])
    losses = out["catalog"]["preference_losses"]
    assert {"hinge", "robust", "bco_pair", "discopop"} <= set(losses["dpo_loss_types"])
    assert set(losses["loop"]) == {"dpo", "ipo", "kto", "simpo", "orpo"}
    assert [row["method"] for row in rows] == [
        "reinforce", "reinforce_pp", "reinforce_pp_baseline", "rloo", "ppo", "grpo", "dr_grpo",
        "dapo", "gspo", "cispo"]
    assert set(rows[0]) == {"method", "baseline", "advantage_unit", "ratio_clip_unit",
                            "length_handling", "kl", "paper", "knobs"}
    ppo_knobs = {row["method"]: row for row in rows}["ppo"]["knobs"]
    assert ppo_knobs["advantage"]["estimator"] == "gae" and "vf_coef" in ppo_knobs["value"]
    assert all(row["paper"] for row in rows)
    by_name = {row["method"]: row for row in rows}
    assert "GAE" in by_name["ppo"]["advantage_unit"]


def test_algorithms_table_names_every_preset():
    result = invoke("algorithms")
    assert result.exit_code == 0, result.output
    for name in PRESET_NAMES:
        assert name in result.output


def test_report_writes_report_html(tmp_path):
    run = tmp_path / "run"
    with MetricsLogger(run) as logger:
        for step in range(1, 6):
            logger.log(step, {"loss": 1.0 / step, "eval/accuracy": step / 10})
    result = invoke("report", str(run))
    assert result.exit_code == 0, result.output
    report = run / "report.html"
    assert result.output.strip().splitlines()[-1] == str(report)
    text = report.read_text()
    assert text.lstrip().lower().startswith("<!doctype html")
    assert "eval/accuracy" in text and "loss" in text
    assert "data:image/png;base64," in text  # plots are embedded: the file stands alone


def test_report_of_a_folder_without_metrics_fails_cleanly(tmp_path):
    result = invoke("report", str(tmp_path))
    assert result.exit_code == 2
    assert isinstance(result.exception, SystemExit)
    assert "no metrics.jsonl" in result.output


def test_train_with_overrides_then_resume_a_finished_run(tmp_path):
    """`psirl train CONFIG key=value` applies the overrides and keeps them in the run folder;
    `psirl train --resume RUN_DIR` of a finished run has nothing left to do."""
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        "loop: sft\noutput_dir: unused\nmax_steps: 5\ndevice: cpu\n"
        "model: {tiny: {hidden_size: 32, num_layers: 1, num_heads: 4, intermediate_size: 32}}\n"
        "data: {task: addition, task_kwargs: {digits: 1}, n_train: 16}\n"
        "optim: {batch_size: 4}\n"
    )
    run = tmp_path / "run"
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = invoke("train", str(cfg), f"output_dir={run}", "max_steps=3", "--quiet")
        assert result.exit_code == 0, result.output
        assert f"run folder: {run}" in result.output
        assert [r["step"] for r in read_metrics(run)] == [1, 2, 3]
        assert "max_steps: 3" in (run / "config.yaml").read_text()
        assert (run / "report.html").is_file() and (run / "final" / "config.json").is_file()

        metrics = (run / "metrics.jsonl").read_bytes()
        result = invoke("train", "--resume", str(run), "--quiet")
        assert result.exit_code == 0, result.output
        assert (run / "metrics.jsonl").read_bytes() == metrics
    finally:
        torch.set_num_threads(before)


def test_eval_reports_accuracy_of_a_saved_model(tmp_path):
    """`psirl eval` on an untrained tiny model: valid JSON, accuracy 0 (it cannot add yet)."""
    from psirl.models.tiny import make_tiny_model

    model_dir = make_tiny_model(tmp_path / "m", hidden_size=32, num_layers=1, num_heads=2,
                                intermediate_size=64)
    result = invoke("eval", str(model_dir), "--task", "addition", "--n", "8", "--max-new-tokens", "3")
    assert result.exit_code == 0, result.output
    # stdout alone: the runner mixes library warnings (stderr) into result.output.
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out == {"task": "addition", "n": 8, "greedy": True, "accuracy": 0.0}


def test_compare_accepts_key_value_overrides_after_the_config(tmp_path):
    root = Path(__file__).resolve().parents[1]
    result = invoke("compare", str(root / "examples" / "grpo.yaml"), "max_steps=1", "device=cpu",
                    "eval.every=0", "model.tiny.hidden_size=32", "model.tiny.num_layers=1",
                    "model.tiny.intermediate_size=64", "optim.batch_size=2",
                    "--presets", "grpo,rloo", "--output-dir", str(tmp_path / "cmp"))
    assert result.exit_code == 0, result.output
    assert (tmp_path / "cmp" / "grpo" / "final" / "config.json").exists()
    assert (tmp_path / "cmp" / "rloo" / "final" / "config.json").exists()


def test_eval_and_sink_failures_are_one_line_errors(tmp_path):
    result = invoke("eval", str(tmp_path / "no-such-model"))
    assert result.exit_code == 2
    assert "model folder does not exist" in result.output and "Traceback" not in result.output
    root = Path(__file__).resolve().parents[1]
    result = invoke("train", str(root / "examples" / "sft.yaml"), "max_steps=1", "device=cpu",
                    f"output_dir={tmp_path / 'run'}", "track.sinks=[jsonl,mlflow]")
    assert result.exit_code == 2, result.output
    assert "track.sinks: the 'mlflow' metrics sink needs" in result.output
