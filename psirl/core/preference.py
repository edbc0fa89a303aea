"""Preference losses over per-sequence log-probabilities: DPO, IPO, KTO, SimPO, ORPO, Bradley–Terry.

Every input is a per-sequence quantity, shape [B] float: ``*_logps`` are SUMS of the completion's
token log-probs, log pi(y | x) = sum_t log pi(y_t | x, y_<t); ``*_lengths`` are completion token
counts |y| (> 0). Every loss returns the UNREDUCED per-example loss [B], so a loop can sum
micro-batches and divide by a normaliser computed once per optimiser step (as core/aggregate.py
does for the online loop).

Notation: h = log pi(y_w)/pi_ref(y_w) - log pi(y_l)/pi_ref(y_l) (the log-ratio margin);
implicit reward r_hat(y) = beta log pi(y)/pi_ref(y); sigma = logistic sigmoid.

References: ../shared/reference/000_7914f6881bc4a22c.txt ("DPO: closed-form RL as a supervised
loss", "Variants": SimPO, KTO, IPO, ORPO, online DPO); ../shared/reference/001_dd55e9af3bef0bfc.txt
(DPO, iterative DPO, IPO's margin, KTO's value function and reference point, SimPO's length
normalisation and margin gamma); ../shared/reference/004_0ae34f1505be1cc8.txt (Bradley–Terry
reward-model loss, DPO loss and its gradient); ../shared/reference/003_e8bd019fa090e190.txt
(likelihood displacement: watch the chosen log-prob, not only the margin). Where the references
name a method without its formula, the formula is the original paper's (cited per function).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "dpo_loss",
    "ipo_loss",
    "kto_reference_point",
    "kto_loss",
    "simpo_loss",
    "average_logps",
    "log_odds",
    "orpo_loss",
    "bradley_terry_loss",
    "implicit_rewards",
    "preference_metrics",
    "best_worst_pairs",
]

# The largest average log-prob ORPO's log-odds accept: log p = 0 (p = 1) has infinite odds.
_MAX_AVG_LOGP = -1e-6


def _check_same_shape(**tensors: Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    first = next(iter(shapes.values()))
    if len(first) != 1 or any(s != first for s in shapes.values()):
        raise ValueError(f"expected tensors of one shape [B]; got {shapes}")


def _log_ratio_margin(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
) -> Tensor:
    _check_same_shape(
        policy_chosen_logps=policy_chosen_logps,
        policy_rejected_logps=policy_rejected_logps,
        ref_chosen_logps=ref_chosen_logps,
        ref_rejected_logps=ref_rejected_logps,
    )
    return (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float,
    label_smoothing: float = 0.0,
) -> Tensor:
    """DPO, optionally conservative (label smoothing eps): per-pair loss [B].

        L = -(1 - eps) log sigma(beta h) - eps log sigma(-beta h)

    with h the log-ratio margin above. eps = 0 is DPO (000 "DPO: closed-form RL as a supervised
    loss"; 004 L_DPO); eps > 0 assumes each label is flipped with probability eps (conservative
    DPO, Mitchell 2023), so the loss has a finite minimiser beta h = log((1-eps)/eps).

    Gradient (004, "DPO gradient analysis"), for eps = 0:
        dL/d log pi(y_w) = -beta sigma(r_hat_l - r_hat_w),  dL/d log pi(y_l) = +beta sigma(r_hat_l - r_hat_w)
    so pairs the model ranks wrongly get the largest weight.

    All inputs [B] float (sequence log-prob sums); beta > 0; 0 <= eps < 0.5.
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    logits = beta * _log_ratio_margin(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    loss = -F.logsigmoid(logits)
    if label_smoothing > 0:
        loss = (1.0 - label_smoothing) * loss - label_smoothing * F.logsigmoid(-logits)
    return loss


def ipo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float,
) -> Tensor:
    """IPO: squared distance of the log-ratio margin from 1/(2 beta); per-pair loss [B].

        L = (h - 1/(2 beta))^2

    Instead of pushing the margin to infinity as DPO's sigmoid does, IPO regresses it to a finite
    target, so training stops once the pair is separated by 1/(2 beta) (Azar et al. 2024;
    001 "Identity Preference Optimization"; 000 "Variants"). The minimiser is h = 1/(2 beta) with
    loss 0. Inputs [B] float (sequence log-prob sums; pass per-token averages to get the
    length-normalised variant); beta > 0.
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    margin = _log_ratio_margin(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    return (margin - 1.0 / (2.0 * beta)) ** 2


def kto_reference_point(mismatched_policy_logps: Tensor, mismatched_ref_logps: Tensor) -> Tensor:
    """KTO's reference point z0, a detached scalar estimate of KL(pi || pi_ref).

        z0 = max(0, mean_j [log pi(y'_j | x_j) - log pi_ref(y'_j | x_j)])

    over MISMATCHED pairs (x_j, y'_j): prompt j with the completion of another example of the
    batch, so z0 estimates the KL on "unrelated" outputs and carries no per-example signal. It is
    detached: KTO does not back-propagate through the reference point (Ethayarajh et al. 2024;
    001 "KTO": "the authors used an estimator ... or set the reference point to zero").
    Inputs [M] float (sequence log-prob sums); returns a 0-dim tensor.
    """
    _check_same_shape(
        mismatched_policy_logps=mismatched_policy_logps, mismatched_ref_logps=mismatched_ref_logps
    )
    kl = (mismatched_policy_logps - mismatched_ref_logps).detach().mean()
    return kl.clamp(min=0.0)


def kto_loss(
    policy_logps: Tensor,
    ref_logps: Tensor,
    desirable: Tensor,
    reference_point: Tensor | float,
    *,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> Tensor:
    """KTO over unpaired samples labelled desirable / undesirable: per-sample loss [B].

        r(x, y) = log pi(y|x) - log pi_ref(y|x)
        v(x, y) = lambda_D sigma(beta (r - z0))   if y is desirable
                  lambda_U sigma(beta (z0 - r))   if y is undesirable
        L       = lambda_y - v(x, y)

    (Ethayarajh et al. 2024; 001 "KTO": the value function and reference point z0; 000
    "Variants"). policy_logps, ref_logps: [B] float sequence log-prob sums; desirable: [B] bool;
    reference_point: z0 from ``kto_reference_point`` (or 0.0); beta > 0; weights lambda_D,
    lambda_U > 0 (the paper balances them so that lambda_D n_D / (lambda_U n_U) is in [1, 4/3]).
    """
    _check_same_shape(policy_logps=policy_logps, ref_logps=ref_logps, desirable=desirable)
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if desirable_weight <= 0 or undesirable_weight <= 0:
        raise ValueError(
            f"desirable_weight and undesirable_weight must be > 0, got "
            f"{desirable_weight}, {undesirable_weight}"
        )
    if desirable.dtype != torch.bool:
        raise ValueError(f"desirable must be a bool tensor, got {desirable.dtype}")
    z0 = torch.as_tensor(reference_point, dtype=policy_logps.dtype, device=policy_logps.device)
    r = policy_logps - ref_logps
    value_d = desirable_weight * torch.sigmoid(beta * (r - z0))
    value_u = undesirable_weight * torch.sigmoid(beta * (z0 - r))
    weight = torch.where(
        desirable,
        torch.full_like(r, desirable_weight),
        torch.full_like(r, undesirable_weight),
    )
    return weight - torch.where(desirable, value_d, value_u)


def average_logps(logps: Tensor, lengths: Tensor) -> Tensor:
    """Length-normalised log-prob, log pi(y|x) / |y|: [B] float from sums [B] and counts [B] (> 0)."""
    _check_same_shape(logps=logps, lengths=lengths)
    if bool((lengths <= 0).any()):
        raise ValueError(f"lengths must be > 0, got {lengths.tolist()}")
    return logps / lengths.to(logps.dtype)


def simpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    *,
    beta: float,
    gamma: float,
) -> Tensor:
    """SimPO: reference-free, length-normalised reward with a target margin; per-pair loss [B].

        L = -log sigma( beta/|y_w| log pi(y_w|x) - beta/|y_l| log pi(y_l|x) - gamma )

    (Meng et al. 2024; 000 "Variants": "drops pi_ref ... uses average log-prob normalized by
    length as the implicit reward"; 001 "SimPO": "length-normalized log probability ... with some
    margin target gamma"). Inputs [B] float: log-prob sums and token counts; beta > 0; gamma >= 0.
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if gamma < 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    _check_same_shape(policy_chosen_logps=policy_chosen_logps,
                      policy_rejected_logps=policy_rejected_logps)
    chosen = average_logps(policy_chosen_logps, chosen_lengths)
    rejected = average_logps(policy_rejected_logps, rejected_lengths)
    return -F.logsigmoid(beta * (chosen - rejected) - gamma)


def log_odds(avg_logps: Tensor) -> Tensor:
    """log odds(y|x) = log P - log(1 - P) with log P the per-token average log-prob (ORPO).

        log odds = a - log(1 - exp(a)),  a = log pi(y|x) / |y|  (computed as log(-expm1(a)))

    a is clamped to <= -1e-6 so that a sequence of probability exactly 1 stays finite.
    avg_logps: [B] float (<= 0). Returns [B] float.
    """
    a = avg_logps.clamp(max=_MAX_AVG_LOGP)
    return a - torch.log(-torch.expm1(a))


def orpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    *,
    lam: float,
) -> Tensor:
    """ORPO: SFT on the chosen answer plus lambda times an odds-ratio preference term; loss [B].

        a_w = log pi(y_w|x)/|y_w|,  a_l = log pi(y_l|x)/|y_l|
        L = -a_w + lambda * ( -log sigma( log odds(a_w) - log odds(a_l) ) )

    (Hong et al. 2024; 000 "Variants": "folds an explicit SFT term into the DPO loss so you can
    collapse the SFT and preference-tuning stages into one pass"). No reference model. The SFT
    term is the chosen completion's per-token NLL. Inputs [B] float; lam >= 0.
    """
    if lam < 0:
        raise ValueError(f"lam must be >= 0, got {lam}")
    _check_same_shape(policy_chosen_logps=policy_chosen_logps,
                      policy_rejected_logps=policy_rejected_logps)
    chosen = average_logps(policy_chosen_logps, chosen_lengths)
    rejected = average_logps(policy_rejected_logps, rejected_lengths)
    odds_ratio_term = -F.logsigmoid(log_odds(chosen) - log_odds(rejected))
    return -chosen + lam * odds_ratio_term


def bradley_terry_loss(
    chosen_scores: Tensor, rejected_scores: Tensor, margin: Tensor | float | None = None
) -> Tensor:
    """Bradley–Terry reward-model loss: per-pair loss [B].

        L = -log sigma( r_phi(x, y_w) - r_phi(x, y_l) - m )

    (004 "The Bradley--Terry model": P(y_w > y_l | x) = sigma(r_phi(x,y_w) - r_phi(x,y_l)) and
    L_RM = -E[log sigma(r_phi(x,y_w) - r_phi(x,y_l))]). Optional margin m (scalar or [B]; Llama 2
    style) demands that the chosen score lead by m; None means m = 0.
    chosen_scores, rejected_scores: [B] float scalar rewards.
    """
    _check_same_shape(chosen_scores=chosen_scores, rejected_scores=rejected_scores)
    diff = chosen_scores - rejected_scores
    if margin is not None:
        diff = diff - margin
    return -F.logsigmoid(diff)


def implicit_rewards(
    policy_logps: Tensor, ref_logps: Tensor | None = None, *, beta: float
) -> Tensor:
    """DPO's implicit reward r_hat(y) = beta (log pi(y|x) - log pi_ref(y|x)), detached; [B] float.

    (004 "DPO gradient analysis": r_hat_i = beta log pi_theta(y_i|x) / pi_ref(y_i|x).) With
    ref_logps None (SimPO, ORPO: no reference) it is beta log pi(y|x); pass per-token averages to
    get SimPO's length-normalised reward.
    """
    r = policy_logps if ref_logps is None else policy_logps - ref_logps
    return beta * r.detach()


def preference_metrics(chosen_rewards: Tensor, rejected_rewards: Tensor) -> dict[str, float]:
    """Means over pairs of the implicit (or reward-model) rewards: floats.

        rewards/chosen   = mean r_w          rewards/rejected = mean r_l
        rewards/margin   = mean (r_w - r_l)
        rewards/accuracy = mean (1[r_w > r_l] + 1/2 1[r_w = r_l])

    A tie counts as half right, so a policy equal to its reference (all margins 0) scores the
    chance level 0.5. chosen_rewards, rejected_rewards: [B] float, B >= 1.
    """
    _check_same_shape(chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards)
    if chosen_rewards.numel() == 0:
        raise ValueError("preference_metrics needs at least one pair")
    c, r = chosen_rewards.detach().double(), rejected_rewards.detach().double()
    margin = c - r
    accuracy = (margin > 0).double() + 0.5 * (margin == 0).double()
    return {
        "rewards/chosen": float(c.mean()),
        "rewards/rejected": float(r.mean()),
        "rewards/margin": float(margin.mean()),
        "rewards/accuracy": float(accuracy.mean()),
    }


def best_worst_pairs(rewards: Tensor, group_ids: Tensor) -> tuple[Tensor, Tensor]:
    """Online DPO's pairs: in each group, the highest-reward sample vs the lowest-reward one.

        chosen_g = argmax_{i in g} R_i,  rejected_g = argmin_{i in g} R_i   (lowest index on ties)

    Groups whose rewards are all equal give no preference and are skipped (000 "Variants":
    "Online DPO runs DPO on a stream of fresh preferences (sampled and labeled during training)";
    001 "Iterative and Online DPO": label the current model's samples with the reward model).
    rewards: [B] float; group_ids: [B] long. Returns (chosen_idx [M] long, rejected_idx [M] long),
    one entry per group with a strict preference, in ascending order of group id.
    """
    _check_same_shape(rewards=rewards, group_ids=group_ids)
    chosen, rejected = [], []
    r = rewards.detach()
    group_ids = group_ids.to(r.device)  # rewards are scored on the host, ids may be on the GPU
    for g in torch.unique(group_ids).tolist():
        rows = (group_ids == g).nonzero().flatten()
        values = r[rows]
        best, worst = int(torch.argmax(values)), int(torch.argmin(values))
        if values[best] > values[worst]:
            chosen.append(int(rows[best]))
            rejected.append(int(rows[worst]))
    as_long = {"dtype": torch.long, "device": rewards.device}
    return torch.tensor(chosen, **as_long), torch.tensor(rejected, **as_long)
