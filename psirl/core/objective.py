"""The policy loss of the online loop: ratio -> clip -> aggregate, + KL in loss, - entropy bonus.

    L = Agg_t[ clip_rule( r_t(level), A_t ) ] + beta * Agg_t[ k(logp_t, ref_t) ] - c_H * Agg_t[ H_t ]

Every method is a choice of (ratio level, clip rule, aggregation, KL estimator and placement);
nothing here branches on an algorithm's name.
Reference: ../shared/reference/002_51bc6b7a5ef2c181.txt (the two levers: Psi_t and step
control), ../shared/reference/000_7914f6881bc4a22c.txt (GRPO loss with - beta D_KL inside),
../shared/reference/001_dd55e9af3bef0bfc.txt (KL in the loss is differentiated).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from psirl.core.aggregate import aggregate_loss
from psirl.core.clip import CLIP_RULES, RULE_INPUTS
from psirl.core.kl import kl_estimate
from psirl.core.masking import masked_mean
from psirl.core.ratio import importance_log_ratio

__all__ = ["policy_loss"]


def _knob(knobs: Any, name: str, default: Any) -> Any:
    return getattr(knobs, name, default)


def policy_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    knobs: Any,
    normaliser: float,
    ref_logp: Tensor | None = None,
    *,
    entropy: Tensor | None = None,
    kl_coef: float | None = None,
    is_weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Compose the per-token surrogate and aggregate it into one micro-batch's loss.

    log r_t = importance_log_ratio(logp, old_logp, mask, knobs.ratio)
    l_t     = CLIP_RULES[knobs.clip](exp(log r_t), A_t; eps_low, eps_high, dual_clip_c)
    L       = Agg(l) + beta * Agg(k_t) [if knobs.kl_placement == "loss"] - c_H * Agg(H_t)

    with Agg = aggregate_loss(., mask, knobs.aggregation, normaliser) and k_t =
    kl_estimate(logp, ref_logp, knobs.kl_estimator, clamp=knobs.kl_clamp, log_ratio=log r_t)
    differentiated (KL in the loss; the ratio only matters for "k3_ratio"). When the KL
    sits in the reward it has already shaped ``advantages`` and is not added here.

    logp: [B, T] float, current policy log-probs of the sampled tokens (requires grad);
    old_logp: [B, T] behaviour/old log-probs (ignored for ratio "on_policy");
    advantages: [B, T] (detached); mask: [B, T] 0/1;
    knobs: any object with the PolicyLossKnobs attributes (ratio, clip, eps_low, eps_high,
    dual_clip_c, aggregation, kl_estimator, kl_placement, kl_coef, entropy_coef);
    normaliser: float from ``step_normaliser(step masks, knobs.aggregation, ...)``;
    ref_logp: [B, T] reference log-probs, required when the KL is in the loss with beta > 0;
    entropy: [B, T] per-token entropy (differentiable), used for the bonus and the metric;
    kl_coef: overrides knobs.kl_coef (e.g. the adaptive controller's current beta).
    is_weights: [B, T] detached per-token weights of l_t (truncated importance sampling for the
    engine-trainer mismatch, ``core.offpolicy.truncated_is_weights``); KL and entropy terms are
    not weighted. None: weight 1.

    Returns (loss 0-d tensor, metrics): loss, pg_loss, kl_loss, entropy_loss, clip_frac_low,
    clip_frac_high, clip_frac_dual, ratio_mean, ratio_min, ratio_max (masked, this micro-batch),
    kl_mean (masked mean of the KL estimate, when ref_logp is given), entropy_mean (when
    entropy is given). All metrics are Python floats.
    Reference: ../shared/reference/002_51bc6b7a5ef2c181.txt, 000 (GRPO objective).
    """
    clip_rule = _knob(knobs, "clip", "symmetric")
    if clip_rule not in CLIP_RULES:
        raise ValueError(f"knobs.clip must be one of {tuple(CLIP_RULES)}, got {clip_rule!r}")
    mode = _knob(knobs, "aggregation", "token_mean")
    placement = _knob(knobs, "kl_placement", "none")
    beta = float(_knob(knobs, "kl_coef", 0.0) if kl_coef is None else kl_coef)
    entropy_coef = float(_knob(knobs, "entropy_coef", 0.0))

    m = mask.to(logp.dtype)
    log_ratio = importance_log_ratio(logp, old_logp, m, _knob(knobs, "ratio", "token"))
    ratio = torch.exp(log_ratio)
    available = {"mask": m, "logp": logp}
    # Rule-specific inputs: the batch's mask / log-probs, and knob values (the rule's own
    # defaults when the knobs object does not carry them).
    extra = {
        name: available[name] if name in available else float(getattr(knobs, name))
        for name in RULE_INPUTS.get(clip_rule, ())
        if name in available or hasattr(knobs, name)
    }
    per_token, clip_masks = CLIP_RULES[clip_rule](
        ratio,
        advantages.detach().to(logp.dtype),
        eps_low=float(_knob(knobs, "eps_low", 0.2)),
        eps_high=float(_knob(knobs, "eps_high", 0.2)),
        dual_clip_c=float(_knob(knobs, "dual_clip_c", 3.0)),
        log_ratio=log_ratio,
        **extra,
    )
    if is_weights is not None:
        per_token = per_token * is_weights.detach().to(per_token.dtype)
    pg_loss = aggregate_loss(per_token, m, mode, normaliser)
    loss = pg_loss
    # Metric tensors are gathered and moved to the host once (one device sync, not a dozen).
    stats: dict[str, Tensor] = {"pg_loss": pg_loss.detach()}

    kl_tok = None
    if ref_logp is not None:
        ref = ref_logp.to(logp.dtype).detach()
        kl_tok = kl_estimate(
            logp, ref, _knob(knobs, "kl_estimator", "k3"),
            clamp=_knob(knobs, "kl_clamp", None), log_ratio=log_ratio,
        )
        stats["kl_mean"] = masked_mean(kl_tok.detach(), m)
    kl_loss = torch.zeros((), dtype=logp.dtype, device=logp.device)
    if placement == "loss" and beta != 0.0:
        if kl_tok is None:
            raise ValueError("knobs.kl_placement == 'loss' with kl_coef > 0 needs ref_logp [B, T]")
        kl_loss = aggregate_loss(kl_tok, m, mode, normaliser)
        loss = loss + beta * kl_loss
    stats["kl_loss"] = kl_loss.detach()

    entropy_loss = torch.zeros((), dtype=logp.dtype, device=logp.device)
    if entropy is not None:
        stats["entropy_mean"] = masked_mean(entropy.detach().to(logp.dtype), m)
        if entropy_coef != 0.0:
            entropy_loss = aggregate_loss(entropy.to(logp.dtype), m, mode, normaliser)
            loss = loss - entropy_coef * entropy_loss
    elif entropy_coef != 0.0:
        raise ValueError("knobs.entropy_coef != 0 needs `entropy` [B, T]")
    stats["entropy_loss"] = entropy_loss.detach()

    on = m > 0
    r = ratio.detach()
    for key, name in (
        ("clipped_low", "clip_frac_low"),
        ("clipped_high", "clip_frac_high"),
        ("clipped_dual", "clip_frac_dual"),
    ):
        stats[name] = masked_mean(clip_masks[key].to(logp.dtype), m)
    # Ratio statistics over response tokens; a micro-batch without any reports 1 (no change).
    one, any_token = torch.ones((), dtype=r.dtype, device=r.device), on.any()
    r_min = torch.where(on, r, torch.full_like(r, float("inf"))).amin()
    r_max = torch.where(on, r, torch.full_like(r, float("-inf"))).amax()
    stats["ratio_mean"] = torch.where(any_token, masked_mean(r, m), one)
    stats["ratio_min"] = torch.where(any_token, r_min, one)
    stats["ratio_max"] = torch.where(any_token, r_max, one)
    stats["loss"] = loss.detach()
    names = list(stats)
    values = torch.stack([stats[k].to(torch.float64).reshape(()) for k in names]).tolist()
    metrics = dict(zip(names, values, strict=True))
    return loss, metrics
