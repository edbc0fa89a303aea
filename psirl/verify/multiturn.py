"""Exact enumeration over multi-turn episodes: the online loss on episodes is the episode gradient.

An episode of the tabular setting is

    prompt x | model turn 1 (H_1 tokens) | env tokens e_1 | model turn 2 (H_2 tokens) | ...

where the environment's tokens are drawn from ``env(x, history) -> [(q, tokens), ...]`` (one
outcome: deterministic; several: stochastic, of different lengths). Every position of the
episode -- model AND environment token -- has a state (prompt, tokens so far) with its own row of
logits theta[state] (V tokens, shared by model and environment, as in a language model). The
model's policy acts only at model positions:

    p_theta(episode | x) = prod_{model t} pi_theta(a_t | s_t) * prod_k q(e_k | x, history_k)

    J(theta) = (1/P) sum_x sum_episodes p_theta(episode | x)
               [ sum_k r_k(episode) - beta * sum_{model t} (log pi_theta - log pi_ref)(a_t | s_t) ]

(r_k: the reward of model turn k; the environment's probabilities cancel in the KL). J and its
gradient are computed by summing over every episode in float64, no sampling.

The sampled side runs the online step on batches laid out as ``run_episodes`` lays them out
(psirl/rollout/episode.py): completion = model and environment tokens, loss mask 1 on model tokens
only, per-turn rewards on each turn's last model token (+ KL in the reward if placed there), the
advantage estimators of core/advantages.py, ``core.aggregate.step_normaliser`` and
``core.objective.policy_loss``. Log-probabilities are computed at EVERY attended position
(environment tokens included, with gradient, as ``token_logprobs`` does on a real model), so only
the loss mask keeps environment tokens out: a leak shows as gradient on states where only the
environment acts (whose exact gradient is 0) and as a bias in the model states' gradient.
``compare_to_exact`` (sampled.py) tests E[g] = c * grad J by Hotelling's T^2.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from psirl.core.advantages import ADVANTAGE_ESTIMATORS
from psirl.core.aggregate import step_normaliser
from psirl.core.kl import kl_in_reward
from psirl.core.objective import policy_loss
from psirl.verify.sampled import (
    BATCH_LEVEL_ESTIMATORS,
    GradientStats,
    aggregation_rescale,
    baseline_scale,
    compare_to_exact,
)
from psirl.verify.stats import bonferroni_alpha

__all__ = [
    "EpisodeTable",
    "EpisodeProblem",
    "deterministic_env",
    "stochastic_env",
    "make_episode_problem",
    "exact_episode_objective",
    "exact_episode_gradient",
    "sample_episodes",
    "EpisodeSamples",
    "episode_batch_gradients",
    "estimate_episodes",
    "multiturn_check",
]

EnvFn = Callable[[int, tuple[int, ...]], list[tuple[float, tuple[int, ...]]]]
STD_SCALED = frozenset({"group_mean_std", "batch_whiten"})


def deterministic_env(vocab_size: int) -> EnvFn:
    """One outcome, whose LENGTH depends on the model's turn: 1 token if the turn's last two
    tokens differ, else 2 (so episodes of one prompt have different lengths)."""

    def env(prompt: int, history: tuple[int, ...]) -> list[tuple[float, tuple[int, ...]]]:
        a, b = history[-2], history[-1]
        if a != b:
            return [(1.0, ((a + b + prompt) % vocab_size,))]
        return [(1.0, ((a + 1) % vocab_size, (b + prompt) % vocab_size))]

    return env


def stochastic_env(vocab_size: int) -> EnvFn:
    """Two outcomes with history-dependent probabilities and different lengths (prefix-free):
    (s,) with q = 0.2 + 0.6 * [sum(history) even], and (s+1, s) with 1 - q, s = sum mod V."""

    def env(prompt: int, history: tuple[int, ...]) -> list[tuple[float, tuple[int, ...]]]:
        s = (sum(history) + prompt) % vocab_size
        q = 0.2 + 0.6 * float(sum(history) % 2 == 0)
        return [(q, (s,)), (1.0 - q, ((s + 1) % vocab_size, s))]

    return env


@dataclass(frozen=True)
class EpisodeTable:
    """Every episode of every prompt, in a fixed order (N rows, T columns after the prompt).

    prompt_ids [N] long; tokens [N, T] long (0 on padding); model_mask [N, T] float64 (1 on
    model tokens); attention [N, T] float64 (1 on model and environment tokens); states [N, T]
    long (the state whose logits predict each token; 0 on padding); env_logprob [N] float64
    (sum of log q of the environment's outcomes); turn_ends [N, K] long (column of each model
    turn's last token); model_states / env_states [n_states] bool (states where the model acts /
    where only environment tokens follow; disjoint).
    """

    prompt_ids: Tensor
    tokens: Tensor
    model_mask: Tensor
    attention: Tensor
    states: Tensor
    env_logprob: Tensor
    turn_ends: Tensor
    model_states: Tensor
    env_states: Tensor

    @property
    def n_states(self) -> int:
        return self.model_states.shape[0]


def enumerate_episodes(
    vocab_size: int, turn_lengths: tuple[int, ...], n_prompts: int, env: EnvFn
) -> EpisodeTable:
    """Build the EpisodeTable (see it). ValueError if an environment's outcomes are not
    prefix-free or their probabilities do not sum to 1 (the state of a position would then not
    say whether the model or the environment moves)."""
    rows: list[tuple[int, tuple[int, ...], tuple[bool, ...], float, tuple[int, ...]]] = []

    def extend(x, hist, is_model, env_lp, ends, turn):
        for seq in itertools.product(range(vocab_size), repeat=turn_lengths[turn]):
            h, m = hist + seq, is_model + (True,) * len(seq)
            e = (*ends, len(h) - 1)
            if turn == len(turn_lengths) - 1:
                rows.append((x, h, m, env_lp, e))
                continue
            outcomes = env(x, h)
            total = sum(q for q, _ in outcomes)
            if abs(total - 1.0) > 1e-9 or any(q <= 0 for q, _ in outcomes):
                raise ValueError(f"env outcomes after {h}: probabilities {outcomes} must be > 0 "
                                 f"and sum to 1")
            seqs = [o for _, o in outcomes]
            for a, b in itertools.permutations(seqs, 2):
                if not a or b[: len(a)] == a:
                    raise ValueError(f"env outcomes after {h} are not prefix-free: {seqs}")
            for q, obs in outcomes:
                extend(x, h + obs, m + (False,) * len(obs), env_lp + math.log(q), e, turn + 1)

    for x in range(n_prompts):
        extend(x, (), (), 0.0, (), 0)
    width = max(len(r[1]) for r in rows)
    n = len(rows)
    index: dict[tuple[int, tuple[int, ...]], int] = {}
    kind: dict[int, bool] = {}
    tokens = torch.zeros((n, width), dtype=torch.long)
    model_mask = torch.zeros((n, width), dtype=torch.float64)
    attention = torch.zeros((n, width), dtype=torch.float64)
    states = torch.zeros((n, width), dtype=torch.long)
    for i, (x, h, m, _, _) in enumerate(rows):
        for t in range(len(h)):
            sid = index.setdefault((x, h[:t]), len(index))
            if kind.setdefault(sid, m[t]) != m[t]:
                raise ValueError(f"state {(x, h[:t])} is both a model and an environment state")
            states[i, t] = sid
        tokens[i, : len(h)] = torch.tensor(h)
        model_mask[i, : len(h)] = torch.tensor(m, dtype=torch.float64)
        attention[i, : len(h)] = 1.0
    model_states = torch.tensor([kind[s] for s in range(len(index))], dtype=torch.bool)
    return EpisodeTable(
        prompt_ids=torch.tensor([r[0] for r in rows]),
        tokens=tokens,
        model_mask=model_mask,
        attention=attention,
        states=states,
        env_logprob=torch.tensor([r[3] for r in rows], dtype=torch.float64),
        turn_ends=torch.tensor([r[4] for r in rows]),
        model_states=model_states,
        env_states=~model_states,
    )


@dataclass(frozen=True)
class EpisodeProblem:
    """theta, ref_theta: [n_states, V] float64; turn_rewards: [N, K] float64, r_k of every
    episode's model turn k (the episode return is their sum); kl_coef: beta."""

    vocab_size: int
    turn_lengths: tuple[int, ...]
    n_prompts: int
    table: EpisodeTable
    theta: Tensor
    ref_theta: Tensor
    turn_rewards: Tensor
    kl_coef: float = 0.5
    name: str = ""
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def model_tokens(self) -> int:
        """Model tokens per episode (the same for every episode: fixed turn lengths)."""
        return sum(self.turn_lengths)

    def token_rewards(self, rows: Tensor) -> Tensor:
        """[len(rows), T] float64: r_k on the last token of model turn k of each row."""
        out = torch.zeros((len(rows), self.table.tokens.shape[1]), dtype=torch.float64)
        return out.scatter_add_(1, self.table.turn_ends[rows], self.turn_rewards[rows])


def make_episode_problem(
    env: str = "stochastic",
    *,
    seed: int = 0,
    vocab_size: int = 3,
    turn_lengths: tuple[int, ...] = (2, 1),
    n_prompts: int = 2,
    per_turn_rewards: bool = True,
    kl_coef: float = 0.5,
    theta_scale: float = 0.5,
) -> EpisodeProblem:
    """Two model turns with an environment between them ("deterministic" or "stochastic").

    Rewards, as in exact.make_problem, differ a lot between prompts (offsets 5 and 2) and are
    skewed within a prompt: final r_K = offset_x + spread_x * u, u ~ Exp(1) - 1 per episode;
    with ``per_turn_rewards`` the earlier turns get r_k = 0.5 * u_k (one value per
    (prompt, history up to that turn)). theta ~ theta_scale N(0, 1), theta_ref = theta + 0.7 N(0, 1).
    """
    makers = {"deterministic": deterministic_env, "stochastic": stochastic_env}
    if env not in makers:
        raise ValueError(f"env: {env!r}, expected one of {sorted(makers)}")
    table = enumerate_episodes(vocab_size, turn_lengths, n_prompts, makers[env](vocab_size))
    gen = torch.Generator().manual_seed(seed)
    n = table.prompt_ids.shape[0]
    offsets = torch.tensor([5.0, 2.0, 3.0, 4.0], dtype=torch.float64)[table.prompt_ids % 4]
    spreads = torch.tensor([1.0, 0.25, 0.5, 0.75], dtype=torch.float64)[table.prompt_ids % 4]
    u = torch.empty(n, dtype=torch.float64).exponential_(1.0, generator=gen) - 1.0
    rewards = torch.zeros((n, len(turn_lengths)), dtype=torch.float64)
    rewards[:, -1] = offsets + spreads * u
    if per_turn_rewards:
        for k in range(len(turn_lengths) - 1):
            # A function of what happened up to turn k only (prompt + history up to its end).
            keys: dict[tuple, float] = {}
            for i in range(n):
                end = int(table.turn_ends[i, k]) + 1
                key = (int(table.prompt_ids[i]), tuple(table.tokens[i, :end].tolist()))
                if key not in keys:
                    keys[key] = 0.5 * float(
                        torch.empty(1, dtype=torch.float64).exponential_(1.0, generator=gen) - 1.0
                    )
                rewards[i, k] = keys[key]
    theta = theta_scale * torch.randn(table.n_states, vocab_size, generator=gen, dtype=torch.float64)
    ref = theta + 0.7 * torch.randn(table.n_states, vocab_size, generator=gen, dtype=torch.float64)
    return EpisodeProblem(vocab_size, tuple(turn_lengths), n_prompts, table, theta, ref, rewards,
                          kl_coef, name=env)


# ------------------------------------------------------------------------------ exact side
def _token_logprobs(theta: Tensor, states: Tensor, tokens: Tensor, attention: Tensor,
                    copies: Tensor | None = None) -> Tensor:
    """log softmax(theta[state])[token] at every attended position (model AND environment
    tokens, like a language model's forward), 0 on padding. theta [S, V] or [M, S, V]."""
    log_pi = torch.log_softmax(theta, dim=-1)
    if theta.dim() == 3:
        log_pi = log_pi.reshape(-1, theta.shape[-1])
        states = states + copies.unsqueeze(1) * theta.shape[1]
    logp = log_pi[states, tokens]
    return torch.where(attention > 0, logp, torch.zeros((), dtype=logp.dtype))


def _episode_logprob(problem: EpisodeProblem, theta: Tensor) -> Tensor:
    """log pi_theta(model tokens of each episode): [N] (the environment's part is separate)."""
    t = problem.table
    return (_token_logprobs(theta, t.states, t.tokens, t.attention) * t.model_mask).sum(1)


def exact_episode_objective(
    problem: EpisodeProblem, theta: Tensor | None = None, kl_coef: float | None = None
) -> Tensor:
    """J(theta) of the module docstring: 0-d float64, differentiable in theta."""
    th = problem.theta if theta is None else theta
    beta = problem.kl_coef if kl_coef is None else kl_coef
    logp = _episode_logprob(problem, th)
    weight = torch.exp(logp + problem.table.env_logprob) / problem.n_prompts
    value = (weight * problem.turn_rewards.sum(1)).sum()
    if beta:
        ref = _episode_logprob(problem, problem.ref_theta)
        value = value - beta * (weight * (logp - ref)).sum()
    return value


def exact_episode_gradient(problem: EpisodeProblem, kl_coef: float | None = None) -> Tensor:
    """grad_theta J [n_states, V] by autograd of the finite sum."""
    theta = problem.theta.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad(exact_episode_objective(problem, theta, kl_coef), theta)
    return g


def exact_episode_critic(problem: EpisodeProblem, loss_knobs: Any) -> Tensor:
    """V(s) = E[reward-to-go at s | state s] for model states [n_states] (0 elsewhere), with
    the per-token rewards of the online step (turn rewards + KL in the reward if placed there).
    Environment tokens carry no reward, so the reward-to-go skips them."""
    t = problem.table
    with torch.no_grad():
        logp = _token_logprobs(problem.theta, t.states, t.tokens, t.attention)
        ref = _token_logprobs(problem.ref_theta, t.states, t.tokens, t.attention)
        rows = torch.arange(t.tokens.shape[0])
        r = _shaped_rewards(problem.token_rewards(rows), t.model_mask, logp, ref, loss_knobs)
        rtg = (r * t.model_mask).flip(1).cumsum(1).flip(1)
        w = torch.exp(_episode_logprob(problem, problem.theta) + t.env_logprob)
        w = w.unsqueeze(1) * t.model_mask
        num = torch.zeros(t.n_states, dtype=torch.float64).index_add_(0, t.states.reshape(-1),
                                                                      (w * rtg).reshape(-1))
        den = torch.zeros(t.n_states, dtype=torch.float64).index_add_(0, t.states.reshape(-1),
                                                                      w.reshape(-1))
    return torch.where(den > 0, num / den.clamp(min=1e-300), torch.zeros_like(num))


def _shaped_rewards(token_rewards, mask, logp, ref_logp, loss_knobs) -> Tensor:
    if loss_knobs.kl_placement.startswith("reward") and loss_knobs.kl_coef:
        return kl_in_reward(token_rewards, logp.detach(), ref_logp.detach(), mask,
                            coef=float(loss_knobs.kl_coef), estimator=loss_knobs.kl_estimator,
                            placement=loss_knobs.kl_placement)
    return token_rewards


# ------------------------------------------------------------------------------ sampled side
@dataclass(frozen=True)
class EpisodeSamples:
    """M batches of P prompts x G episodes: rows [M*B] index EpisodeTable rows; group_ids
    [M*B] (= m * P + x); batch_ids [M*B] (= m)."""

    rows: Tensor
    group_ids: Tensor
    batch_ids: Tensor
    n_batches: int
    group_size: int
    batch_size: int


def sample_episodes(problem: EpisodeProblem, n_batches: int, group_size: int,
                    seed: int) -> EpisodeSamples:
    """Episodes drawn from p_theta(episode | x) (model policy x environment), exactly: a
    categorical draw over the enumerated episodes of each prompt."""
    t = problem.table
    gen = torch.Generator().manual_seed(seed)
    p = problem.n_prompts
    prob = torch.exp(_episode_logprob(problem, problem.theta) + t.env_logprob)
    picks = torch.empty((n_batches, p, group_size), dtype=torch.long)
    for x in range(p):
        idx = (t.prompt_ids == x).nonzero().squeeze(1)
        draw = torch.multinomial(prob[idx], n_batches * group_size, replacement=True,
                                 generator=gen)
        picks[:, x, :] = idx[draw].view(n_batches, group_size)
    rows = picks.reshape(-1)
    batch_ids = torch.arange(n_batches).repeat_interleave(p * group_size)
    prompts = torch.arange(p).repeat_interleave(group_size).repeat(n_batches)
    return EpisodeSamples(rows, batch_ids * p + prompts, batch_ids, n_batches, group_size,
                          p * group_size)


def episode_batch_gradients(
    problem: EpisodeProblem, samples: EpisodeSamples, knobs: Any, *,
    critic: Tensor | None = None, loss_mask: str = "model",
) -> tuple[Tensor, Tensor]:
    """Each batch's rho_m * grad(-L_m) [M, n_states, V] from the online step's loss, and
    nu_m [M] (the step normalisers). ``loss_mask="attention"`` masks the loss with the
    attention instead (environment tokens counted: the bug this module exists to catch)."""
    t = problem.table
    rows = samples.rows
    m_batches, b = samples.n_batches, samples.batch_size
    tokens, states, attention = t.tokens[rows], t.states[rows], t.attention[rows]
    mask = t.model_mask[rows] if loss_mask == "model" else attention
    theta_rep = problem.theta.detach().unsqueeze(0).repeat(m_batches, 1, 1).requires_grad_(True)
    logp = _token_logprobs(theta_rep, states, tokens, attention, samples.batch_ids)
    with torch.no_grad():
        ref = _token_logprobs(problem.ref_theta, states, tokens, attention)
    loss_knobs = knobs.loss
    token_rewards = _shaped_rewards(problem.token_rewards(rows), mask, logp, ref, loss_knobs)
    values = critic[states] * mask if critic is not None else None
    estimator = knobs.advantage.estimator
    fn = ADVANTAGE_ESTIMATORS[estimator]
    kw = {"gamma": float(knobs.advantage.gamma), "lam": float(knobs.advantage.lam)}
    if estimator in BATCH_LEVEL_ESTIMATORS:
        adv = torch.empty_like(token_rewards)
        for m in range(m_batches):
            s = slice(m * b, (m + 1) * b)
            adv[s], _ = fn(token_rewards[s], mask[s], samples.group_ids[s],
                           None if values is None else values[s], **kw)
    else:
        adv, _ = fn(token_rewards, mask, samples.group_ids, values, **kw)
    mode = loss_knobs.aggregation
    constant = getattr(loss_knobs, "constant_normaliser", None)
    nu = torch.tensor([step_normaliser(mask[m * b:(m + 1) * b], mode, constant)
                       for m in range(m_batches)], dtype=torch.float64)
    rho = torch.tensor([aggregation_rescale(mode, float(v), b, problem.model_tokens) for v in nu],
                       dtype=torch.float64)
    loss, _ = policy_loss(logp, logp.detach(), adv, mask, loss_knobs, 1.0, ref_logp=ref)
    (g,) = torch.autograd.grad(-loss, theta_rep)
    return g * (rho / nu).view(-1, 1, 1), nu


def estimate_episodes(
    problem: EpisodeProblem, samples: EpisodeSamples, knobs: Any, *, loss_mask: str = "model"
) -> tuple[GradientStats, float]:
    """(GradientStats of the sampled gradient against the exact episode gradient, the largest
    |gradient| any batch put on an environment-only state). Unbiased estimators are tested with
    their known scale c (sampled.baseline_scale), std-scaled ones by direction (c fitted).
    KL placements: "none" or in the reward."""
    loss = knobs.loss
    if loss.kl_placement == "loss" and loss.kl_coef:
        raise ValueError("estimate_episodes: KL in the loss is not covered; use none or reward")
    critic = exact_episode_critic(problem, loss) if knobs.advantage.estimator == "gae" else None
    grads, _ = episode_batch_gradients(problem, samples, knobs, critic=critic,
                                       loss_mask=loss_mask)
    beta = float(loss.kl_coef) if loss.kl_placement != "none" else 0.0
    exact = exact_episode_gradient(problem, kl_coef=beta)
    scale = baseline_scale(knobs.advantage.estimator, samples.group_size, samples.batch_size)
    stats = compare_to_exact(grads, problem.table.model_states, samples.batch_size,
                             advantaged=exact, exact=exact, scale=scale)
    env_grad = float(grads[:, problem.table.env_states].abs().max())
    return stats, env_grad


def multiturn_check(seed: int = 0, n_batches: int = 4096, presets: tuple[str, ...] | None = None,
                    alpha_family: float = 0.01) -> dict[str, Any]:
    """Every preset (KL none, and k1 in the reward per token) on the deterministic and the
    stochastic environment. Expectation: estimators with a known scale are unbiased (Hotelling
    does not reject at alpha_family / n_tests), std-scaled ones are reported (biased in
    general, 002), and no batch puts any gradient on an environment-only state.
    Returns {"rows": [...], "ok": bool, "alpha": float, "seconds": float}."""
    from psirl import algorithms

    start = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        names = tuple(algorithms.PRESETS) if presets is None else presets
        settings = (("none", "k1"), ("reward_token", "k1"))
        alpha = bonferroni_alpha(alpha_family, 2 * len(names) * len(settings))
        out = []
        for env in ("deterministic", "stochastic"):
            problem = make_episode_problem(env)
            samples = sample_episodes(problem, n_batches, 4, seed)
            for name in names:
                preset = algorithms.resolve_preset(name)
                for placement, estimator in settings:
                    knobs = _harness(preset, placement, estimator, problem.kl_coef)
                    stats, env_grad = estimate_episodes(problem, samples, knobs)
                    known = knobs.advantage.estimator not in STD_SCALED
                    verdict = "unbiased" if stats.agrees(alpha) else "biased"
                    out.append({
                        "env": env, "preset": name,
                        "kl": "none" if placement == "none" else f"{estimator} {placement}",
                        "estimator": knobs.advantage.estimator,
                        "aggregation": knobs.loss.aggregation,
                        "expected": "unbiased" if known else "reported",
                        "verdict": verdict, "env_grad_max": env_grad,
                        "ok": env_grad == 0.0 and (verdict == "unbiased" or not known),
                        **stats.summary(),
                    })
    finally:
        torch.set_num_threads(threads)
    return {"rows": out, "alpha": alpha, "ok": all(r["ok"] for r in out),
            "seconds": time.perf_counter() - start}


def _harness(preset: Any, placement: str, estimator: str, beta: float) -> Any:
    """The preset with the harness's KL (beta in the reward, or none) and no entropy bonus."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loss = replace(preset.loss, kl_placement=placement, kl_estimator=estimator,
                       kl_coef=beta if placement != "none" else 0.0, entropy_coef=0.0)
        return replace(preset, loss=loss, sampling=replace(preset.sampling, group_size=4))


def format_multiturn_table(result: dict[str, Any]):
    """The multi-turn rows as a rich Table (for ``psirl gradcheck``)."""
    from rich.table import Table

    table = Table(title=f"Multi-turn episodes (env tokens between two model turns; "
                        f"alpha = {result['alpha']:.1e}; {result['seconds']:.1f} s)")
    for col in ("env", "preset", "KL", "advantage", "c", "cos", "rel. bias", "p",
                "env grad", "measured", "expected"):
        table.add_column(col)
    for r in result["rows"]:
        mark = "" if r["ok"] else "[bold red]"
        table.add_row(r["env"], r["preset"], r["kl"], r["estimator"],
                      f"{'' if r['scale_known'] else '~'}{r['scale']:.3f}", f"{r['cosine']:.3f}",
                      f"{r['relative_bias']:.3f}", f"{r['p_value']:.2g}",
                      f"{r['env_grad_max']:.0e}", f"{mark}{r['verdict']}", r["expected"])
    return table
