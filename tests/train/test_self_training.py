"""STaR / ReST / RAFT on a tiny model: the filters keep exactly what they say, and SFT steps run."""

from __future__ import annotations

import math

import pytest
import torch

from psirl.models.tiny import make_tiny_model
from psirl.rollout.hf_engine import HFEngine
from psirl.train.base import step_generator
from psirl.train.config import config_from_dict
from psirl.train.self_training import build_self_training, select_samples

TINY = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64}
N_PROMPTS, K = 3, 4


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return str(make_tiny_model(tmp_path_factory.mktemp("st_tiny"), **TINY))


def _config(tmp_path, tiny_path, self_training, max_steps=2):
    return config_from_dict({
        "loop": "self_training", "output_dir": str(tmp_path / "run"), "device": "cpu",
        "max_steps": max_steps, "model": {"path": tiny_path}, "data": {"task": "addition"},
        "optim": {"lr": 1e-3, "batch_size": N_PROMPTS},
        "self_training": {"samples_per_prompt": K, "max_new_tokens": 5, **self_training}})


class RecordingReward:
    """reward = (len(completion) mod 3) / 2 in {0, 0.5, 1}; remembers every call."""

    def __init__(self):
        self.calls = []

    def __call__(self, prompts, completions, records):
        rewards = [(len(c) % 3) / 2 for c in completions]
        self.calls.append({"prompts": list(prompts), "rewards": rewards})
        return rewards


def _steps(spec, n):
    return [spec.step(k, step_generator(0, k)) for k in range(n)]


def _params(spec):
    return [p.detach().clone() for p in spec.models["policy"].parameters()]


def _changed(before, spec):
    return any(not torch.equal(a, p.detach())
               for a, p in zip(before, spec.models["policy"].parameters(), strict=True))


# ----------------------------------------------------------------------------- filters


def test_select_samples_exact_masks():
    rewards = torch.tensor([0.2, 0.9, 0.5, 0.5, 0.0, 1.0, 1.0, 0.7])
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    star = select_samples("star", rewards, groups, threshold=0.5, top_k=None)
    assert star.tolist() == [False, True, True, True, False, True, True, True]
    capped = select_samples("rest", rewards, groups, threshold=0.5, top_k=2)
    assert capped.tolist() == [False, True, True, False, False, True, True, False]
    raft = select_samples("raft", rewards, groups, threshold=0.0, top_k=None)  # top-1
    assert raft.tolist() == [False, True, False, False, False, True, False, False]
    raft2 = select_samples("raft", rewards, groups, threshold=0.0, top_k=3)
    assert raft2.tolist() == [False, True, True, True, False, True, True, True]
    # RAFT honours reward_threshold (0.95 keeps only group 1's best) ...
    raft3 = select_samples("raft", rewards, groups, threshold=0.95, top_k=None)
    assert raft3.tolist() == [False, False, False, False, False, True, False, False]
    # ... and drops a prompt whose every sample scored 0, whatever the threshold.
    zeros = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0])
    raft4 = select_samples("raft", zeros, groups, threshold=-1.0, top_k=None)
    assert raft4.tolist() == [False, False, False, False, False, True, False, False]


# ----------------------------------------------------------------------------- loops


def test_raft_keeps_top_k_per_prompt_and_trains(tmp_path, tiny_path):
    reward = RecordingReward()
    spec = build_self_training(_config(tmp_path, tiny_path, {"method": "raft", "top_k": 2}),
                               tmp_path / "run", reward_fn=reward)
    before = _params(spec)
    metrics = _steps(spec, 2)
    assert len(reward.calls) == 2  # one grow per step (sft_steps_per_round = 1)
    for m, call in zip(metrics, reward.calls, strict=True):
        assert m["self_training/samples"] == N_PROMPTS * K
        assert m["self_training/kept"] == N_PROMPTS * 2
        assert m["reward/mean"] == pytest.approx(sum(call["rewards"]) / (N_PROMPTS * K))
        assert math.isfinite(m["loss"]) and m["loss"] > 0 and m["tokens"] > 0
    assert _changed(before, spec)


def test_rest_raises_threshold_over_improve_steps_on_one_grow(tmp_path, tiny_path):
    reward = RecordingReward()
    cfg = _config(tmp_path, tiny_path, {"method": "rest", "rest_thresholds": [0.5, 1.0]})
    spec = build_self_training(cfg, tmp_path / "run", reward_fn=reward)
    metrics = _steps(spec, 2)
    assert len(reward.calls) == 1  # grow once, improve twice
    rewards = reward.calls[0]["rewards"]
    for m, tau in zip(metrics, (0.5, 1.0), strict=True):
        assert m["self_training/threshold"] == tau
        assert m["self_training/kept"] == sum(r >= tau for r in rewards)
        assert math.isfinite(m["loss"])
    # the round's samples are loop state (JSON), so a resumed run continues the same round
    state = spec.get_state()
    assert state["round"] == 0 and len(state["samples"]) == N_PROMPTS * K


def test_star_rationalises_failures_and_trains_without_the_hint(tmp_path, tiny_path, monkeypatch):
    seen_prompts = []
    generate = HFEngine.generate

    def recording_generate(self, prompts, params):
        seen_prompts.append(list(prompts))
        return generate(self, prompts, params)

    monkeypatch.setattr(HFEngine, "generate", recording_generate)
    calls = []

    def reward_fn(prompts, completions, records):
        # first call (plain samples): all wrong; second call (hinted samples): all right
        calls.append(list(prompts))
        return [0.0 if len(calls) % 2 == 1 else 1.0] * len(completions)

    cfg = _config(tmp_path, tiny_path, {"method": "star", "reward_threshold": 1.0, "top_k": 1,
                                        "hint_template": "{prompt}[{answer}]"})
    spec = build_self_training(cfg, tmp_path / "run", reward_fn=reward_fn)
    before = _params(spec)
    metrics = _steps(spec, 2)
    for m in metrics:
        assert m["star/rationalised_prompts"] == N_PROMPTS
        assert m["self_training/kept"] == m["star/rationalised_kept"] == N_PROMPTS  # top_k = 1
        assert math.isfinite(m["loss"]) and m["loss"] > 0
    assert _changed(before, spec)
    plain, hinted = seen_prompts[0], seen_prompts[1]
    assert all(h.startswith(p + "[") and h.endswith("]") for p, h in zip(plain, hinted, strict=True))
    assert calls[1][::K] == plain  # rationales are scored against the original prompt
    tokenizer = spec.tokenizer
    samples = spec.get_state()["samples"]
    kept_prompts = {tuple(s["prompt_ids"]) for s in samples if s["rationalised"]}
    originals = {tuple(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in seen_prompts[2]}
    assert kept_prompts == originals  # trained WITHOUT the hint


def test_star_without_failures_does_not_rationalise(tmp_path, tiny_path):
    cfg = _config(tmp_path, tiny_path, {"method": "star", "reward_threshold": 0.0})
    spec = build_self_training(cfg, tmp_path / "run", reward_fn=RecordingReward())
    (m,) = _steps(spec, 1)
    assert m["star/rationalised_prompts"] == 0 and m["self_training/kept"] == N_PROMPTS * K


def test_nothing_kept_still_steps(tmp_path, tiny_path):
    cfg = _config(tmp_path, tiny_path, {"method": "star", "rationalize": False,
                                        "reward_threshold": 5.0})
    spec = build_self_training(cfg, tmp_path / "run", reward_fn=RecordingReward())
    before = _params(spec)
    (m,) = _steps(spec, 1)
    assert m["self_training/kept"] == 0 and m["loss"] == 0.0 and m["tokens"] == 0.0
    assert not _changed(before, spec)


def test_resume_mid_round_reuses_the_grown_samples(tmp_path, tiny_path):
    import functools
    import json

    from psirl.train.base import run_loop
    from psirl.train.config import load_run_config

    reward = RecordingReward()
    build = functools.partial(build_self_training, reward_fn=reward)
    cfg = _config(tmp_path, tiny_path, {"method": "rest", "rest_thresholds": [0.5, 1.0]},
                  max_steps=1)
    run_dir = run_loop(cfg, build, quiet=True)
    run_loop(load_run_config(run_dir, ["max_steps=2"]), build, resume=True, quiet=True)
    assert len(reward.calls) == 1  # step 1 continued round 0 from the checkpointed loop state
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[1]["self_training/kept"] == sum(r >= 1.0 for r in reward.calls[0]["rewards"])


@pytest.mark.parametrize("loop", ["preference", "reward_model", "self_training"])
def test_loops_are_registered(loop):
    import importlib

    from psirl.train import LOOPS

    module, fn = LOOPS[loop].split(":")
    assert callable(getattr(importlib.import_module(module), fn))
