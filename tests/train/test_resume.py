"""Exact resume (DESIGN.md, "Conventions"): a run killed at any point resumes from its last
checkpoint and then logs the same metrics and ends with the same weights as an uninterrupted run
with the same seed, bitwise on CPU.

The reference run is in-process with one torch thread; the killed / resumed runs are real
`python -m psirl.cli train` processes with OMP_NUM_THREADS=1 (bitwise equality needs the same
thread count), killed with SIGKILL. A kill in the middle of writing a checkpoint or a metrics line
is reproduced deterministically by the artefacts such a kill leaves (a `.tmp-step-*` folder that
was never renamed, a torn last line), or by interrupting `save_checkpoint` in-process.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import psirl.train.base as base
from psirl.track.metrics import metrics_differences, read_metrics
from psirl.train import run_config
from psirl.train.base import CHECKPOINT_DIR, FINAL_DIR, list_checkpoints
from psirl.train.config import load_config
from psirl.train.setup import INIT_MODEL_DIR, policy_path

MAX_STEPS = 60
EVERY = 5

# Warm-up + cosine (scheduler state), grad_accum 2, sampled and greedy evaluation every 10 steps
# (sampling randomness), so all of them are part of the comparison.
CONFIG = f"""\
loop: sft
output_dir: unused
seed: 3
max_steps: {MAX_STEPS}
device: cpu
model:
  tiny: {{hidden_size: 32, num_layers: 2, num_heads: 4, intermediate_size: 64}}
data:
  task: addition
  task_kwargs: {{digits: 1}}
  n_train: 64
optim: {{lr: 3e-3, batch_size: 8, grad_accum: 2, warmup_steps: 3, schedule: cosine}}
checkpoint: {{every: {EVERY}, keep_last: 2}}
eval: {{every: 10, n: 8, max_new_tokens: 3, greedy: true, sampled: true}}
"""

SUBPROCESS_ENV = {
    **os.environ,
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


class Killed(BaseException):
    """Stands for SIGKILL in the in-process tests: nothing in the library catches it."""


@pytest.fixture(scope="module")
def config_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("resume") / "cfg.yaml"
    path.write_text(CONFIG)
    return path


def run_in_process(config_file: Path, run_dir: Path, *, resume: bool = False,
                   overwrite: bool = False) -> Path:
    """Train (or resume) in this process with one torch thread, as the subprocesses do."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = load_config(config_file, [f"output_dir={run_dir}"])
        return run_config(cfg, resume=resume, quiet=True, overwrite=overwrite)
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def reference(config_file, tmp_path_factory):
    """The uninterrupted run."""
    return run_in_process(config_file, tmp_path_factory.mktemp("reference") / "run")


def assert_same_run(reference: Path, run: Path) -> None:
    """Same metrics (wall-clock keys ignored, floats bitwise), same final weights, same
    checkpoints kept, no temp folder left behind."""
    assert metrics_differences(reference, run) == []
    assert [r["step"] for r in read_metrics(run)] == [0, *range(1, MAX_STEPS + 1)]
    want = load_file(reference / FINAL_DIR / "model.safetensors")
    got = load_file(run / FINAL_DIR / "model.safetensors")
    assert sorted(got) == sorted(want)
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), name
    assert [p.name for p in list_checkpoints(run)] == [p.name for p in list_checkpoints(reference)]
    assert not list((run / CHECKPOINT_DIR).glob(".tmp-*"))
    assert (run / "report.html").is_file()


def test_reference_run_is_complete(reference):
    records = read_metrics(reference)
    evals = [r["step"] for r in records if "eval/accuracy" in r]
    assert evals == [0, 10, 20, 30, 40, 50, 60]
    assert [p.name for p in list_checkpoints(reference)] == ["step-00000055", "step-00000060"]
    assert (reference / FINAL_DIR / "config.json").is_file()


# --------------------------------------------------------------------------- SIGKILL, for real


def _psirl(*args: str, log: Path) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "psirl.cli", "train", *args, "--quiet"],
            stdout=out, stderr=subprocess.STDOUT, env=SUBPROCESS_ENV,
        )


def _last_logged_step(run: Path) -> int:
    try:
        records = read_metrics(run)
    except FileNotFoundError:
        return -1
    return records[-1]["step"] if records else -1


@pytest.mark.slow
def test_sigkill_then_resume_matches_an_uninterrupted_run(config_file, reference, tmp_path):
    run = tmp_path / "killed"
    proc = _psirl(str(config_file), f"output_dir={run}", log=tmp_path / "first.log")
    # Kill once a checkpoint exists and steps after it have been logged (so resume must also
    # drop metrics of steps it replays).
    deadline = time.monotonic() + 240
    while proc.poll() is None and time.monotonic() < deadline:
        ckpts = list_checkpoints(run)
        if ckpts and _last_logged_step(run) > int(ckpts[-1].name.split("-")[1]) + 1:
            break
        time.sleep(0.01)
    if proc.poll() is not None:
        pytest.fail(f"the run ended (rc={proc.returncode}) before it could be killed:\n"
                    + (tmp_path / "first.log").read_text())
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    assert not (run / FINAL_DIR).exists()
    last_ckpt = int(list_checkpoints(run)[-1].name.split("-")[1])
    assert last_ckpt % EVERY == 0 and last_ckpt < MAX_STEPS

    # What a kill in the middle of a write leaves: the next checkpoint's temp folder, half
    # written and never renamed, and a metrics line cut short.
    tmp_ckpt = run / CHECKPOINT_DIR / f".tmp-step-{last_ckpt + EVERY:08d}"
    tmp_ckpt.mkdir(exist_ok=True)
    (tmp_ckpt / "policy.safetensors").write_bytes(b"\x00 half a checkpoint")
    with open(run / "metrics.jsonl", "ab") as fh:
        fh.write(b'{"step": 99999, "time": 1.0, "loss": 0.12')

    resumed = _psirl("--resume", str(run), log=tmp_path / "resume.log")
    assert resumed.wait(timeout=300) == 0, (tmp_path / "resume.log").read_text()
    assert f"run folder: {run}" in (tmp_path / "resume.log").read_text()
    assert_same_run(reference, run)


# --------------------------------------------------------------------------- kills, in-process


def _kill_at_checkpoint(monkeypatch, step: int, *, after_temp_written: bool) -> None:
    """Make save_checkpoint die at `step`: after writing the whole temp folder (just before the
    rename), or before writing anything."""
    real_save, real_fsync = base.save_checkpoint, base._fsync_tree

    def fsync_tree(root):
        real_fsync(root)
        if Path(root).name == f".tmp-step-{step:08d}":
            raise Killed

    def save_checkpoint(run_dir, done, spec, keep_last=2):
        if done == step and not after_temp_written:
            raise Killed
        return real_save(run_dir, done, spec, keep_last=keep_last)

    monkeypatch.setattr(base, "_fsync_tree", fsync_tree)
    monkeypatch.setattr(base, "save_checkpoint", save_checkpoint)


def test_kill_while_writing_a_checkpoint_resumes_from_the_previous_one(
    config_file, reference, tmp_path, monkeypatch
):
    run = tmp_path / "run"
    _kill_at_checkpoint(monkeypatch, 15, after_temp_written=True)
    with pytest.raises(Killed):
        run_in_process(config_file, run)
    monkeypatch.undo()
    assert [p.name for p in list_checkpoints(run)] == ["step-00000005", "step-00000010"]
    assert (run / CHECKPOINT_DIR / ".tmp-step-00000015" / "state.json").is_file()
    assert _last_logged_step(run) == 15  # logged before the checkpoint that never landed

    run_in_process(config_file, run, resume=True)
    assert_same_run(reference, run)


@pytest.mark.parametrize("fresh", [False, True], ids=["resume", "start-again"])
def test_kill_before_the_first_checkpoint(config_file, reference, tmp_path, monkeypatch, fresh):
    """No checkpoint yet: `--resume` starts from step 0, and so does starting the same run again
    in that folder with --overwrite (without it the folder is refused: test_run_safety.py)."""
    run = tmp_path / "run"
    _kill_at_checkpoint(monkeypatch, EVERY, after_temp_written=False)
    with pytest.raises(Killed):
        run_in_process(config_file, run)
    monkeypatch.undo()
    assert list_checkpoints(run) == []
    assert _last_logged_step(run) == EVERY

    run_in_process(config_file, run, resume=not fresh, overwrite=fresh)
    assert_same_run(reference, run)


def test_resuming_a_finished_run_changes_nothing(config_file, tmp_path):
    run = run_in_process(config_file, tmp_path / "run")
    before = (run / "metrics.jsonl").read_bytes()
    weights = load_file(run / FINAL_DIR / "model.safetensors")
    run_in_process(config_file, run, resume=True)
    assert (run / "metrics.jsonl").read_bytes() == before
    after = load_file(run / FINAL_DIR / "model.safetensors")
    assert all(torch.equal(after[k], v) for k, v in weights.items())


def test_a_half_written_tiny_model_is_rebuilt(config_file, tmp_path):
    """A kill while the initial tiny model is written leaves only `.tmp-init_model`; the next
    start builds init_model/ again with the same weights (seeded), and no temp folder remains."""
    cfg = load_config(config_file, [f"output_dir={tmp_path / 'run'}"])
    clean = policy_path(cfg, tmp_path / "clean")
    run = tmp_path / "run"
    (run / f".tmp-{INIT_MODEL_DIR}").mkdir(parents=True)
    (run / f".tmp-{INIT_MODEL_DIR}" / "config.json").write_text("{")  # torn
    built = policy_path(cfg, run)
    assert built == run / INIT_MODEL_DIR
    assert not (run / f".tmp-{INIT_MODEL_DIR}").exists()
    want, got = load_file(clean / "model.safetensors"), load_file(built / "model.safetensors")
    assert sorted(got) == sorted(want)
    assert all(torch.equal(got[k], v) for k, v in want.items())


def test_sigterm_checkpoints_at_the_next_step_boundary_and_resumes_exactly(
    config_file, reference, tmp_path, monkeypatch
):
    """A polite kill (SIGTERM) during step 12 loses nothing: the run saves step-00000013 and
    stops without writing final/; resuming it gives the uninterrupted run."""
    real_generator = base.step_generator

    def step_generator(seed, step, stream=0):
        if step == 12:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_generator(seed, step, stream)

    monkeypatch.setattr(base, "step_generator", step_generator)
    handler = signal.getsignal(signal.SIGTERM)
    run = run_in_process(config_file, tmp_path / "run")
    monkeypatch.undo()
    assert [p.name for p in list_checkpoints(run)] == ["step-00000010", "step-00000013"]
    assert _last_logged_step(run) == 13
    assert not (run / FINAL_DIR).exists()
    assert signal.getsignal(signal.SIGTERM) is handler  # the loop's handler is removed again

    run_in_process(config_file, run, resume=True)
    assert_same_run(reference, run)


def test_sigterm_during_the_last_step_still_finishes_the_run(
    config_file, reference, tmp_path, monkeypatch
):
    """The stop lands on the last step boundary: the run is complete, so final/ and the report
    are written as in an uninterrupted run (and the checkpoint of that step is kept)."""
    real_generator = base.step_generator

    def step_generator(seed, step, stream=0):
        if step == MAX_STEPS - 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_generator(seed, step, stream)

    monkeypatch.setattr(base, "step_generator", step_generator)
    run = run_in_process(config_file, tmp_path / "run")
    monkeypatch.undo()
    assert (run / FINAL_DIR / "model.safetensors").exists() and (run / "report.html").exists()
    assert list_checkpoints(run)[-1].name == f"step-{MAX_STEPS:08d}"
    assert_same_run(reference, run)


def test_checkpoint_round_trip_restores_weights_optimiser_rng_and_loop_state(tmp_path):
    """save_checkpoint / load_checkpoint alone: everything the next step depends on comes back,
    and trainer_state.pt holds tensors and plain values only (loads with weights_only=True)."""
    import random

    import numpy as np

    def make_spec(state):
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 2)
        opt = torch.optim.AdamW(model.parameters(), lr=0.1)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1))
        return base.LoopSpec(models={"policy": model}, tokenizer=None, optimizers={"policy": opt},
                             schedulers={"policy": sched}, step=lambda step, g: {},
                             get_state=lambda: dict(state), set_state=state.update)

    def train_step(spec):
        model, opt = spec.models["policy"], spec.optimizers["policy"]
        model(torch.ones(1, 3)).sum().backward()
        opt.step()
        spec.schedulers["policy"].step()
        opt.zero_grad()

    def draws():
        return random.random(), float(np.random.rand()), float(torch.rand(()))

    spec = make_spec({"kl_coef": 0.25})
    for _ in range(3):
        train_step(spec)
    base.seed_everything(7)
    draws()
    ckpt = base.save_checkpoint(tmp_path, 3, spec)
    assert ckpt == tmp_path / CHECKPOINT_DIR / "step-00000003"
    torch.load(ckpt / "trainer_state.pt", weights_only=True)
    want_draws = draws()
    train_step(spec)
    want_weights = [p.detach().clone() for p in spec.models["policy"].parameters()]

    loop_state = {}
    other = make_spec(loop_state)
    base.seed_everything(99)
    assert base.load_checkpoint(ckpt, other) == 3
    assert loop_state == {"kl_coef": 0.25}
    assert draws() == want_draws
    assert other.schedulers["policy"].get_last_lr() == pytest.approx([0.1 / 4])
    train_step(other)
    for got, want in zip(other.models["policy"].parameters(), want_weights, strict=True):
        assert torch.equal(got, want)
