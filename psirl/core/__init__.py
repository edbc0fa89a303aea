"""psirl.core: pure tensor math of the online loop (no models, no files, no config parsing).

One job per module: masking (masked reductions), advantages (every Psi_t estimator behind one
signature), ratio (on-policy / token / sequence importance ratios), clip (per-token surrogate
rules), aggregate (loss reduction with a step-wide normaliser), kl (k1/k2/k3, placement,
adaptive coefficient), objective (the composed policy loss), value (PPO critic loss),
entropy, filters (dynamic sampling, self-training selection).
See ../shared/reference/README.md for the texts each function follows.
"""

from psirl.core.advantages import (
    ADVANTAGE_ESTIMATORS,
    batch_mean_advantages,
    batch_whiten_advantages,
    gae_advantages,
    group_mean_advantages,
    group_mean_std_advantages,
    leave_one_out_advantages,
    no_baseline_advantages,
    reward_to_go,
    sequence_returns,
)
from psirl.core.aggregate import AGGREGATION_MODES, aggregate_loss, step_normaliser
from psirl.core.clip import (
    CLIP_RULES,
    asymmetric_clip_loss,
    cispo_loss,
    dual_clip_loss,
    no_clip_loss,
    symmetric_clip_loss,
)
from psirl.core.entropy import entropy_from_logits
from psirl.core.filters import (
    dynamic_sampling_keep,
    threshold_keep,
    top_k_per_group,
    zero_signal_groups,
)
from psirl.core.kl import (
    KL_ESTIMATORS,
    AdaptiveKLController,
    FixedKLController,
    kl_estimate,
    kl_in_reward,
    kl_k1,
    kl_k2,
    kl_k3,
)
from psirl.core.masking import (
    first_token_index,
    last_token_index,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    place_on_last_token,
    token_counts,
)
from psirl.core.objective import policy_loss
from psirl.core.ratio import RATIO_LEVELS, importance_log_ratio, importance_ratio
from psirl.core.value import clipped_value_loss, explained_variance, value_clip_fraction

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "AGGREGATION_MODES",
    "CLIP_RULES",
    "KL_ESTIMATORS",
    "RATIO_LEVELS",
    "AdaptiveKLController",
    "FixedKLController",
    "aggregate_loss",
    "asymmetric_clip_loss",
    "batch_mean_advantages",
    "batch_whiten_advantages",
    "cispo_loss",
    "clipped_value_loss",
    "dual_clip_loss",
    "dynamic_sampling_keep",
    "entropy_from_logits",
    "explained_variance",
    "first_token_index",
    "gae_advantages",
    "group_mean_advantages",
    "group_mean_std_advantages",
    "importance_log_ratio",
    "importance_ratio",
    "kl_estimate",
    "kl_in_reward",
    "kl_k1",
    "kl_k2",
    "kl_k3",
    "last_token_index",
    "leave_one_out_advantages",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "no_baseline_advantages",
    "no_clip_loss",
    "place_on_last_token",
    "policy_loss",
    "reward_to_go",
    "sequence_returns",
    "step_normaliser",
    "symmetric_clip_loss",
    "threshold_keep",
    "token_counts",
    "top_k_per_group",
    "value_clip_fraction",
    "zero_signal_groups",
]
