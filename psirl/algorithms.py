"""The knobs of the online loop, and every policy-gradient method as a named preset of them.

    grad J = E[ sum_t Psi_t grad log pi(a_t | s_t) ]

Methods differ only in Psi_t (the advantage: ``AdvantageKnobs``) and in how the step is
controlled (ratio level, clip rule, aggregation, KL: ``PolicyLossKnobs``, ``KLControlKnobs``);
``SamplingKnobs`` and ``ValueKnobs`` carry the rest. See ../shared/reference/002 ("Everything
in this post is a single equation with two levers") and the method matrix there.

Every knob dataclass is frozen and validated on construction: a bad value raises ValueError
naming the field. ``PRESETS`` is one plain dict literal (no registration side effects);
``resolve_preset(name, overrides)`` turns a preset plus overrides into ``OnlineKnobs``.
This module holds no tensors; it imports core only for the names of its choices.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import warnings
from dataclasses import dataclass, field
from typing import Any

from psirl.core.advantages import ESTIMATORS, WHITEN_MODES, estimator_names
from psirl.core.aggregate import AGGREGATION_MODES
from psirl.core.clip import CLIP_RULES
from psirl.core.kl import KL_ESTIMATORS
from psirl.core.offpolicy import TIS_LEVELS
from psirl.core.ratio import RATIO_LEVELS

__all__ = [
    "KL_PLACEMENTS",
    "GROUP_ESTIMATORS",
    "KnobWarning",
    "PolicyLossKnobs",
    "AdvantageKnobs",
    "KLControlKnobs",
    "SamplingKnobs",
    "ValueKnobs",
    "OnlineKnobs",
    "PRESETS",
    "resolve_preset",
    "knobs_from_dict",
    "knobs_to_dict",
    "method_matrix",
    "knob_catalog",
]

KL_PLACEMENTS: tuple[str, ...] = ("none", "reward_token", "reward_sequence", "loss")
# Estimators whose baseline needs several completions of the same prompt (read from the
# registry in core/advantages.py, the one place an estimator's properties live).
GROUP_ESTIMATORS: tuple[str, ...] = estimator_names(scope="group")

_REF_001 = "../shared/reference/001_dd55e9af3bef0bfc.txt (table of KL estimator placements)"


class KnobWarning(UserWarning):
    """A legal but known-bad combination of knobs (warned once per process)."""


_WARNED: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key in _WARNED:
        return
    _WARNED.add(key)
    warnings.warn(message, KnobWarning, stacklevel=4)


# --------------------------------------------------------------------------------------------
# Field validators: each returns the (coerced) value or raises ValueError naming "Class.field".


def _set(obj: Any, name: str, value: Any) -> None:
    object.__setattr__(obj, name, value)  # frozen dataclass: coerce once, in __post_init__


def _where(obj: Any, name: str) -> str:
    return f"{type(obj).__name__}.{name}"


def _choice(obj: Any, name: str, choices: tuple[str, ...]) -> None:
    value = getattr(obj, name)
    if value not in choices:
        raise ValueError(f"{_where(obj, name)} must be one of {choices}, got {value!r}")


def _bool(obj: Any, name: str) -> None:
    value = getattr(obj, name)
    if not isinstance(value, bool):
        raise ValueError(f"{_where(obj, name)} must be true or false, got {value!r}")


def _int(obj: Any, name: str, lo: int) -> None:
    value = getattr(obj, name)
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
            _set(obj, name, value)
        else:
            raise ValueError(f"{_where(obj, name)} must be an integer, got {value!r}")
    if value < lo:
        raise ValueError(f"{_where(obj, name)} must be >= {lo}, got {value}")


def _float(
    obj: Any,
    name: str,
    *,
    lo: float | None = None,
    hi: float | None = None,
    lo_open: bool = False,
    optional: bool = False,
) -> None:
    value = getattr(obj, name)
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{_where(obj, name)} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{_where(obj, name)} must be finite, got {value}")
    if lo is not None and (value < lo or (lo_open and value == lo)):
        raise ValueError(f"{_where(obj, name)} must be {'>' if lo_open else '>='} {lo}, got {value}")
    if hi is not None and value > hi:
        raise ValueError(f"{_where(obj, name)} must be <= {hi}, got {value}")
    _set(obj, name, value)


# --------------------------------------------------------------------------------------------
# Knob dataclasses


@dataclass(frozen=True)
class PolicyLossKnobs:
    """How the step is controlled: ratio level, clip rule, aggregation, KL, entropy bonus.

    ratio: "on_policy" | "token" | "sequence" (GSPO)          (core/ratio.py)
    clip: "none" | "symmetric" | "asymmetric" | "dual" | "cispo" | "sapo" | "gmpo" |
        "clip_cov" | "kl_cov" (core/clip.py)
    sapo_tau_pos, sapo_tau_neg: > 0, SAPO's gate temperatures for A > 0 / A < 0 (TRL: 1, 1.05);
    cov_ratio: fraction of tokens Clip-Cov cuts / KL-Cov penalises (verl: 2e-4); clip_cov_lb <
        clip_cov_ub: Clip-Cov's covariance band (1, 5); kl_cov_coef >= 0: KL-Cov's |log r| weight.
    For "gmpo" eps_low / eps_high are widths of log r (GMPO: 0.4).
    eps_low, eps_high: clip widths, band [1 - eps_low, 1 + eps_high]; eps_low in [0, 1]
        (1 = no lower bound, as CISPO uses), eps_high >= 0; "symmetric" needs them equal.
    dual_clip_c: > 1, the dual-clip floor c * A for negative advantages.
    aggregation: "token_mean" | "seq_mean_token_mean" | "seq_mean_token_sum" | "constant".
    constant_normaliser: C > 0 for "constant" (loss = sum / (N_seq * C)); None inside
        OnlineKnobs means sampling.max_new_tokens (Dr. GRPO's choice).
    kl_estimator: a key of core.kl.KL_ESTIMATORS -- "k1" | "k2" | "k3" | "abs" | "low_var_kl"
        (k3 clamped at 10, verl) | "k1+" | "k3+" | "low_var_kl+" (value of k1/k3, gradient of
        k2: verl's straight-through) | "k3_ratio" (k3 times the importance ratio, TRL's
        use_bias_correction_kl); kl_placement: "none" | "reward_token" | "reward_sequence" |
        "loss"; kl_coef: beta >= 0 (must be 0 when placement is "none");
    kl_clamp: None (off, as the references write k3) or c > 0: the KL estimate is clamped to
        [-c, c] (verl clamps k3 at 10; beyond it the gradient is 0).
    entropy_coef: >= 0, weight of the entropy bonus in the loss.
    tis_cap: truncated importance sampling for the engine-trainer mismatch (core/offpolicy.py):
        each token's policy-gradient term is weighted by min(pi_trainer / mu_engine, tis_cap);
        None = off. tis_level: "token" | "sequence" (ratio of the whole completion).
    Reference: ../shared/reference/002_51bc6b7a5ef2c181.txt (Lever 2), 001 (KL placements).
    """

    ratio: str = "token"
    clip: str = "symmetric"
    eps_low: float = 0.2
    eps_high: float = 0.2
    dual_clip_c: float = 3.0
    aggregation: str = "token_mean"
    constant_normaliser: float | None = None
    kl_estimator: str = "k3"
    kl_placement: str = "none"
    kl_coef: float = 0.0
    kl_clamp: float | None = None
    entropy_coef: float = 0.0
    tis_cap: float | None = None
    tis_level: str = "token"
    sapo_tau_pos: float = 1.0
    sapo_tau_neg: float = 1.05
    cov_ratio: float = 2e-4
    clip_cov_lb: float = 1.0
    clip_cov_ub: float = 5.0
    kl_cov_coef: float = 1.0

    def __post_init__(self) -> None:
        _choice(self, "ratio", RATIO_LEVELS)
        _choice(self, "clip", tuple(CLIP_RULES))
        _float(self, "eps_low", lo=0.0, hi=1.0)
        _float(self, "eps_high", lo=0.0)
        _float(self, "dual_clip_c", lo=1.0, lo_open=True)
        _choice(self, "aggregation", AGGREGATION_MODES)
        _float(self, "constant_normaliser", lo=0.0, lo_open=True, optional=True)
        _choice(self, "kl_estimator", tuple(KL_ESTIMATORS))
        _choice(self, "kl_placement", KL_PLACEMENTS)
        _float(self, "kl_coef", lo=0.0)
        _float(self, "kl_clamp", lo=0.0, lo_open=True, optional=True)
        _float(self, "entropy_coef", lo=0.0)
        _float(self, "tis_cap", lo=0.0, lo_open=True, optional=True)
        _choice(self, "tis_level", TIS_LEVELS)
        _float(self, "sapo_tau_pos", lo=0.0, lo_open=True)
        _float(self, "sapo_tau_neg", lo=0.0, lo_open=True)
        _float(self, "cov_ratio", lo=0.0, hi=1.0)
        _float(self, "clip_cov_lb", lo=None)
        _float(self, "clip_cov_ub", lo=None)
        _float(self, "kl_cov_coef", lo=0.0)
        if self.clip_cov_lb >= self.clip_cov_ub:
            raise ValueError(
                f"PolicyLossKnobs.clip_cov_lb ({self.clip_cov_lb}) must be < clip_cov_ub "
                f"({self.clip_cov_ub})"
            )
        if self.clip == "symmetric" and self.eps_low != self.eps_high:
            raise ValueError(
                f"PolicyLossKnobs.eps_high ({self.eps_high}) must equal eps_low ({self.eps_low}) "
                "when clip='symmetric'; set both, or use clip='asymmetric'"
            )
        if self.kl_placement == "none" and self.kl_coef > 0:
            raise ValueError(
                f"PolicyLossKnobs.kl_coef is {self.kl_coef} but kl_placement='none'; choose "
                f"a placement from {KL_PLACEMENTS[1:]} or set kl_coef=0"
            )
        in_reward = self.kl_placement in ("reward_token", "reward_sequence")
        if self.kl_coef > 0 and in_reward and self.kl_estimator == "k3":
            _warn_once(
                "k3_in_reward",
                "kl_estimator='k3' with the KL in the reward gives a biased gradient and led to "
                f"training collapse for every coefficient tested ({_REF_001}); k1 in the "
                "reward is the unbiased choice.",
            )
        if self.kl_coef > 0 and self.kl_placement == "loss" and self.kl_estimator == "k1":
            _warn_once(
                "k1_in_loss",
                "kl_estimator='k1' in the loss has zero expected gradient, so the KL term adds "
                f"only noise and training is unstable ({_REF_001}); use k3 (or k2) in the "
                "loss, or k1 in the reward.",
            )


@dataclass(frozen=True)
class AdvantageKnobs:
    """Which Psi_t: the advantage estimator (core/advantages.py), its parameters, whitening.

    estimator: a key of core.advantages.ESTIMATORS (each entry carries its scope, std scaling
        and what the references say of its bias; `psirl algorithms --json` lists them).
    gamma: discount in [0, 1] (1 for LMs: no hidden length preference, ref 002);
    lam: GAE lambda in [0, 1]; eps: >= 0, added to the std of std-scaled estimators;
    whiten: "none" | "batch" | "group" -- whitening applied after the estimator
        (core.advantages.whiten_advantages: token-level masked mean / unbiased variance, verl's
        masked_whiten); verl and OpenRLHF whiten PPO's GAE advantages and REINFORCE++'s
        reward-to-go over the batch.
    Reference: ../shared/reference/002_51bc6b7a5ef2c181.txt (Lever 1).
    """

    estimator: str = "group_mean_std"
    gamma: float = 1.0
    lam: float = 1.0
    eps: float = 1e-6
    whiten: str = "none"

    def __post_init__(self) -> None:
        _choice(self, "estimator", tuple(ESTIMATORS))
        _float(self, "gamma", lo=0.0, hi=1.0)
        _float(self, "lam", lo=0.0, hi=1.0)
        _float(self, "eps", lo=0.0)
        _choice(self, "whiten", WHITEN_MODES)


@dataclass(frozen=True)
class KLControlKnobs:
    """How beta evolves and how the reference is kept.

    adaptive: PPO-KLPEN proportional controller (core/kl.py AdaptiveKLController) starting
        from loss.kl_coef; target: KL_target > 0; horizon: > 0 steps;
    ref_reset_every: reset the reference to the current policy every N steps (0 = never).
    Reference: ../shared/reference/001_dd55e9af3bef0bfc.txt (PPO-KLPEN),
    ../shared/reference/003_e8bd019fa090e190.txt ("reset the reference periodically").
    """

    adaptive: bool = False
    target: float = 0.1
    horizon: int = 10000
    ref_reset_every: int = 0

    def __post_init__(self) -> None:
        _bool(self, "adaptive")
        _float(self, "target", lo=0.0, lo_open=True)
        _int(self, "horizon", lo=1)
        _int(self, "ref_reset_every", lo=0)


@dataclass(frozen=True)
class SamplingKnobs:
    """Rollout and reuse: completions per prompt, decoding, dynamic sampling, epochs.

    group_size: completions per prompt (>= 1; >= 2 for group baselines and dynamic sampling);
    temperature > 0; top_p in (0, 1]; top_k >= 0 (0 = off); max_new_tokens >= 1;
    dynamic_sampling: drop zero-signal groups and resample (DAPO);
    max_resample_rounds >= 0; epochs >= 1 and minibatches >= 1 per rollout batch.
    Reference: ../shared/reference/002_51bc6b7a5ef2c181.txt (temperature > 0 for any spread;
    DAPO dynamic sampling).
    """

    group_size: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 64
    dynamic_sampling: bool = False
    max_resample_rounds: int = 4
    epochs: int = 1
    minibatches: int = 1

    def __post_init__(self) -> None:
        _int(self, "group_size", lo=1)
        _float(self, "temperature", lo=0.0, lo_open=True)
        _float(self, "top_p", lo=0.0, hi=1.0, lo_open=True)
        _int(self, "top_k", lo=0)
        _int(self, "max_new_tokens", lo=1)
        _bool(self, "dynamic_sampling")
        _int(self, "max_resample_rounds", lo=0)
        _int(self, "epochs", lo=1)
        _int(self, "minibatches", lo=1)


@dataclass(frozen=True)
class ValueKnobs:
    """The critic (used when advantage.estimator == "gae").

    vf_coef >= 0: weight of the value loss; value_clip: > 0 clip width of PPO's clipped value
    loss, or None for the plain squared error.
    Reference: ../shared/reference/000_7914f6881bc4a22c.txt (critic loss).
    """

    vf_coef: float = 0.5
    value_clip: float | None = 0.2

    def __post_init__(self) -> None:
        _float(self, "vf_coef", lo=0.0)
        _float(self, "value_clip", lo=0.0, lo_open=True, optional=True)


@dataclass(frozen=True)
class OnlineKnobs:
    """All knobs of the online loop, with cross-field checks.

    Cross checks: group baselines and dynamic sampling need sampling.group_size >= 2;
    kl_control.adaptive needs a KL placement; loss.aggregation == "constant" with
    constant_normaliser None takes sampling.max_new_tokens (Dr. GRPO's constant).
    """

    advantage: AdvantageKnobs = field(default_factory=AdvantageKnobs)
    loss: PolicyLossKnobs = field(default_factory=PolicyLossKnobs)
    kl_control: KLControlKnobs = field(default_factory=KLControlKnobs)
    sampling: SamplingKnobs = field(default_factory=SamplingKnobs)
    value: ValueKnobs = field(default_factory=ValueKnobs)

    def __post_init__(self) -> None:
        for name, cls in _SECTIONS.items():
            if not isinstance(getattr(self, name), cls):
                raise ValueError(
                    f"OnlineKnobs.{name} must be a {cls.__name__}, got {type(getattr(self, name)).__name__}"
                )
        spec = ESTIMATORS[self.advantage.estimator]
        if self.sampling.group_size < spec.min_group_size:
            raise ValueError(
                f"sampling.group_size must be >= {spec.min_group_size} for advantage.estimator="
                f"{self.advantage.estimator!r} (scope {spec.scope!r}), got "
                f"{self.sampling.group_size}"
            )
        if self.sampling.dynamic_sampling and self.sampling.group_size < 2:
            raise ValueError(
                "sampling.group_size must be >= 2 when sampling.dynamic_sampling is true, got "
                f"{self.sampling.group_size}"
            )
        if self.kl_control.adaptive and self.loss.kl_placement == "none":
            raise ValueError(
                "kl_control.adaptive is true but loss.kl_placement is 'none'; choose a placement"
            )
        if self.kl_control.adaptive and self.loss.kl_coef <= 0:
            raise ValueError(
                "kl_control.adaptive needs loss.kl_coef > 0 as the starting beta, got "
                f"{self.loss.kl_coef}"
            )
        if self.loss.aggregation == "constant" and self.loss.constant_normaliser is None:
            _set(
                self,
                "loss",
                dataclasses.replace(
                    self.loss, constant_normaliser=float(self.sampling.max_new_tokens)
                ),
            )


_SECTIONS: dict[str, type] = {
    "advantage": AdvantageKnobs,
    "loss": PolicyLossKnobs,
    "kl_control": KLControlKnobs,
    "sampling": SamplingKnobs,
    "value": ValueKnobs,
}


# --------------------------------------------------------------------------------------------
# Presets. One plain literal. Values the references give are marked (ref NNN); the others are
# psirl's choices, named as such. Knobs left out take the dataclass defaults above.
#
# Sample reuse (epochs/minibatches) is not fixed by the references: clipped methods get two
# minibatches per rollout so that the ratio moves off 1 and the clip has something to act on;
# PPO also takes two epochs (sample reuse is its point, ref 002). KL coefficients that the
# references leave open (REINFORCE++, RLOO, PPO) are psirl's choices.

PRESETS: dict[str, dict[str, Any]] = {
    "reinforce": {
        "paper": "Williams 1992, Simple statistical gradient-following algorithms for "
        "connectionist reinforcement learning",
        "vs_grpo": "No baseline, no ratio or clip and no KL: every token is pushed by its raw "
        "reward-to-go, unbiased but with the highest variance.",
        "knobs": {
            "advantage": {"estimator": "none", "gamma": 1.0, "lam": 1.0},
            # (1/N) sum_i sum_t grad log pi * R_i  (ref 000) -> sum over tokens, mean over seqs.
            "loss": {"ratio": "on_policy", "clip": "none", "aggregation": "seq_mean_token_sum",
                     "kl_placement": "none", "kl_coef": 0.0},
            "sampling": {"group_size": 1},
        },
    },
    "reinforce_pp": {
        "paper": "Hu 2025, REINFORCE++: A Simple and Efficient Approach for Aligning Large "
        "Language Models",
        "vs_grpo": "Subtracts the mean reward of the whole batch of diverse prompts instead of a "
        "per-prompt group statistic, has no ratio clip, and puts a token-level k1 KL in the "
        "reward instead of k3 in the loss.",
        "knobs": {
            # Ref 000: A_i = R_i - mean_B(R_j) (batch mean, no std) and a token-level log-ratio
            # KL in the reward; 000's table lists no clipping. beta = 0.01 is psirl's choice.
            "advantage": {"estimator": "batch_mean", "gamma": 1.0, "lam": 1.0},
            "loss": {"ratio": "on_policy", "clip": "none", "aggregation": "seq_mean_token_sum",
                     "kl_estimator": "k1", "kl_placement": "reward_token", "kl_coef": 0.01},
            "sampling": {"group_size": 1},
        },
    },
    "reinforce_pp_baseline": {
        "paper": "Hu 2025, REINFORCE++ (REINFORCE++-baseline, as verl and OpenRLHF compute it)",
        "vs_grpo": "Subtracts the group mean (no group std), then whitens over the whole batch "
        "instead of per group, has no ratio clip, and puts a token-level k1 KL in the reward.",
        "knobs": {
            # verl compute_reinforce_plus_plus_baseline_outcome_advantage: R - group mean, then
            # masked_whiten over the batch. G = 4 and the KL (as reinforce_pp): psirl's choices.
            "advantage": {"estimator": "group_mean", "gamma": 1.0, "lam": 1.0,
                          "whiten": "batch"},
            "loss": {"ratio": "on_policy", "clip": "none", "aggregation": "seq_mean_token_sum",
                     "kl_estimator": "k1", "kl_placement": "reward_token", "kl_coef": 0.01},
            "sampling": {"group_size": 4},
        },
    },
    "rloo": {
        "paper": "Ahmadian et al. 2024, Back to Basics: Revisiting REINFORCE Style Optimization "
        "for Learning from Human Feedback in LLMs",
        "vs_grpo": "Uses the mean of the other K-1 completions as an unbiased baseline with no "
        "std scaling and no ratio clip, and puts the KL in the reward per sequence.",
        "knobs": {
            # Ref 002: leave-one-out baseline, single on-policy step, token-mean; KL placement A
            # (in the reward). Ref 004: K samples per prompt. K = 4, beta = 0.05: psirl's choice.
            "advantage": {"estimator": "leave_one_out", "gamma": 1.0, "lam": 1.0},
            "loss": {"ratio": "on_policy", "clip": "none", "aggregation": "token_mean",
                     "kl_estimator": "k1", "kl_placement": "reward_sequence", "kl_coef": 0.05},
            "sampling": {"group_size": 4},
        },
    },
    "ppo": {
        "paper": "Schulman et al. 2017, Proximal Policy Optimization Algorithms (with GAE, "
        "Schulman et al. 2016; RLHF KL control, Ziegler et al. 2019)",
        "vs_grpo": "Learns a critic and gives every token its own GAE advantage instead of a "
        "group baseline, and puts a k1 KL in the reward per token instead of k3 in the loss.",
        "knobs": {
            # Ref 000/004: GAE(gamma, lambda), clipped ratio with eps 0.2 (ref 001: "usually
            # 0.2"); gamma = 1 for LMs (ref 002); lambda = 0.95 the common GAE setting.
            # Ref 001: drift KL subtracted from the reward; set kl_control.adaptive=true for
            # PPO-KLPEN's controller. beta = 0.05 is psirl's choice.
            # Whitening: verl and OpenRLHF whiten GAE advantages over the batch (token-level
            # masked mean and unbiased variance); the references are silent, so the anchors'
            # choice is the preset's (advantage.whiten=none gives raw GAE).
            "advantage": {"estimator": "gae", "gamma": 1.0, "lam": 0.95, "whiten": "batch"},
            "loss": {"ratio": "token", "clip": "symmetric", "eps_low": 0.2, "eps_high": 0.2,
                     "aggregation": "token_mean", "kl_estimator": "k1",
                     "kl_placement": "reward_token", "kl_coef": 0.05},
            "kl_control": {"adaptive": False},
            "sampling": {"group_size": 1, "epochs": 2, "minibatches": 2},
            "value": {"vf_coef": 0.5, "value_clip": 0.2},
        },
    },
    "grpo": {
        "paper": "Shao et al. 2024, DeepSeekMath: Pushing the Limits of Mathematical Reasoning "
        "in Open Language Models (GRPO)",
        "vs_grpo": "The reference point: group mean/std advantage, token-level PPO clip, "
        "per-response token-mean then mean over responses, and k3 KL in the loss.",
        "knobs": {
            # Ref 002/004: (R - mean)/std over the group; ref 004: per-token clip and
            # 1/G sum_i 1/|y_i| sum_t; ref 003: beta = 0.04, k3 (ref 004) in the loss (ref 001).
            "advantage": {"estimator": "group_mean_std", "gamma": 1.0, "lam": 1.0},
            "loss": {"ratio": "token", "clip": "symmetric", "eps_low": 0.2, "eps_high": 0.2,
                     "aggregation": "seq_mean_token_mean", "kl_estimator": "k3",
                     "kl_placement": "loss", "kl_coef": 0.04},
            "sampling": {"group_size": 8, "minibatches": 2},
        },
    },
    "dr_grpo": {
        "paper": "Liu et al. 2025, Understanding R1-Zero-Like Training: A Critical Perspective "
        "(Dr. GRPO)",
        "vs_grpo": "Drops GRPO's division by the group std and its per-response 1/|y| (token "
        "sums divided by a constant, the max completion length), and drops the KL.",
        "knobs": {
            # Ref 002: "GRPO, no std (Dr. GRPO)". Constant normaliser C = max_new_tokens
            # (constant_normaliser None -> sampling.max_new_tokens). No KL: psirl follows the
            # Dr. GRPO recipe's beta = 0.
            "advantage": {"estimator": "group_mean", "gamma": 1.0, "lam": 1.0},
            "loss": {"ratio": "token", "clip": "symmetric", "eps_low": 0.2, "eps_high": 0.2,
                     "aggregation": "constant", "constant_normaliser": None,
                     "kl_placement": "none", "kl_coef": 0.0},
            "sampling": {"group_size": 8, "minibatches": 2},
        },
    },
    "dapo": {
        "paper": "Yu et al. 2025, DAPO: An Open-Source LLM Reinforcement Learning System at Scale",
        "vs_grpo": "Averages over all tokens of the batch instead of per response, raises the "
        "upper clip (clip-higher), drops all-right and all-wrong groups by dynamic sampling, "
        "and drops the KL.",
        "knobs": {
            # Ref 002: token-level aggregation, clip-higher, dynamic sampling, often no KL;
            # ref 003: eps_lo = 0.2, eps_hi = 0.28.
            "advantage": {"estimator": "group_mean_std", "gamma": 1.0, "lam": 1.0},
            "loss": {"ratio": "token", "clip": "asymmetric", "eps_low": 0.2, "eps_high": 0.28,
                     "aggregation": "token_mean", "kl_placement": "none", "kl_coef": 0.0},
            "sampling": {"group_size": 8, "dynamic_sampling": True, "minibatches": 2},
        },
    },
    "gspo": {
        "paper": "Zheng et al. 2025, Group Sequence Policy Optimization",
        "vs_grpo": "Computes and clips one length-normalised importance ratio per sequence "
        "instead of one per token, with a much narrower band, and drops the KL.",
        "knobs": {
            # Ref 002: ratio and clip at the sequence level. Band 3e-4 / 4e-4 from the GSPO
            # paper (a sequence ratio is a geometric mean, so it moves far less than a token's).
            "advantage": {"estimator": "group_mean_std", "gamma": 1.0, "lam": 1.0},
            "loss": {"ratio": "sequence", "clip": "asymmetric", "eps_low": 3e-4,
                     "eps_high": 4e-4, "aggregation": "seq_mean_token_mean",
                     "kl_placement": "none", "kl_coef": 0.0},
            "sampling": {"group_size": 8, "minibatches": 2},
        },
    },
    "cispo": {
        "paper": "MiniMax 2025, MiniMax-M1: Scaling Test-Time Compute Efficiently with Lightning "
        "Attention (CISPO)",
        "vs_grpo": "Replaces the clipped objective by a clipped, stop-gradient importance weight "
        "times A log pi so no token's gradient is ever zeroed, averages over all tokens, and "
        "drops the KL.",
        "knobs": {
            # Ref 002: clip the IS weight under a stop-gradient; token-level aggregation.
            # MiniMax-M1 sets no lower bound (eps_low = 1 -> bound 0) and tunes only eps_high;
            # the references give no value, 0.28 (DAPO's upper width) is psirl's choice.
            "advantage": {"estimator": "group_mean_std", "gamma": 1.0, "lam": 1.0},
            "loss": {"ratio": "token", "clip": "cispo", "eps_low": 1.0, "eps_high": 0.28,
                     "aggregation": "token_mean", "kl_placement": "none", "kl_coef": 0.0},
            "sampling": {"group_size": 8, "minibatches": 2},
        },
    },
}


# --------------------------------------------------------------------------------------------
# Building knobs from dicts


def _unknown(key: str, valid: list[str]) -> ValueError:
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ValueError(f"unknown knob {key!r}{hint} (valid: {', '.join(sorted(valid))})")


def _valid_keys() -> list[str]:
    return [
        f"{section}.{f.name}"
        for section, cls in _SECTIONS.items()
        for f in dataclasses.fields(cls)
    ]


def knobs_from_dict(data: dict[str, Any] | None) -> OnlineKnobs:
    """Build validated ``OnlineKnobs`` from a nested dict {section: {field: value}}.

    Unknown sections or fields raise ValueError naming the dotted key; missing ones take the
    defaults. Inverse of ``knobs_to_dict``.
    """
    data = data or {}
    sections: dict[str, Any] = {}
    for section, values in data.items():
        if section not in _SECTIONS:
            raise _unknown(str(section), list(_SECTIONS))
        if not isinstance(values, dict):
            raise ValueError(f"knob section {section!r} must be a mapping, got {values!r}")
        cls = _SECTIONS[section]
        names = {f.name for f in dataclasses.fields(cls)}
        for key in values:
            if key not in names:
                raise _unknown(f"{section}.{key}", _valid_keys())
        sections[section] = cls(**values)
    return OnlineKnobs(**sections)


def knobs_to_dict(knobs: OnlineKnobs) -> dict[str, dict[str, Any]]:
    """Nested plain dict {section: {field: value}} of ``knobs`` (for configs and run folders)."""
    return {name: dataclasses.asdict(getattr(knobs, name)) for name in _SECTIONS}


def _apply_override(base: dict[str, dict[str, Any]], key: str, value: Any) -> None:
    parts = key.split(".")
    if len(parts) != 2 or parts[0] not in _SECTIONS:
        raise _unknown(key, _valid_keys())
    section, name = parts
    if name not in {f.name for f in dataclasses.fields(_SECTIONS[section])}:
        raise _unknown(key, _valid_keys())
    base.setdefault(section, {})[name] = value


def resolve_preset(name: str, overrides: dict[str, Any] | None = None) -> OnlineKnobs:
    """The knobs of preset ``name`` with ``overrides`` applied, validated.

    overrides: dotted keys {"loss.eps_high": 0.3}, nested {"loss": {"eps_high": 0.3}}, or a
    mix. An unknown preset or key raises ValueError naming it (with the closest valid name).
    Reference: ../shared/reference/002_51bc6b7a5ef2c181.txt (every method is the same skeleton
    with different entries in a few columns).
    """
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    base: dict[str, dict[str, Any]] = copy.deepcopy(PRESETS[name]["knobs"])
    for key, value in (overrides or {}).items():
        if isinstance(value, dict) and "." not in key:
            if key not in _SECTIONS:
                raise _unknown(key, list(_SECTIONS))
            for sub, sub_value in value.items():
                _apply_override(base, f"{key}.{sub}", sub_value)
        else:
            _apply_override(base, key, value)
    try:
        return knobs_from_dict(base)
    except ValueError as err:
        raise ValueError(f"preset {name!r}: {err}") from None


# --------------------------------------------------------------------------------------------
# The method matrix (ref 002), derived from the presets so it cannot drift from them.

_LENGTH = {
    "token_mean": "token-mean over all responses",
    "seq_mean_token_mean": "per-response then per-group (length bias)",
    "seq_mean_token_sum": "token sum per response, mean over responses",
    "constant": "token sum / constant (max tokens)",
}


def _baseline(adv: AdvantageKnobs) -> str:
    words = ESTIMATORS[adv.estimator].baseline
    return words if adv.whiten == "none" else f"{words}, then {adv.whiten} whitening"


def _ratio_clip(loss: PolicyLossKnobs, sampling: SamplingKnobs) -> str:
    unit = {"on_policy": "none (on-policy)", "token": "token", "sequence": "sequence"}[loss.ratio]
    clip = {
        "none": "",
        "symmetric": f", clip eps={loss.eps_low:g}",
        "asymmetric": f", clip-higher eps_low={loss.eps_low:g} eps_high={loss.eps_high:g}",
        "dual": f", dual clip eps={loss.eps_low:g}/{loss.eps_high:g} c={loss.dual_clip_c:g}",
        "cispo": f", clips the IS weight (stop-grad) at 1+{loss.eps_high:g}",
        "sapo": f", soft sigmoid gate tau={loss.sapo_tau_pos:g}/{loss.sapo_tau_neg:g}",
        "gmpo": f", geometric mean, log-ratio clip {loss.eps_low:g}/{loss.eps_high:g}",
        "clip_cov": f", clip eps={loss.eps_low:g}/{loss.eps_high:g} + clip-cov",
        "kl_cov": ", KL-Cov penalty",
    }[loss.clip]
    extra = " + dynamic sampling" if sampling.dynamic_sampling else ""
    return unit + clip + extra


def _kl(knobs: OnlineKnobs) -> str:
    loss = knobs.loss
    if loss.kl_placement == "none" or loss.kl_coef == 0:
        return "none"
    where = {
        "reward_token": "in reward, per token",
        "reward_sequence": "in reward, per sequence",
        "loss": "in loss",
    }[loss.kl_placement]
    adaptive = ", adaptive" if knobs.kl_control.adaptive else ""
    return f"{loss.kl_estimator} {where}, beta={loss.kl_coef:g}{adaptive}"


def method_matrix() -> list[dict[str, str]]:
    """One row per preset, in the columns of ref 002's method matrix.

    Keys: method, baseline, advantage_unit, ratio_clip_unit, length_handling, kl, paper.
    Derived from ``resolve_preset(name)`` for every name in PRESETS.
    Reference: ../shared/reference/002_51bc6b7a5ef2c181.txt ("the whole family as one matrix").
    """
    rows = []
    for name, preset in PRESETS.items():
        k = resolve_preset(name)
        if k.advantage.estimator == "gae":
            unit = f"token (GAE gamma={k.advantage.gamma:g} lambda={k.advantage.lam:g})"
        elif k.loss.kl_placement == "reward_token" and k.loss.kl_coef > 0:
            unit = "sequence + per-token KL"
        else:
            unit = "sequence"
        rows.append(
            {
                "method": name,
                "baseline": _baseline(k.advantage),
                "advantage_unit": unit,
                "ratio_clip_unit": _ratio_clip(k.loss, k.sampling),
                "length_handling": _LENGTH[k.loss.aggregation],
                "kl": _kl(k),
                "paper": preset["paper"],
            }
        )
    return rows


def knob_catalog() -> dict[str, Any]:
    """Every value each choice knob accepts, with what psirl knows of it (for `psirl algorithms
    --json` and the docs), read from the registries in core/ -- nothing is listed twice.

    Keys: advantage_estimators {name: scope, std_scaled, unbiased, bias, baseline, inputs,
    global_statistics}, whiten, kl_estimators, clip_rules, aggregation, ratio, kl_placements,
    preference_losses {loop losses, dpo_loss_types, further functions}.
    """
    from psirl.core import preference

    return {
        "advantage_estimators": {
            name: {"scope": s.scope, "std_scaled": s.std_scaled, "unbiased": s.unbiased,
                   "bias": s.bias, "baseline": s.baseline, "inputs": list(s.inputs),
                   "global_statistics": s.global_statistics}
            for name, s in ESTIMATORS.items()
        },
        "whiten": list(WHITEN_MODES),
        "kl_estimators": list(KL_ESTIMATORS),
        "clip_rules": list(CLIP_RULES),
        "aggregation": list(AGGREGATION_MODES),
        "ratio": list(RATIO_LEVELS),
        "kl_placements": list(KL_PLACEMENTS),
        "preference_losses": {
            "loop": ["dpo", "ipo", "kto", "simpo", "orpo"],
            "dpo_loss_types": list(preference.DPO_LOSS_TYPES),
            "f_divergences": ["reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"],
            "functions": ["mixed_dpo_loss", "kto_apo_zero_unpaired_loss", "cpo_loss",
                          "alphapo_loss", "reward_centering_penalty", "likelihood_displacement"],
            "paper_defaults": preference.PAPER_DEFAULTS,
        },
    }
