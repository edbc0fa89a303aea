"""Advantage estimators (the Psi_t of the policy gradient), all behind one signature.

    grad J = E[ sum_t Psi_t grad log pi(a_t | s_t) ]        (../shared/reference/002, "Lever 1")

Every estimator is

    fn(token_rewards [B,T] float, mask [B,T] 0/1, group_ids [B] long, values [B,T] | None = None,
       *, gamma=1.0, lam=1.0, eps=1e-6) -> (advantages [B,T], returns [B,T])

so the online loop never special-cases GAE or GRPO. ``token_rewards`` holds the sequence reward
on the last response token (see ``masking.place_on_last_token``) plus any per-token terms, such
as -beta * kl_t when the KL sits in the reward. ``returns`` is always the per-token
reward-to-go G_t (for GAE: A_t + V_t, the critic's target).

Group and batch baselines are computed from each sequence's *total* return G_0 (the return at
its first response token) and subtracted from the per-token reward-to-go G_t. With a terminal
reward only, G_t = R for every token and the advantage is the familiar per-sequence scalar; with
per-token KL in the reward, each token keeps its own future KL while the baseline stays a
function of the group only (so it is still a valid, action-independent baseline).

Outputs are detached (advantages carry no gradient), have the dtype of ``token_rewards`` and
are 0 where mask is 0.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from psirl.core.filters import zero_signal_groups
from psirl.core.masking import first_token_index

__all__ = [
    "reward_to_go",
    "sequence_returns",
    "no_baseline_advantages",
    "batch_mean_advantages",
    "batch_whiten_advantages",
    "group_mean_advantages",
    "group_mean_std_advantages",
    "leave_one_out_advantages",
    "gae_advantages",
    "remax_advantages",
    "gpg_advantages",
    "opo_advantages",
    "passk_advantages",
    "passk_std_advantages",
    "whiten_advantages",
    "WHITEN_MODES",
    "SCOPES",
    "EstimatorSpec",
    "ESTIMATORS",
    "ADVANTAGE_ESTIMATORS",
    "estimator_names",
    "AdvantageFn",
]

AdvantageFn = Callable[..., tuple[Tensor, Tensor]]


def _check(token_rewards: Tensor, mask: Tensor, group_ids: Tensor | None) -> Tensor:
    if token_rewards.dim() != 2:
        raise ValueError(f"token_rewards must be [B, T], got shape {tuple(token_rewards.shape)}")
    if mask.shape != token_rewards.shape:
        raise ValueError(
            f"mask shape {tuple(mask.shape)} != token_rewards shape {tuple(token_rewards.shape)}"
        )
    if group_ids is not None and group_ids.shape != token_rewards.shape[:1]:
        raise ValueError(
            f"group_ids must be [B]={token_rewards.shape[0]}, got shape {tuple(group_ids.shape)}"
        )
    if not token_rewards.is_floating_point():
        raise ValueError(f"token_rewards must be floating point, got {token_rewards.dtype}")
    return mask.to(token_rewards.dtype)


def reward_to_go(token_rewards: Tensor, mask: Tensor, gamma: float = 1.0) -> Tensor:
    """Discounted reward-to-go over response tokens.

    G_t = r_t + gamma * G_{t'}   (t' = the next response token after t; G = 0 past the end)
        = sum_{k >= t} gamma^{k-t} r_k   for a contiguous (right-padded) response;
    G_t = 0 where m_t = 0.

    token_rewards: [B, T] float; mask: [B, T] 0/1. Returns [B, T], detached, 0 on padding.
    Rewards at masked positions are ignored; masked positions inside a row (holes, e.g. tool
    output) are skipped, not counted as steps, so discounting runs over response tokens.
    Reference: ../shared/reference/000_7914f6881bc4a22c.txt (R_t = sum_{t' >= t} r_{t'}),
    ../shared/reference/002_51bc6b7a5ef2c181.txt (gamma = 1 for LMs).
    """
    m = _check(token_rewards, mask, None)
    r = torch.where(m > 0, token_rewards.detach(), torch.zeros_like(token_rewards))
    if gamma == 1.0:
        # Reverse cumulative sum: exact and vectorised for the common undiscounted case.
        rtg = r.flip(-1).cumsum(-1).flip(-1)
        return rtg * m
    out = torch.zeros_like(r)
    running = torch.zeros_like(r[:, 0])
    for t in range(r.shape[1] - 1, -1, -1):
        step = r[:, t] + gamma * running
        running = torch.where(m[:, t] > 0, step, running)
        out[:, t] = torch.where(m[:, t] > 0, step, torch.zeros_like(step))
    return out


def sequence_returns(returns: Tensor, mask: Tensor) -> Tensor:
    """Each sequence's total return: the reward-to-go at its first response token, G_0.

    returns: [B, T] reward-to-go; mask: [B, T]. Returns [B] (0 for a row with no tokens).
    With gamma = 1 this is sum_t r_t over the response.
    Reference: ../shared/reference/002_51bc6b7a5ef2c181.txt (R(tau) = sum_t gamma^t r_t).
    """
    idx = first_token_index(mask)
    return returns.gather(1, idx.unsqueeze(1)).squeeze(1)


def _group_index(group_ids: Tensor) -> tuple[Tensor, int]:
    _, inverse = torch.unique(group_ids, return_inverse=True)
    return inverse, int(inverse.max().item()) + 1 if inverse.numel() else 0


def _group_stats(seq_ret: Tensor, group_ids: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-sequence group count, group sum, group sample std, and an all-equal flag.

    Returns four [B] tensors broadcast back to sequences: K_g, S_g, std_g (Bessel; 0 for K=1)
    and a bool telling whether every return in the group is equal (to rounding).
    """
    inv, n = _group_index(group_ids)
    zeros = torch.zeros(n, dtype=seq_ret.dtype, device=seq_ret.device)
    count = zeros.index_add(0, inv, torch.ones_like(seq_ret))
    total = zeros.index_add(0, inv, seq_ret)
    mean = total / count
    dev = seq_ret - mean[inv]
    sq = zeros.index_add(0, inv, dev * dev)
    std = torch.sqrt(torch.where(count > 1, sq / (count - 1).clamp(min=1), zeros))
    # Equality up to a few ulps (see filters.zero_signal_groups), not std < tol: a constant
    # group's mean can be off by rounding, and (R - mean) / (std + eps) would then be a tiny
    # non-zero number (or, with per-token terms, a huge one) instead of exactly 0.
    constant = zero_signal_groups(seq_ret, group_ids)
    return count[inv], total[inv], std[inv], constant[inv]


def _batch_is_constant(seq_ret: Tensor) -> bool:
    return bool(zero_signal_groups(seq_ret, torch.zeros_like(seq_ret, dtype=torch.long))[0])


def no_baseline_advantages(
    token_rewards: Tensor,
    mask: Tensor,
    group_ids: Tensor,
    values: Tensor | None = None,
    *,
    gamma: float = 1.0,
    lam: float = 1.0,
    eps: float = 1e-6,
) -> tuple[Tensor, Tensor]:
    """REINFORCE: no baseline, Psi_t = G_t (reward-to-go).

    A_t = G_t = sum_{k >= t} gamma^{k-t} r_k ;  returns = G_t.

    Shapes: see module docstring ([B,T] in, ([B,T], [B,T]) out). ``group_ids``, ``values``,
    ``lam`` and ``eps`` are unused (uniform signature).
    Reference: ../shared/reference/000_7914f6881bc4a22c.txt (REINFORCE, b = 0),
    ../shared/reference/001_dd55e9af3bef0bfc.txt ("we compute rewards to-go").
    """
    rtg = reward_to_go(token_rewards, mask, gamma)
    return rtg.clone(), rtg


def batch_mean_advantages(
    token_rewards: Tensor,
    mask: Tensor,
    group_ids: Tensor,
    values: Tensor | None = None,
    *,
    gamma: float = 1.0,
    lam: float = 1.0,
    eps: float = 1e-6,
) -> tuple[Tensor, Tensor]:
    """REINFORCE++ baseline: subtract the batch mean of the sequences' total returns.

    A_{i,t} = G_{i,t} - (1/B) sum_j G_{j,0}

    The baseline is subtracted from the per-token reward-to-go G_{i,t}; the batch statistic
    uses each sequence's total return G_{j,0}. ``group_ids`` is ignored (the batch is the group).
    Reference: ../shared/reference/000_7914f6881bc4a22c.txt (REINFORCE++:
    A_i = R_i - mean({R_j}_{j=1}^B)).
    """
    m = _check(token_rewards, mask, group_ids)
    rtg = reward_to_go(token_rewards, m, gamma)
    seq = sequence_returns(rtg, m)
    if seq.numel() == 0:
        return torch.zeros_like(rtg), rtg
    # A constant batch's mean is any member, taken exactly (no rounding residue).
    baseline = seq[0] if _batch_is_constant(seq) else seq.mean()
    return (rtg - baseline) * m, rtg


def batch_whiten_advantages(
    token_rewards: Tensor,
    mask: Tensor,
    group_ids: Tensor,
    values: Tensor | None = None,
    *,
    gamma: float = 1.0,
    lam: float = 1.0,
    eps: float = 1e-6,
) -> tuple[Tensor, Tensor]:
    """Batch whitening: REINFORCE++'s batch-mean baseline, also divided by the batch std.

    A_{i,t} = (G_{i,t} - mean_j G_{j,0}) / (std_j G_{j,0} + eps),  std = sample std (Bessel)

    A batch whose total returns are all equal (to rounding) has no signal: its advantages are
    exactly 0 (never NaN, never (rounding error)/eps).
    Reference: ../shared/reference/000_7914f6881bc4a22c.txt (REINFORCE++, batch statistics over
    the full batch of diverse prompts), ../shared/reference/002_51bc6b7a5ef2c181.txt (std
    scaling, here batch-wide instead of per group). The REINFORCE++ preset uses batch_mean,
    which is what 000 writes; this is the normalised variant.
    """
    m = _check(token_rewards, mask, group_ids)
    rtg = reward_to_go(token_rewards, m, gamma)
    seq = sequence_returns(rtg, m)
    if seq.numel() < 2 or _batch_is_constant(seq):
        return torch.zeros_like(rtg), rtg
    adv = (rtg - seq.mean()) / (seq.std(unbiased=True) + eps)
    return adv * m, rtg


def group_mean_advantages(
    token_rewards: Tensor,
    mask: Tensor,
    group_ids: Tensor,
    values: Tensor | None = None,
    *,
    gamma: float = 1.0,
    lam: float = 1.0,
    eps: float = 1e-6,
) -> tuple[Tensor, Tensor]:
    """Dr. GRPO: group mean baseline without std scaling.

    A_{i,t} = G_{i,t} - (1/G) sum_{j in group(i)} G_{j,0}

    group_ids: [B] long, equal ids share a prompt. Worked example (002): R = [0, 0, 1, 0]
    gives [-0.25, -0.25, 0.75, -0.25]. A group whose total returns are all equal gets exactly
    0 from terminal rewards (no rounding residue).
    Reference: ../shared/reference/002_51bc6b7a5ef2c181.txt ("GRPO, no std (Dr. GRPO)").
    """
    m = _check(token_rewards, mask, group_ids)
    rtg = reward_to_go(token_rewards, m, gamma)
    seq = sequence_returns(rtg, m)
    count, total, _, constant = _group_stats(seq, group_ids)
    # In a constant group the mean equals every member; use the member itself so that rounding
    # in sum/count cannot leave a tiny non-zero advantage (per-token KL terms still survive).
    baseline = torch.where(constant, seq, total / count)
    return (rtg - baseline.unsqueeze(1)) * m, rtg


def group_mean_std_advantages(
    token_rewards: Tensor,
    mask: Tensor,
    group_ids: Tensor,
    values: Tensor | None = None,
    *,
    gamma: float = 1.0,
    lam: float = 1.0,
    eps: float = 1e-6,
) -> tuple[Tensor, Tensor]:
    """GRPO: group mean baseline, scaled by the group's sample standard deviation.

    A_{i,t} = (G_{i,t} - mean_g) / (std_g + eps),
    mean_g = (1/G) sum_j G_{j,0},  std_g = sqrt( sum_j (G_{j,0} - mean_g)^2 / (G - 1) )

    The std is the *sample* std (Bessel's correction), as in the worked example of 002:
    R = [0, 0, 1, 0] -> mean 0.25, std 0.5 -> [-0.5, -0.5, 1.5, -0.5] (with eps = 0).
    A zero-variance group (all total returns equal to rounding, or a group of one) gives
    exactly 0 for all its tokens, never NaN.
    Reference: ../shared/reference/002_51bc6b7a5ef2c181.txt (GRPO and the worked example),
    ../shared/reference/004_0ae34f1505be1cc8.txt (std + eps in the denominator).
    """
    m = _check(token_rewards, mask, group_ids)
    rtg = reward_to_go(token_rewards, m, gamma)
    seq = sequence_returns(rtg, m)
    count, total, std, constant = _group_stats(seq, group_ids)
    adv = (rtg - (total / count).unsqueeze(1)) / (std + eps).unsqueeze(1)
    adv = torch.where(constant.unsqueeze(1), torch.zeros_like(adv), adv)
    return adv * m, rtg


def leave_one_out_advantages(
    token_rewards: Tensor,
    mask: Tensor,
    group_ids: Tensor,
    values: Tensor | None = None,
    *,
    gamma: float = 1.0,
    lam: float = 1.0,
    eps: float = 1e-6,
) -> tuple[Tensor, Tensor]:
    """RLOO: baseline = mean of the *other* sequences' total returns in the group.

    A_{i,t} = G_{i,t} - (1/(K-1)) sum_{j in group(i), j != i} G_{j,0}

    The baseline for i does not depend on sample i, so the estimator stays unbiased. Worked
    example (002): R = [0, 0, 1, 0] -> [-1/3, -1/3, 1, -1/3]. A group of one has no other
    sample to compare with: its baseline is its own return (terminal-only rewards give 0).
    Reference: ../shared/reference/002_51bc6b7a5ef2c181.txt (RLOO),
    ../shared/reference/004_0ae34f1505be1cc8.txt (b_i = 1/(K-1) sum_{j != i} r_j).
    """
    m = _check(token_rewards, mask, group_ids)
    rtg = reward_to_go(token_rewards, m, gamma)
    seq = sequence_returns(rtg, m)
    count, total, _, constant = _group_stats(seq, group_ids)
    # Constant group (or a group of one): the others' mean is the member's own return; take it
    # exactly so terminal-only rewards give exact zeros.
    baseline = torch.where(constant, seq, (total - seq) / (count - 1).clamp(min=1))
    return (rtg - baseline.unsqueeze(1)) * m, rtg


def gae_advantages(
    token_rewards: Tensor,
    mask: Tensor,
    group_ids: Tensor,
    values: Tensor | None = None,
    *,
    gamma: float = 1.0,
    lam: float = 1.0,
    eps: float = 1e-6,
) -> tuple[Tensor, Tensor]:
    """PPO: Generalised Advantage Estimation from per-token rewards and critic values.

    delta_t = r_t + gamma * V_{t+1} - V_t         (V after the last response token = 0)
    A_t     = sum_{l >= 0} (gamma * lam)^l delta_{t+l} = delta_t + gamma * lam * A_{t+1}
    returns = A_t + V_t                           (the value loss's target)

    lam = 1 gives A_t = G_t - V_t (Monte Carlo); lam = 0 gives the one-step TD error.
    values: [B, T] float, V(s_t) for each response position (required; detached here).
    Masked positions inside a row are skipped (the next step is the next response token).
    Reference: ../shared/reference/000_7914f6881bc4a22c.txt (GAE),
    ../shared/reference/004_0ae34f1505be1cc8.txt (GAE(gamma, lambda)).
    """
    m = _check(token_rewards, mask, group_ids)
    if values is None:
        raise ValueError("gae_advantages needs `values` [B, T] from the critic; got None")
    if values.shape != token_rewards.shape:
        raise ValueError(
            f"values shape {tuple(values.shape)} != token_rewards shape {tuple(token_rewards.shape)}"
        )
    r = torch.where(m > 0, token_rewards.detach(), torch.zeros_like(token_rewards))
    v = torch.where(m > 0, values.detach().to(r.dtype), torch.zeros_like(r))
    adv = torch.zeros_like(r)
    next_value = torch.zeros_like(r[:, 0])
    next_adv = torch.zeros_like(r[:, 0])
    for t in range(r.shape[1] - 1, -1, -1):
        on = m[:, t] > 0
        delta = r[:, t] + gamma * next_value - v[:, t]
        a_t = delta + gamma * lam * next_adv
        adv[:, t] = torch.where(on, a_t, torch.zeros_like(a_t))
        next_value = torch.where(on, v[:, t], next_value)
        next_adv = torch.where(on, a_t, next_adv)
    return adv, (adv + v) * m


def remax_advantages(
    token_rewards: Tensor,
    mask: Tensor,
    group_ids: Tensor,
    values: Tensor | None = None,
    *,
    gamma: float = 1.0,
    lam: float = 1.0,
    eps: float = 1e-6,
    baseline_rewards: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """ReMax: the baseline is the reward of the prompt's greedy (argmax-decoded) completion.

    A_{i,t} = G_{i,t} - R(x_i, y_greedy(x_i))

    baseline_rewards: [B] float, the greedy completion's total return for each row's prompt
    (the caller decodes greedily once per prompt and scores it). The greedy completion does not
    depend on the sampled y_i, so the baseline is state-only and the gradient stays unbiased.
    Reference: Li et al. 2023, ReMax (arXiv 2310.10505); verl compute_remax_outcome_advantage
    (A = reward-to-go - baseline, no std scaling).
    """
    m = _check(token_rewards, mask, group_ids)
    if baseline_rewards is None:
        raise ValueError(
            "remax_advantages needs baseline_rewards [B]: the reward of each prompt's greedy "
            "completion (decode with temperature 0 and score it)"
        )
    if baseline_rewards.shape != token_rewards.shape[:1]:
        raise ValueError(
            f"baseline_rewards must be [B]={token_rewards.shape[0]}, got "
            f"{tuple(baseline_rewards.shape)}"
        )
    rtg = reward_to_go(token_rewards, m, gamma)
    b = baseline_rewards.detach().to(rtg.dtype)
    return (rtg - b.unsqueeze(1)) * m, rtg


def _sum_over_ranks(x: Tensor, reduce: Callable[[Tensor], Tensor] | None) -> Tensor:
    return x if reduce is None else reduce(x)


def gpg_advantages(
    token_rewards: Tensor,
    mask: Tensor,
    group_ids: Tensor,
    values: Tensor | None = None,
    *,
    gamma: float = 1.0,
    lam: float = 1.0,
    eps: float = 1e-6,
    reduce: Callable[[Tensor], Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """GPG: the Dr. GRPO group-mean advantage, scaled by alpha = B / #{j : G_{j,0} != 0}.

    A_{i,t} = alpha * (G_{i,t} - mean_{j in group(i)} G_{j,0}),
    alpha   = B / max(1, number of sequences in the batch whose total return is non-zero)

    alpha is a batch statistic (it rescales the step when few samples carry reward); with
    data-parallel ranks pass ``reduce`` = a sum over ranks of a tensor, so B and the count are
    global. f_norm = 1 (verl's default). A group of one gets 0 (psirl's group convention;
    verl gives it A = R).
    Reference: Chu et al. 2025, GPG: A Simple and Strong Reinforcement Learning Baseline
    (arXiv 2504.02546); verl compute_gpg_outcome_advantage (alpha = bsz / count_nonzero).
    """
    m = _check(token_rewards, mask, group_ids)
    adv, rtg = group_mean_advantages(token_rewards, m, group_ids, gamma=gamma)
    seq = sequence_returns(rtg, m)
    counts = torch.stack([
        torch.tensor(float(seq.shape[0]), dtype=rtg.dtype, device=rtg.device),
        (seq != 0).sum().to(rtg.dtype),
    ])
    total, nonzero = _sum_over_ranks(counts, reduce).unbind(0)
    alpha = total / nonzero.clamp(min=1)
    return adv * alpha, rtg


def opo_advantages(
    token_rewards: Tensor,
    mask: Tensor,
    group_ids: Tensor,
    values: Tensor | None = None,
    *,
    gamma: float = 1.0,
    lam: float = 1.0,
    eps: float = 1e-6,
) -> tuple[Tensor, Tensor]:
    """OPO: a length-weighted group baseline (the optimal baseline under its assumptions).

    A_{i,t} = G_{i,t} - b_g,   b_g = sum_{j in g} |y_j| G_{j,0} / sum_{j in g} |y_j|

    The baseline includes sample i itself, so (as Dr. GRPO's group mean) the gradient is
    shrunk: at equal lengths b_g is the group mean and E[g] = (1 - 1/G) grad J. A constant
    group or a group of one gets exactly 0 (verl gives a group of one A = R).
    Reference: Hao et al. 2025, On-Policy RL with Optimal Reward Baseline (arXiv 2505.23585);
    verl compute_opo_outcome_advantage.
    """
    m = _check(token_rewards, mask, group_ids)
    rtg = reward_to_go(token_rewards, m, gamma)
    seq = sequence_returns(rtg, m)
    lengths = m.sum(dim=1)
    inv, n = _group_index(group_ids)
    zeros = torch.zeros(n, dtype=rtg.dtype, device=rtg.device)
    weighted = zeros.index_add(0, inv, lengths * seq)
    total_len = zeros.index_add(0, inv, lengths)
    constant = zero_signal_groups(seq, group_ids)[inv]
    baseline = torch.where(constant, seq, (weighted / total_len.clamp(min=1))[inv])
    return (rtg - baseline.unsqueeze(1)) * m, rtg


def _passk(
    token_rewards: Tensor, mask: Tensor, group_ids: Tensor, gamma: float, eps: float, std: bool
) -> tuple[Tensor, Tensor]:
    m = _check(token_rewards, mask, group_ids)
    rtg = reward_to_go(token_rewards, m, gamma)
    seq = sequence_returns(rtg, m)
    inv, n = _group_index(group_ids)
    count = torch.zeros(n, dtype=torch.long, device=seq.device).index_add(
        0, inv, torch.ones_like(inv)
    )
    if (count < 2).any():
        raise ValueError("pass@k advantages need at least 2 samples per group (group_ids)")
    order = torch.arange(seq.shape[0], device=seq.device)
    # The best sample of each group (the first one on ties) and the others' best return.
    best = torch.full((n,), float("-inf"), dtype=seq.dtype, device=seq.device)
    best = best.scatter_reduce(0, inv, seq, reduce="amax")
    is_max = seq == best[inv]
    first = torch.full((n,), seq.shape[0], dtype=torch.long, device=seq.device)
    first = first.scatter_reduce(0, inv, torch.where(is_max, order, first[inv]), reduce="amin")
    winner = order == first[inv]
    others = torch.where(winner, torch.full_like(seq, float("-inf")), seq)
    second = torch.full((n,), float("-inf"), dtype=seq.dtype, device=seq.device)
    second = second.scatter_reduce(0, inv, others, reduce="amax")[inv]
    adv = torch.where(winner.unsqueeze(1), rtg - second.unsqueeze(1), torch.zeros_like(rtg))
    if std:
        _, _, group_std, constant = _group_stats(seq, group_ids)
        adv = torch.where(constant.unsqueeze(1), torch.zeros_like(adv),
                          adv / (group_std + eps).unsqueeze(1))
    return adv * m, rtg


def passk_advantages(
    token_rewards: Tensor,
    mask: Tensor,
    group_ids: Tensor,
    values: Tensor | None = None,
    *,
    gamma: float = 1.0,
    lam: float = 1.0,
    eps: float = 1e-6,
) -> tuple[Tensor, Tensor]:
    """Pass@k training: only each group's best sample is pushed, by its margin over the rest.

    A_{i,t} = [i = argmax_j G_{j,0}] * (G_{i,t} - max_{j in g, j != i} G_{j,0}),   else 0

    This is the leave-one-out form of max: max_j R_j - max_{j != i} R_j is R_max - R_second for
    the best sample and 0 for every other one, and max_{j != i} R_j does not depend on y_i, so
    E[sum_i A_i grad log pi(y_i)] = grad E[max_{j <= G} R_j] exactly: an unbiased estimator of
    the gradient of pass@G (best-of-G), not of E[R]. Ties: the first best sample gets
    R_max - R_max = 0. Needs G >= 2. verl's `grpo_passk` further divides by the group std by
    default (``passk_std_advantages``).
    Reference: Chen et al. 2025, Pass@k Training (arXiv 2508.10751) / verl
    compute_grpo_passk_outcome_advantage (arXiv 2503.19595).
    """
    return _passk(token_rewards, mask, group_ids, gamma, eps, std=False)


def passk_std_advantages(
    token_rewards: Tensor,
    mask: Tensor,
    group_ids: Tensor,
    values: Tensor | None = None,
    *,
    gamma: float = 1.0,
    lam: float = 1.0,
    eps: float = 1e-6,
) -> tuple[Tensor, Tensor]:
    """verl's `grpo_passk` default: ``passk_advantages`` divided by the group's sample std + eps.

    A_i = [i = argmax] (R_max - R_second) / (std_g + eps); a constant group gets 0.
    Reference: verl compute_grpo_passk_outcome_advantage (norm_adv_by_std_in_grpo = True).
    """
    return _passk(token_rewards, mask, group_ids, gamma, eps, std=True)


# -------------------------------------------------------------------------------- whitening
WHITEN_MODES: tuple[str, ...] = ("none", "batch", "group")


def _inv_std(var: Tensor, eps: float) -> Tensor:
    # No spread at all (and eps = 0): every deviation is 0, so the scale is irrelevant; use 0.
    inv = torch.rsqrt(var + eps)
    return torch.where(torch.isinf(inv), torch.zeros_like(inv), inv)


def whiten_advantages(
    advantages: Tensor,
    mask: Tensor,
    group_ids: Tensor,
    mode: str,
    *,
    eps: float = 1e-8,
    reduce: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """Whitening as a step after any estimator (verl's / OpenRLHF's advantage normalisation).

    batch:  A'_{i,t} = (A_{i,t} - mu) / sqrt(var + eps), mu and var the masked mean and
            unbiased (Bessel) variance over every response token of the batch;
    group:  the same with mu_g, var_g over the tokens of each group (group_ids);
    none:   A' = A.

    This is verl's ``masked_whiten`` (shift_mean=True, eps = 1e-8 inside the sqrt), applied by
    verl to GAE advantages and to REINFORCE++'s reward-to-go. Statistics are over tokens, not
    sequences, so long responses weigh more. ``reduce`` (batch mode): a sum over data-parallel
    ranks of a tensor, so mu and var are the global batch's. A group with fewer than two tokens
    has var 0. advantages, mask: [B, T]; group_ids: [B]. Returns [B, T], 0 where mask is 0.
    Reference: verl core_algos (compute_gae_advantage_return, compute_reinforce_plus_plus_
    outcome_advantage); Hu 2025, REINFORCE++ (global advantage normalisation).
    """
    if mode not in WHITEN_MODES:
        raise ValueError(f"whiten mode must be one of {WHITEN_MODES}, got {mode!r}")
    m = _check(advantages, mask, group_ids)
    a = torch.where(m > 0, advantages.detach(), torch.zeros_like(advantages))
    if mode == "none":
        return a
    if mode == "batch":
        sums = _sum_over_ranks(torch.stack([m.sum(), a.sum()]), reduce)
        n, mean = sums[0], sums[0].new_zeros(()) if sums[0] == 0 else sums[1] / sums[0]
        sq = _sum_over_ranks((((a - mean) * m) ** 2).sum().reshape(1), reduce)[0]
        var = sq / (n - 1) if n > 1 else sq.new_zeros(())
        return (a - mean) * _inv_std(var, eps) * m
    inv, n_groups = _group_index(group_ids)
    zeros = torch.zeros(n_groups, dtype=a.dtype, device=a.device)
    count = zeros.index_add(0, inv, m.sum(dim=1))
    mean = zeros.index_add(0, inv, a.sum(dim=1)) / count.clamp(min=1)
    dev = (a - mean[inv].unsqueeze(1)) * m
    sq = zeros.index_add(0, inv, (dev * dev).sum(dim=1))
    var = torch.where(count > 1, sq / (count - 1).clamp(min=1), zeros)
    return dev * _inv_std(var, eps)[inv].unsqueeze(1)


# ------------------------------------------------------------------------------- registry
SCOPES: tuple[str, ...] = ("sequence", "group", "batch", "critic")


@dataclass(frozen=True)
class EstimatorSpec:
    """What an advantage estimator is: the one place the rest of psirl reads it from.

    fn: the estimator (uniform signature above);
    scope: where its baseline's statistics come from --
        "sequence" (the row alone, or a per-prompt input such as ReMax's greedy reward),
        "group" (the rows sharing its group id: needs group_size >= 2),
        "batch" (every row of the step: data-parallel ranks must share statistics),
        "critic" (a learned value V(s_t): needs ``values``);
    std_scaled: divides by a standard deviation (a random scale: the gradient is biased);
    batch_statistic: some factor is a statistic of the whole batch even though the baseline
        is not (GPG's alpha); such an estimator takes ``reduce`` for data-parallel runs;
    inputs: extra keyword inputs the caller must pass (e.g. "baseline_rewards");
    unbiased: whether E[estimator] = c * grad E[R] with a known constant c;
    scale: that c as a function of (group_size G, batch_size B), or None;
    bias: what the references say of its bias, with the reference;
    baseline: the method-matrix words for its baseline.
    """

    fn: AdvantageFn
    scope: str
    std_scaled: bool
    unbiased: bool
    bias: str
    baseline: str
    scale: Callable[[int, int], float] | None = None
    batch_statistic: bool = False
    inputs: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.scope not in SCOPES:
            raise ValueError(f"EstimatorSpec.scope must be one of {SCOPES}, got {self.scope!r}")
        if self.unbiased != (self.scale is not None):
            raise ValueError("EstimatorSpec: an unbiased estimator needs its scale c, and only it")

    @property
    def needs_values(self) -> bool:
        return self.scope == "critic"

    @property
    def min_group_size(self) -> int:
        return 2 if self.scope == "group" else 1

    @property
    def global_statistics(self) -> bool:
        """True when data-parallel ranks must share statistics (scope batch or a batch factor)."""
        return self.scope == "batch" or self.batch_statistic


# Keys are the values of AdvantageKnobs.estimator (psirl/algorithms.py).
ESTIMATORS: dict[str, EstimatorSpec] = {
    "none": EstimatorSpec(
        no_baseline_advantages, "sequence", std_scaled=False, unbiased=True,
        scale=lambda g, b: 1.0, baseline="none",
        bias="unbiased: REINFORCE, b = 0 (000)",
    ),
    "batch_mean": EstimatorSpec(
        batch_mean_advantages, "batch", std_scaled=False, unbiased=True,
        scale=lambda g, b: 1.0 - 1.0 / b, baseline="batch mean (critic-free)",
        bias="the batch mean includes the sample itself: E[g] = (1 - 1/B) grad J; 000 calls "
        "it a constant baseline in the large-batch limit",
    ),
    "batch_whiten": EstimatorSpec(
        batch_whiten_advantages, "batch", std_scaled=True, unbiased=False,
        baseline="batch mean / std (critic-free)",
        bias="biased: divides by the batch std (002: std-normalisation is a bias)",
    ),
    "group_mean": EstimatorSpec(
        group_mean_advantages, "group", std_scaled=False, unbiased=True,
        scale=lambda g, b: 1.0 - 1.0 / g, baseline="group mean, no std (critic-free)",
        bias="the group mean includes the sample itself: E[g] = (1 - 1/G) grad J (002, Dr. GRPO)",
    ),
    "group_mean_std": EstimatorSpec(
        group_mean_std_advantages, "group", std_scaled=True, unbiased=False,
        baseline="group mean / std (critic-free)",
        bias="biased: 002, 'GRPO std-norm: a small bias'",
    ),
    "leave_one_out": EstimatorSpec(
        leave_one_out_advantages, "group", std_scaled=False, unbiased=True,
        scale=lambda g, b: 1.0, baseline="leave-one-out group mean (critic-free)",
        bias="unbiased: the others' mean does not depend on the sample (002, 004)",
    ),
    "gae": EstimatorSpec(
        gae_advantages, "critic", std_scaled=False, unbiased=True, scale=lambda g, b: 1.0,
        baseline="learned value V_phi", inputs=("values",),
        bias="unbiased for any lambda when V is the true value function (000, GAE); biased "
        "otherwise",
    ),
    "remax": EstimatorSpec(
        remax_advantages, "sequence", std_scaled=False, unbiased=True, scale=lambda g, b: 1.0,
        baseline="greedy completion's reward (critic-free)", inputs=("baseline_rewards",),
        bias="unbiased: the greedy rollout does not depend on the sample (ReMax, 2310.10505)",
    ),
    "gpg": EstimatorSpec(
        gpg_advantages, "group", std_scaled=False, unbiased=False, batch_statistic=True,
        baseline="group mean x B / #non-zero rewards (critic-free)",
        bias="biased: alpha = B / #non-zero rewards is a random, reward-dependent scale "
        "(GPG, 2504.02546, calls it a correction for invalid samples)",
    ),
    "opo": EstimatorSpec(
        opo_advantages, "group", std_scaled=False, unbiased=False,
        baseline="length-weighted group mean (critic-free)",
        bias="the baseline includes the sample itself; at equal lengths E[g] = (1 - 1/G) "
        "grad J, otherwise no constant (OPO, 2505.23585)",
    ),
    "grpo_passk": EstimatorSpec(
        passk_advantages, "group", std_scaled=False, unbiased=False,
        baseline="best sample minus the runner-up (critic-free)",
        bias="estimates grad E[max of G rewards] (pass@G) exactly, not grad E[R] "
        "(Pass@k training, 2508.10751)",
    ),
    "grpo_passk_std": EstimatorSpec(
        passk_std_advantages, "group", std_scaled=True, unbiased=False,
        baseline="best minus runner-up, / group std (critic-free)",
        bias="biased: pass@k advantage divided by the group std (verl's grpo_passk default)",
    ),
}

ADVANTAGE_ESTIMATORS: dict[str, AdvantageFn] = {name: s.fn for name, s in ESTIMATORS.items()}


def estimator_names(
    *,
    scope: str | None = None,
    std_scaled: bool | None = None,
    global_statistics: bool | None = None,
) -> tuple[str, ...]:
    """Names of the estimators with the given properties (None: any), in registry order."""
    return tuple(
        name
        for name, s in ESTIMATORS.items()
        if (scope is None or s.scope == scope)
        and (std_scaled is None or s.std_scaled == std_scaled)
        and (global_statistics is None or s.global_statistics == global_statistics)
    )
