"""KL to the reference policy: the k1/k2/k3 estimators, their placement, the adaptive coefficient.

With rho_t = log pi_ref(a_t) - log pi(a_t) (a_t sampled from pi):

    k1 = -rho = log pi - log pi_ref                  unbiased for KL(pi || pi_ref), high variance
    k2 = rho^2 / 2                                   biased, >= 0, low variance
    k3 = exp(rho) - rho - 1                          unbiased (E_pi[exp(rho)] = 1), >= 0

Placement (../shared/reference/001_dd55e9af3bef0bfc.txt, table after "KL Estimators and Gradient
Pitfall"): in the reward the value is detached and subtracted from the reward; in the loss it
is differentiated. Only k1-in-reward gives an unbiased gradient of the KL-regularised objective;
k1-in-loss has zero expected gradient (noise only); k3-in-reward is biased and collapses
training; k3-in-loss (GRPO) is biased but stable.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from psirl.core.masking import masked_sum, place_on_last_token

__all__ = [
    "kl_k1",
    "kl_k2",
    "kl_k3",
    "kl_abs",
    "kl_low_var",
    "straight_through",
    "KL_ESTIMATORS",
    "RATIO_CORRECTED",
    "kl_estimate",
    "kl_in_reward",
    "AdaptiveKLController",
    "FixedKLController",
]


def _check(logp: Tensor, ref_logp: Tensor) -> None:
    if logp.shape != ref_logp.shape:
        raise ValueError(f"logp {tuple(logp.shape)} and ref_logp {tuple(ref_logp.shape)} differ")


def kl_k1(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k1 = log pi(a) - log pi_ref(a): the naive Monte Carlo estimate of KL(pi || pi_ref).

    logp, ref_logp: [B, T] (or any equal shape) float log-probs of the sampled tokens.
    Returns the same shape; differentiable in logp.
    Reference: ../shared/reference/001_dd55e9af3bef0bfc.txt (K1 estimator),
    ../shared/reference/000_7914f6881bc4a22c.txt (REINFORCE++ token-level log-ratio).
    """
    _check(logp, ref_logp)
    return logp - ref_logp


def kl_k2(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k2 = (log pi(a) - log pi_ref(a))^2 / 2: the second-order (Taylor) estimate.

    Shapes as ``kl_k1``.
    Reference: ../shared/reference/001_dd55e9af3bef0bfc.txt (K2 estimator).
    """
    _check(logp, ref_logp)
    d = logp - ref_logp
    return 0.5 * d * d


def kl_k3(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k3 = exp(rho) - rho - 1, rho = log pi_ref(a) - log pi(a): unbiased and non-negative.

    = pi_ref/pi - log(pi_ref/pi) - 1. Shapes as ``kl_k1``.
    Reference: ../shared/reference/004_0ae34f1505be1cc8.txt (GRPO's KL approximation),
    ../shared/reference/003_e8bd019fa090e190.txt (kl = exp(log_rho) - log_rho - 1).
    """
    _check(logp, ref_logp)
    rho = ref_logp - logp
    # expm1(rho) - rho, not exp(rho) - 1 - rho: near rho = 0 the latter rounds below zero.
    return torch.expm1(rho) - rho


def kl_abs(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """abs = |log pi(a) - log pi_ref(a)| (verl's kl_penalty "abs"). Shapes as ``kl_k1``.

    Biased (E_pi|k1| >= KL) and non-negative. Reference: verl core_algos.kl_penalty.
    """
    _check(logp, ref_logp)
    return (logp - ref_logp).abs()


LOW_VAR_KL_CLAMP = 10.0


def kl_low_var(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """verl's "low_var_kl": k3 clamped to [-10, 10] (k3 >= 0, so in effect min(k3, 10)).

    Beyond the clamp the value is 10 and the gradient 0 (torch.clamp). Shapes as ``kl_k1``.
    Reference: verl core_algos.kl_penalty ("low_var_kl": torch.clamp(kld, min=-10, max=10)).
    """
    return torch.clamp(kl_k3(logp, ref_logp), -LOW_VAR_KL_CLAMP, LOW_VAR_KL_CLAMP)


def straight_through(value: Tensor, logp: Tensor, ref_logp: Tensor) -> Tensor:
    """The value of an estimator with the gradient of k2: verl's "+" variants (k1+, k3+, ...).

        out = value.detach() + k2 - k2.detach(),   k2 = (log pi - log pi_ref)^2 / 2

    so out == value while d out / d logp = log pi - log pi_ref: in the loss, E_pi of that times
    grad log pi is the gradient of the per-state reverse KL, which k1 (zero in expectation) and
    k3 (the forward KL's) do not give. Reference: verl core_algos.kl_penalty ("+" suffix,
    straight-through), OpenRLHF PR #1309.
    """
    k2 = kl_k2(logp, ref_logp)
    return value.detach() + (k2 - k2.detach())


KL_ESTIMATORS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "k1": kl_k1,
    "k2": kl_k2,
    "k3": kl_k3,
    "abs": kl_abs,
    "low_var_kl": kl_low_var,
    "k1+": lambda lp, ref: straight_through(kl_k1(lp, ref), lp, ref),
    "k3+": lambda lp, ref: straight_through(kl_k3(lp, ref), lp, ref),
    "low_var_kl+": lambda lp, ref: straight_through(kl_low_var(lp, ref), lp, ref),
    # TRL's GRPO default (use_bias_correction_kl): k3 times the importance ratio pi/pi_old, see
    # kl_estimate; with no ratio given (the KL in the reward, at sampling time) it is k3.
    "k3_ratio": kl_k3,
}
# Estimators multiplied by the importance ratio r_t = pi/pi_old (differentiated) when given one.
RATIO_CORRECTED: frozenset[str] = frozenset({"k3_ratio"})


def kl_estimate(
    logp: Tensor,
    ref_logp: Tensor,
    estimator: str,
    *,
    clamp: float | None = None,
    log_ratio: Tensor | None = None,
) -> Tensor:
    """Per-token KL estimate with the named estimator (a key of ``KL_ESTIMATORS``).

        k = KL_ESTIMATORS[estimator](logp, ref_logp)
        k = k * exp(log_ratio)          for "k3_ratio" when log_ratio is given (TRL's
                                        importance-sampling-corrected KL: E_old[r k3] = E_pi[k3])
        k = clamp(k, -clamp, clamp)     when clamp is given (verl clamps k3 at 10; off by
                                        default, as the references write k3)

    logp, ref_logp: [B, T] float; log_ratio: [B, T] (or broadcastable) log pi - log pi_old,
    differentiable. Returns [B, T]; differentiable in logp.
    Reference: ../shared/reference/001_dd55e9af3bef0bfc.txt; verl core_algos.kl_penalty; TRL
    GRPOTrainer (use_bias_correction_kl).
    """
    try:
        fn = KL_ESTIMATORS[estimator]
    except KeyError:
        raise ValueError(
            f"kl estimator must be one of {tuple(KL_ESTIMATORS)}, got {estimator!r}"
        ) from None
    k = fn(logp, ref_logp)
    if estimator in RATIO_CORRECTED and log_ratio is not None:
        k = k * torch.exp(log_ratio)
    if clamp is not None:
        if not clamp > 0:
            raise ValueError(f"kl clamp must be > 0, got {clamp!r}")
        k = torch.clamp(k, -clamp, clamp)
    return k


def kl_in_reward(
    token_rewards: Tensor,
    logp: Tensor,
    ref_logp: Tensor,
    mask: Tensor,
    *,
    coef: float,
    estimator: str = "k1",
    placement: str = "reward_token",
    clamp: float | None = None,
) -> Tensor:
    """Subtract a detached KL penalty from the per-token rewards.

    reward_token:     r'_{b,t} = r_{b,t} - coef * m_{b,t} * k_{b,t}
    reward_sequence:  r'_{b,t} = r_{b,t} - coef * [t == last_b] * sum_s m_{b,s} k_{b,s}

    With reward-to-go advantages, the token placement charges each token only for the KL still
    ahead of it (REINFORCE++ / PPO: A_t = R - beta sum_{i >= t} KL_i), the sequence placement
    charges every token for the whole sequence's KL (RLOO: R' = R - beta KL). The KL value is
    detached: in the reward it is a number, never differentiated.
    token_rewards, logp, ref_logp, mask: [B, T]. Returns new token_rewards [B, T] (detached).
    ``placement`` also accepts "token" / "sequence"; ``clamp``: see ``kl_estimate``.
    Reference: ../shared/reference/001_dd55e9af3bef0bfc.txt ("In the Reward: ... stop the
    gradients, and then you subtract it from the reward"), ../shared/reference/000 (REINFORCE++
    R~_i = R_i - beta sum_t log pi/pi_ref), ../shared/reference/002 (Placement A, RLOO).
    """
    if token_rewards.shape != mask.shape:
        raise ValueError(
            f"token_rewards {tuple(token_rewards.shape)} and mask {tuple(mask.shape)} differ"
        )
    kl = kl_estimate(logp.detach(), ref_logp.detach(), estimator, clamp=clamp)
    kl = kl.to(token_rewards.dtype)
    m = mask.to(token_rewards.dtype)
    if placement in ("reward_token", "token"):
        penalty = torch.where(m > 0, kl, torch.zeros_like(kl)) * m
    elif placement in ("reward_sequence", "sequence"):
        penalty = place_on_last_token(masked_sum(kl, m, dim=1), m)
    else:
        raise ValueError(
            f"placement must be 'reward_token' or 'reward_sequence', got {placement!r}"
        )
    return token_rewards.detach() - coef * penalty


class AdaptiveKLController:
    """PPO-KLPEN adaptive KL coefficient, in Ziegler et al.'s proportional form.

    e_t       = clip( KL_t / KL_target - 1, -0.2, 0.2 )
    beta_{t+1} = beta_t * (1 + K_beta * e_t),   K_beta = n_steps / horizon

    The coefficient grows when the measured KL is above target and shrinks when below; the
    clip bounds a single update to a factor within [1 - 0.2 K_beta, 1 + 0.2 K_beta].
    init: starting beta (>= 0; 0 stays 0, i.e. no KL); target: KL_target (> 0, nats per sequence or per token, as
    measured by the caller); horizon: steps over which errors are integrated (> 0).
    Reference: ../shared/reference/001_dd55e9af3bef0bfc.txt (PPO-KLPEN: "the algorithm quickly
    adjusts it"); Ziegler et al. 2019 for the proportional controller.
    """

    def __init__(self, init: float, target: float, horizon: int) -> None:
        if not init >= 0:
            raise ValueError(f"AdaptiveKLController.init must be >= 0, got {init!r}")
        if not target > 0:
            raise ValueError(f"AdaptiveKLController.target must be > 0, got {target!r}")
        if not horizon > 0:
            raise ValueError(f"AdaptiveKLController.horizon must be > 0, got {horizon!r}")
        self.value = float(init)
        self.target = float(target)
        self.horizon = int(horizon)

    def update(self, current_kl: float, n_steps: int = 1) -> float:
        """Apply one controller step for a measured KL; returns the new beta."""
        error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value, "target": self.target, "horizon": float(self.horizon)}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])
        self.target = float(state["target"])
        self.horizon = int(state["horizon"])


class FixedKLController:
    """A constant KL coefficient with the same interface as ``AdaptiveKLController``.

    beta_{t+1} = beta_t. Reference: ../shared/reference/001_dd55e9af3bef0bfc.txt (fixed beta).
    """

    def __init__(self, value: float) -> None:
        if not value >= 0:
            raise ValueError(f"FixedKLController.value must be >= 0, got {value!r}")
        self.value = float(value)

    def update(self, current_kl: float, n_steps: int = 1) -> float:
        return self.value

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])
