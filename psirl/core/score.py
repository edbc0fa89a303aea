"""The score stage of the online step: rewards -> per-token rewards (+ KL in the reward) -> advantages.

    r_{i,t} = R_i [t = last_i]                                       (KL placement none / loss)
    r_{i,t} = R_i [t = last_i] - beta * k_{i,t}                      (reward_token)
    r_{i,t} = R_i [t = last_i] - beta * [t = last_i] sum_s k_{i,s}   (reward_sequence)
    (A, G)  = estimator(r, mask, group_ids, values; gamma, lam, eps)
    A      <- whiten(A) over the batch or each group (adv_knobs.whiten; "none" leaves A)

with k the KL estimator of the loss knobs on the behaviour log-probs against the reference
(detached: a KL in the reward is a reward, ../shared/reference/001_dd55e9af3bef0bfc.txt). The
online loop (psirl/train/online.py) and the gradient harness (psirl/verify/sampled.py) call this
one function, so every advantage / KL knob reaches both.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from psirl.core.advantages import ADVANTAGE_ESTIMATORS, whiten_advantages
from psirl.core.kl import kl_in_reward
from psirl.core.masking import place_on_last_token

__all__ = ["REWARD_PLACEMENTS", "Scores", "reward_tokens", "score_rollouts"]

REWARD_PLACEMENTS = frozenset({"reward_token", "reward_sequence"})

# (token_rewards, mask, group_ids, values, *, gamma, lam, eps) -> (advantages, returns)
AdvantageFn = Callable[..., tuple[Tensor, Tensor]]


@dataclass
class Scores:
    """What the update stage needs from the score stage.

    token_rewards: [B, T] the per-token rewards (KL in the reward already subtracted).
    advantages: [B, T] Psi_t of every completion token (0 where mask is 0).
    returns: [B, T] the estimator's returns (the critic's regression targets for GAE).
    """

    token_rewards: Tensor
    advantages: Tensor
    returns: Tensor


def reward_tokens(
    rewards: Tensor,
    mask: Tensor,
    loss_knobs: Any,
    *,
    behaviour_logp: Tensor | None = None,
    ref_logp: Tensor | None = None,
    kl_coef: float | None = None,
    turn_rewards: Tensor | None = None,
) -> Tensor:
    """r_{i,t} of the module docstring: [B] rewards -> [B, T] per-token rewards (mask's float dtype).

    The KL term enters only when both log-probs are given, the placement is a reward placement
    and the coefficient (kl_coef, else loss_knobs.kl_coef) is non-zero. turn_rewards: [B, T]
    per-turn rewards of multi-turn episodes (each on its turn's last model token), used instead
    of placing R_i on the last token, so reward-to-go / GAE see when each was earned.
    """
    dtype = mask.dtype if mask.is_floating_point() else torch.float32
    if turn_rewards is not None:
        token_rewards = turn_rewards.to(dtype) * mask
    else:
        token_rewards = place_on_last_token(rewards.to(dtype), mask)
    beta = float(loss_knobs.kl_coef if kl_coef is None else kl_coef)
    if (ref_logp is not None and behaviour_logp is not None
            and loss_knobs.kl_placement in REWARD_PLACEMENTS and beta != 0.0):
        token_rewards = kl_in_reward(token_rewards, behaviour_logp.detach(), ref_logp.detach(),
                                     mask, coef=beta, estimator=loss_knobs.kl_estimator,
                                     placement=loss_knobs.kl_placement,
                                     clamp=getattr(loss_knobs, "kl_clamp", None))
    return token_rewards


def score_rollouts(
    rewards: Tensor,
    mask: Tensor,
    group_ids: Tensor,
    adv_knobs: Any,
    loss_knobs: Any,
    *,
    behaviour_logp: Tensor | None = None,
    ref_logp: Tensor | None = None,
    values: Tensor | None = None,
    kl_coef: float | None = None,
    advantage_fn: AdvantageFn | None = None,
    turn_rewards: Tensor | None = None,
    extra_inputs: dict[str, Tensor] | None = None,
    reduce: Callable[[Tensor], Tensor] | None = None,
) -> Scores:
    """Per-token rewards and advantages of one batch of rollouts (module docstring).

    rewards: [B] sequence rewards; mask: [B, T] completion mask; group_ids: [B].
    adv_knobs: has estimator, gamma, lam, eps (psirl.algorithms.AdvantageKnobs).
    loss_knobs: has kl_placement, kl_estimator, kl_coef (psirl.algorithms.PolicyLossKnobs).
    behaviour_logp, ref_logp: [B, T] log-probs of the sampled tokens under the sampling policy and
        the reference; the KL goes into the reward only when both are given, the placement is a
        reward placement and the coefficient is non-zero.
    values: [B, T] critic values (GAE). kl_coef: the step's coefficient (an adaptive controller's
        current value); None takes loss_knobs.kl_coef.
    advantage_fn: the estimator to call; None looks ``adv_knobs.estimator`` up in
        ``ADVANTAGE_ESTIMATORS`` (the data-parallel loop passes one that takes batch statistics
        over every rank). turn_rewards: see ``reward_tokens``. extra_inputs: the estimator's
        further inputs (ReMax's ``baseline_rewards`` [B]). reduce: sums a tensor over
        data-parallel ranks, so batch whitening takes the global batch's statistics.

    After the estimator, ``adv_knobs.whiten`` ("none" | "batch" | "group") whitens the
    advantages (core.advantages.whiten_advantages), as verl and OpenRLHF do for PPO.
    """
    if advantage_fn is None:
        advantage_fn = ADVANTAGE_ESTIMATORS[adv_knobs.estimator]
    token_rewards = reward_tokens(rewards, mask, loss_knobs, behaviour_logp=behaviour_logp,
                                  ref_logp=ref_logp, kl_coef=kl_coef, turn_rewards=turn_rewards)
    advantages, returns = advantage_fn(token_rewards, mask, group_ids, values,
                                       gamma=float(adv_knobs.gamma), lam=float(adv_knobs.lam),
                                       eps=float(adv_knobs.eps), **(extra_inputs or {}))
    whiten = getattr(adv_knobs, "whiten", "none")
    if whiten != "none":
        advantages = whiten_advantages(advantages, mask, group_ids, whiten, reduce=reduce)
    return Scores(token_rewards=token_rewards, advantages=advantages, returns=returns)
