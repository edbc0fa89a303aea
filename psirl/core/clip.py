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
    "sapo_loss",
    "gmpo_loss",
    "clip_cov_loss",
    "kl_cov_loss",
    "RULE_INPUTS",
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
    gradient is the paper's and the loss value is 0 at r = 1. TRL and verl report
    -w_t A_t log pi_t instead: their value is psirl's minus w_t A_t log pi_old,t (aggregated the
    same way), a constant per batch; loss curves differ by it, gradients are identical. psirl
    keeps 0 at r = 1 so that the value does not depend on how likely the sampled tokens were.
    TRL's CISPO caps the weight at epsilon_high itself (e.g. 5.0); psirl caps at 1 + eps_high. clipped_high / clipped_low mark
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


def _masked_mean(x: Tensor, m: Tensor) -> Tensor:
    return (x * m).sum() / m.sum().clamp(min=1)


def sapo_loss(
    ratio: Tensor,
    advantages: Tensor,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    dual_clip_c: float = 3.0,
    log_ratio: Tensor | None = None,
    sapo_tau_pos: float = 1.0,
    sapo_tau_neg: float = 1.05,
) -> tuple[Tensor, dict[str, Tensor]]:
    """SAPO: a soft, temperature-controlled gate on the ratio instead of a hard clip.

    f_tau(r) = (4 / tau) * sigmoid(tau (r - 1)),  tau = tau_pos if A_t > 0 else tau_neg
    loss_t   = -f_tau(r_t) * A_t

    f'(1) = 1, so at r = 1 the gradient is the policy gradient -A grad log pi; away from 1 the
    gradient decays smoothly (sigmoid') instead of dropping to 0 at a band edge. No token is
    ever hard-clipped: the masks are all False. eps/c unused.
    Reference: Gao et al. 2025, Soft Adaptive Policy Optimization (SAPO); TRL GRPOTrainer
    loss_type "sapo" (sapo_temperature_pos = 1.0, sapo_temperature_neg = 1.05), verl.
    """
    _check(ratio, advantages)
    if not (sapo_tau_pos > 0 and sapo_tau_neg > 0):
        raise ValueError(f"SAPO temperatures must be > 0, got {sapo_tau_pos}, {sapo_tau_neg}")
    adv = advantages.detach()
    tau = torch.where(adv > 0, torch.full_like(adv, sapo_tau_pos),
                      torch.full_like(adv, sapo_tau_neg))
    gate = 4.0 / tau * torch.sigmoid(tau * (ratio - 1.0))
    return -gate * adv, _no_masks(ratio)


def gmpo_loss(
    ratio: Tensor,
    advantages: Tensor,
    *,
    eps_low: float = 0.4,
    eps_high: float = 0.4,
    dual_clip_c: float = 3.0,
    log_ratio: Tensor | None = None,
    mask: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """GMPO: the geometric mean of token ratios, with token-level clipping in log space.

    l_t    = sgn(A) * min( sgn(A) log r_t, sgn(A) clip(log r_t, -eps_low, eps_high) )
    s_i    = exp( (1/|y_i|) sum_t m_t l_t ),  A_i = (1/|y_i|) sum_t m_t A_t
    loss_t = -A_i * s_i   on every token of sequence i

    eps_low / eps_high are widths of log r here (the GMPO paper clips r to (e^-0.4, e^0.4)).
    With aggregation "seq_mean_token_mean" the step's loss is mean_i(-A_i s_i), verl's
    compute_policy_loss_geo_mean. At r = 1: grad = -A_i (1/|y_i|) sum_t grad log pi_t.
    mask: [B, T] response mask (required). clipped_high / clipped_low mark tokens whose log
    ratio was clipped (their gradient is 0).
    Reference: Zhao et al. 2025, Geometric-Mean Policy Optimization (arXiv 2507.20673); verl.
    """
    _check(ratio, advantages)
    if mask is None:
        raise ValueError("gmpo_loss needs the response mask [B, T]")
    m = mask.to(ratio.dtype)
    lr = torch.log(ratio) if log_ratio is None else log_ratio
    n = m.sum(dim=1).clamp(min=1)
    adv_seq = (advantages.detach() * m).sum(dim=1) / n
    sgn = torch.sign(adv_seq).unsqueeze(1)
    clipped = torch.clamp(lr, -eps_low, eps_high)
    token = sgn * torch.minimum(sgn * lr, sgn * clipped)
    seq_ratio = torch.exp((token * m).sum(dim=1) / n)
    loss = (-adv_seq * seq_ratio).unsqueeze(1).expand_as(ratio) * m
    masks = _no_masks(ratio)
    lr_d = lr.detach()
    masks["clipped_high"] = (sgn > 0) & (lr_d > eps_high)
    masks["clipped_low"] = (sgn < 0) & (lr_d < -eps_low)
    return loss, masks


def _token_covariance(advantages: Tensor, logp: Tensor, m: Tensor) -> Tensor:
    """cov_t = (A_t - mean A) (log pi_t - mean log pi), means over the mask's tokens."""
    a, lp = advantages.detach(), logp.detach()
    return (a - _masked_mean(a, m)) * (lp - _masked_mean(lp, m))


def clip_cov_loss(
    ratio: Tensor,
    advantages: Tensor,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    dual_clip_c: float = 3.0,
    log_ratio: Tensor | None = None,
    mask: Tensor | None = None,
    logp: Tensor | None = None,
    cov_ratio: float = 2e-4,
    clip_cov_lb: float = 1.0,
    clip_cov_ub: float = 5.0,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clip-Cov: the PPO clipped surrogate, with the gradient of a few high-covariance tokens cut.

    cov_t = (A_t - mean A)(log pi_t - mean log pi) over response tokens; among tokens not
    already clipped with clip_cov_lb < cov_t < clip_cov_ub, n = max(1, floor(cov_ratio * N))
    are drawn at random and their loss is multiplied by 0 (no gradient): the tokens that drive
    entropy collapse. loss_t = -min(r A, clip(r, 1-eps_low, 1+eps_high) A) * c_t.
    mask, logp: [B, T] (required). clipped_dual marks the cut tokens.
    Reference: Cui et al. 2025, The Entropy Mechanism of RL for Reasoning LMs; verl
    compute_policy_loss_clip_cov (clip_ratio 2e-4, clip_cov_lb 1, clip_cov_ub 5).
    """
    if mask is None or logp is None:
        raise ValueError("clip_cov_loss needs the response mask and log-probs [B, T]")
    loss, masks = asymmetric_clip_loss(ratio, advantages, eps_low=eps_low, eps_high=eps_high)
    m = mask.to(ratio.dtype)
    cov = _token_covariance(advantages, logp, m)
    clipped_by_ppo = masks["clipped_high"] | masks["clipped_low"]
    eligible = (cov > clip_cov_lb) & (cov < clip_cov_ub) & (m > 0) & ~clipped_by_ppo
    idx = torch.nonzero(eligible.reshape(-1)).squeeze(1)
    n = max(int(cov_ratio * float(m.sum())), 1)
    cut = torch.zeros(ratio.numel(), dtype=torch.bool, device=ratio.device)
    if idx.numel():
        perm = torch.randperm(idx.numel(), generator=generator, device="cpu").to(idx.device)
        cut[idx[perm[:n]]] = True
    cut = cut.view_as(ratio)
    masks["clipped_dual"] = cut
    return torch.where(cut, torch.zeros_like(loss), loss), masks


def kl_cov_loss(
    ratio: Tensor,
    advantages: Tensor,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    dual_clip_c: float = 3.0,
    log_ratio: Tensor | None = None,
    mask: Tensor | None = None,
    logp: Tensor | None = None,
    cov_ratio: float = 2e-4,
    kl_cov_coef: float = 1.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """KL-Cov: the unclipped surrogate, plus a |log r| penalty on the highest-covariance tokens.

    loss_t = -r_t A_t + kl_cov_coef * |log r_t| * [t among the top n by cov_t],
    n = max(1, floor(cov_ratio * N)) over the N response tokens (cov_t as in Clip-Cov).
    mask, logp: [B, T] (required). clipped_dual marks the penalised tokens.
    Reference: Cui et al. 2025 (KL-Cov); verl compute_policy_loss_kl_cov (kl_cov_ratio 2e-4,
    ppo_kl_coef 1).
    """
    if mask is None or logp is None:
        raise ValueError("kl_cov_loss needs the response mask and log-probs [B, T]")
    _check(ratio, advantages)
    m = mask.to(ratio.dtype)
    lr = torch.log(ratio) if log_ratio is None else log_ratio
    loss = -ratio * advantages.detach()
    cov = _token_covariance(advantages, logp, m)
    flat = torch.where(m > 0, cov, torch.full_like(cov, float("-inf"))).reshape(-1)
    n = min(max(int(cov_ratio * float(m.sum())), 1), int((m > 0).sum()))
    chosen = torch.zeros(ratio.numel(), dtype=torch.bool, device=ratio.device)
    if n > 0:
        chosen[torch.topk(flat, n).indices] = True
    chosen = chosen.view_as(ratio)
    masks = _no_masks(ratio)
    masks["clipped_dual"] = chosen
    return torch.where(chosen, loss + kl_cov_coef * lr.abs(), loss), masks


# Keys are the values of PolicyLossKnobs.clip (psirl/algorithms.py).
CLIP_RULES: dict[str, ClipFn] = {
    "none": no_clip_loss,
    "symmetric": symmetric_clip_loss,
    "asymmetric": asymmetric_clip_loss,
    "dual": dual_clip_loss,
    "cispo": cispo_loss,
    "sapo": sapo_loss,
    "gmpo": gmpo_loss,
    "clip_cov": clip_cov_loss,
    "kl_cov": kl_cov_loss,
}
# The further inputs each rule takes (policy_loss passes them from the knobs and the batch).
RULE_INPUTS: dict[str, tuple[str, ...]] = {
    "sapo": ("sapo_tau_pos", "sapo_tau_neg"),
    "gmpo": ("mask",),
    "clip_cov": ("mask", "logp", "cov_ratio", "clip_cov_lb", "clip_cov_ub"),
    "kl_cov": ("mask", "logp", "cov_ratio", "kl_cov_coef"),
}
