"""Masked reductions over response tokens, and placing a per-sequence value on its last token.

Every loss and statistic in psirl is taken over *response* tokens only. The mask is a float
tensor of 0/1 (bool is accepted and cast) with the same shape as the data, usually [B, T]:
B sequences, T completion positions, right-padded. Reference for the conventions:
../shared/reference/002_51bc6b7a5ef2c181.txt (the sequence reward sits at the end of the
completion; every loss term is a masked average of per-token terms).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "masked_sum",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "token_counts",
    "first_token_index",
    "last_token_index",
    "place_on_last_token",
]


def _as_mask(mask: Tensor, like: Tensor) -> Tensor:
    if mask.shape != like.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} != data shape {tuple(like.shape)}")
    return mask.to(like.dtype)


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Sum of the entries of ``x`` where ``mask`` is 1.

    S = sum_i m_i x_i   (over all entries, or along ``dim``).

    x: float tensor, any shape; mask: same shape, 0/1 float or bool.
    Returns a 0-d tensor (dim=None) or x reduced along ``dim``; dtype of x.
    Entries where mask is 0 are selected out with ``where`` (not multiplied), so a NaN or
    -inf in padding never leaks into the sum or its gradient.
    Reference: ../shared/reference/002_51bc6b7a5ef2c181.txt (masked token sums).
    """
    m = _as_mask(mask, x)
    xm = torch.where(m > 0, x, torch.zeros((), dtype=x.dtype, device=x.device)) * m
    return xm.sum() if dim is None else xm.sum(dim=dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``x`` over the entries where ``mask`` is 1.

    mean = sum_i m_i x_i / max(sum_i m_i, 1)

    x: float tensor; mask: same shape (0/1). Returns 0-d (dim=None) or reduced along ``dim``.
    An all-masked slice has mean 0 (the count is clamped to 1) rather than NaN.
    Reference: ../shared/reference/004_0ae34f1505be1cc8.txt (GRPO's 1/|y| sum_t).
    """
    m = _as_mask(mask, x)
    count = m.sum() if dim is None else m.sum(dim=dim)
    return masked_sum(x, m, dim) / count.clamp(min=1)


def masked_var(
    x: Tensor, mask: Tensor, unbiased: bool = True, dim: int | None = None
) -> Tensor:
    """Variance of ``x`` over the masked entries.

    var = sum_i m_i (x_i - mean)^2 / (n - 1)   (unbiased, Bessel's correction; n = sum_i m_i)
    var = sum_i m_i (x_i - mean)^2 / n         (unbiased=False)

    x: float tensor; mask: same shape. Returns 0-d (dim=None) or reduced along ``dim``.
    With fewer than 2 (unbiased) or 0 (biased) entries the variance is undefined; 0 is
    returned so that whitening such a slice gives 0, never NaN.
    Reference: ../shared/reference/002_51bc6b7a5ef2c181.txt (sample std of the worked example).
    """
    m = _as_mask(mask, x)
    count = m.sum() if dim is None else m.sum(dim=dim)
    mean = masked_mean(x, m, dim)
    centred = x - (mean if dim is None else mean.unsqueeze(dim))
    sq = masked_sum(centred * centred, m, dim)
    denom = count - 1 if unbiased else count
    return torch.where(denom > 0, sq / denom.clamp(min=1), torch.zeros_like(sq))


def masked_whiten(
    x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8
) -> Tensor:
    """Whiten ``x`` with the mean and (unbiased) variance of its masked entries.

    w = (x - mean) / sqrt(var + eps)            (shift_mean=True)
    w = (x - mean) / sqrt(var + eps) + mean     (shift_mean=False: rescale only)

    x: float tensor; mask: same shape. Returns the same shape; 0 where mask is 0.
    Reference: ../shared/reference/002_51bc6b7a5ef2c181.txt (std normalisation: "the std-
    normalization rescales it"), applied here over whatever the mask selects.
    """
    m = _as_mask(mask, x)
    mean = masked_mean(x, m)
    var = masked_var(x, m, unbiased=True)
    w = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        w = w + mean
    return torch.where(m > 0, w, torch.zeros_like(w))


def token_counts(mask: Tensor) -> Tensor:
    """Number of response tokens per sequence: n_b = sum_t m_{b,t}.

    mask: [B, T] 0/1. Returns [B] in the mask's float dtype (float32 for a bool mask).
    Reference: ../shared/reference/004_0ae34f1505be1cc8.txt (|y_i| in GRPO's loss).
    """
    dtype = mask.dtype if mask.is_floating_point() else torch.float32
    return mask.to(dtype).sum(dim=-1)


def first_token_index(mask: Tensor) -> Tensor:
    """Index of the first response token of each row: min{t : m_{b,t} = 1}.

    mask: [B, T] 0/1. Returns [B] long; 0 for an all-zero row.
    Reference: ../shared/reference/002_51bc6b7a5ef2c181.txt (returns are read at the first token).
    """
    return (mask > 0).to(torch.int8).argmax(dim=-1)


def last_token_index(mask: Tensor) -> Tensor:
    """Index of the last response token of each row: max{t : m_{b,t} = 1}.

    mask: [B, T] 0/1. Returns [B] long; 0 for an all-zero row.
    Reference: ../shared/reference/002_51bc6b7a5ef2c181.txt (terminal reward at the last token).
    """
    T = mask.shape[-1]
    flipped = (mask > 0).to(torch.int8).flip(-1)
    idx = T - 1 - flipped.argmax(dim=-1)
    return torch.where((mask > 0).any(dim=-1), idx, torch.zeros_like(idx))


def place_on_last_token(values: Tensor, mask: Tensor) -> Tensor:
    """Put each sequence's scalar on its last response token; zeros elsewhere.

    out_{b,t} = values_b if t == last_token_index(mask)_b else 0
    (rows with no response token get all zeros).

    values: [B] float (e.g. the sequence rewards); mask: [B, T] 0/1.
    Returns [B, T] with values' dtype: the ``token_rewards`` layout every advantage estimator
    takes (a terminal, outcome-level reward).
    Reference: ../shared/reference/002_51bc6b7a5ef2c181.txt ("Terminal reward ... arrives only
    at the end").
    """
    if values.dim() != 1 or mask.dim() != 2 or values.shape[0] != mask.shape[0]:
        raise ValueError(
            f"values must be [B] and mask [B, T]; got {tuple(values.shape)} and {tuple(mask.shape)}"
        )
    out = torch.zeros(mask.shape, dtype=values.dtype, device=values.device)
    has_tokens = (mask > 0).any(dim=-1)
    idx = last_token_index(mask)
    out[torch.arange(mask.shape[0], device=mask.device), idx] = torch.where(
        has_tokens, values, torch.zeros_like(values)
    )
    return out
