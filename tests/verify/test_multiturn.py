"""Exact enumeration over episodes with environment turns (psirl/verify/multiturn.py)."""

import itertools
import math

import pytest
import torch

from psirl import algorithms
from psirl.verify.multiturn import (
    _harness,
    enumerate_episodes,
    estimate_episodes,
    exact_episode_gradient,
    exact_episode_objective,
    make_episode_problem,
    multiturn_check,
    sample_episodes,
    stochastic_env,
)


@pytest.mark.parametrize("env", ["deterministic", "stochastic"])
def test_objective_matches_a_brute_force_sum(env):
    """J from the tensors equals a plain-Python sum over every (model turn 1, env outcome,
    model turn 2) path, with the environment's probabilities from its own function."""
    problem = make_episode_problem(env, per_turn_rewards=True)
    table = problem.table
    theta, ref, v = problem.theta, problem.ref_theta, problem.vocab_size
    env_fn = {"deterministic": None, "stochastic": stochastic_env(v)}[env]
    from psirl.verify.multiturn import deterministic_env

    env_fn = env_fn or deterministic_env(v)
    state = {}
    for i in range(table.tokens.shape[0]):
        for t in range(int(table.attention[i].sum())):
            state[(int(table.prompt_ids[i]), tuple(table.tokens[i, :t].tolist()))] = int(
                table.states[i, t])
    episode_row = {(int(table.prompt_ids[i]), tuple(
        table.tokens[i, : int(table.attention[i].sum())].tolist())): i
        for i in range(table.tokens.shape[0])}

    def pi(th, x, prefix, a):
        return float(torch.softmax(th[state[(x, prefix)]], -1)[a])

    total, mass = 0.0, [0.0, 0.0]
    for x in range(problem.n_prompts):
        for y1 in itertools.product(range(v), repeat=2):
            for q, obs in env_fn(x, y1):
                for y2 in range(v):
                    hist = y1 + obs + (y2,)
                    p_model = pi(theta, x, (), y1[0]) * pi(theta, x, y1[:1], y1[1]) * pi(
                        theta, x, y1 + obs, y2)
                    p_ref = pi(ref, x, (), y1[0]) * pi(ref, x, y1[:1], y1[1]) * pi(
                        ref, x, y1 + obs, y2)
                    row = episode_row[(x, hist)]
                    reward = float(problem.turn_rewards[row].sum())
                    weight = p_model * q / problem.n_prompts
                    total += weight * (reward - problem.kl_coef * math.log(p_model / p_ref))
                    mass[x] += p_model * q
    assert mass == pytest.approx([1.0, 1.0], abs=1e-12)
    assert float(exact_episode_objective(problem)) == pytest.approx(total, abs=1e-12)
    grad = exact_episode_gradient(problem)
    assert grad[table.env_states].abs().max() == 0.0  # only model tokens carry the objective
    assert grad[table.model_states].abs().max() > 0.0


def test_episode_table_shapes_and_prefix_free_check():
    problem = make_episode_problem("stochastic")
    t = problem.table
    lengths = t.attention.sum(1)
    assert set(lengths.tolist()) == {4.0, 5.0}  # env turns of 1 or 2 tokens
    assert (t.model_mask.sum(1) == 3).all()  # model tokens per episode are fixed
    assert not (t.model_states & t.env_states).any()
    with pytest.raises(ValueError, match="prefix-free"):
        enumerate_episodes(2, (1, 1), 1, lambda x, h: [(0.5, (0,)), (0.5, (0, 1))])
    with pytest.raises(ValueError, match="sum to 1"):
        enumerate_episodes(2, (1, 1), 1, lambda x, h: [(0.5, (0,))])


def test_online_presets_agree_with_the_exact_episode_gradient():
    """Known-scale estimators are unbiased on episodes (deterministic and stochastic env,
    per-turn rewards, KL none / k1 in the reward) and no environment-only state gets any
    gradient; std-scaled GRPO is reported, not claimed."""
    result = multiturn_check(seed=1, n_batches=1024,
                             presets=("reinforce", "rloo", "ppo", "dr_grpo", "grpo"))
    assert result["ok"], [r for r in result["rows"] if not r["ok"]]
    rows = result["rows"]
    assert len(rows) == 2 * 5 * 2
    assert all(r["env_grad_max"] == 0.0 for r in rows)
    for r in rows:
        if r["expected"] == "unbiased":
            assert r["p_value"] >= result["alpha"] and r["cosine"] > 0.95, r


@pytest.mark.parametrize("preset", ["ppo", "grpo", "rloo"])
def test_a_loss_mask_that_counts_env_tokens_is_caught(preset):
    """Masking the loss with the attention (environment tokens included) puts gradient on
    environment states; with GAE or a per-sequence token mean it also biases the model states'
    gradient (Hotelling rejects)."""
    problem = make_episode_problem("stochastic")
    samples = sample_episodes(problem, 1024, 4, seed=0)
    knobs = _harness(algorithms.resolve_preset(preset), "none", "k1", 0.0)
    good, good_env = estimate_episodes(problem, samples, knobs)
    bad, bad_env = estimate_episodes(problem, samples, knobs, loss_mask="attention")
    assert good_env == 0.0 and bad_env > 0.1
    if preset == "ppo":
        assert good.p_value > 1e-3 and bad.p_value < 1e-10
    if preset == "grpo":  # direction test: the leak moves the direction further off
        assert bad.cosine < good.cosine - 0.02
