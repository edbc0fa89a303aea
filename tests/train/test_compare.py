"""`psirl compare`: presets over one config, same seed, one overlaid report."""

from __future__ import annotations

import yaml

from psirl.models.tiny import make_tiny_model
from psirl.track.metrics import read_metrics
from psirl.train.compare import compare_runs


def test_compare_presets_writes_one_report(tmp_path):
    tiny = make_tiny_model(tmp_path / "tiny", hidden_size=32, num_layers=1, num_heads=2,
                           intermediate_size=64, alphabet="0123456789+=\n")
    cfg = {
        "loop": "online", "output_dir": "unused", "max_steps": 2, "device": "cpu",
        "model": {"path": str(tiny)},
        "data": {"task": "addition", "task_kwargs": {"digits": 1}, "n_train": 50},
        "reward": {"kind": "format", "pattern": "^1"},
        "algorithm": {"preset": "grpo", "knobs": {"sampling": {"group_size": 4, "max_new_tokens": 2}}},
        "optim": {"lr": 1e-3, "batch_size": 2},
        "checkpoint": {"every": 0},
    }
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = compare_runs([path], presets=["grpo", "rloo"], output_dir=tmp_path / "cmp", quiet=True)
    html = out.read_text()
    assert out.name == "compare.html"
    assert "grpo" in html and "rloo" in html and "data:image/png;base64," in html
    # Same seed: both runs saw the same prompts at step 1 and logged the same number of steps.
    a, b = read_metrics(tmp_path / "cmp" / "grpo"), read_metrics(tmp_path / "cmp" / "rloo")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2]
