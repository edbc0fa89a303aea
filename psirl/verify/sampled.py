"""Sampled policy gradients of the online loop's knobs, against the exact gradient.

For one setting of the knobs (an ``OnlineKnobs`` from ``psirl.algorithms.resolve_preset``, with
the KL placement / estimator / coefficient of the harness) this module runs the *real* psirl
pipeline -- ``core.kl.kl_in_reward``, ``core.advantages.ADVANTAGE_ESTIMATORS``,
``core.aggregate.step_normaliser``, ``core.objective.policy_loss`` -- on batches sampled from a
TabularPolicy, backpropagates to theta, and compares the average with ``exact.py``.

The gradient checked is the on-policy, single-update one: old_logp = logp.detach(), so every
importance ratio equals 1 with the gradient of log pi, and no clip rule is active. At that point
every preset's step is  grad(-L) = sum_{i,t} w_{i,t} A_{i,t} grad log pi(y_{i,t}|s_{i,t})  (plus
the KL-in-loss term), i.e. the policy-gradient form of 002 ("one equation with two levers").

Batch layout (mirrors the online step): one batch = P prompts x G samples (B = P * G rows), the
G samples of a prompt form a group; M independent batches are drawn at once and stacked along
the rows, so row r = m * B + x * G + g. Group ids are unique per (batch, prompt).

Vectorisation. All M batches go through ONE ``policy_loss`` call: theta is copied M times
(theta_rep [M, n_prefixes, V], a leaf), batch m's log-probs read copy m, and backward of the
summed loss gives every batch's own gradient in theta_rep.grad[m]. ``policy_loss`` is called
with normaliser 1, so the summed loss is sum_m nu_m * L_m, where nu_m =
step_normaliser(mask of batch m) is the normaliser the online loop would use for batch m alone;
dividing theta_rep.grad[m] by nu_m gives exactly grad(-L_m). Advantage estimators with a
batch-level statistic (batch_mean, batch_whiten) are called once per batch; group-level ones
once for all rows (their statistics never cross group ids).

Undoing the aggregation (derivation). With terminal/sequence advantages, the per-batch step is

    token_mean:          grad(-L_m) = (1/N_tok)  sum_i A_i grad log pi(y_i)      N_tok = sum m
    seq_mean_token_sum:  grad(-L_m) = (1/B)      sum_i A_i grad log pi(y_i)
    constant (C):        grad(-L_m) = (1/(B C))  sum_i A_i grad log pi(y_i)
    seq_mean_token_mean: grad(-L_m) = (1/B)      sum_i (1/|y_i|) A_i grad log pi(y_i)

while the policy-gradient estimator of 000/002 is (1/B) sum_i A_i grad log pi(y_i). So the
harness multiplies grad(-L_m) by rho_m = nu_m / B (token_mean: N_tok/B; token_sum: 1;
constant: C), and by H more for seq_mean_token_mean. With fixed-length sequences (no EOS) this
recovers the estimator exactly; with variable lengths seq_mean_token_mean keeps a 1/|y_i|
weight that no constant undoes (the length bias of 002, "DAPO"), so its scale is treated as
unknown. The KL-in-loss term is aggregated the same way and rescaled by the same rho_m.

Known scale of the baseline (derivation). For a group of G i.i.d. samples,
E[(R_i - (1/G) sum_j R_j) grad log pi_i] = (1 - 1/G) grad J, because E[R_j grad log pi_i] =
E[R_j] E[grad log pi_i] = 0 for j != i (000, zero-gradient property) while the j = i term keeps a
1/G share of R_i. Hence E[g] = c grad J with c = 1 for "none", "leave_one_out" and "gae" (with a
correct critic), c = 1 - 1/G for "group_mean" and c = 1 - 1/B for "batch_mean". The std-scaled
estimators ("group_mean_std", "batch_whiten") have no such constant: their scale is fitted by
least squares and only the *direction* is tested (see ``compare_to_exact``). The baseline
constant multiplies only what flows through the advantages: task reward and KL-in-reward, not
the KL-in-loss term.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from psirl.core.advantages import (
    ADVANTAGE_ESTIMATORS,
    ESTIMATORS,
    estimator_names,
)
from psirl.core.aggregate import step_normaliser
from psirl.core.objective import policy_loss
from psirl.core.score import REWARD_PLACEMENTS, reward_tokens, score_rollouts
from psirl.verify.exact import (
    TabularProblem,
    exact_gradient,
    exact_kl_gradient,
    exact_value_function,
)
from psirl.verify.stats import hotelling_test, orthogonal_complement, reduce

__all__ = [
    "BATCH_LEVEL_ESTIMATORS",
    "SampledBatches",
    "BatchGradients",
    "GradientStats",
    "sample_batches",
    "harness_knobs",
    "baseline_scale",
    "greedy_rewards",
    "aggregation_rescale",
    "build_token_rewards",
    "exact_critic",
    "per_batch_gradients",
    "ExactTargets",
    "exact_targets",
    "compare_to_exact",
    "estimate",
]

BATCH_LEVEL_ESTIMATORS = frozenset(estimator_names(global_statistics=True))
"""Estimators with a statistic of the whole batch (called once per batch): read from
core.advantages.ESTIMATORS (scope "batch", or a batch-wide factor such as GPG's alpha)."""



# ---------------------------------------------------------------------------------- sampling
@dataclass(frozen=True)
class SampledBatches:
    """M independent batches of P prompts x G samples from pi_theta, stacked along rows.

    prompt_ids [M*B] long; tokens [M*B, H] long; mask [M*B, H] float64; rewards [M*B] float64
    (R(x, y)); group_ids [M*B] long (= m * P + x); batch_ids [M*B] long (= m);
    n_batches M; group_size G; batch_size B = P * G.
    """

    prompt_ids: Tensor
    tokens: Tensor
    mask: Tensor
    rewards: Tensor
    group_ids: Tensor
    batch_ids: Tensor
    n_batches: int
    group_size: int
    batch_size: int

    @property
    def fixed_length(self) -> bool:
        """True when every sequence has the full horizon H (mask all ones)."""
        return bool((self.mask > 0).all())


def sample_batches(
    problem: TabularProblem, n_batches: int, group_size: int, seed: int
) -> SampledBatches:
    """Draw M = n_batches batches, each with G = group_size samples of every prompt.

    y ~ pi_theta(. | x) by ancestral sampling (TabularPolicy.sample) with a torch.Generator
    seeded by ``seed``; the same seed gives the same batches. Shapes: see SampledBatches.
    """
    if n_batches < 2 or group_size < 1:
        raise ValueError(
            f"sample_batches: n_batches must be >= 2 and group_size >= 1, got {n_batches}, "
            f"{group_size}"
        )
    pol = problem.policy
    p = pol.n_prompts
    b = p * group_size
    gen = torch.Generator().manual_seed(seed)
    per_batch_prompts = torch.arange(p).repeat_interleave(group_size)  # [B]
    prompt_ids = per_batch_prompts.repeat(n_batches)
    tokens, mask = pol.sample(problem.theta, prompt_ids, gen)
    batch_ids = torch.arange(n_batches).repeat_interleave(b)
    return SampledBatches(
        prompt_ids=prompt_ids,
        tokens=tokens,
        mask=mask,
        rewards=problem.reward_of(prompt_ids, tokens),
        group_ids=batch_ids * p + prompt_ids,
        batch_ids=batch_ids,
        n_batches=n_batches,
        group_size=group_size,
        batch_size=b,
    )


# ---------------------------------------------------------------------------------- knobs
def harness_knobs(
    knobs: Any,
    *,
    kl_placement: str = "none",
    kl_estimator: str = "k1",
    kl_coef: float = 0.0,
    group_size: int | None = None,
) -> Any:
    """A copy of an OnlineKnobs with the harness's KL setting (and group size).

    Sets loss.kl_placement / kl_estimator / kl_coef (kl_coef = 0 when placement is "none"),
    loss.entropy_coef = 0 (an entropy bonus changes the objective; none of the presets of
    002 uses one) and, if given, sampling.group_size. Uses dataclasses.replace, so the
    dataclasses' own validation runs again.
    """
    coef = 0.0 if kl_placement == "none" else float(kl_coef)
    loss = replace(
        knobs.loss,
        kl_placement=kl_placement,
        kl_estimator=kl_estimator,
        kl_coef=coef,
        entropy_coef=0.0,
    )
    out = replace(knobs, loss=loss)
    if group_size is not None:
        out = replace(out, sampling=replace(out.sampling, group_size=group_size))
    return out


def baseline_scale(
    estimator: str, group_size: int, batch_size: int, whiten: str = "none"
) -> float | None:
    """Known constant c with E[g] = c * grad J for an advantage estimator (module docstring).

    Read from core.advantages.ESTIMATORS[estimator].scale ("none", "leave_one_out", "gae",
    "remax": 1; "group_mean": 1 - 1/G; "batch_mean": 1 - 1/B); None for estimators without a
    known constant (std-scaled ones, GPG, OPO, pass@k), for unknown names, and whenever the
    advantages are whitened afterwards (a random scale).
    """
    spec = ESTIMATORS.get(estimator)
    if spec is None or spec.scale is None or whiten != "none":
        return None
    return float(spec.scale(group_size, batch_size))


def greedy_rewards(problem: TabularProblem, prompt_ids: Tensor) -> Tensor:
    """R(x, y_greedy(x)) for each row's prompt: ReMax's baseline on the tabular policy.

    y_greedy takes argmax_a theta[prefix, a] at every step (EOS ends it; the rest is padding).
    prompt_ids: [N] long. Returns [N] float64.
    """
    pol = problem.policy
    prompts = torch.arange(pol.n_prompts)
    tokens = torch.zeros(pol.n_prompts, pol.horizon, dtype=torch.long)
    ended = torch.zeros(pol.n_prompts, dtype=torch.bool)
    for t in range(pol.horizon):
        best = problem.theta[pol.prefix_ids(prompts, tokens)[:, t]].argmax(dim=-1)
        if pol.eos_token is not None:
            best = torch.where(ended, torch.full_like(best, pol.eos_token), best)
            ended = ended | (best == pol.eos_token)
        tokens[:, t] = best
    return problem.reward_of(prompts, tokens)[prompt_ids]


def aggregation_rescale(mode: str, normaliser: float, batch_size: int, horizon: int) -> float:
    """rho with rho * grad(-L_m) = (1/B) sum_i A_i grad log pi(y_i) (fixed length; see module).

    rho = normaliser / B, times H for "seq_mean_token_mean".
    """
    rho = normaliser / batch_size
    return rho * horizon if mode == "seq_mean_token_mean" else rho


# ---------------------------------------------------------------------------------- rewards
def build_token_rewards(
    rewards: Tensor, mask: Tensor, logp: Tensor, ref_logp: Tensor, loss_knobs: Any
) -> Tensor:
    """Per-token rewards of the online step: R on the last token, minus a detached KL if in reward.

        r_{i,t} = R_i [t = last_i]                                   (placement none / loss)
        r_{i,t} = R_i [t = last_i] - beta * k_{i,t}                  (reward_token)
        r_{i,t} = R_i [t = last_i] - beta * [t = last_i] sum_s k_{i,s}   (reward_sequence)

    with k the estimator loss_knobs.kl_estimator (core.kl.kl_in_reward; detached).
    rewards [B]; mask, logp, ref_logp [B, H]. Returns [B, H] float64.
    Reference: ../shared/reference/001 (KL in the reward), 000 (REINFORCE++ token-level KL).
    """
    return reward_tokens(rewards.to(torch.float64), mask, loss_knobs, behaviour_logp=logp,
                         ref_logp=ref_logp)


def exact_critic(problem: TabularProblem, loss_knobs: Any) -> Tensor:
    """Exact V(s) [n_prefixes] of the per-token rewards ``build_token_rewards`` produces.

    V(s) = E[ sum_{t' >= t} r_t' | s_t = s ] at problem.theta, by enumeration
    (exact.exact_value_function), so it includes the KL-in-reward terms of the placement.
    """
    pol, t = problem.policy, problem.table
    with torch.no_grad():
        logp = pol.token_logprobs(problem.theta, t.prompt_ids, t.tokens, t.mask)
        ref = pol.token_logprobs(problem.ref_theta, t.prompt_ids, t.tokens, t.mask)
        token_rewards = build_token_rewards(problem.sequence_rewards, t.mask, logp, ref, loss_knobs)
    return exact_value_function(pol, problem.theta, token_rewards)


# ---------------------------------------------------------------------------------- gradients
@dataclass(frozen=True)
class BatchGradients:
    """Per-batch gradients, rescaled to estimator units (module docstring, "Undoing ...").

    total: [M, n_prefixes, V] float64, rho_m * grad_theta(-L_m) for each batch m;
    kl_loss_part: [M, n_prefixes, V] or None, the part of ``total`` that comes from the
    KL-in-loss term (None unless kl_placement == "loss"); rescale: [M] the rho_m applied;
    normaliser: [M] the step normalisers nu_m of core.aggregate.step_normaliser.
    """

    total: Tensor
    kl_loss_part: Tensor | None
    rescale: Tensor
    normaliser: Tensor


def _advantages(
    fn: Callable[..., tuple[Tensor, Tensor]],
    batch_level: bool,
    batches: SampledBatches,
    logp: Tensor,
    ref_logp: Tensor,
    values: Tensor | None,
    knobs: Any,
    extra: dict[str, Tensor],
) -> Tensor:
    """Advantages of every batch by the online loop's own score stage (core.score.score_rollouts:
    per-token rewards with the KL, the estimator, then whitening), one call per batch m where a
    batch statistic is involved. extra: the estimator's further inputs, [M*B] per row."""
    rewards = batches.rewards.to(torch.float64)

    def score(rows: slice) -> Tensor:
        v = None if values is None else values[rows]
        return score_rollouts(rewards[rows], batches.mask[rows], batches.group_ids[rows],
                              knobs.advantage, knobs.loss, behaviour_logp=logp[rows],
                              ref_logp=ref_logp[rows], values=v, advantage_fn=fn,
                              extra_inputs={k: x[rows] for k, x in extra.items()}).advantages

    if not batch_level and getattr(knobs.advantage, "whiten", "none") == "none":
        return score(slice(None))
    b = batches.batch_size
    out = torch.empty_like(batches.mask, dtype=torch.float64)
    for m in range(batches.n_batches):
        rows = slice(m * b, (m + 1) * b)
        out[rows] = score(rows)
    return out


def per_batch_gradients(
    problem: TabularProblem,
    batches: SampledBatches,
    knobs: Any,
    *,
    critic: Tensor | None = None,
    advantage_fn: Callable[..., tuple[Tensor, Tensor]] | None = None,
    batch_level: bool | None = None,
) -> BatchGradients:
    """Run the online step's loss on every batch and return each batch's gradient of -L.

    problem: the tabular problem (theta, ref_theta, rewards); batches: from sample_batches;
    knobs: OnlineKnobs (advantage.estimator/gamma/lam, loss = PolicyLossKnobs);
    critic: [n_prefixes] state values V(s) fed to the estimator as values[i,t] = V(s_{i,t})
    (required for "gae"; use ``exact_critic``); advantage_fn: replaces the knobs' estimator
    (same signature as core.advantages); batch_level: call it once per batch (default: True
    for BATCH_LEVEL_ESTIMATORS).

    Steps, for all rows at once: logp = log pi_theta_rep[m](y_t|s_t) [M*B, H];
    token_rewards = build_token_rewards(...); A = estimator(token_rewards, mask, group_ids,
    values); L = policy_loss(logp, logp.detach(), A, mask, knobs.loss, normaliser=1,
    ref_logp); grad_m = d(-L)/d theta_rep[m] / nu_m * rho_m. Returns BatchGradients.
    """
    pol = problem.policy
    m_batches, b = batches.n_batches, batches.batch_size
    loss_knobs = knobs.loss
    estimator = knobs.advantage.estimator
    if advantage_fn is None:
        try:
            advantage_fn = ADVANTAGE_ESTIMATORS[estimator]
        except KeyError:
            raise ValueError(
                f"knobs.advantage.estimator {estimator!r} is not in "
                f"core.advantages.ADVANTAGE_ESTIMATORS {tuple(ADVANTAGE_ESTIMATORS)}"
            ) from None
        if batch_level is None:
            batch_level = estimator in BATCH_LEVEL_ESTIMATORS
    batch_level = bool(batch_level)

    mask = batches.mask
    theta_rep = problem.theta.detach().unsqueeze(0).repeat(m_batches, 1, 1).requires_grad_(True)
    logp = pol.token_logprobs(theta_rep, batches.prompt_ids, batches.tokens, mask, batches.batch_ids)
    with torch.no_grad():
        ref_logp = pol.token_logprobs(problem.ref_theta, batches.prompt_ids, batches.tokens, mask)

    values = None
    if critic is not None:
        values = critic[pol.prefix_ids(batches.prompt_ids, batches.tokens)] * mask
    elif estimator == "gae" and advantage_fn is ADVANTAGE_ESTIMATORS.get("gae"):
        raise ValueError("estimator 'gae' needs a critic [n_prefixes] (see exact_critic)")
    extra = {}
    spec = ESTIMATORS.get(estimator)
    if spec is not None and "baseline_rewards" in spec.inputs:
        extra["baseline_rewards"] = greedy_rewards(problem, batches.prompt_ids)
    adv = _advantages(advantage_fn, batch_level, batches, logp, ref_logp, values, knobs, extra)

    mode = loss_knobs.aggregation
    constant = getattr(loss_knobs, "constant_normaliser", None)
    nu = torch.tensor(
        [
            step_normaliser(mask[m * b : (m + 1) * b], mode, constant)
            for m in range(m_batches)
        ],
        dtype=torch.float64,
    )
    rho = torch.tensor(
        [aggregation_rescale(mode, float(n), b, pol.horizon) for n in nu], dtype=torch.float64
    )
    per_batch = (rho / nu).view(-1, 1, 1)

    def grads_of(advantages: Tensor, keep_graph: bool) -> Tensor:
        loss, _ = policy_loss(
            logp, logp.detach(), advantages, mask, loss_knobs, 1.0, ref_logp=ref_logp
        )
        (g,) = torch.autograd.grad(-loss, theta_rep, retain_graph=keep_graph)
        return g * per_batch

    kl_in_loss = loss_knobs.kl_placement == "loss" and loss_knobs.kl_coef != 0.0
    total = grads_of(adv, keep_graph=kl_in_loss)
    kl_part = grads_of(torch.zeros_like(adv), keep_graph=False) if kl_in_loss else None
    return BatchGradients(total=total, kl_loss_part=kl_part, rescale=rho, normaliser=nu)


# ---------------------------------------------------------------------------------- targets
@dataclass(frozen=True)
class ExactTargets:
    """Exact gradients that a setting's estimator is compared with ([n_prefixes, V] each).

    full: grad J with J = E[R] - beta KL (beta = 0 when placement is "none");
    advantaged: grad of what flows through the advantages, E[R] - beta_r KL with
    beta_r = beta for KL in the reward, else 0; kl_loss: -beta grad KL when the KL is in the
    loss, else 0. Unbiased estimator: E[g] = c * advantaged + kl_loss, and then
    c * advantaged + kl_loss = full when c = 1.
    """

    full: Tensor
    advantaged: Tensor
    kl_loss: Tensor


def exact_targets(problem: TabularProblem, loss_knobs: Any) -> ExactTargets:
    """ExactTargets for a PolicyLossKnobs' KL placement and coefficient (see ExactTargets)."""
    placement = loss_knobs.kl_placement
    beta = float(loss_knobs.kl_coef) if placement != "none" else 0.0
    reward_grad = exact_gradient(problem, kl_coef=0.0)
    kl_grad = exact_kl_gradient(problem)
    in_reward = placement in REWARD_PLACEMENTS
    return ExactTargets(
        full=reward_grad - beta * kl_grad,
        advantaged=reward_grad - (beta * kl_grad if in_reward else 0.0),
        kl_loss=-beta * kl_grad if placement == "loss" else torch.zeros_like(kl_grad),
    )


# ---------------------------------------------------------------------------------- statistics
@dataclass(frozen=True)
class GradientStats:
    """How a sampled gradient compares with its exact target.

    mean [n_prefixes, V]: (1/M) sum_m g_m (rescaled per-batch gradients);
    target [n_prefixes, V]: the hypothesised expectation c * advantaged + kl_loss;
    exact [n_prefixes, V]: grad J (ExactTargets.full);
    scale: c (known, or fitted when scale_known is False);
    cosine: cos(mean, exact);  relative_bias: ||mean - target|| / ||target||;
    var_per_sample: B * tr Cov(g_m) / c^2 -- the variance of ONE sample's contribution to an
    estimator normalised to estimate grad J (so presets with different advantage scales and
    batch sizes are comparable; Cov is the sample covariance over the M batches);
    snr_per_sample: ||target||^2 / var_per_sample (signal-to-noise of one sample);
    error_to_noise: ||gbar - target||^2 / (tr Cov(g_m) / M), the squared error of the mean
    in units of what sampling noise alone gives: E = 1 exactly when E[g] = target (known
    scale), >> 1 for a bias that the M batches resolve;
    t2, dof, p_value: Hotelling's T^2 test of E[g] = target -- in all dof = d coordinates when
    the scale is known; in the d - 1 coordinates orthogonal to `advantaged` (direction only)
    when it is fitted. Small p: the estimator is biased.
    extra: further scalars; ``estimate`` adds, for KL in the loss, the test of the KL part
    alone against -beta grad KL: p_kl_part, kl_part_relative_bias, kl_part_cosine.

    Note (tabular, fixed horizon): the reduced gradient has dimension V^H - 1 per prompt, the
    same as the batch's histogram of sampled completions, and an estimator whose per-sample
    term depends on that sample only (no cross-sample baseline: "none", GAE with a fixed
    critic, k1/k3 in the reward) is an affine bijection of that histogram. Hotelling's T^2 is
    affine-invariant, so every such estimator that is unbiased gets the very same T^2 (the
    test of the histogram's mean); a biased one differs through its target.
    """

    mean: Tensor
    target: Tensor
    exact: Tensor
    scale: float
    scale_known: bool
    cosine: float
    relative_bias: float
    var_per_sample: float
    snr_per_sample: float
    error_to_noise: float
    t2: float
    dof: int
    p_value: float
    n_batches: int
    batch_size: int
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def p_min(self) -> float:
        """Smallest p of the tests run (the full gradient, and the KL part when present)."""
        return min(self.p_value, self.extra.get("p_kl_part", 1.0))

    def agrees(self, alpha: float) -> bool:
        """True when no test rejects (E[g] = target; E[KL part] = -beta grad KL) at alpha."""
        return self.p_min >= alpha

    def summary(self) -> dict[str, Any]:
        """JSON-friendly scalars (no tensors)."""
        return {
            "scale": self.scale,
            "scale_known": self.scale_known,
            "cosine": self.cosine,
            "relative_bias": self.relative_bias,
            "var_per_sample": self.var_per_sample,
            "snr_per_sample": self.snr_per_sample,
            "error_to_noise": self.error_to_noise,
            "t2": self.t2,
            "dof": self.dof,
            "p_value": self.p_value,
            "p_min": self.p_min,
            "n_batches": self.n_batches,
            "batch_size": self.batch_size,
            **self.extra,
        }


def _cos(a: Tensor, b: Tensor) -> float:
    na, nb = float(a.norm()), float(b.norm())
    return float((a * b).sum()) / (na * nb) if na > 0 and nb > 0 else math.nan


def compare_to_exact(
    per_batch: Tensor,
    reachable: Tensor,
    batch_size: int,
    *,
    advantaged: Tensor,
    kl_loss: Tensor | None = None,
    exact: Tensor | None = None,
    scale: float | None = 1.0,
) -> GradientStats:
    """Test H0: E[g] = c * advantaged + kl_loss on M per-batch gradients.

    per_batch: [M, n_prefixes, V]; reachable: [n_prefixes] bool; batch_size: B;
    advantaged, kl_loss, exact: [n_prefixes, V] (kl_loss defaults to 0, exact to the target);
    scale: the known c, or None to fit c = <gbar - kl_loss, u> / <u, u> (u = advantaged) and
    test only the component of g - kl_loss orthogonal to u (d - 1 coordinates).
    Hotelling's test, shapes and definitions: see GradientStats and verify.stats.
    """
    if kl_loss is None:
        kl_loss = torch.zeros_like(advantaged)
    g = reduce(per_batch, reachable)  # [M, d]
    u = reduce(advantaged, reachable)
    k = reduce(kl_loss, reachable)
    gbar = g.mean(0)
    scale_known = scale is not None
    if scale is None:
        c = float(((gbar - k) * u).sum() / (u * u).sum())
        basis = orthogonal_complement(u)  # [d, d-1]
        t2, dof, p = hotelling_test((g - k) @ basis, torch.zeros(basis.shape[1], dtype=g.dtype))
    else:
        c = float(scale)
        t2, dof, p = hotelling_test(g, c * u + k)
    target = c * advantaged + kl_loss
    mean = per_batch.mean(0)
    centred = g - gbar
    trace_cov = float((centred * centred).sum()) / (g.shape[0] - 1)
    var = batch_size * trace_cov / (c * c)
    err = gbar - (c * u + k)
    tnorm = float(target.norm())
    return GradientStats(
        mean=mean,
        target=target,
        exact=target if exact is None else exact,
        scale=c,
        scale_known=scale_known,
        cosine=_cos(mean, target if exact is None else exact),
        relative_bias=float((mean - target).norm()) / tnorm if tnorm > 0 else math.inf,
        var_per_sample=var,
        snr_per_sample=tnorm**2 / var if var > 0 else math.inf,
        error_to_noise=float((err * err).sum()) * g.shape[0] / trace_cov
        if trace_cov > 0
        else math.inf,
        t2=t2,
        dof=dof,
        p_value=p,
        n_batches=g.shape[0],
        batch_size=batch_size,
    )


def estimate(
    problem: TabularProblem,
    batches: SampledBatches,
    knobs: Any,
    *,
    critic: Tensor | None | str = "exact",
    advantage_fn: Callable[..., tuple[Tensor, Tensor]] | None = None,
    scale: float | None | str = "known",
) -> tuple[GradientStats, BatchGradients]:
    """Per-batch gradients of one knob setting and their comparison with the exact gradient.

    critic: "exact" (exact_critic, used only by "gae"), None, or a [n_prefixes] table;
    scale: "known" (baseline_scale of the estimator; None for std-scaled ones and for
    seq_mean_token_mean with variable lengths), a float, or None (fit, direction-only test).
    When the KL is in the loss, the gradient splits exactly into the advantage part (the same
    as with no KL) and the KL part (BatchGradients.kl_loss_part); the KL part is also tested
    alone against -beta grad KL (stats.extra["p_kl_part"]): that test does not carry the
    reward's variance, so it sees a KL bias that the full-gradient test may be too noisy to see.
    Returns (GradientStats against exact_targets, the BatchGradients).
    """
    if isinstance(critic, str):
        if critic != "exact":
            raise ValueError(f"critic must be 'exact', None or a tensor, got {critic!r}")
        critic = exact_critic(problem, knobs.loss) if knobs.advantage.estimator == "gae" else None
    grads = per_batch_gradients(problem, batches, knobs, critic=critic, advantage_fn=advantage_fn)
    if isinstance(scale, str):
        if scale != "known":
            raise ValueError(f"scale must be 'known', a float or None, got {scale!r}")
        scale = baseline_scale(
            knobs.advantage.estimator,
            batches.group_size,
            batches.batch_size,
            getattr(knobs.advantage, "whiten", "none"),
        )
        if knobs.loss.aggregation == "seq_mean_token_mean" and not batches.fixed_length:
            scale = None
    targets = exact_targets(problem, knobs.loss)
    stats = compare_to_exact(
        grads.total,
        problem.reachable,
        batches.batch_size,
        advantaged=targets.advantaged,
        kl_loss=targets.kl_loss,
        exact=targets.full,
        scale=scale,
    )
    if grads.kl_loss_part is not None:
        kl_stats = compare_to_exact(
            grads.kl_loss_part,
            problem.reachable,
            batches.batch_size,
            advantaged=torch.zeros_like(targets.kl_loss),
            kl_loss=targets.kl_loss,
            scale=1.0,
        )
        stats.extra.update(
            p_kl_part=kl_stats.p_value,
            kl_part_relative_bias=kl_stats.relative_bias,
            kl_part_cosine=kl_stats.cosine,
        )
    return stats, grads

