"""Supervised fine-tuning loss over completion tokens."""

from __future__ import annotations

import torch


def sft_token_loss(logp: torch.Tensor, mask: torch.Tensor, normaliser: float) -> torch.Tensor:
    """Negative log-likelihood of the completion tokens, divided by a step-wide normaliser.

    L = -(1/N) Σ_{i,t} m_{i,t} log π(y_{i,t} | x_i, y_{i,<t})

    logp: [B, T] float, per-token log-probs of the target tokens; mask: [B, T] 0/1 (prompt and
    padding are 0). normaliser N: the completion-token count of the WHOLE optimiser step, so
    summing this over micro-batches gives exactly the full-batch token-mean loss.
    """
    if normaliser <= 0:
        raise ValueError(f"normaliser must be positive, got {normaliser}")
    return -(logp * mask).sum() / normaliser
