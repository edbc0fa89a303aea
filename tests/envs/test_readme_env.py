"""The README's custom environment runs as written, given as `module:Class`."""

import re
import sys
from pathlib import Path

import torch

from psirl.envs import build_env_factory
from psirl.models import load_policy
from psirl.models.tiny import make_tiny_model
from psirl.rollout.batch import SamplingParams
from psirl.rollout.episode import run_episodes
from psirl.rollout.hf_engine import HFEngine


def test_readme_guess_env(tmp_path, monkeypatch):
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    code = next(b for b in re.findall(r"```python\n(.*?)```", readme, re.DOTALL)
                if "class GuessEnv" in b)
    assert len(code.strip().splitlines()) <= 25
    (tmp_path / "readme_guess.py").write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        make = build_env_factory("readme_guess:GuessEnv")
        env = make()
        assert env.reset({"prompt": "guess:", "answer": "7"}) == "guess:"
        assert env.step("3\n").observation == "higher\n"
        assert env.step("x").observation == "a number, please\n"
        last = env.step("7\n")
        assert last.done and last.reward == 1.0 / 3
        model, tokenizer = load_policy(make_tiny_model(tmp_path / "m", hidden_size=32,
                                                       num_layers=1, initializer_range=0.2))
        params = SamplingParams(max_new_tokens=4, n=2, seed=0)
        episodes = run_episodes(HFEngine(model, tokenizer), make,
                                [{"prompt": "guess:", "answer": "7"}], params, max_turns=3)
        batch = episodes.batch
        assert batch.input_ids.shape[0] == 2 and episodes.turns.max() <= 3
        # Environment turns are attended but out of the loss.
        env_tokens = batch.attention_mask[:, batch.prompt_len:].sum() - batch.completion_mask.sum()
        assert (episodes.turns > 1).any() == (env_tokens > 0)
        assert torch.equal(episodes.rewards, batch.token_rewards.sum(1))
    finally:
        sys.modules.pop("readme_guess", None)
