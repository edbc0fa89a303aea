"""Truncated importance sampling (TIS) for the engine-trainer mismatch, and its metrics.

A fast engine (vLLM) samples with its own kernels, batch shapes and dtype, so even with the same
weights its behaviour log-probs l_eng differ from the trainer's l_tr of the same tokens. The
policy gradient then averages over samples from mu (the engine) while it should average over pi
(the trainer's policy). Importance weights pi / mu correct for this; truncating them at C bounds
their variance at the price of a bias that vanishes once C exceeds every ratio (verl PR #2953,
"Your efficient RL framework secretly brings you off-policy RL training"; TRL, OpenRLHF):

    token:     w[b, t] = min(exp(l_tr[b, t] - l_eng[b, t]), C)
    sequence:  w[b, t] = min(exp(sum_s m[b, s] (l_tr[b, s] - l_eng[b, s])), C)   (every t of b)

w multiplies each token's policy-gradient term (detached: it is a weight, not a path for
gradients). l_tr is the trainer's log-prob of the sampled token at the weights that sampled it
(the "old" log-prob; one extra no-grad forward when the engine is not the trainer's own module).
Token-level weights correct each step's action distribution but not the state distribution, so
some bias remains even with C = inf; sequence-level weights are exact (unbiased) once C exceeds
every sequence ratio, with higher variance. ``psirl.verify.offpolicy`` measures both.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

TIS_LEVELS = ("token", "sequence")


def truncated_is_weights(
    trainer_logprobs: Tensor,
    behaviour_logprobs: Tensor,
    mask: Tensor,
    cap: float,
    level: str = "token",
) -> Tensor:
    """Truncated importance weights min(pi / mu, C) (equations in the module docstring).

    trainer_logprobs, behaviour_logprobs: [B, T] log-probs of the sampled tokens under the
        trainer (pi) and the engine that sampled them (mu); mask: [B, T] 0/1 completion mask.
    cap: C > 0 (math.inf: no truncation). level: "token" | "sequence".
    Returns [B, T] in trainer_logprobs' dtype, detached, 0 where mask is 0. Computed in log
    space, exp(min(delta, log C)), so a large log-ratio cannot overflow.
    """
    if level not in TIS_LEVELS:
        raise ValueError(f"tis_level must be one of {TIS_LEVELS}, got {level!r}")
    if not cap > 0:
        raise ValueError(f"tis_cap must be > 0, got {cap}")
    if trainer_logprobs.shape != behaviour_logprobs.shape or mask.shape != trainer_logprobs.shape:
        raise ValueError(
            "truncated_is_weights: trainer_logprobs, behaviour_logprobs and mask must have one "
            f"shape, got {tuple(trainer_logprobs.shape)}, {tuple(behaviour_logprobs.shape)}, "
            f"{tuple(mask.shape)}"
        )
    keep = mask > 0
    delta = torch.where(keep, (trainer_logprobs - behaviour_logprobs).detach(), 0.0)
    if level == "sequence":
        delta = delta.sum(dim=-1, keepdim=True).expand_as(delta)
    log_cap = math.log(cap) if math.isfinite(cap) else math.inf
    weights = delta.clamp(max=log_cap).exp()
    return torch.where(keep, weights, torch.zeros((), dtype=weights.dtype))


def mismatch_metrics(
    trainer_logprobs: Tensor,
    behaviour_logprobs: Tensor,
    mask: Tensor,
    cap: float | None = None,
    level: str = "token",
) -> dict[str, float]:
    """How far the engine's log-probs are from the trainer's, over the masked tokens.

    mismatch/abs_mean, mismatch/abs_max: mean and max of |l_tr - l_eng| per token;
    mismatch/kl_k3: mean of r - 1 - log r, r = exp(l_tr - l_eng), an unbiased estimate of the
        per-token KL(mu || pi) under the engine's samples;
    tis/truncated_frac (when cap is given): fraction of tokens whose weight was truncated
        (for level "sequence": of tokens in truncated sequences).
    """
    keep = mask > 0
    n = keep.sum().clamp(min=1)
    delta = torch.where(keep, (trainer_logprobs - behaviour_logprobs).detach().double(), 0.0)
    out = {
        "mismatch/abs_mean": float(delta.abs().sum() / n),
        "mismatch/abs_max": float(delta.abs().max()) if keep.any() else 0.0,
        "mismatch/kl_k3": float(torch.where(keep, delta.exp() - 1 - delta, 0.0).sum() / n),
    }
    if cap is not None:
        level_delta = delta.sum(-1, keepdim=True).expand_as(delta) if level == "sequence" else delta
        truncated = keep & (level_delta > math.log(cap))
        out["tis/truncated_frac"] = float(truncated.sum() / n)
    return out
