"""Sample filters: DAPO dynamic sampling, and reward-based selection for self-training.

Reference: ../shared/reference/002_51bc6b7a5ef2c181.txt (DAPO "dynamic sampling, which discards
all-right or all-wrong groups since their advantages are zero and they contribute no
gradient"), ../shared/reference/000_7914f6881bc4a22c.txt (self-training: keep the top-k per
prompt, or all rewards above a threshold).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["zero_signal_groups", "dynamic_sampling_keep", "threshold_keep", "top_k_per_group"]


def _check(rewards: Tensor, group_ids: Tensor) -> Tensor:
    """Validate the shapes; return `group_ids` on the rewards' device.

    Rewards are often built on the host from a Python list while the engine's group ids live on
    the GPU: the ids (a small long vector) follow the rewards, and every output is on the
    rewards' device.
    """
    if rewards.dim() != 1 or group_ids.shape != rewards.shape:
        raise ValueError(
            f"rewards and group_ids must both be [B]; got {tuple(rewards.shape)} and "
            f"{tuple(group_ids.shape)}"
        )
    return group_ids.to(rewards.device)


def zero_signal_groups(rewards: Tensor, group_ids: Tensor) -> Tensor:
    """Which groups carry no learning signal: all rewards in the group equal.

    zero_g = ( max_{i in g} R_i - min_{i in g} R_i <= 8 * eps_dtype * max_{i in g} |R_i| )

    "Equal" allows a few ulps of spread (eps_dtype = machine epsilon of the rewards' dtype) so
    that totals summed in different orders (e.g. 1.0 - 0.2 - 0.1 vs 1.0 - 0.3) still count as
    equal: a 1e-16 spread is rounding, and dividing by it would blow GRPO's advantages up.

    rewards: [B] float; group_ids: [B] long (any device: moved to the rewards'). Returns bool
    [n_groups] on the rewards' device, one entry per distinct group id in ascending order of id
    (``torch.unique(group_ids)``). A group of one is zero-signal (nothing to compare with).
    Reference: ../shared/reference/002_51bc6b7a5ef2c181.txt (DAPO dynamic sampling).
    """
    group_ids = _check(rewards, group_ids)
    uniq, inv = torch.unique(group_ids, return_inverse=True)
    n = uniq.numel()  # known on the host once unique returns: no extra .item() sync
    r = rewards.detach()
    base = torch.zeros(n, dtype=r.dtype, device=r.device)
    hi = base.scatter_reduce(0, inv, r, reduce="amax", include_self=False)
    lo = base.scatter_reduce(0, inv, r, reduce="amin", include_self=False)
    tol = 8 * torch.finfo(r.dtype).eps * torch.maximum(hi.abs(), lo.abs())
    return (hi - lo) <= tol


def dynamic_sampling_keep(rewards: Tensor, group_ids: Tensor) -> Tensor:
    """Per-sample keep mask for DAPO dynamic sampling: keep samples of groups with signal.

    keep_i = not zero_signal_groups(R, group_ids)[group(i)]

    rewards: [B] float; group_ids: [B] long. Returns bool [B] on the rewards' device. The loop
    resamples until enough groups survive (SamplingKnobs.max_resample_rounds).
    Reference: ../shared/reference/002_51bc6b7a5ef2c181.txt (DAPO).
    """
    group_ids = _check(rewards, group_ids)
    _, inv = torch.unique(group_ids, return_inverse=True)
    return ~zero_signal_groups(rewards, group_ids)[inv]


def threshold_keep(rewards: Tensor, threshold: float) -> Tensor:
    """Self-training filter (STaR / RAFT): keep_i = R_i >= threshold.

    rewards: [B] float. Returns bool [B].
    Reference: ../shared/reference/000_7914f6881bc4a22c.txt (Self-Training: "all rewards above
    threshold").
    """
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be [B], got {tuple(rewards.shape)}")
    return rewards >= threshold


def top_k_per_group(rewards: Tensor, group_ids: Tensor, k: int) -> Tensor:
    """Self-training filter (ReST / RAFT): keep the k highest-reward samples of each group.

    keep_i = rank of R_i within group(i), descending, is < k (ties broken by lower index).

    rewards: [B] float; group_ids: [B] long; k >= 1. Returns bool [B] on the rewards' device.
    Reference: ../shared/reference/000_7914f6881bc4a22c.txt (Self-Training: "Keep the top-k
    per prompt").
    """
    group_ids = _check(rewards, group_ids)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    B = rewards.shape[0]
    # Sort by (group, -reward, index) with two stable sorts, then rank within each group.
    order = torch.argsort(-rewards.detach(), stable=True)
    order = order[torch.argsort(group_ids[order], stable=True)]
    sorted_groups = group_ids[order]
    start = torch.ones(B, dtype=torch.bool, device=rewards.device)
    start[1:] = sorted_groups[1:] != sorted_groups[:-1]
    pos = torch.arange(B, device=rewards.device)
    group_start = torch.cummax(torch.where(start, pos, torch.zeros_like(pos)), dim=0).values
    rank = pos - group_start
    keep = torch.zeros(B, dtype=torch.bool, device=rewards.device)
    keep[order] = rank < k
    return keep
