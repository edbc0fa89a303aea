"""Bradley–Terry reward-model training on a tiny model; the result loads in RewardModelReward."""

from __future__ import annotations

import json
import math
import random

import pytest

from psirl.data.tasks import AdditionTask
from psirl.models.tiny import make_tiny_model
from psirl.train.config import config_from_dict
from psirl.train.preference_data import task_preference_pairs

TINY = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64}


def _separable_pairs(n: int, seed: int) -> list[dict]:
    """Random prompts and numbers; the chosen completion ends in " yes", the rejected in " no"."""
    rng = random.Random(seed)
    return [{"prompt": f"{rng.randrange(100)}+{rng.randrange(100)}=",
             "chosen": f"{rng.randrange(100)} yes", "rejected": f"{rng.randrange(100)} no"}
            for _ in range(n)]


def _jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return str(make_tiny_model(tmp_path_factory.mktemp("rm_tiny"), **TINY))


def test_reward_model_learns_separable_pairs_and_loads_as_reward(tmp_path, tiny_path):
    from psirl.rewards.reward_model import RewardModelReward
    from psirl.train import run_config

    held_out = _separable_pairs(12, seed=1)
    cfg = config_from_dict({
        "loop": "reward_model", "output_dir": str(tmp_path / "run"), "device": "cpu",
        "max_steps": 10, "model": {"path": tiny_path},
        "data": {"train_path": _jsonl(tmp_path / "train.jsonl", _separable_pairs(24, seed=0)),
                 "eval_path": _jsonl(tmp_path / "eval.jsonl", held_out)},
        "optim": {"lr": 1e-3, "batch_size": 8}, "eval": {"every": 10}})
    run_dir = run_config(cfg, quiet=True)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    first, last = rows[0], rows[-1]
    assert first["step"] == 0 and last["step"] == 10
    assert last["eval/rewards/accuracy"] == 1.0 > first["eval/rewards/accuracy"]
    assert last["eval/loss"] < min(first["eval/loss"], math.log(2.0))
    assert all(math.isfinite(r["loss"]) for r in rows[1:])

    reward = RewardModelReward(run_dir / "final")
    prompts = [p["prompt"] for p in held_out]
    good = reward(prompts, [p["chosen"] for p in held_out], held_out)
    bad = reward(prompts, [p["rejected"] for p in held_out], held_out)
    assert all(g > b for g, b in zip(good, bad, strict=True))


def test_task_pairs_are_correct_vs_wrong_answers():
    task = AdditionTask(digits=2)
    pairs = task_preference_pairs(task, 20, seed=3)
    assert len(pairs) == 20
    for p in pairs:
        record = {"answer": p["answer"]}
        assert task.reward(p["chosen"], record) == 1.0
        assert task.reward(p["rejected"], record) == 0.0
    held_out = task_preference_pairs(task, 5, seed=3, split="test")
    assert {p["prompt"] for p in held_out}.isdisjoint({p["prompt"] for p in pairs})


def test_reward_model_on_task_pairs_runs(tmp_path, tiny_path):
    from psirl.train.base import step_generator
    from psirl.train.reward_model import build_reward_model

    cfg = config_from_dict({
        "loop": "reward_model", "output_dir": str(tmp_path / "run"), "device": "cpu",
        "max_steps": 2, "model": {"path": tiny_path},
        "data": {"task": "addition", "n_train": 16}, "eval": {"n": 4},
        "optim": {"lr": 1e-3, "batch_size": 4}})
    spec = build_reward_model(cfg, tmp_path / "run")
    metrics = [spec.step(k, step_generator(0, k)) for k in range(2)]
    assert all(math.isfinite(m["loss"]) and 0.0 <= m["rewards/accuracy"] <= 1.0 for m in metrics)
    assert set(spec.evaluate(2)) >= {"eval/loss", "eval/rewards/accuracy"}


def test_reward_model_rejects_lora(tmp_path, tiny_path):
    with pytest.raises(ValueError, match="model.lora"):  # at config load, before any model
        config_from_dict({
            "loop": "reward_model", "output_dir": str(tmp_path / "run"), "device": "cpu",
            "model": {"path": tiny_path, "lora": {"r": 2}}, "data": {"task": "addition"}})
