"""The TIS gradcheck rows (verify/offpolicy.py): exact expectations by enumeration."""

import math

import torch

from psirl.verify.exact import exact_gradient, make_problem
from psirl.verify.offpolicy import behaviour_theta, expected_tis_gradient, tis_rows


def test_uncapped_sequence_weights_are_exactly_unbiased():
    # importance sampling identity: E_mu[(pi/mu) R grad log pi] = E_pi[R grad log pi]
    problem = make_problem()
    theta_mu = behaviour_theta(problem, 0.5, seed=1)
    got = expected_tis_gradient(problem, theta_mu, math.inf, "sequence")
    assert torch.allclose(got, exact_gradient(problem, kl_coef=0.0), atol=1e-12, rtol=1e-10)


def test_on_policy_weights_are_one_for_any_cap():
    problem = make_problem()
    for level in ("token", "sequence"):
        got = expected_tis_gradient(problem, problem.theta, 1.0, level)
        assert torch.allclose(got, exact_gradient(problem, kl_coef=0.0), atol=1e-12)


def test_bias_falls_as_the_cap_grows():
    result = tis_rows()
    assert result["ok"], result["checks"]
    seq = [r["rel_bias"] for r in result["rows"] if r["level"] == "sequence"]
    tok = [r["rel_bias"] for r in result["rows"] if r["level"] == "token"]
    none = result["rows"][0]["rel_bias"]
    assert seq[0] > 0.5 and seq[-1] < 1e-10  # C = 1 strongly biased, C = inf exact
    assert tok[0] > tok[-1] > 0.01  # token level keeps the state-distribution bias
    assert none > 1.0  # ignoring the mismatch is worse than any cap >= 2
