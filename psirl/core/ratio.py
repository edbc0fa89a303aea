"""Importance ratios at three levels: on-policy, token, sequence (GSPO).

    r_t(theta) = pi_theta(a_t | s_t) / pi_old(a_t | s_t)        (token level, PPO / GRPO)
    s_i(theta) = exp( (1/|y_i|) sum_t log r_{i,t}(theta) )       (sequence level, GSPO)

References: ../shared/reference/000_7914f6881bc4a22c.txt (PPO ratio),
../shared/reference/002_51bc6b7a5ef2c181.txt (GSPO: "computes and clips the ratio at the
sequence level"; Knob 2, the ratio unit).
"""

from __future__ import annotations

import torch
from torch import Tensor

from psirl.core.masking import masked_mean

__all__ = ["RATIO_LEVELS", "importance_log_ratio", "importance_ratio"]

RATIO_LEVELS: tuple[str, ...] = ("on_policy", "token", "sequence")


def importance_log_ratio(logp: Tensor, old_logp: Tensor, mask: Tensor, level: str) -> Tensor:
    """Log importance ratio per token, at the requested level.

    on_policy: log r_t = log pi(a_t) - sg[log pi(a_t)]   -> value 0 (ratio 1), gradient
               grad log pi(a_t): the plain REINFORCE score function. ``old_logp`` is unused.
    token:     log r_t = log pi(a_t) - log pi_old(a_t)
    sequence:  log s_i = (1/|y_i|) sum_t m_t (log pi(a_t) - log pi_old(a_t))   (GSPO)
               broadcast with GSPO-token's stop-gradient:
               log s_{i,t} = sg[log s_i] + log pi(a_t) - sg[log pi(a_t)]
               so the value is the sequence ratio on every token and the gradient of
               s_{i,t} is s_i * grad log pi(a_t) (each token its own score, scaled by the
               sequence ratio). With a sequence-level advantage and per-sequence token-mean
               aggregation this is exactly GSPO's gradient.

    logp: [B, T] float, requires grad; old_logp: [B, T] float (behaviour / old policy);
    mask: [B, T] 0/1. Returns [B, T] in logp's dtype, 0 where mask is 0 (padding can hold
    -inf or garbage without producing NaN).
    Reference: ../shared/reference/002_51bc6b7a5ef2c181.txt (token vs sequence ratio, GSPO).
    """
    if logp.shape != mask.shape or (level != "on_policy" and old_logp.shape != logp.shape):
        raise ValueError(
            f"logp {tuple(logp.shape)}, old_logp {tuple(old_logp.shape)} and mask "
            f"{tuple(mask.shape)} must all be [B, T]"
        )
    on = mask > 0
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    lp = torch.where(on, logp, zero)
    if level == "on_policy":
        return lp - lp.detach()
    if level not in RATIO_LEVELS:
        raise ValueError(f"ratio level must be one of {RATIO_LEVELS}, got {level!r}")
    old = torch.where(on, old_logp.to(logp.dtype).detach(), zero)
    token_lr = lp - old
    if level == "token":
        return token_lr
    seq_lr = masked_mean(token_lr.detach(), mask, dim=1)  # [B]
    return torch.where(on, seq_lr.unsqueeze(1) + lp - lp.detach(), zero)


def importance_ratio(logp: Tensor, old_logp: Tensor, mask: Tensor, level: str) -> Tensor:
    """r = exp(importance_log_ratio(logp, old_logp, mask, level)); 1 where mask is 0.

    Shapes and levels as ``importance_log_ratio``.
    Reference: ../shared/reference/000_7914f6881bc4a22c.txt (r_t(theta) = pi_theta / pi_old).
    """
    return torch.exp(importance_log_ratio(logp, old_logp, mask, level))
