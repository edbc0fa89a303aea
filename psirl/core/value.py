"""Critic (value-head) loss for PPO, and the explained-variance diagnostic.

    V_clip = V_old + clip(V - V_old, -eps, eps)
    l_t    = 0.5 * max( (V_t - G_t)^2, (V_clip_t - G_t)^2 )

Reference: ../shared/reference/000_7914f6881bc4a22c.txt (L_critic = E_t[(V_phi(s_t) -
V^target_t)^2]), ../shared/reference/004_0ae34f1505be1cc8.txt (PPO with GAE; value function in
memory). Value clipping follows the PPO implementations (OpenAI baselines), which the
references do not spell out; the 0.5 makes the gradient (V - G).
"""

from __future__ import annotations

import torch
from torch import Tensor

from psirl.core.aggregate import aggregate_loss
from psirl.core.masking import masked_mean, masked_var

__all__ = ["clipped_value_loss", "explained_variance", "value_clip_fraction"]


def _per_token_value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip_eps: float | None
) -> tuple[Tensor, Tensor]:
    if not (values.shape == old_values.shape == returns.shape == mask.shape):
        raise ValueError(
            f"values {tuple(values.shape)}, old_values {tuple(old_values.shape)}, returns "
            f"{tuple(returns.shape)} and mask {tuple(mask.shape)} must all be [B, T]"
        )
    target = returns.detach().to(values.dtype)
    unclipped = (values - target) ** 2
    if clip_eps is None:
        return 0.5 * unclipped, torch.zeros_like(unclipped, dtype=torch.bool)
    old = old_values.detach().to(values.dtype)
    v_clip = old + torch.clamp(values - old, -clip_eps, clip_eps)
    clipped = (v_clip - target) ** 2
    return 0.5 * torch.maximum(unclipped, clipped), clipped > unclipped


def clipped_value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    clip_eps: float | None,
    normaliser: float,
    mode: str = "token_mean",
) -> Tensor:
    """PPO's clipped value loss, aggregated like the policy loss.

    l_t = 0.5 * max( (V_t - G_t)^2, (V_old,t + clip(V_t - V_old,t, -eps, eps) - G_t)^2 )
    (clip_eps None: l_t = 0.5 (V_t - G_t)^2)
    loss = aggregate_loss(l, mask, mode, normaliser)

    values: [B, T] float (critic output, requires grad); old_values: [B, T] (critic at rollout
    time); returns: [B, T] targets G_t (e.g. from ``gae_advantages``); mask: [B, T] 0/1;
    normaliser: from ``step_normaliser`` for ``mode``. Returns a 0-d tensor.
    Reference: ../shared/reference/000_7914f6881bc4a22c.txt (critic loss).
    """
    per_token, _ = _per_token_value_loss(values, old_values, returns, mask, clip_eps)
    return aggregate_loss(per_token, mask, mode, normaliser)


def value_clip_fraction(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip_eps: float | None
) -> float:
    """Fraction of response tokens where the clipped value term is the larger (flat) one.

    frac = mean_t m_t [ (V_clip,t - G_t)^2 > (V_t - G_t)^2 ]     (0 when clip_eps is None)

    Shapes as ``clipped_value_loss``. Returns a Python float.
    Reference: ../shared/reference/000_7914f6881bc4a22c.txt (critic loss).
    """
    _, clipped = _per_token_value_loss(values, old_values, returns, mask, clip_eps)
    return float(masked_mean(clipped.to(torch.float32), mask.to(torch.float32)).item())


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> float:
    """How much of the returns' variance the critic explains.

    EV = 1 - Var[G - V] / Var[G]      (masked, unbiased variances)

    1 is a perfect critic, 0 is no better than a constant, < 0 is worse. Returns NaN when
    Var[G] = 0 (undefined). values, returns, mask: [B, T]. Returns a Python float.
    Reference: ../shared/reference/000_7914f6881bc4a22c.txt (a good V_phi gives tight advantages).
    """
    v = values.detach().to(torch.float64)
    g = returns.detach().to(torch.float64)
    var_g = float(masked_var(g, mask.to(torch.float64)).item())
    if var_g == 0.0:
        return float("nan")
    return 1.0 - float(masked_var(g - v, mask.to(torch.float64)).item()) / var_g
