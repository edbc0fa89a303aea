"""Every YAML in examples/ runs with `psirl train` and the max_steps= / output_dir= overrides."""

from __future__ import annotations

from pathlib import Path

import pytest

from psirl.track.metrics import read_metrics
from psirl.train import run_config
from psirl.train.config import load_config

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.yaml"))


def test_there_is_one_example_per_preset():
    from psirl.algorithms import PRESETS

    assert {p.stem for p in EXAMPLES} >= set(PRESETS)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_runs_one_step(path, tmp_path):
    # Shrink only what costs time here; the example's algorithm and task are used as written.
    cfg = load_config(path, [f"output_dir={tmp_path / path.stem}", "max_steps=1", "eval.every=0",
                             "device=cpu", "model.tiny.hidden_size=32", "model.tiny.num_layers=1",
                             "model.tiny.intermediate_size=64", "optim.batch_size=2"])
    run_dir = run_config(cfg, quiet=True)
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == [1]
    assert (run_dir / "final" / "config.json").exists()
