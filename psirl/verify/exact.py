"""Exact objective, gradient and value function of a tabular policy, by summing over sequences.

The KL-regularised objective of ../shared/reference/001_dd55e9af3bef0bfc.txt (drift KL, reverse
direction) and 003 ("the KL-regularised objective"), with prompts x drawn uniformly:

    J(theta) = (1/P) sum_x sum_y pi_theta(y|x) [ R(x, y) - beta * (log pi_theta(y|x) - log pi_ref(y|x)) ]
             = E[R] - beta * KL(pi_theta || pi_ref)

Every sum runs over all P * N_y (prompt, completion) pairs of the TabularPolicy, in float64, and
the gradient is autograd of that finite sum -- no sampling anywhere. This is the ground truth the
sampled estimators of ``psirl.verify.sampled`` are compared with.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from psirl.verify.tabular import SequenceTable, TabularPolicy

__all__ = [
    "TabularProblem",
    "make_problem",
    "exact_objective",
    "exact_expected_reward",
    "exact_kl",
    "exact_gradient",
    "exact_kl_gradient",
    "exact_statewise_kl_gradient",
    "exact_value_function",
    "sequence_probabilities",
]


@dataclass(frozen=True)
class TabularProblem:
    """A policy, its parameters, a reference policy, a reward table and a KL coefficient.

    policy: TabularPolicy (V, H, P, eos); theta: [n_prefixes, V] float64 (the point where
    gradients are taken); ref_theta: [n_prefixes, V] float64 (pi_ref); rewards: [P, N_y]
    float64, R(x, y) for every prompt x and completion y in ``policy.completions()`` order;
    kl_coef: beta >= 0. Derived on construction: ``table`` (policy.enumerate()) and
    ``reachable`` ([n_prefixes] bool, policy.reachable_prefixes()).
    """

    policy: TabularPolicy
    theta: Tensor
    ref_theta: Tensor
    rewards: Tensor
    kl_coef: float = 0.0
    table: SequenceTable = field(init=False, repr=False, compare=False)
    reachable: Tensor = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        pol = self.policy
        for name in ("theta", "ref_theta"):
            t = getattr(self, name)
            if t.shape != (pol.n_prefixes, pol.vocab_size) or t.dtype != torch.float64:
                raise ValueError(
                    f"TabularProblem.{name} must be float64 [{pol.n_prefixes}, {pol.vocab_size}],"
                    f" got {t.dtype} {tuple(t.shape)}"
                )
        table = pol.enumerate()
        n_y = int(table.seq_index.max()) + 1
        if self.rewards.shape != (pol.n_prompts, n_y):
            raise ValueError(
                f"TabularProblem.rewards must be [{pol.n_prompts}, {n_y}] (prompts, completions),"
                f" got {tuple(self.rewards.shape)}"
            )
        if self.kl_coef < 0:
            raise ValueError(f"TabularProblem.kl_coef must be >= 0, got {self.kl_coef}")
        object.__setattr__(self, "table", table)
        object.__setattr__(self, "reachable", pol.reachable_prefixes())

    @property
    def sequence_rewards(self) -> Tensor:
        """R for every row of ``table``: [N] float64."""
        return self.rewards[self.table.prompt_ids, self.table.seq_index]

    def reward_of(self, prompt_ids: Tensor, tokens: Tensor) -> Tensor:
        """R(x, y) of sampled sequences: prompt_ids [B], tokens [B, H] -> [B] float64."""
        return self.rewards[prompt_ids, self.policy.completion_index(tokens)]


def make_problem(
    *,
    seed: int = 0,
    vocab_size: int = 3,
    horizon: int = 3,
    n_prompts: int = 2,
    eos_token: int | None = None,
    prompt_offsets: tuple[float, ...] = (5.0, 2.0),
    prompt_spreads: tuple[float, ...] = (1.0, 0.25),
    theta_scale: float = 0.7,
    ref_shift: float = 0.7,
    kl_coef: float = 0.5,
) -> TabularProblem:
    """The default enumeration problem of the tests and of ``psirl gradcheck``.

    Rewards R(x, y) = offset_x + spread_x * u(y), with u(y) ~ Exponential(1) - 1 drawn once
    from ``seed`` (skewed, many distinct values) and, by default, two prompts whose values and
    spreads differ a lot: offsets (5, 2), spreads (1, 0.25). Why this table:
    - every reward is positive with a large common mean, so REINFORCE (no baseline) pays for
      E[R]^2 in its variance; a batch-mean baseline (REINFORCE++) removes the common mean but
      not the per-prompt offsets (+-1.5); a per-prompt group baseline (RLOO, GRPO) removes
      those too. Spreads << offset differences make REINFORCE > REINFORCE++ > RLOO/GRPO in
      variance by large factors (000, "why any baseline works": the closer b is to V(s), the
      lower the variance) -- robust to the seed.
    - the within-prompt spreads differ by 4x, so GRPO's division by the group std re-weights
      the two prompts (002: "biases toward low-variance prompts") and the skewed u makes the
      std-scaled advantage a non-affine function of R even within a prompt: a clear bias.
    theta ~ theta_scale * N(0,1); theta_ref = theta + ref_shift * N(0,1), so KL(pi||pi_ref)
    is O(0.5) per sequence and the KL terms of the gradient are not negligible at
    kl_coef = 0.5.
    """
    pol = TabularPolicy(vocab_size, horizon, n_prompts, eos_token)
    if len(prompt_offsets) != n_prompts or len(prompt_spreads) != n_prompts:
        raise ValueError(
            f"make_problem: prompt_offsets and prompt_spreads need {n_prompts} entries "
            f"(n_prompts), got {len(prompt_offsets)} and {len(prompt_spreads)}"
        )
    gen = torch.Generator().manual_seed(seed)
    n_y = pol.completions()[0].shape[0]
    u = torch.empty(n_prompts, n_y, dtype=torch.float64).exponential_(1.0, generator=gen) - 1.0
    offsets = torch.tensor(prompt_offsets, dtype=torch.float64).unsqueeze(1)
    spreads = torch.tensor(prompt_spreads, dtype=torch.float64).unsqueeze(1)
    theta = pol.init_theta(gen, theta_scale)
    ref = theta + pol.init_theta(gen, ref_shift)
    return TabularProblem(pol, theta, ref, offsets + spreads * u, kl_coef)


def sequence_probabilities(problem: TabularProblem, theta: Tensor | None = None) -> Tensor:
    """Joint probability of every table row: p(x, y) = (1/P) pi_theta(y|x): [N] (differentiable)."""
    th = problem.theta if theta is None else theta
    t = problem.table
    logp = problem.policy.sequence_logprobs(th, t.prompt_ids, t.tokens, t.mask)
    return logp.exp() / problem.policy.n_prompts


def exact_expected_reward(problem: TabularProblem, theta: Tensor | None = None) -> Tensor:
    """E[R] = (1/P) sum_x sum_y pi_theta(y|x) R(x, y): 0-d float64 (differentiable)."""
    return (sequence_probabilities(problem, theta) * problem.sequence_rewards).sum()


def exact_kl(problem: TabularProblem, theta: Tensor | None = None) -> Tensor:
    """Sequence-level reverse KL averaged over prompts (001, "drift KL"): 0-d float64.

        KL = (1/P) sum_x sum_y pi_theta(y|x) [log pi_theta(y|x) - log pi_ref(y|x)]
           = E_pi[ sum_t k1_t ]   (the sum over tokens of the per-token k1 estimator).
    """
    th = problem.theta if theta is None else theta
    t = problem.table
    pol = problem.policy
    logp = pol.sequence_logprobs(th, t.prompt_ids, t.tokens, t.mask)
    ref = pol.sequence_logprobs(problem.ref_theta, t.prompt_ids, t.tokens, t.mask)
    return (logp.exp() * (logp - ref)).sum() / pol.n_prompts


def exact_objective(
    problem: TabularProblem, theta: Tensor | None = None, kl_coef: float | None = None
) -> Tensor:
    """J(theta) = E[R] - beta * KL(pi_theta || pi_ref): 0-d float64 (differentiable).

    beta = ``kl_coef`` if given, else ``problem.kl_coef``. Reference: 001 (KL-regularised
    RLHF objective) and 000 ("the training objective").
    """
    beta = problem.kl_coef if kl_coef is None else kl_coef
    value = exact_expected_reward(problem, theta)
    if beta != 0.0:
        value = value - beta * exact_kl(problem, theta)
    return value


def _grad(fn, problem: TabularProblem) -> Tensor:
    theta = problem.theta.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad(fn(theta), theta)
    return g


def exact_gradient(problem: TabularProblem, kl_coef: float | None = None) -> Tensor:
    """grad_theta J at problem.theta by autograd of the finite sum: [n_prefixes, V] float64.

    Each row sums to 0 (J depends on theta only through log-softmax).
    """
    return _grad(lambda th: exact_objective(problem, th, kl_coef), problem)


def exact_kl_gradient(problem: TabularProblem) -> Tensor:
    """grad_theta KL(pi_theta || pi_ref) at problem.theta: [n_prefixes, V] float64."""
    return _grad(lambda th: exact_kl(problem, th), problem)


def exact_statewise_kl_gradient(problem: TabularProblem, direction: str = "reverse") -> Tensor:
    """Gradient of a per-state divergence with the state-visit probabilities held fixed.

        g = sum_s d(s) grad_theta D(s),   d(s) = P_pi(the sequence visits s), not differentiated
        reverse: D(s) = KL(pi(.|s) || pi_ref(.|s));  forward: D(s) = KL(pi_ref(.|s) || pi(.|s))

    (d averages over prompts like J.) These are the expected gradients of a KL estimator that
    is *differentiated in the loss* on on-policy samples (001, "the gradients can be biased"):
    E_a[grad k2] = E_a[(log pi - log pi_ref) grad log pi] = grad KL(pi || pi_ref)(s) and
    E_a[grad k3] = E_a[(1 - pi_ref / pi) grad log pi] = -sum_a pi_ref(a) grad log pi(a)
    = grad KL(pi_ref || pi)(s), per visited state; k1 gives E_a[grad log pi] = 0. The true
    grad KL(pi || pi_ref) of the sequence also moves d(s) (a token changes which states come
    next), which no per-token loss term sees. Returns [n_prefixes, V] float64.
    """
    if direction not in ("reverse", "forward"):
        raise ValueError(f"direction must be 'reverse' or 'forward', got {direction!r}")
    pol, t = problem.policy, problem.table
    with torch.no_grad():
        p = sequence_probabilities(problem).unsqueeze(1).expand_as(t.mask)
        ids = pol.prefix_ids(t.prompt_ids, t.tokens)
        on = t.mask > 0
        visit = torch.zeros(pol.n_prefixes, dtype=torch.float64).index_add_(0, ids[on], p[on])
    theta = problem.theta.detach().clone().requires_grad_(True)
    log_pi = torch.log_softmax(theta, -1)
    log_ref = torch.log_softmax(problem.ref_theta, -1)
    if direction == "reverse":
        div = (log_pi.exp() * (log_pi - log_ref)).sum(-1)
    else:
        div = (log_ref.exp() * (log_ref - log_pi)).sum(-1)
    (g,) = torch.autograd.grad((visit * div).sum(), theta)
    return g


def exact_value_function(
    policy: TabularPolicy, theta: Tensor, token_rewards: Tensor
) -> Tensor:
    """Exact state values V(s) = E_pi[ sum_{t' >= t} r_t' | s_t = s ] for every prefix s.

    policy, theta [n_prefixes, V]: the policy pi; token_rewards: [N, H], the per-token rewards
    r_t of every row of ``policy.enumerate()`` (a fixed function of the sequence). With the
    joint weights w_n = (1/P) pi(y_n|x_n) and reward-to-go G_t(n) = sum_{t'>=t} r_t'(n):

        V(s) = sum_n w_n G_t(n) [prefix_t(n) = s] / sum_n w_n [prefix_t(n) = s]

    which is the conditional expectation given the prefix (the reward-to-go of 000, "the
    advantage function"). Returns [n_prefixes] float64; unreachable prefixes get 0. The value
    after the last token is 0 (terminal).
    """
    table = policy.enumerate()
    if token_rewards.shape != table.tokens.shape:
        raise ValueError(
            f"token_rewards must be [{table.tokens.shape[0]}, {policy.horizon}] (one row per "
            f"enumerated sequence), got {tuple(token_rewards.shape)}"
        )
    with torch.no_grad():
        logp = policy.sequence_logprobs(theta, table.prompt_ids, table.tokens, table.mask)
        w = (logp.exp() / policy.n_prompts).unsqueeze(1).expand_as(table.mask) * table.mask
        r = token_rewards.to(torch.float64) * table.mask
        rtg = r.flip(1).cumsum(1).flip(1)
        ids = policy.prefix_ids(table.prompt_ids, table.tokens)
        num = torch.zeros(policy.n_prefixes, dtype=torch.float64)
        den = torch.zeros(policy.n_prefixes, dtype=torch.float64)
        num.index_add_(0, ids.reshape(-1), (w * rtg).reshape(-1))
        den.index_add_(0, ids.reshape(-1), w.reshape(-1))
        return torch.where(den > 0, num / den.clamp(min=1e-300), torch.zeros_like(num))
