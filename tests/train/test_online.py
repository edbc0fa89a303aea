"""The online loop end to end on a tiny model: every preset, learning, dynamic sampling, resume."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from psirl.algorithms import PRESETS
from psirl.models.tiny import make_tiny_model
from psirl.track.metrics import metrics_differences, read_metrics
from psirl.train import run_config
from psirl.train.config import config_from_dict

# A small alphabet keeps the vocabulary at ~16 tokens, so a format reward is not too sparse for a
# model trained from scratch: P(first char == "1") starts near 1/16.
ALPHABET = "0123456789+=\n"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny"), hidden_size=32, num_layers=1,
                           num_heads=2, intermediate_size=64, alphabet=ALPHABET, seed=0)


def online_config(tiny_dir, out, preset, **over):
    cfg = {
        "loop": "online",
        "output_dir": str(out),
        "seed": 0,
        "max_steps": 2,
        "device": "cpu",
        "model": {"path": str(tiny_dir)},
        "data": {"task": "addition", "task_kwargs": {"digits": 1}, "n_train": 200},
        "algorithm": {"preset": preset,
                      "knobs": {"sampling": {"group_size": 4, "max_new_tokens": 3}}},
        "optim": {"lr": 1e-2, "batch_size": 4},
        "eval": {"every": 0},
        "checkpoint": {"every": 1},
    }
    for key, value in over.items():
        cfg[key] = value
    return config_from_dict(cfg)


def _weights(path):
    return load_file(str(next(path.glob("*.safetensors"))))


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_runs_two_steps(tiny_dir, tmp_path, preset):
    """Loss finite, weights change, the loop's metrics are present, for every preset."""
    # A format reward keeps some signal on an untrained model (the task reward would be all 0).
    cfg = online_config(tiny_dir, tmp_path / preset, preset,
                        reward={"kind": "format", "pattern": "^1"})
    run_dir = run_config(cfg, quiet=True)
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == [1, 2]
    last = records[-1]
    for key in ("reward/mean", "response/length_mean", "response/truncated_frac", "grad_norm",
                "perf/tokens_per_s", "time/generate_s", "time/score_s", "time/learn_s",
                "loss/policy", "clip/frac_low", "clip/frac_high", "ratio/mean", "ratio/max",
                "entropy/mean", "task/accuracy", "sampling/zero_signal_frac"):
        assert key in last, key
        assert math.isfinite(last[key]), (key, last[key])
    if preset == "ppo":
        assert math.isfinite(last["loss/value"]) and "value/explained_variance" in last
    before, after = _weights(tiny_dir), _weights(run_dir / "final")
    changed = sum(not torch.equal(before[k], after[k]) for k in before if k in after)
    assert changed > 0


def _reward_curve(tiny_dir, out, preset, steps):
    cfg = online_config(tiny_dir, out, preset, max_steps=steps,
                        reward={"kind": "format", "pattern": "^1"},
                        optim={"lr": 3e-3, "batch_size": 8},
                        checkpoint={"every": 0})
    run_dir = run_config(cfg, quiet=True)
    return [r["reward/mean"] for r in read_metrics(run_dir)]


@pytest.mark.parametrize("preset", ["grpo", "ppo"])
def test_short_run_raises_task_reward(tiny_dir, tmp_path, preset):
    """The reward "completion starts with 1" climbs from ~1/16 within a few dozen steps."""
    curve = _reward_curve(tiny_dir, tmp_path / preset, preset, steps=30)
    start, end = sum(curve[:5]) / 5, sum(curve[-5:]) / 5
    assert end > start + 0.3, curve


def test_dynamic_sampling_all_equal_rewards_no_nan(tiny_dir, tmp_path):
    """Every group has equal rewards (constant reward): DAPO's filter drops them all, resamples up
    to the cap, records the count, and the step is skipped without NaN."""
    cfg = online_config(tiny_dir, tmp_path / "dapo", "dapo",
                        reward={"kind": "format", "pattern": ".*"})  # always 1.0
    run_dir = run_config(cfg, quiet=True)
    for rec in read_metrics(run_dir):
        assert rec["sampling/zero_signal_frac"] == 1.0
        assert rec["sampling/skipped_step"] == 1.0
        assert rec["sampling/resample_rounds"] == PRESETS["dapo"]["knobs"]["sampling"].get(
            "max_resample_rounds", 4)
        assert all(not (isinstance(v, float) and math.isnan(v)) for v in rec.values())
    before, after = _weights(tiny_dir), _weights(run_dir / "final")
    assert all(torch.equal(before[k], after[k]) for k in before if k in after)


def test_grpo_all_equal_rewards_without_filter_gives_zero_advantage(tiny_dir, tmp_path):
    """Without dynamic sampling the same batch trains on zero advantages: finite, no NaN."""
    cfg = online_config(tiny_dir, tmp_path / "grpo0", "dr_grpo",
                        reward={"kind": "format", "pattern": ".*"})
    run_dir = run_config(cfg, quiet=True)
    for rec in read_metrics(run_dir):
        assert rec["sampling/zero_signal_frac"] == 1.0
        assert all(math.isfinite(v) for v in rec.values() if isinstance(v, float))


@pytest.mark.parametrize("preset", ["grpo", "ppo"])
def test_online_resume_matches_uninterrupted(tiny_dir, tmp_path, preset):
    """Stop after step 2 of 4, resume to 4: metrics and weights equal the uninterrupted run's."""
    torch.set_num_threads(1)
    reward = {"kind": "format", "pattern": "^1"}
    full = run_config(online_config(tiny_dir, tmp_path / "full", preset, max_steps=4,
                                    reward=reward), quiet=True)
    part_dir = tmp_path / "part"
    run_config(online_config(tiny_dir, part_dir, preset, max_steps=2, reward=reward), quiet=True)
    from psirl.train.config import load_run_config

    resumed = run_config(load_run_config(part_dir, ["max_steps=4"]), resume=True, quiet=True)
    assert metrics_differences(full, resumed) == []
    a, b = _weights(full / "final"), _weights(resumed / "final")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_reference_reset_and_adaptive_kl(tiny_dir, tmp_path):
    """ref_reset_every=1: the reference is the policy that sampled the next batch, so that
    batch's KL is ~0; the adaptive controller moves β away from its start (Ziegler et al.)."""
    cfg = online_config(tiny_dir, tmp_path / "reset", "ppo", max_steps=3,
                        reward={"kind": "format", "pattern": "^1"},
                        algorithm={"preset": "ppo", "knobs": {
                            "sampling": {"group_size": 4, "max_new_tokens": 3},
                            "kl_control": {"adaptive": True, "target": 0.01, "horizon": 10,
                                           "ref_reset_every": 1}}})
    records = read_metrics(run_config(cfg, quiet=True))
    assert all(r["kl/ref_reset"] == 1.0 for r in records)
    # Step 1 samples from the initial policy = the reference: KL is 0 up to float rounding.
    assert abs(records[0]["kl/mean"]) < 1e-4
    assert abs(records[1]["kl/mean"]) < 1e-4 and abs(records[2]["kl/mean"]) < 1e-4
    beta0 = PRESETS["ppo"]["knobs"]["loss"]["kl_coef"]
    # KL (~0) is below the target: e = -1 clipped to -0.2; β shrinks by 1 - 0.2 * B / horizon.
    batch = 4 * 4
    assert records[0]["kl/coef"] == pytest.approx(beta0 * (1 - 0.2 * batch / 10))


def test_resume_after_a_reference_reset_matches_uninterrupted(tiny_dir, tmp_path):
    """kl_control.ref_reset_every: the reset reference is checkpointed (it is no longer the
    initial policy), so a run stopped after a reset resumes exactly (issue: finding 8)."""
    torch.set_num_threads(1)
    algorithm = {"preset": "grpo", "knobs": {
        "sampling": {"group_size": 4, "max_new_tokens": 3},
        "loss": {"kl_placement": "loss", "kl_estimator": "k3", "kl_coef": 0.5},
        "kl_control": {"ref_reset_every": 1}}}
    reward = {"kind": "format", "pattern": "^[0-4]"}
    full = run_config(online_config(tiny_dir, tmp_path / "full", "grpo", max_steps=4,
                                    reward=reward, algorithm=algorithm), quiet=True)
    part = tmp_path / "part"
    run_config(online_config(tiny_dir, part, "grpo", max_steps=2, reward=reward,
                             algorithm=algorithm), quiet=True)
    assert list((part / "checkpoints").glob("*/reference*.safetensors"))
    from psirl.train.config import load_run_config

    resumed = run_config(load_run_config(part, ["max_steps=4"]), resume=True, quiet=True)
    assert metrics_differences(full, resumed) == []
    kls = [r["kl/mean"] for r in read_metrics(resumed)]
    assert any(k != 0 for k in kls)  # the KL term is live, so a wrong reference would show


def test_remax_uses_the_greedy_completion_reward_as_baseline(tiny_dir, tmp_path, monkeypatch):
    """advantage.estimator: remax decodes each prompt greedily with the current policy and scores
    it: A_i = R_i - R(greedy of prompt i) on every token of row i."""
    from psirl.train import online

    seen = {}
    original = online.score_rollouts

    def spy(*args, **kwargs):
        out = original(*args, **kwargs)
        seen["baseline"] = kwargs["extra_inputs"]["baseline_rewards"]
        seen["rewards"], seen["advantages"], seen["mask"] = args[0], out.advantages, args[1]
        return out

    monkeypatch.setattr(online, "score_rollouts", spy)
    cfg = online_config(tiny_dir, tmp_path / "remax", "reinforce", max_steps=1,
                        reward={"kind": "format", "pattern": "^[0-4]"},
                        algorithm={"preset": "reinforce", "knobs": {
                            "advantage": {"estimator": "remax"},
                            "sampling": {"group_size": 4, "max_new_tokens": 3}}})
    run_config(cfg, quiet=True)
    baseline, rewards = seen["baseline"], seen["rewards"]
    assert baseline.shape == rewards.shape
    assert set(baseline.tolist()) <= {0.0, 1.0}  # a reward of the format verifier
    expected = (rewards - baseline).unsqueeze(1) * seen["mask"]
    assert torch.allclose(seen["advantages"], expected)
