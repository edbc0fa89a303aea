"""metrics.jsonl: exact records, resume truncation, torn lines, SIGKILL durability, sinks."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
import types

import numpy as np
import pytest
import torch

from psirl.track.metrics import (
    MetricsLogger,
    comparable_metrics,
    metrics_differences,
    read_metrics,
    truncate_metrics,
)


def _log_steps(run_dir, steps, **kwargs):
    with MetricsLogger(run_dir, **kwargs) as logger:
        for s in steps:
            logger.log(
                s,
                {
                    "loss": 1.0 / s,
                    "reward/mean": s * 0.25,
                    "time/step_s": time.perf_counter(),
                    "perf/tokens_per_s": time.perf_counter(),
                },
            )


def test_records_are_exact_and_scalars_are_converted(tmp_path):
    with MetricsLogger(tmp_path) as logger:
        logger.log(1, {"loss": 0.5, "n": 3, "ok": True, "phase": "rollout", "none": None})
        logger.log(2, {"t": torch.tensor(1.5), "a": np.float32(0.25), "i": np.int64(7)})
    recs = read_metrics(tmp_path)
    assert comparable_metrics(recs) == [
        {"step": 1, "loss": 0.5, "n": 3, "ok": True, "phase": "rollout", "none": None},
        {"step": 2, "t": 1.5, "a": 0.25, "i": 7},
    ]
    assert all(isinstance(r["time"], float) for r in recs)
    raw = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(raw) == 2 and json.loads(raw[1])["i"] == 7


def test_bad_inputs_name_the_problem(tmp_path):
    with MetricsLogger(tmp_path) as logger:
        with pytest.raises(TypeError, match="'vec'"):
            logger.log(1, {"vec": torch.zeros(3)})
        with pytest.raises(ValueError, match="reserved"):
            logger.log(1, {"time": 1.0})
        logger.log(5, {"x": 1.0})
        logger.log(5, {"eval/accuracy": 0.5})  # same step again is allowed
        with pytest.raises(ValueError, match="smaller than the last logged step 5"):
            logger.log(4, {"x": 1.0})
        with pytest.raises(ValueError, match="int >= 0"):
            logger.log(-1, {})
    with pytest.raises(ValueError, match=r"unknown sink\(s\) \['csv'\]"):
        MetricsLogger(tmp_path, sinks=("jsonl", "csv"))


def test_resume_truncates_and_matches_uninterrupted_run(tmp_path):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    _log_steps(full, range(1, 9))
    # The resumed run got to step 6, was killed, and its last checkpoint is step 4.
    _log_steps(resumed, range(1, 7))
    _log_steps(resumed, range(5, 9), resume_from_step=4)
    assert [r["step"] for r in read_metrics(resumed)] == list(range(1, 9))
    assert metrics_differences(full, resumed) == []
    # ... and a real difference is reported with its step and key.
    with MetricsLogger(resumed, resume_from_step=7) as logger:
        logger.log(8, {"loss": 0.0, "reward/mean": 2.0})
    assert metrics_differences(full, resumed) == ["record 7 (step 8): 'loss': 0.125 != 0.0"]


def test_truncate_returns_dropped_count(tmp_path):
    _log_steps(tmp_path, range(1, 6))
    assert truncate_metrics(tmp_path, 2) == 3
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]
    assert truncate_metrics(tmp_path / "missing", 0) == 0


def test_torn_last_line_is_tolerated_and_repaired(tmp_path):
    _log_steps(tmp_path, range(1, 4))
    path = tmp_path / "metrics.jsonl"
    with open(path, "a") as fh:
        fh.write('{"step": 4, "time": 1.0, "lo')  # a kill mid-write
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]
    # A fresh logger cuts the fragment before appending, so the file stays valid.
    _log_steps(tmp_path, [4])
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4]
    assert path.read_text().endswith("}\n")
    # A complete final record that only lacks its newline is kept.
    path.write_text(path.read_text().rstrip("\n"))
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4]
    _log_steps(tmp_path, [5])
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4, 5]


def test_malformed_middle_line_names_file_and_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not a metrics record"):
        read_metrics(tmp_path)
    with pytest.raises(FileNotFoundError, match="no metrics file"):
        read_metrics(tmp_path / "nowhere")


def test_nan_round_trips_and_compares_equal(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        with MetricsLogger(d) as logger:
            logger.log(1, {"loss": float("nan"), "kl/mean": 1e-3})
    assert math.isnan(read_metrics(a)[0]["loss"])
    assert metrics_differences(a, b) == []
    rec = [{"step": 1, "x": 1.0}]
    assert metrics_differences(rec, [{"step": 1, "x": 1.0 + 1e-12}], rel_tol=1e-9) == []
    assert metrics_differences(rec, [{"step": 1, "x": 1.0 + 1e-12}]) != []


_WRITER = """
import sys
from psirl.track.metrics import MetricsLogger
logger = MetricsLogger(sys.argv[1])
step = 0
while True:
    step += 1
    logger.log(step, {"loss": 1.0 / step, "pad": "x" * 2000})
    print(step, flush=True)
"""


def test_sigkill_loses_at_most_the_current_line(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        for line in proc.stdout:
            if int(line) >= 20:
                break
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    steps = [r["step"] for r in read_metrics(tmp_path)]
    assert steps[:20] == list(range(1, 21))
    assert steps == list(range(1, len(steps) + 1))


def test_missing_optional_sinks_say_install_track(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    monkeypatch.setitem(sys.modules, "mlflow", None)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    for sink in ("wandb", "mlflow", "tensorboard"):
        with pytest.raises(ImportError, match=r"psirl\[track\]"):
            MetricsLogger(tmp_path, sinks=("jsonl", sink))


def test_wandb_sink_gets_numbers_and_keeps_its_run_id(tmp_path, monkeypatch):
    calls = []

    class FakeRun:
        def log(self, metrics, step):
            calls.append(("log", step, metrics))

        def finish(self):
            calls.append(("finish",))

    def init(**kwargs):
        calls.append(("init", kwargs["id"], kwargs["resume"], kwargs["name"]))
        return FakeRun()

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    with MetricsLogger(tmp_path / "run", sinks=("wandb",)) as logger:
        logger.log(1, {"loss": 2, "phase": "a", "flag": True})
    with MetricsLogger(tmp_path / "run", sinks=("wandb",), resume_from_step=1) as logger:
        logger.log(2, {"loss": 1.5})
    run_id = (tmp_path / "run" / "wandb_run_id").read_text()
    assert calls == [
        ("init", run_id, "allow", "run"),
        ("log", 1, {"loss": 2.0}),
        ("finish",),
        ("init", run_id, "allow", "run"),
        ("log", 2, {"loss": 1.5}),
        ("finish",),
    ]
