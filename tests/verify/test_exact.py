"""Exact objective and gradient: closed forms (bandit), finite differences, value recursion."""

import pytest
import torch

from psirl.verify.exact import (
    TabularProblem,
    exact_expected_reward,
    exact_gradient,
    exact_kl,
    exact_kl_gradient,
    exact_objective,
    exact_statewise_kl_gradient,
    exact_value_function,
    make_problem,
)
from psirl.verify.tabular import TabularPolicy

F64 = torch.float64


def _bandit(beta: float) -> tuple[TabularProblem, torch.Tensor, torch.Tensor, torch.Tensor]:
    pol = TabularPolicy(vocab_size=3, horizon=1)
    theta = torch.tensor([[0.2, -0.5, 1.0]], dtype=F64)
    ref = torch.tensor([[0.0, 0.3, -0.2]], dtype=F64)
    r = torch.tensor([[1.0, 3.0, -2.0]], dtype=F64)
    return TabularProblem(pol, theta, ref, r, beta), theta, ref, r


def test_bandit_closed_forms():
    """H = 1: J = sum_a pi_a R_a - beta sum_a pi_a log(pi_a / rho_a), grad = pi * (f - E_pi f)."""
    beta = 0.7
    prob, theta, ref, r = _bandit(beta)
    pi = torch.softmax(theta[0], -1)
    log_ratio = torch.log_softmax(theta[0], -1) - torch.log_softmax(ref[0], -1)
    kl = (pi * log_ratio).sum()
    assert torch.allclose(exact_kl(prob), kl)
    assert torch.allclose(exact_expected_reward(prob), (pi * r[0]).sum())
    # d/dtheta_b sum_a pi_a f_a = pi_b (f_b - E f) for fixed f; the KL adds
    # d/dtheta_b E[log pi] = pi_b (log pi_b - E log pi) (the "+1" term has zero mean).
    grad_r = pi * (r[0] - (pi * r[0]).sum())
    grad_kl = pi * (log_ratio - kl)
    assert torch.allclose(exact_kl_gradient(prob)[0], grad_kl)
    assert torch.allclose(exact_gradient(prob)[0], grad_r - beta * grad_kl)
    assert torch.allclose(exact_gradient(prob, kl_coef=0.0)[0], grad_r)


def test_statewise_kl_gradients():
    """H = 1: the per-state reverse KL is the KL; forward KL(ref||pi) has gradient pi - ref."""
    prob, theta, ref, _ = _bandit(0.7)
    assert torch.allclose(exact_statewise_kl_gradient(prob, "reverse"), exact_kl_gradient(prob))
    fwd = torch.softmax(theta, -1) - torch.softmax(ref, -1)
    assert torch.allclose(exact_statewise_kl_gradient(prob, "forward"), fwd)
    # H = 3: holding the state visits fixed misses how a token changes the later KL terms
    deep = make_problem()
    assert not torch.allclose(exact_statewise_kl_gradient(deep), exact_kl_gradient(deep))


def test_gradient_matches_central_differences():
    prob = make_problem(seed=3)
    g = exact_gradient(prob)
    h = 1e-6
    gen = torch.Generator().manual_seed(0)
    for _ in range(6):
        row = int(torch.randint(prob.policy.n_prefixes, (1,), generator=gen))
        col = int(torch.randint(3, (1,), generator=gen))
        plus, minus = prob.theta.clone(), prob.theta.clone()
        plus[row, col] += h
        minus[row, col] -= h
        fd = (exact_objective(prob, plus) - exact_objective(prob, minus)) / (2 * h)
        assert abs(float(fd) - float(g[row, col])) < 1e-7


def test_kl_is_zero_at_the_reference_and_rows_sum_to_zero():
    prob = make_problem(seed=1)
    same = TabularProblem(prob.policy, prob.theta, prob.theta.clone(), prob.rewards, 0.5)
    assert abs(float(exact_kl(same))) < 1e-12
    assert exact_kl_gradient(same).abs().max() < 1e-12
    assert float(exact_kl(prob)) > 0
    assert exact_gradient(prob).sum(1).abs().max() < 1e-12


def test_value_function_bellman_and_root():
    """V(s) = sum_a pi(a|s) [r(s, a) + V(s a)] and V(root of x) = E[R | x]."""
    prob = make_problem(seed=2)
    pol, t = prob.policy, prob.table
    token_rewards = torch.zeros(t.tokens.shape, dtype=F64)
    token_rewards[:, -1] = prob.sequence_rewards
    v = exact_value_function(pol, prob.theta, token_rewards)
    pi = torch.softmax(prob.theta, -1)
    for x in range(pol.n_prompts):
        root = x * pol.prefixes_per_prompt
        p_y = pol.sequence_logprobs(prob.theta, t.prompt_ids, t.tokens, t.mask).exp()
        rows = t.prompt_ids == x
        assert torch.allclose(v[root], (p_y[rows] * prob.sequence_rewards[rows]).sum())
        # depth-1 prefix (a) has index root + 1 + a; its children are at depth 2
        for a in range(3):
            child = root + 1 + a
            kids = root + 4 + 3 * a + torch.arange(3)
            assert torch.allclose(v[child], (pi[child] * v[kids]).sum())
        # leaf prefixes: V(s) = sum_a pi(a|s) R(s a)
        leaf = root + 4  # prefix (0, 0)
        r_leaf = prob.rewards[x, :3]  # completions (0, 0, a), lexicographic order
        assert torch.allclose(v[leaf], (pi[leaf] * r_leaf).sum())


def test_problem_validation_names_the_field():
    prob = make_problem()
    with pytest.raises(ValueError, match="rewards"):
        TabularProblem(prob.policy, prob.theta, prob.ref_theta, prob.rewards[:, :5])
    with pytest.raises(ValueError, match="theta"):
        TabularProblem(prob.policy, prob.theta.float(), prob.ref_theta, prob.rewards)
    with pytest.raises(ValueError, match="kl_coef"):
        TabularProblem(prob.policy, prob.theta, prob.ref_theta, prob.rewards, -1.0)
