"""Per-token surrogate losses: how each method controls the step (Lever 2 of 002).

Every rule has one signature

    fn(ratio [B,T], advantages [B,T], *, eps_low, eps_high, dual_clip_c, log_ratio=None)
        -> (per_token_loss [B,T], {"clipped_low", "clipped_high", "clipped_dual"}: [B,T] bool)

``per_token_loss`` is the *negated* surrogate (a loss to minimise); masking and averaging are
left to ``aggregate.aggregate_loss``. The masks mark tokens where the rule acted:

- clipped_low:  ratio below 1 - eps_low where that matters to the rule,
- clipped_high: ratio above 1 + eps_high where that matters to the rule,
- clipped_dual: the dual-clip bound c * A is active (negative advantage, ratio > c).

For the PPO-family rules (symmetric, asymmetric, dual) a set mask means the token's gradient
is exactly zero; for CISPO it means the IS weight was capped (its gradient is only rescaled).
``log_ratio`` (same shape as ratio) is only used by CISPO, to differentiate log pi without an
exp/log round trip; when omitted it is log(ratio).

References: ../shared/reference/000_7914f6881bc4a22c.txt and 004 (PPO clip),
../shared/reference/002_51bc6b7a5ef2c181.txt (DAPO clip-higher, CISPO),
../shared/reference/003_e8bd019fa090e190.txt (eps_lo / eps_hi in code).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = [
    "CLIP_RULES",
    "ClipFn",
    "no_clip_loss",
    "symmetric_clip_loss",
    "asymmetric_clip_loss",
    "dual_clip_loss",
    "cispo_loss",
]

ClipFn = Callable[..., tuple[Tensor, dict[str, Tensor]]]


def _check(ratio: Tensor, advantages: Tensor) -> None:
    if ratio.shape != advantages.shape:
        raise ValueError(
            f"ratio shape {tuple(ratio.shape)} != advantages shape {tuple(advantages.shape)}"
        )


def _no_masks(ratio: Tensor) -> dict[str, Tensor]:
    f = torch.zeros(ratio.shape, dtype=torch.bool, device=ratio.device)
    return {"clipped_low": f, "clipped_high": f.clone(), "clipped_dual": f.clone()}


def no_clip_loss(
    ratio: Tensor,
    advantages: Tensor,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    dual_clip_c: float = 3.0,
    log_ratio: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """No clipping: the importance-weighted policy gradient.

    loss_t = -r_t * A_t        (with the on-policy ratio, r = 1 and grad = -A_t grad log pi)

    ratio, advantages: [B, T] float. Masks are all False. eps/c are unused.
    Reference: ../shared/reference/002_51bc6b7a5ef2c181.txt (REINFORCE / RLOO: no step control).
    """
    _check(ratio, advantages)
    return -ratio * advantages.detach(), _no_masks(ratio)


def asymmetric_clip_loss(
    ratio: Tensor,
    advantages: Tensor,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.28,
    dual_clip_c: float = 3.0,
    log_ratio: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate with separate lower/upper widths (DAPO "clip-higher").

    loss_t = -min( r_t A_t, clip(r_t, 1 - eps_low, 1 + eps_high) A_t )

    The gradient is zero exactly where the clipped branch is the minimum and r is outside the
    band: A > 0 and r > 1 + eps_high (clipped_high), or A < 0 and r < 1 - eps_low
    (clipped_low). On the other side of the band the unclipped term is the min and the
    gradient is kept (the pessimistic bound).
    ratio, advantages: [B, T] float. Returns ([B, T], masks).
    Reference: ../shared/reference/004_0ae34f1505be1cc8.txt (L^CLIP),
    ../shared/reference/002_51bc6b7a5ef2c181.txt (DAPO clip-higher).
    """
    _check(ratio, advantages)
    adv = advantages.detach()
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high) * adv
    loss = -torch.minimum(unclipped, clipped)
    masks = _no_masks(ratio)
    masks["clipped_high"] = (adv > 0) & (ratio > 1.0 + eps_high)
    masks["clipped_low"] = (adv < 0) & (ratio < 1.0 - eps_low)
    return loss, masks


def symmetric_clip_loss(
    ratio: Tensor,
    advantages: Tensor,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    dual_clip_c: float = 3.0,
    log_ratio: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO-CLIP with one width eps: clip(r, 1 - eps, 1 + eps).

    loss_t = -min( r_t A_t, clip(r_t, 1 - eps, 1 + eps) A_t ),   eps = eps_low = eps_high

    Raises ValueError when eps_low != eps_high (use "asymmetric" for two widths).
    Reference: ../shared/reference/000_7914f6881bc4a22c.txt (L_PPO),
    ../shared/reference/001_dd55e9af3bef0bfc.txt (PPO-CLIP, eps usually 0.2).
    """
    if eps_low != eps_high:
        raise ValueError(
            f"symmetric clip needs eps_low == eps_high, got eps_low={eps_low}, "
            f"eps_high={eps_high}; use clip='asymmetric'"
        )
    return asymmetric_clip_loss(
        ratio, advantages, eps_low=eps_low, eps_high=eps_high, dual_clip_c=dual_clip_c
    )


def dual_clip_loss(
    ratio: Tensor,
    advantages: Tensor,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    dual_clip_c: float = 3.0,
    log_ratio: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Dual-clip PPO: the clipped surrogate, plus a floor c * A for negative advantages.

    surr_t = min( r_t A_t, clip(r_t, 1 - eps_low, 1 + eps_high) A_t )
    loss_t = -max( surr_t, c * A_t )   if A_t < 0
    loss_t = -surr_t                   otherwise              (c > 1)

    For A < 0 the plain PPO surrogate r A is unbounded below as r grows; the dual clip caps the
    per-token loss at -c A (zero gradient once r > c: clipped_dual).
    Reference: ../shared/reference/002_51bc6b7a5ef2c181.txt ("Clipping: bias for step-safety");
    dual clip from Ye et al. 2020 (not in the references), written in their notation.
    """
    if not dual_clip_c > 1.0:
        raise ValueError(f"dual_clip_c must be > 1, got {dual_clip_c}")
    _check(ratio, advantages)
    adv = advantages.detach()
    loss, masks = asymmetric_clip_loss(ratio, adv, eps_low=eps_low, eps_high=eps_high)
    floor = -dual_clip_c * adv  # the loss may not exceed -c*A (a positive number when A < 0)
    neg = adv < 0
    loss = torch.where(neg, torch.minimum(loss, floor), loss)
    masks["clipped_dual"] = neg & (ratio > dual_clip_c)
    return loss, masks


def cispo_loss(
    ratio: Tensor,
    advantages: Tensor,
    *,
    eps_low: float = 1.0,
    eps_high: float = 0.28,
    dual_clip_c: float = 3.0,
    log_ratio: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """CISPO: clipped, stop-gradient importance weight times advantage times log pi.

    w_t    = sg[ clip(r_t, 1 - eps_low, 1 + eps_high) ]
    loss_t = -w_t * A_t * log r_t        (grad = -w_t A_t grad log pi(a_t): never zero)

    log r_t = log pi - log pi_old differs from the paper's log pi by a constant in theta, so the
    gradient is the paper's and the loss value is 0 at r = 1. clipped_high / clipped_low mark
    tokens whose weight was capped (rescaled, not dropped). eps_low = 1 means no lower bound.
    Reference: ../shared/reference/002_51bc6b7a5ef2c181.txt (CISPO: "clips the importance-
    sampling weight, wrapped in a stop-gradient ... can never zero it out").
    """
    _check(ratio, advantages)
    lr = torch.log(ratio) if log_ratio is None else log_ratio
    weight = torch.clamp(ratio.detach(), 1.0 - eps_low, 1.0 + eps_high)
    loss = -weight * advantages.detach() * lr
    masks = _no_masks(ratio)
    masks["clipped_high"] = ratio.detach() > 1.0 + eps_high
    masks["clipped_low"] = ratio.detach() < 1.0 - eps_low
    return loss, masks


# Keys are the values of PolicyLossKnobs.clip (psirl/algorithms.py).
CLIP_RULES: dict[str, ClipFn] = {
    "none": no_clip_loss,
    "symmetric": symmetric_clip_loss,
    "asymmetric": asymmetric_clip_loss,
    "dual": dual_clip_loss,
    "cispo": cispo_loss,
}
