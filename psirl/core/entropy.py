"""Entropy of the policy's next-token distribution, from logits.

    H(pi(. | s)) = -sum_a pi(a | s) log pi(a | s) = logsumexp(z) - sum_a softmax(z)_a z_a

Used as an optional exploration bonus in the loss and as a collapse diagnostic.
Reference: ../shared/reference/003_e8bd019fa090e190.txt (RL without an anchor "collapses
entropy"), ../shared/reference/002_51bc6b7a5ef2c181.txt (temperature is the whole
exploration mechanism).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["entropy_from_logits", "entropy_from_logprobs"]


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of softmax(logits) over the last dimension.

    H = logsumexp(z) - sum_v softmax(z)_v z_v   (stable: never forms log 0; -inf logits allowed)

    logits: [..., V] float. Returns [...] in logits' dtype (computed in at least float32).
    Differentiable in the logits.
    Reference: ../shared/reference/003_e8bd019fa090e190.txt (entropy collapse).
    """
    z = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
    p = torch.softmax(z, dim=-1)
    # p * z is 0 * -inf = NaN for masked-out vocabulary entries (in value and gradient);
    # those entries contribute 0, so replace z there before multiplying.
    z_safe = torch.where(p > 0, z, torch.zeros_like(z))
    return (torch.logsumexp(z, dim=-1) - (p * z_safe).sum(dim=-1)).to(logits.dtype)


def entropy_from_logprobs(logp: Tensor) -> Tensor:
    """Entropy from a log-softmax already computed: H = -sum_v exp(l_v) l_v.

    logp: [..., V] float log-probabilities (entries of -inf, i.e. probability 0, contribute 0).
    Returns [...] in logp's dtype; differentiable. This is the form the log-prob pass uses
    (psirl.models.logprobs.token_logprobs): it reuses the chunk's log-softmax instead of a
    second softmax over the vocabulary.
    """
    p = logp.exp()
    return -(p * torch.where(p > 0, logp, torch.zeros_like(logp))).sum(dim=-1)
