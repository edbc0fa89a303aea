"""`psirl gradcheck` rows for truncated importance sampling (core/offpolicy.py), exact.

Setting: the default tabular problem (``exact.make_problem``), the trainer's policy pi_theta, and
a behaviour policy mu = pi_{theta + sigma * N(0, 1)} that stands in for an engine whose log-probs
differ from the trainer's. Samples come from mu; the estimator is REINFORCE with the TIS weight,

    g_C(x, y) = sum_t w_t(x, y) R(x, y) grad log pi_theta(y_t | x, y_<t),

w from ``truncated_is_weights`` (token or sequence level, cap C) or w = 1 (no correction). Its
expectation E_mu[g_C] = sum_{x,y} p(x) mu(y|x) g_C(x, y) is computed EXACTLY by enumerating every
(prompt, completion), so the bias ||E_mu[g_C] - grad J|| / ||grad J|| (J = E_pi[R]) has no
sampling noise. Expectations:
- sequence level: the bias falls as C grows and is 0 (to float64 rounding) once C exceeds the
  largest sequence ratio pi / mu (importance sampling is unbiased);
- token level: the bias falls as C grows to a floor > 0 (the state distribution stays mu's);
- every corrected estimator with C >= 2 has less bias than the uncorrected one.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from rich.table import Table

from psirl.core.offpolicy import truncated_is_weights
from psirl.verify.exact import TabularProblem, exact_gradient, make_problem

DEFAULT_CAPS = (1.0, 1.5, 2.0, 4.0, 8.0, 16.0, math.inf)
DEFAULT_PERTURBATION = 0.5


def behaviour_theta(problem: TabularProblem, perturbation: float, seed: int = 0) -> torch.Tensor:
    """theta_mu = theta + perturbation * N(0, 1) (seeded): [n_prefixes, V] float64."""
    gen = torch.Generator().manual_seed(seed)
    return problem.theta + problem.policy.init_theta(gen, perturbation)


def expected_tis_gradient(
    problem: TabularProblem, theta_mu: torch.Tensor, cap: float | None, level: str
) -> torch.Tensor:
    """E_mu[g_C] by enumeration: [n_prefixes, V] float64. cap None: no correction (w = 1)."""
    table, pol = problem.table, problem.policy
    theta = problem.theta.clone().requires_grad_(True)
    logp_pi = pol.token_logprobs(theta, table.prompt_ids, table.tokens, table.mask)
    logp_mu = pol.token_logprobs(theta_mu, table.prompt_ids, table.tokens, table.mask)
    mu_joint = logp_mu.sum(1).exp() / pol.n_prompts  # p(x) mu(y|x)
    if cap is None:
        weights = table.mask
    else:
        weights = truncated_is_weights(logp_pi.detach(), logp_mu, table.mask, cap, level)
    surrogate = (mu_joint * problem.sequence_rewards * (weights * logp_pi).sum(1)).sum()
    (grad,) = torch.autograd.grad(surrogate, theta)
    return grad


def tis_rows(
    *,
    seed: int = 0,
    perturbation: float = DEFAULT_PERTURBATION,
    caps: tuple[float, ...] = DEFAULT_CAPS,
) -> dict[str, Any]:
    """The TIS bias table: {"rows": [{level, cap, rel_bias}], "max_sequence_ratio", "ok",
    "checks": {name: bool}} on ``make_problem(seed)`` with the given behaviour perturbation."""
    problem = make_problem(seed=seed)
    theta_mu = behaviour_theta(problem, perturbation, seed=seed + 1)
    exact = exact_gradient(problem, kl_coef=0.0)
    norm = exact.norm()

    def rel_bias(cap: float | None, level: str) -> float:
        return float((expected_tis_gradient(problem, theta_mu, cap, level) - exact).norm() / norm)

    rows = [{"level": "none", "cap": None, "rel_bias": rel_bias(None, "token")}]
    for level in ("token", "sequence"):
        rows += [{"level": level, "cap": c, "rel_bias": rel_bias(c, level)} for c in caps]
    t, pol = problem.table, problem.policy
    log_ratio = pol.sequence_logprobs(problem.theta, t.prompt_ids, t.tokens, t.mask) - (
        pol.sequence_logprobs(theta_mu, t.prompt_ids, t.tokens, t.mask)
    )
    max_ratio = float(log_ratio.exp().max())

    def biases(level: str) -> list[float]:
        return [r["rel_bias"] for r in rows if r["level"] == level]

    none_bias = rows[0]["rel_bias"]
    tol = 1e-12
    checks = {
        "token bias non-increasing in C": all(
            b2 <= b1 + tol for b1, b2 in zip(biases("token"), biases("token")[1:], strict=False)
        ),
        "sequence bias non-increasing in C": all(
            b2 <= b1 + tol
            for b1, b2 in zip(biases("sequence"), biases("sequence")[1:], strict=False)
        ),
        "sequence bias 0 once C >= max ratio": all(
            r["rel_bias"] < 1e-10
            for r in rows
            if r["level"] == "sequence" and r["cap"] >= max_ratio
        ),
        "token bias floor > 0 at C = inf": biases("token")[-1] > 1e-6,
        "C >= 2 beats no correction": all(
            r["rel_bias"] < none_bias for r in rows if r["cap"] is not None and r["cap"] >= 2
        ),
    }
    return {
        "rows": rows,
        "max_sequence_ratio": max_ratio,
        "perturbation": perturbation,
        "checks": checks,
        "ok": all(checks.values()),
    }


def format_tis_table(result: dict[str, Any]) -> Table:
    """Relative bias of the TIS estimator per level and cap (the `psirl gradcheck` TIS rows)."""
    caps = sorted({r["cap"] for r in result["rows"] if r["cap"] is not None})
    table = Table(
        title=(
            "Truncated IS vs exact gradient (behaviour = theta + "
            f"{result['perturbation']} N(0,1); largest sequence ratio "
            f"{result['max_sequence_ratio']:.2f}); relative bias, exact by enumeration"
        )
    )
    table.add_column("level", justify="left")
    for c in caps:
        table.add_column(f"C={c:g}", justify="right")
    none = next(r for r in result["rows"] if r["level"] == "none")
    table.add_row("none (w = 1)", *[f"{none['rel_bias']:.4f}"] * len(caps))
    for level in ("token", "sequence"):
        by_cap = {r["cap"]: r["rel_bias"] for r in result["rows"] if r["level"] == level}
        table.add_row(level, *[f"{by_cap[c]:.4f}" for c in caps])
    return table


def main(seed: int = 0) -> int:
    """Print the TIS table and whether its expectations hold; 0 if they all do."""
    from rich.console import Console

    console = Console(width=132)
    result = tis_rows(seed=seed)
    console.print(format_tis_table(result))
    failed = [name for name, ok in result["checks"].items() if not ok]
    console.print(
        "TIS: all expectations hold" if not failed else "TIS FAILED: " + "; ".join(failed)
    )
    return 0 if not failed else 1


if __name__ == "__main__":
    raise SystemExit(main())
