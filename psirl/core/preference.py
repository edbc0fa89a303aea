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

import math

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
    "DPO_LOSS_TYPES",
    "dpo_family_loss",
    "mixed_dpo_loss",
    "kto_apo_zero_unpaired_loss",
    "cpo_loss",
    "alphapo_loss",
    "reward_centering_penalty",
    "likelihood_displacement",
    "PAPER_DEFAULTS",
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
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
) -> Tensor:
    """IPO: squared distance of the log-ratio margin from 1/(2 beta); per-pair loss [B].

        L = (h - 1/(2 beta))^2

    Instead of pushing the margin to infinity as DPO's sigmoid does, IPO regresses it to a finite
    target, so training stops once the pair is separated by 1/(2 beta) (Azar et al. 2024;
    001 "Identity Preference Optimization"; 000 "Variants"). The minimiser is h = 1/(2 beta) with
    loss 0. Inputs [B] float: sequence log-prob sums, as the IPO paper defines h (log-ratios of
    whole sequences). With ``chosen_lengths`` / ``rejected_lengths`` [B] every log-prob is first
    divided by its completion length (per-token averages: what TRL's DPOTrainer does for
    loss_type "ipo"); the target 1/(2 beta) is then a per-token margin. beta > 0.
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if (chosen_lengths is None) != (rejected_lengths is None):
        raise ValueError("ipo_loss: give both chosen_lengths and rejected_lengths, or neither")
    if chosen_lengths is not None:
        policy_chosen_logps = average_logps(policy_chosen_logps, chosen_lengths)
        ref_chosen_logps = average_logps(ref_chosen_logps, chosen_lengths)
        policy_rejected_logps = average_logps(policy_rejected_logps, rejected_lengths)
        ref_rejected_logps = average_logps(ref_rejected_logps, rejected_lengths)
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
    label_smoothing: float = 0.0,
) -> Tensor:
    """SimPO: reference-free, length-normalised reward with a target margin; per-pair loss [B].

        z = beta/|y_w| log pi(y_w|x) - beta/|y_l| log pi(y_l|x) - gamma
        L = -(1 - eps) log sigma(z) - eps log sigma(-z)     (eps = label_smoothing, default 0)

    Label smoothing as TRL's CPOTrainer applies it to SimPO (conservative, as cDPO).

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
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    chosen = average_logps(policy_chosen_logps, chosen_lengths)
    rejected = average_logps(policy_rejected_logps, rejected_lengths)
    z = beta * (chosen - rejected) - gamma
    loss = -F.logsigmoid(z)
    if label_smoothing > 0:
        loss = (1.0 - label_smoothing) * loss - label_smoothing * F.logsigmoid(-z)
    return loss


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
    chosen_nll: Tensor | None = None,
) -> Tensor:
    """ORPO: SFT on the chosen answer plus lambda times an odds-ratio preference term; loss [B].

        a_w = log pi(y_w|x)/|y_w|,  a_l = log pi(y_l|x)/|y_l|
        L = -a_w + lambda * ( -log sigma( log odds(a_w) - log odds(a_l) ) )

    (Hong et al. 2024; 000 "Variants": "folds an explicit SFT term into the DPO loss so you can
    collapse the SFT and preference-tuning stages into one pass"). No reference model. The SFT
    term is the chosen completion's per-token NLL, -a_w (averaged over the completion only);
    TRL's ORPOTrainer averages the NLL over prompt and completion tokens instead: pass that
    per-example NLL [B] as ``chosen_nll`` to use it (the odds-ratio term is unchanged).
    Inputs [B] float; lam >= 0.
    """
    if lam < 0:
        raise ValueError(f"lam must be >= 0, got {lam}")
    _check_same_shape(policy_chosen_logps=policy_chosen_logps,
                      policy_rejected_logps=policy_rejected_logps)
    chosen = average_logps(policy_chosen_logps, chosen_lengths)
    rejected = average_logps(policy_rejected_logps, rejected_lengths)
    odds_ratio_term = -F.logsigmoid(log_odds(chosen) - log_odds(rejected))
    nll = -chosen if chosen_nll is None else chosen_nll
    return nll + lam * odds_ratio_term


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


# ------------------------------------------------------------------ TRL's further DPO losses
def _logratios(pol_w: Tensor, pol_l: Tensor, ref_w: Tensor, ref_l: Tensor) -> tuple[Tensor, Tensor]:
    _check_same_shape(pol_w=pol_w, pol_l=pol_l, ref_w=ref_w, ref_l=ref_l)
    return pol_w - ref_w, pol_l - ref_l


def _smoothed_sigmoid(z: Tensor, label_smoothing: float) -> Tensor:
    return -(1.0 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)


def _cap_exp(x: Tensor, cap: float = 88.0) -> Tensor:
    # exp that does not overflow float32 (TRL's cap_exp bound): f-divergence logits use u^-alpha.
    return torch.exp(x.clamp(max=cap))


def dpo_family_loss(
    loss_type: str,
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float,
    label_smoothing: float = 0.0,
    f_divergence: str = "reverse_kl",
    alpha: float = 1.0,
    bco_delta: float = 0.0,
    discopop_tau: float = 0.05,
) -> Tensor:
    """The DPO-family loss ``loss_type`` of TRL's DPOTrainer; per-pair loss [B].

    With a_w = log pi(y_w)/pi_ref(y_w), a_l = log pi(y_l)/pi_ref(y_l) (sequence sums),
    h = a_w - a_l, eps = label_smoothing, sg = sigma:
      sigmoid    -(1-eps) log sg(beta z) - eps log sg(-beta z), z = the f-divergence margin
                 (reverse_kl: z = h, i.e. DPO; js_divergence: z = h - (softplus(a_w) -
                 softplus(a_l)); forward_kl: z = e^{-a_l} - e^{-a_w}; alpha_divergence:
                 z = (e^{-alpha a_l} - e^{-alpha a_w}) / alpha  -- f-DPO, Wang et al. 2023:
                 z = f'(u_w) - f'(u_l) with u = pi/pi_ref; forward KL is alpha = 1)
      robust     ( -(1-eps) log sg(beta h) + eps log sg(-beta h) ) / (1 - 2 eps)  (Chowdhury 2024)
      hinge      max(0, 1 - beta h)                                       (SLiC, Zhao 2023)
      exo_pair   sg(beta h) (log sg(beta h) - log(1-e)) + sg(-beta h) (log sg(-beta h) - log e),
                 e = eps, or 1e-3 when eps = 0                              (EXO, Ji 2024)
      nca_pair   -log sg(beta a_w) - 0.5 log sg(-beta a_w) - 0.5 log sg(-beta a_l)  (Chen 2024)
      bco_pair   -log sg(beta a_w - delta) - log sg(-(beta a_l - delta)), delta = the running
                 mean of the implicit rewards (``bco_delta``; BCO, Jung 2024)
      sppo_hard  (a_w - 1/(2 beta))^2 + (a_l + 1/(2 beta))^2                (SPPO, Wu 2024)
      aot        the sigmoid loss on z = sort_B(log pi_w - log pi_l) - sort_B(log ref_w -
                 log ref_l) (AOT, Melnyk 2024: optimal transport of the margin distributions)
      aot_unpaired  the sigmoid loss on z = sort_B(a_w) - sort_B(a_l)
      apo_zero   (1 - sg(beta a_w)) + sg(beta a_l)                      (APO, D'Oosterlinck 2024)
      apo_down   sg(beta a_w) + (1 - sg(beta (a_w - a_l)))
      discopop   (1 - m) (-log sg(beta h)) + m e^{-beta h}, m = sg(beta h / tau)  (Chris 2024)
    Inputs [B] float sequence log-prob sums; beta > 0. The sorted losses (aot, aot_unpaired)
    mix the examples of the batch, so they are per-position, not per-pair.
    Reference: TRL DPOTrainer.dpo_loss (the loss_type values), the papers cited per line.
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    a_w, a_l = _logratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                          ref_rejected_logps)
    h = a_w - a_l
    eps = label_smoothing
    if loss_type == "sigmoid":
        if f_divergence == "reverse_kl":
            z = h
        elif f_divergence == "js_divergence":
            z = h - (F.softplus(a_w) - F.softplus(a_l))
        elif f_divergence in ("forward_kl", "alpha_divergence"):
            a = 1.0 if f_divergence == "forward_kl" else alpha
            if a <= 0:
                raise ValueError(f"alpha must be > 0, got {a}")
            z = (_cap_exp(-a * a_l) - _cap_exp(-a * a_w)) / a
        else:
            raise ValueError(
                "f_divergence must be one of ('reverse_kl', 'forward_kl', 'js_divergence', "
                f"'alpha_divergence'), got {f_divergence!r}"
            )
        return _smoothed_sigmoid(beta * z, eps)
    if loss_type == "robust":
        return (-(1 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1 - 2 * eps)
    if loss_type == "hinge":
        return torch.relu(1.0 - beta * h)
    if loss_type == "exo_pair":
        e = eps if eps > 0 else 1e-3
        z = beta * h
        return (torch.sigmoid(z) * (F.logsigmoid(z) - math.log(1 - e))
                + torch.sigmoid(-z) * (F.logsigmoid(-z) - math.log(e)))
    if loss_type == "nca_pair":
        return (-F.logsigmoid(beta * a_w) - 0.5 * F.logsigmoid(-beta * a_w)
                - 0.5 * F.logsigmoid(-beta * a_l))
    if loss_type == "bco_pair":
        return -F.logsigmoid(beta * a_w - bco_delta) - F.logsigmoid(-(beta * a_l - bco_delta))
    if loss_type == "sppo_hard":
        return (a_w - 0.5 / beta) ** 2 + (a_l + 0.5 / beta) ** 2
    if loss_type == "aot":
        pol = torch.sort(policy_chosen_logps - policy_rejected_logps).values
        ref = torch.sort(ref_chosen_logps - ref_rejected_logps).values
        return _smoothed_sigmoid(beta * (pol - ref), eps)
    if loss_type == "aot_unpaired":
        return _smoothed_sigmoid(beta * (torch.sort(a_w).values - torch.sort(a_l).values), eps)
    if loss_type == "apo_zero":
        return (1.0 - torch.sigmoid(beta * a_w)) + torch.sigmoid(beta * a_l)
    if loss_type == "apo_down":
        return torch.sigmoid(beta * a_w) + (1.0 - torch.sigmoid(beta * h))
    if loss_type == "discopop":
        z = beta * h
        mod = torch.sigmoid(z / discopop_tau)
        return -F.logsigmoid(z) * (1.0 - mod) + torch.exp(-z) * mod
    raise ValueError(f"loss_type must be one of {DPO_LOSS_TYPES}, got {loss_type!r}")


DPO_LOSS_TYPES: tuple[str, ...] = (
    "sigmoid", "robust", "hinge", "exo_pair", "nca_pair", "bco_pair", "sppo_hard", "aot",
    "aot_unpaired", "apo_zero", "apo_down", "discopop",
)


def mixed_dpo_loss(
    weighted_types: dict[str, float],
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    **kwargs: float | str,
) -> Tensor:
    """A weighted mixture sum_k w_k L_k of ``dpo_family_loss`` types (TRL's loss_type list with
    loss_weights, e.g. MPO = sigmoid + bco_pair + sft). weighted_types: {loss_type: weight}."""
    if not weighted_types:
        raise ValueError("mixed_dpo_loss needs at least one {loss_type: weight}")
    return sum(
        w * dpo_family_loss(t, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                            ref_rejected_logps, **kwargs)
        for t, w in weighted_types.items()
    )


def kto_apo_zero_unpaired_loss(
    policy_logps: Tensor, ref_logps: Tensor, desirable: Tensor, *, beta: float
) -> Tensor:
    """KTO's loss_type "apo_zero_unpaired" (TRL): APO-zero on unpaired samples; loss [B].

        desirable:   1 - sg(beta (log pi(y) - log pi_ref(y)))
        undesirable: sg(beta (log pi(y) - log pi_ref(y)))
    (no KL reference point). desirable: [B] bool. Reference: TRL KTOTrainer, D'Oosterlinck 2024.
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    _check_same_shape(policy_logps=policy_logps, ref_logps=ref_logps)
    s = torch.sigmoid(beta * (policy_logps - ref_logps))
    return torch.where(desirable.bool(), 1.0 - s, s)


def cpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    chosen_lengths: Tensor,
    *,
    beta: float,
    nll_weight: float = 1.0,
    hinge: bool = False,
    label_smoothing: float = 0.0,
) -> Tensor:
    """CPO (Xu et al. 2024): a reference-free DPO term on sequence log-probs plus the chosen NLL.

        sigmoid: L = -(1-eps) log sg(beta (log pi_w - log pi_l)) - eps log sg(-beta(...))
                     + w * ( -log pi(y_w) / |y_w| )
        hinge:   L = max(0, 1 - beta (log pi_w - log pi_l)) + w * ( -log pi(y_w) / |y_w| )
    Inputs [B]: sequence log-prob sums and the chosen lengths. Reference: TRL CPOTrainer
    (loss_type sigmoid / hinge, cpo_alpha = the NLL weight).
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    _check_same_shape(policy_chosen_logps=policy_chosen_logps,
                      policy_rejected_logps=policy_rejected_logps)
    z = beta * (policy_chosen_logps - policy_rejected_logps)
    pref = torch.relu(1.0 - z) if hinge else _smoothed_sigmoid(z, label_smoothing)
    return pref - nll_weight * average_logps(policy_chosen_logps, chosen_lengths)


def alphapo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    *,
    beta: float,
    gamma: float,
    alpha: float,
) -> Tensor:
    """AlphaPO (Gupta et al. 2025): SimPO with the reward r(y) = -(p^-alpha - 1) / alpha.

        p = exp(log pi(y)/|y|) (per-token average),  r = (1 - p^-alpha) / alpha  (alpha -> 0:
        r -> log p, SimPO);  L = -log sg( beta (r_w - r_l) - gamma )
    Reference: TRL CPOTrainer (alpha, loss_type "simpo").
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    a_w = average_logps(policy_chosen_logps, chosen_lengths)
    a_l = average_logps(policy_rejected_logps, rejected_lengths)
    if alpha == 0:
        r_w, r_l = a_w, a_l
    else:
        r_w = -torch.expm1(-alpha * a_w) / alpha
        r_l = -torch.expm1(-alpha * a_l) / alpha
    return -F.logsigmoid(beta * (r_w - r_l) - gamma)


def reward_centering_penalty(chosen_scores: Tensor, rejected_scores: Tensor, coef: float) -> Tensor:
    """Bradley-Terry reward centring (Eisenstein et al. 2023; TRL center_rewards_coefficient):
    coef * (r_w + r_l)^2 per pair [B], added to the BT loss so rewards stay centred at 0."""
    if coef < 0:
        raise ValueError(f"coef must be >= 0, got {coef}")
    _check_same_shape(chosen_scores=chosen_scores, rejected_scores=rejected_scores)
    return coef * (chosen_scores + rejected_scores) ** 2


def likelihood_displacement(
    chosen_logps_before: Tensor, chosen_logps_after: Tensor,
    rejected_logps_before: Tensor, rejected_logps_after: Tensor,
) -> dict[str, float]:
    """Likelihood displacement (reference 003): the margin grows while the chosen log-prob falls.

    Returns chosen_logp_change = mean(log pi_after(y_w) - log pi_before(y_w)), margin_change
    (the same for log pi(y_w) - log pi(y_l)), and displaced = 1.0 when the margin grew and the
    chosen log-prob fell (else 0.0). Inputs [B] sequence log-prob sums of the same pairs.
    """
    dw = float((chosen_logps_after - chosen_logps_before).mean())
    dl = float((rejected_logps_after - rejected_logps_before).mean())
    return {"chosen_logp_change": dw, "margin_change": dw - dl,
            "displaced": float(dw - dl > 0 and dw < 0)}


# The hyper-parameters each loss's paper uses (what `preference.beta` etc. should default to for
# that loss); "source" says where the value comes from.
PAPER_DEFAULTS: dict[str, dict[str, float | str]] = {
    "dpo": {"beta": 0.1, "source": "Rafailov et al. 2023 (beta = 0.1 in most experiments)"},
    "ipo": {"beta": 0.1, "source": "Azar et al. 2024 sweep tau; 0.1 is TRL's default"},
    "kto": {"beta": 0.1, "source": "Ethayarajh et al. 2024 (beta = 0.1, lambda_D = lambda_U = 1)"},
    "simpo": {"beta": 2.0, "gamma": 1.0,
              "source": "Meng et al. 2024 (beta = 2.0, gamma / beta = 0.5: Llama-3-Base setting)"},
    "orpo": {"orpo_lambda": 0.1, "source": "Hong et al. 2024 (lambda = 0.1)"},
    "cpo": {"beta": 0.1, "nll_weight": 1.0, "source": "Xu et al. 2024; TRL CPOConfig"},
}
