"""Runs that never ship NaN weights and tell the truth (issue 12, findings 7, 9, 10, 11).

Most tests drive `run_loop` with a toy loop (a 3x2 linear "policy" trained by the shared
`clip_and_step`), so each takes well under a second; the end-to-end ones use the real SFT loop on a
tiny model, and one runs `psirl train` as a real process (lock + SIGTERM).
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import psirl.train.base as base
from psirl.cli import app
from psirl.track.metrics import read_metrics
from psirl.train import run_config
from psirl.train.base import (
    CHECKPOINT_DIR,
    FINAL_DIR,
    LOCK_FILE,
    CheckpointDamaged,
    LoopSpec,
    NonFiniteError,
    RunDirInUse,
    build_optimizer,
    build_scheduler,
    clip_and_step,
    list_checkpoints,
    load_latest_intact_checkpoint,
    read_run_status,
    run_dir_lock,
    run_loop,
    save_checkpoint,
)
from psirl.train.config import config_from_dict, load_config

TINY = {"hidden_size": 32, "num_layers": 1, "num_heads": 4, "intermediate_size": 32}


def toy_config(run_dir: Path, **over):
    raw = {
        "loop": "sft", "output_dir": str(run_dir), "seed": 0, "max_steps": 6, "device": "cpu",
        "model": {"tiny": TINY}, "data": {"task": "addition", "task_kwargs": {"digits": 1}},
        "optim": {"lr": 0.1, "batch_size": 2, "max_nonfinite_steps": 3},
        "checkpoint": {"every": 2, "keep_last": 1},
    }
    for key, value in over.items():
        section, _, leaf = key.partition("__")
        if leaf:
            raw[section] = {**raw[section], leaf: value}
        else:
            raw[key] = value
    return config_from_dict(raw)


class ToyPolicy(torch.nn.Linear):
    def save_pretrained(self, folder, safe_serialization=True):  # noqa: ARG002 - HF signature
        Path(folder).mkdir(parents=True, exist_ok=True)
        save_file(dict(self.state_dict()), str(Path(folder) / "model.safetensors"))


def toy_build(nan_input_steps=(), poison_weights_at=None, seen=None):
    """A loop whose step `s` trains on a NaN input for s in nan_input_steps (NaN loss and
    gradients), and whose weights are set to NaN after step `poison_weights_at` (as AdamW with
    eps=0 does)."""

    def build(config, run_dir):  # noqa: ARG001
        torch.manual_seed(0)
        policy = ToyPolicy(3, 2)
        opt = build_optimizer(policy.parameters(), config.optim)
        sched = build_scheduler(opt, config.optim, config.max_steps)
        params = list(policy.parameters())

        def step(s, generator):
            if seen is not None:
                seen[s] = [p.detach().clone() for p in params]
            x = torch.randn(4, 3, generator=generator)
            if s in nan_input_steps:
                x[0, 0] = float("nan")
            loss = policy(x).pow(2).mean()
            loss.backward()
            grad_norm = clip_and_step(params, opt, sched, config.optim.grad_clip)
            if s == poison_weights_at:
                with torch.no_grad():
                    policy.weight.fill_(float("nan"))
            return {"loss": loss.item(), "grad_norm": grad_norm}

        return LoopSpec(models={"policy": policy}, tokenizer=None, optimizers={"policy": opt},
                        schedulers={"policy": sched}, step=step)

    return build


def all_finite(path: Path) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in load_file(path).values())


# --------------------------------------------------------------------------- finding 7: NaN


def test_a_non_finite_step_is_skipped_counted_and_the_run_goes_on(tmp_path):
    seen = {}
    run = run_loop(toy_config(tmp_path / "run"), toy_build(nan_input_steps={2}, seen=seen),
                   quiet=True)
    records = {r["step"]: r for r in read_metrics(run)}
    assert [records[s]["train/skipped_nonfinite"] for s in range(1, 7)] == [0, 0, 1, 0, 0, 0]
    assert math.isnan(records[3]["grad_norm"])
    # The skipped step left the weights exactly as they were; the next step trained again.
    assert all(torch.equal(a, b) for a, b in zip(seen[2], seen[3], strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(seen[3], seen[4], strict=True))
    assert all_finite(run / FINAL_DIR / "model.safetensors")
    assert read_run_status(run) == {"state": "finished", "step": 6}


def test_n_non_finite_steps_in_a_row_stop_the_run_naming_the_step(tmp_path):
    with pytest.raises(NonFiniteError) as err:
        run_loop(toy_config(tmp_path / "run"), toy_build(nan_input_steps={3, 4, 5}), quiet=True)
    assert str(err.value).startswith("step 6: the loss or gradient norm was NaN/inf in 3 steps "
                                     "in a row (steps 4..6)")
    run = tmp_path / "run"
    assert "last good checkpoint: " + str(run / CHECKPOINT_DIR / "step-00000004") in str(err.value)
    assert not (run / FINAL_DIR).exists()
    assert [p.name for p in list_checkpoints(run)] == ["step-00000004"]
    assert all_finite(list_checkpoints(run)[0] / "policy.safetensors")
    assert [r["train/skipped_nonfinite"] for r in read_metrics(run)] == [0, 0, 0, 1, 1, 1]


def test_two_non_finite_steps_apart_do_not_stop_the_run(tmp_path):
    run = run_loop(toy_config(tmp_path / "run"), toy_build(nan_input_steps={1, 2, 4, 5}),
                   quiet=True)
    assert read_run_status(run)["state"] == "finished"


def test_no_checkpoint_is_written_from_nan_weights_and_retention_keeps_the_good_one(tmp_path):
    """keep_last=1: the NaN weights of step 4 must neither be saved nor push out step 2."""
    with pytest.raises(NonFiniteError) as err:
        run_loop(toy_config(tmp_path / "run"), toy_build(poison_weights_at=2), quiet=True)
    assert str(err.value) == (
        "refusing to write checkpoint step-00000004: module 'policy' has non-finite (NaN/inf) "
        "values in 'weight'; the earlier checkpoints are kept")
    ckpts = list_checkpoints(tmp_path / "run")
    assert [p.name for p in ckpts] == ["step-00000002"]
    assert all_finite(ckpts[0] / "policy.safetensors")
    assert not list((tmp_path / "run" / CHECKPOINT_DIR).glob(".tmp-*"))


def test_sft_with_eps_zero_never_ships_nan(tmp_path):
    """Finding 7 as reported: optim.eps=0 (now refused by the config; forced here past it) makes
    AdamW's first update 0/0 for the embeddings of unused tokens. The run now stops with an
    error, and no checkpoint or final/ holds NaN."""
    cfg = toy_config(tmp_path / "run", max_steps=6, checkpoint__every=1, checkpoint__keep_last=2,
                     optim__lr=1e-3)
    cfg.optim.eps = 0.0  # pydantic does not re-validate on assignment
    with pytest.raises(NonFiniteError, match="module 'policy' has non-finite"):
        run_config(cfg, quiet=True)
    run = tmp_path / "run"
    assert not (run / FINAL_DIR).exists()
    for ckpt in list_checkpoints(run):
        assert all_finite(ckpt / "policy.safetensors"), ckpt


# --------------------------------------------------------------------------- finding 11: integrity


def _toy_spec():
    cfg = toy_config(Path("unused"))
    return toy_build()(cfg, None)


def _three_checkpoints(run: Path):
    spec = _toy_spec()
    for s in (1, 2, 3):
        spec.step(s, torch.Generator().manual_seed(s))
        save_checkpoint(run, s, spec, keep_last=3)
    return spec


def test_every_checkpoint_carries_the_sha256_of_its_files(tmp_path):
    import hashlib

    _three_checkpoints(tmp_path)
    ckpt = list_checkpoints(tmp_path)[-1]
    sums = json.loads((ckpt / "checksums.json").read_text())
    assert sorted(sums) == ["policy.safetensors", "state.json", "trainer_state.pt"]
    for name, digest in sums.items():
        assert hashlib.sha256((ckpt / name).read_bytes()).hexdigest() == digest


def test_a_flipped_byte_falls_back_to_the_newest_intact_checkpoint(tmp_path, caplog):
    _three_checkpoints(tmp_path)
    weights = tmp_path / CHECKPOINT_DIR / "step-00000003" / "policy.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x01  # one bit of a weight: the file still loads, only the checksum sees it
    weights.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="psirl.train"):
        assert load_latest_intact_checkpoint(tmp_path, _toy_spec()) == 2
    assert f"{weights}: sha256 does not match checksums.json (damaged)" in caplog.text
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000001", "step-00000002"]
    assert (tmp_path / CHECKPOINT_DIR / "damaged-step-00000003" / "policy.safetensors").exists()


@pytest.mark.parametrize("name", ["policy.safetensors", "trainer_state.pt", "state.json"])
def test_a_truncated_file_without_checksums_is_named(tmp_path, caplog, name):
    """Checkpoints written before checksums existed: the load itself names the bad file."""
    _three_checkpoints(tmp_path)
    ckpt = tmp_path / CHECKPOINT_DIR / "step-00000003"
    (ckpt / "checksums.json").unlink()
    path = ckpt / name
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    with caplog.at_level(logging.WARNING, logger="psirl.train"):
        assert load_latest_intact_checkpoint(tmp_path, _toy_spec()) == 2
    assert f"{path}: cannot be loaded" in caplog.text


def test_no_intact_checkpoint_is_an_error_naming_each_damaged_file(tmp_path):
    _three_checkpoints(tmp_path)
    for ckpt in list_checkpoints(tmp_path):
        (ckpt / "trainer_state.pt").write_bytes(b"")
    for _ in range(2):  # nothing is moved aside, so a second resume fails the same way
        with pytest.raises(CheckpointDamaged) as err:
            load_latest_intact_checkpoint(tmp_path, _toy_spec())
        for s in (1, 2, 3):
            assert f"step-0000000{s}/trainer_state.pt: sha256 does not match" in str(err.value)


def test_resume_after_damage_replays_to_the_same_weights(tmp_path):
    """A resumed run that fell back two steps ends where an uninterrupted run ends."""
    cfg = toy_config(tmp_path / "ref", checkpoint__every=1, checkpoint__keep_last=3)
    ref = run_loop(cfg, toy_build(), quiet=True)
    cut = toy_config(tmp_path / "cut", max_steps=4, checkpoint__every=1, checkpoint__keep_last=3)
    run = run_loop(cut, toy_build(), quiet=True)
    (run / CHECKPOINT_DIR / "step-00000004" / "state.json").write_text('{"step": 4, "lo')
    run_loop(toy_config(run, checkpoint__every=1, checkpoint__keep_last=3), toy_build(),
             resume=True, quiet=True)
    want, got = load_file(ref / FINAL_DIR / "model.safetensors"), load_file(
        run / FINAL_DIR / "model.safetensors")
    assert all(torch.equal(got[k], v) for k, v in want.items())


# --------------------------------------------------------------------------- finding 10: folders


def test_a_locked_folder_is_refused_at_once(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    with open(run / LOCK_FILE, "a+") as other:  # another process's lock, as flock sees it
        fcntl.flock(other.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        other.write("pid 4242\n")
        other.flush()
        t0 = time.monotonic()
        with pytest.raises(RunDirInUse, match=r"output_dir .*/run is in use by another run "
                                              r"\(pid 4242\)"):
            run_loop(toy_config(run), toy_build(), quiet=True)
        with pytest.raises(RunDirInUse):
            run_loop(toy_config(run), toy_build(), resume=True, quiet=True)
        assert time.monotonic() - t0 < 5
    assert not (run / "config.yaml").exists()  # refused before touching the folder
    run_loop(toy_config(run), toy_build(), quiet=True)  # free again once the holder is gone


def test_the_lock_is_released_after_the_run_and_after_an_error(tmp_path):
    run = tmp_path / "run"
    with pytest.raises(NonFiniteError):
        run_loop(toy_config(run), toy_build(nan_input_steps={0, 1, 2}), quiet=True)
    with run_dir_lock(run):
        pass


def _killed_before_first_checkpoint(run: Path, tiny: dict) -> None:
    """What a run killed before its first checkpoint leaves: its config, init_model, metrics."""
    cfg = load_config(None, ["loop=sft", f"output_dir={run}", "max_steps=4", "device=cpu",
                             f"model.tiny={json.dumps(tiny)}", "data.task=addition",
                             "data.task_kwargs.digits=1", "optim.batch_size=2",
                             "checkpoint.every=0"])

    class Killed(BaseException):
        pass

    def die(*args, **kwargs):
        raise Killed

    real = base.save_checkpoint
    base.save_checkpoint = die
    try:
        with pytest.raises(Killed):
            run_config(cfg, quiet=True)
    finally:
        base.save_checkpoint = real
    assert list_checkpoints(run) == [] and (run / "init_model").is_dir()


def test_a_folder_left_without_a_checkpoint_or_with_another_config_needs_overwrite(tmp_path):
    run = tmp_path / "run"
    _killed_before_first_checkpoint(run, TINY)
    wider = {**TINY, "hidden_size": 64}
    new = load_config(None, ["loop=sft", f"output_dir={run}", "max_steps=2", "device=cpu",
                             f"model.tiny={json.dumps(wider)}", "data.task=addition",
                             "data.task_kwargs.digits=1", "optim.batch_size=2"])
    with pytest.raises(FileExistsError, match=r"holds a run with a different config \(differs "
                                              r"in: checkpoint, max_steps, model\)"):
        run_config(new, quiet=True)
    same = load_config(run / "config.yaml", [f"output_dir={run}"])
    with pytest.raises(FileExistsError, match="left without a completed checkpoint; resume it "
                                              "with `psirl train --resume"):
        run_config(same, quiet=True)

    run_config(new, quiet=True, overwrite=True)
    # The new run trained the model its config describes, not the old folder's initial model.
    weights = load_file(run / FINAL_DIR / "model.safetensors")
    assert weights["model.embed_tokens.weight"].shape[1] == 64
    assert read_run_status(run)["state"] == "finished"
    assert [r["step"] for r in read_metrics(run)] == [1, 2]


def test_overwrite_leaves_a_folder_without_a_run_alone(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    run_loop(toy_config(tmp_path), toy_build(), quiet=True, overwrite=True)
    assert (tmp_path / "notes.txt").read_text() == "mine"


# --------------------------------------------------------------------------- finding 9: SIGTERM


def _sft_yaml(tmp_path: Path, run: Path, max_steps: int) -> Path:
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        f"loop: sft\noutput_dir: {run}\nmax_steps: {max_steps}\ndevice: cpu\nmodel: {{tiny: "
        f"{json.dumps(TINY)}}}\ndata: {{task: addition, task_kwargs: {{digits: 1}}}}\n"
        "optim: {batch_size: 2}\ncheckpoint: {every: 0}\n")
    return cfg


def test_sigterm_exits_143_and_says_how_to_resume(tmp_path, monkeypatch):
    run = tmp_path / "run"
    cfg = _sft_yaml(tmp_path, run, max_steps=4)
    real_generator = base.step_generator

    def step_generator(seed, step, stream=0):
        if step == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_generator(seed, step, stream)

    monkeypatch.setattr(base, "step_generator", step_generator)
    result = CliRunner().invoke(app, ["train", str(cfg), "--quiet"])
    monkeypatch.undo()
    assert result.exit_code == 143, result.output
    assert f"stopped at step 2, resume with: psirl train --resume {run}" in result.output
    assert "report" not in result.output and not (run / "report.html").exists()
    assert [p.name for p in list_checkpoints(run)] == ["step-00000002"]

    result = CliRunner().invoke(app, ["train", "--resume", str(run), "--quiet"])
    assert result.exit_code == 0, result.output
    assert f"report: {run / 'report.html'}" in result.output and (run / "report.html").is_file()


def test_cli_overwrite_and_used_folder_exit_codes(tmp_path):
    run = tmp_path / "run"
    cfg = _sft_yaml(tmp_path, run, max_steps=1)
    assert CliRunner().invoke(app, ["train", str(cfg), "--quiet"]).exit_code == 0
    again = CliRunner().invoke(app, ["train", str(cfg), "--quiet"])
    assert again.exit_code == 2 and "already holds checkpoints" in again.output
    assert CliRunner().invoke(app, ["train", str(cfg), "--quiet", "--overwrite"]).exit_code == 0
    both = CliRunner().invoke(app, ["train", "--resume", str(run), "--overwrite"])
    assert both.exit_code == 2 and "contradict" in both.output


@pytest.mark.slow
def test_a_real_run_holds_its_folder_and_sigterm_exits_143(tmp_path):
    """`psirl train` as a process: a second run and a resume of its folder fail at once while it
    runs; SIGTERM then stops it with exit 143 and the resume line."""
    run = tmp_path / "run"
    cfg = _sft_yaml(tmp_path, run, max_steps=100000)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "psirl.cli", "train", str(cfg), "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (run / "metrics.jsonl").exists() and time.monotonic() < deadline:
            assert proc.poll() is None, proc.stdout.read()
            time.sleep(0.1)
        for args in ([str(cfg)], ["--resume", str(run)]):
            result = CliRunner().invoke(app, ["train", *args, "--quiet"])
            assert result.exit_code == 2, result.output
            assert f"is in use by another run (pid {proc.pid})" in result.output
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, out
    step = read_run_status(run)["step"]
    assert f"stopped at step {step}, resume with: psirl train --resume {run}" in out
    assert "report" not in out
    assert list_checkpoints(run)[-1].name == f"step-{step:08d}"


@pytest.mark.parametrize("fused", [True, False])
def test_clip_and_step_skips_a_non_finite_update_exactly(fused):
    """Weights, Adam moments and step count are untouched, the schedule advances, the skip is
    counted; fused (found_inf flag in the kernel) and per-tensor optimisers alike."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(3, 2)
    params = list(layer.parameters())
    opt = torch.optim.AdamW(params, lr=0.1, fused=fused)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1))
    layer(torch.ones(1, 3)).sum().backward()
    clip_and_step(params, opt, sched, grad_clip=1.0)
    base.take_skipped_updates()
    weights = [p.detach().clone() for p in params]
    moments = [opt.state[p]["exp_avg"].clone() for p in params]
    layer(torch.tensor([[1.0, float("inf"), 0.0]])).sum().backward()
    norm = clip_and_step(params, opt, sched, grad_clip=1.0)
    assert not math.isfinite(norm)
    assert all(torch.equal(p, w) for p, w in zip(params, weights, strict=True))
    assert all(torch.equal(opt.state[p]["exp_avg"], m) for p, m in zip(params, moments, strict=True))
    assert all(float(opt.state[p]["step"]) == 1.0 for p in params)
    assert all(p.grad is None for p in params)
    assert sched.get_last_lr() == pytest.approx([0.1 / 3])
    assert base.take_skipped_updates() == 1 and base.take_skipped_updates() == 0


# --------------------------------------------------------------------------- finding 12: rewards


def test_an_absurd_reward_counts_as_a_failed_sample(caplog):
    """1e30 (finite) would overflow the advantage's std; it becomes reward.fallback, counted in
    reward/<name>/failures and logged once with its value; ordinary rewards pass unchanged."""
    from psirl.train.rewards import build_reward

    cfg = config_from_dict({
        "loop": "online", "output_dir": "x", "model": {"tiny": TINY},
        "data": {"task": "addition"}, "optim": {"batch_size": 2},
        "reward": {"kind": "weighted", "fallback": -1.0, "components": [
            {"weight": 1e30, "reward": {"kind": "format", "pattern": "^big"}},
            {"weight": 1.0, "reward": {"kind": "format", "pattern": "^ok"}},
        ]},
    })
    fn = build_reward(cfg, None)
    with caplog.at_level(logging.WARNING):
        got = fn(["p"] * 4, ["big", "ok", "nan", "big"], [{}] * 4)
    assert got == [-1.0, 1.0, 0.0, -1.0]
    assert "gave 1e+30 for sample 0, beyond +-1e+06" in caplog.text
    failures = {k: v for k, v in fn.metrics().items() if k.endswith("/failures")}
    assert list(failures.values()) == [2]


def test_the_online_loop_with_eps_zero_stops_with_a_nan_error_not_a_crash(tmp_path):
    """Finding 7, online: it wrote a NaN checkpoint and then crashed with an index error (the
    checkpoint refusal is tested above; here no checkpoint is due, so the crash itself must say
    that the weights are NaN)."""
    cfg = config_from_dict({
        "loop": "online", "output_dir": str(tmp_path / "run"), "max_steps": 6, "device": "cpu",
        "model": {"tiny": TINY}, "data": {"task": "addition", "task_kwargs": {"digits": 1}},
        "optim": {"lr": 1e-2, "batch_size": 2}, "checkpoint": {"every": 0},
        "algorithm": {"preset": "grpo", "knobs": {"sampling": {"group_size": 2,
                                                               "max_new_tokens": 3}}},
    })
    cfg.optim.eps = 0.0  # refused by the config; forced past it
    with pytest.raises(NonFiniteError, match=r"with non-finite \(NaN/inf\) weights in module "
                                             r"'policy' \('model\.embed_tokens\.weight'\)"):
        run_config(cfg, quiet=True)
    run = tmp_path / "run"
    assert not (run / FINAL_DIR).exists() and list_checkpoints(run) == []


def test_cli_reports_a_nan_stop_with_exit_1_and_one_line(tmp_path, monkeypatch):
    import psirl.train

    cfg = _sft_yaml(tmp_path, tmp_path / "run", max_steps=1)

    def nan_run(config, **kwargs):  # noqa: ARG001
        raise NonFiniteError("step 4: the loss or gradient norm was NaN/inf in 3 steps in a row")

    monkeypatch.setattr(psirl.train, "run_config", nan_run)
    result = CliRunner().invoke(app, ["train", str(cfg), "--quiet"])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    assert result.output.strip() == (
        "error: step 4: the loss or gradient norm was NaN/inf in 3 steps in a row")


def test_cli_resume_names_the_damaged_file_and_goes_on(tmp_path):
    run = tmp_path / "run"
    cfg = _sft_yaml(tmp_path, run, max_steps=2)
    assert CliRunner().invoke(app, ["train", str(cfg), "--quiet", "checkpoint.every=1"]
                              ).exit_code == 0
    weights = run / CHECKPOINT_DIR / "step-00000002" / "policy.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x10
    weights.write_bytes(bytes(data))
    result = CliRunner().invoke(app, ["train", "--resume", str(run), "--quiet", "max_steps=3"])
    assert result.exit_code == 0, result.output
    assert f"{weights}: sha256 does not match checksums.json (damaged)" in result.output
    # resumed from step 1: step 2 is trained and saved again, the damaged copy kept aside
    assert [p.name for p in list_checkpoints(run)] == ["step-00000002", "step-00000003"]
    assert (run / CHECKPOINT_DIR / "damaged-step-00000002" / "policy.safetensors").is_file()
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3]
