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
    "ADVANTAGE_ESTIMATORS",
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


# Keys are the values of AdvantageKnobs.estimator (psirl/algorithms.py).
ADVANTAGE_ESTIMATORS: dict[str, AdvantageFn] = {
    "none": no_baseline_advantages,
    "batch_mean": batch_mean_advantages,
    "batch_whiten": batch_whiten_advantages,
    "group_mean": group_mean_advantages,
    "group_mean_std": group_mean_std_advantages,
    "leave_one_out": leave_one_out_advantages,
    "gae": gae_advantages,
}
