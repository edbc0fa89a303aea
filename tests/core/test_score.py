"""core.score: the online loop's score stage on worked examples."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from psirl.core.score import reward_tokens, score_rollouts


def _knobs(estimator="group_mean_std", placement="none", coef=0.0, whiten="none", eps=0.0):
    adv = SimpleNamespace(estimator=estimator, gamma=1.0, lam=1.0, eps=eps, whiten=whiten)
    loss = SimpleNamespace(kl_placement=placement, kl_estimator="k1", kl_coef=coef, kl_clamp=None)
    return adv, loss


def test_grpo_worked_example_every_token_of_a_row_gets_its_advantage():
    # rewards [0, 0, 1, 0] in one group: mean 0.25, std 0.5 -> [-0.5, -0.5, 1.5, -0.5] (eps 0)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    adv, loss = _knobs()
    out = score_rollouts(torch.tensor([0.0, 0.0, 1.0, 0.0]), mask, torch.zeros(4, dtype=torch.long),
                         adv, loss)
    expected = torch.tensor([-0.5, -0.5, 1.5, -0.5]).unsqueeze(1) * mask
    assert torch.allclose(out.advantages, expected)


def test_k1_in_the_reward_per_token_and_per_sequence():
    mask = torch.tensor([[1.0, 1.0, 1.0]])
    logp, ref = torch.tensor([[-1.0, -2.0, -0.5]]), torch.tensor([[-1.5, -1.0, -0.5]])
    # k1 = logp - ref = [0.5, -1.0, 0.0]; beta 2; R = 1 on the last token
    _, loss = _knobs(placement="reward_token", coef=2.0)
    r = reward_tokens(torch.tensor([1.0]), mask, loss, behaviour_logp=logp, ref_logp=ref)
    assert torch.allclose(r, torch.tensor([[-1.0, 2.0, 1.0]]))
    _, loss = _knobs(placement="reward_sequence", coef=2.0)
    r = reward_tokens(torch.tensor([1.0]), mask, loss, behaviour_logp=logp, ref_logp=ref)
    assert torch.allclose(r, torch.tensor([[0.0, 0.0, 2.0]]))  # 1 - 2 * (0.5 - 1.0 + 0)
    _, loss = _knobs(placement="loss", coef=2.0)  # the KL is in the loss, not the reward
    r = reward_tokens(torch.tensor([1.0]), mask, loss, behaviour_logp=logp, ref_logp=ref)
    assert torch.allclose(r, torch.tensor([[0.0, 0.0, 1.0]]))


def test_batch_whitening_after_the_estimator_and_turn_rewards():
    mask = torch.ones(2, 2)
    adv, loss = _knobs(estimator="none", whiten="batch")
    out = score_rollouts(torch.tensor([1.0, 3.0]), mask, torch.tensor([0, 1]), adv, loss)
    # none: A = R on every token -> [1, 1, 3, 3]; mean 2, unbiased var 4/3
    expected = (torch.tensor([[1.0, 1.0], [3.0, 3.0]]) - 2.0) / torch.sqrt(torch.tensor(4 / 3))
    assert torch.allclose(out.advantages, expected, atol=1e-6)
    adv, loss = _knobs(estimator="none")
    turns = torch.tensor([[0.5, 0.0], [0.0, 2.0]])  # a per-turn reward on the first token of row 0
    out = score_rollouts(torch.tensor([0.5, 2.0]), mask, torch.tensor([0, 1]), adv, loss,
                         turn_rewards=turns)
    assert torch.allclose(out.advantages, torch.tensor([[0.5, 0.0], [2.0, 2.0]]))  # reward-to-go
