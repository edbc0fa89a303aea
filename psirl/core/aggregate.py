"""Loss aggregation: from per-token losses to one scalar, with an explicit step normaliser.

Modes (b indexes sequences, t tokens, m the response mask, n_b = sum_t m_{b,t}):

    token_mean           L = sum_{b,t} m l / N_tok                    (DAPO: every token equal)
    seq_mean_token_mean  L = sum_b [ sum_t m l / n_b ] / N_seq        (GRPO: 1/G sum_i 1/|y_i| sum_t)
    seq_mean_token_sum   L = sum_b [ sum_t m l ] / N_seq              (REINFORCE estimator; Dr. GRPO)
    constant             L = sum_b [ sum_t m l ] / (N_seq * C)        (Dr. GRPO: C = max tokens)

N_tok, N_seq are counts over the *whole optimiser step* (all micro-batches, all data-parallel
ranks), computed once by ``step_normaliser`` and passed to every ``aggregate_loss`` call. Then
sum over micro-batches of aggregate_loss(mb) == aggregate_loss(full batch), for loss and
gradient, in every mode: each term of the numerator lives in exactly one micro-batch and the
denominator is shared. (Averaging per-micro-batch means instead is the bug of TRL #5619.)
Micro-batches split along B (whole sequences); a sequence is never split across them.

References: ../shared/reference/002_51bc6b7a5ef2c181.txt (Length column: token-mean,
per-response then per-group, sequence-level; DAPO's fix),
../shared/reference/000_7914f6881bc4a22c.txt (GRPO's 1/sum_i |tau_i| token-level form),
../shared/reference/004_0ae34f1505be1cc8.txt (GRPO's 1/G sum_i 1/|y_i| sum_t form).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from psirl.core.masking import masked_sum, token_counts

__all__ = [
    "AGGREGATION_MODES",
    "aggregate_loss",
    "normaliser_count",
    "normaliser_from_count",
    "step_normaliser",
]

AGGREGATION_MODES: tuple[str, ...] = (
    "token_mean",
    "seq_mean_token_mean",
    "seq_mean_token_sum",
    "constant",
)


def _check_mode(mode: str) -> None:
    if mode not in AGGREGATION_MODES:
        raise ValueError(f"aggregation mode must be one of {AGGREGATION_MODES}, got {mode!r}")


def step_normaliser(
    mask_of_whole_step: Tensor | Sequence[Tensor], mode: str, constant: float | None = None
) -> float:
    """The denominator of one optimiser step's loss, computed once from the step's masks.

    token_mean:                          N_tok = sum_{b,t} m_{b,t}
    seq_mean_token_mean / _token_sum:    N_seq = #{b : n_b > 0}   (sequences with a token)
    constant:                            N_seq * C                 (C = ``constant`` > 0)

    mask_of_whole_step: [B, T] 0/1 for the whole step, or a sequence of per-micro-batch masks
    [B_k, T_k] (widths may differ). For data parallelism, all-reduce ``normaliser_count`` of
    each rank's masks and pass the sum to ``normaliser_from_count`` (psirl/train/distributed.py
    does), or pass the global masks. Returns a Python float >= 1 for counts (an empty step
    divides by 1, so its loss is 0 rather than NaN).
    Reference: ../shared/reference/002_51bc6b7a5ef2c181.txt (length handling); DESIGN.md
    ("the normaliser is an explicit argument computed once per optimiser step").
    """
    return normaliser_from_count(normaliser_count(mask_of_whole_step, mode), mode, constant)


def normaliser_count(mask_of_whole_step: Tensor | Sequence[Tensor], mode: str) -> float:
    """The count behind ``step_normaliser``, before clamping and scaling: additive over any split.

    token_mean:  N_tok = sum_{b,t} m_{b,t};   every other mode:  N_seq = #{b : n_b > 0}

    Because each sequence lives in exactly one part, the counts of disjoint parts of a step
    (micro-batches, data-parallel ranks) sum to the count of the whole step; so a rank's
    ``normaliser_count``, all-reduced, gives the global normaliser through
    ``normaliser_from_count``. Masks as for ``step_normaliser``. Returns a float >= 0 (an
    integer value).
    Reference: as ``step_normaliser``.
    """
    _check_mode(mode)
    masks = [mask_of_whole_step] if isinstance(mask_of_whole_step, Tensor) else list(
        mask_of_whole_step
    )
    for k, m in enumerate(masks):
        if m.dim() != 2:
            raise ValueError(f"mask {k} must be [B, T], got shape {tuple(m.shape)}")
    if mode == "token_mean":
        return float(sum(float(token_counts(m).sum().item()) for m in masks))
    return float(sum(int((token_counts(m) > 0).sum().item()) for m in masks))


def normaliser_from_count(count: float, mode: str, constant: float | None = None) -> float:
    """The step normaliser from the step's whole ``normaliser_count``.

    token_mean, seq_mean_token_mean, seq_mean_token_sum:  max(count, 1)
    constant:                                             max(count, 1) * C   (C > 0)

    count: N_tok or N_seq of the whole step (float >= 0). Returns a float >= 1 (for constant,
    >= C). Reference: as ``step_normaliser``.
    """
    _check_mode(mode)
    if mode == "constant":
        if constant is None or not constant > 0:
            raise ValueError(
                f"aggregation 'constant' needs constant_normaliser > 0 (e.g. max_new_tokens), "
                f"got {constant!r}"
            )
        return max(float(count), 1.0) * float(constant)
    return max(float(count), 1.0)


def aggregate_loss(per_token_loss: Tensor, mask: Tensor, mode: str, normaliser: float) -> Tensor:
    """Reduce per-token losses to a scalar with a step-wide ``normaliser``.

    token_mean, seq_mean_token_sum, constant:  L = sum_{b,t} m_{b,t} l_{b,t} / normaliser
    seq_mean_token_mean:                       L = sum_b (sum_t m_{b,t} l_{b,t} / n_b) / normaliser

    (The modes differ in what ``step_normaliser`` counts and, for seq_mean_token_mean, in the
    per-sequence 1/n_b, which is local to a sequence and so safe to compute per micro-batch.)
    per_token_loss: [B, T] float; mask: [B, T] 0/1; normaliser: float > 0 from
    ``step_normaliser``. Returns a 0-d tensor with per_token_loss's dtype.
    Reference: ../shared/reference/002_51bc6b7a5ef2c181.txt (DAPO token-level aggregation vs
    GRPO per-response averaging).
    """
    _check_mode(mode)
    if per_token_loss.shape != mask.shape or per_token_loss.dim() != 2:
        raise ValueError(
            f"per_token_loss {tuple(per_token_loss.shape)} and mask {tuple(mask.shape)} "
            "must both be [B, T]"
        )
    if not normaliser > 0:
        raise ValueError(f"normaliser must be > 0, got {normaliser!r}")
    m = mask.to(per_token_loss.dtype)
    if mode == "seq_mean_token_mean":
        per_seq = masked_sum(per_token_loss, m, dim=1) / m.sum(dim=1).clamp(min=1)
        return per_seq.sum() / normaliser
    return masked_sum(per_token_loss, m) / normaliser
