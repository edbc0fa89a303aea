"""Per-token log-probabilities of a completion, without a float32 [B, L, V] logits tensor.

Every policy-gradient method needs log pi_theta(a_t | s_t) for the sampled completion tokens
(reference 000_7914f6881bc4a22c.txt, "The RL Formulation for Language Models" and the policy
gradient; 004_0ae34f1505be1cc8.txt, REINFORCE / PPO / GRPO objectives). With a vocabulary of
150k entries, ``model(input_ids).logits.float()`` is the largest tensor of a training step
([B, L, V] float32, plus as much again for the log-softmax and its gradient). Here the decoder
runs once to give hidden states, only the T completion-predicting positions are kept, and the
head + log-softmax run over chunks of ``chunk_tokens`` rows of the flattened [B*T, H] states, so
the biggest vocabulary-sized tensor is [chunk_tokens, V]. Rows that repeat a prompt (GRPO groups,
DPO pairs) run it once (``completion_hidden_states`` picks the layout, prefix_sharing.py).

Autograd. With gradients enabled each chunk runs under ``torch.utils.checkpoint`` (non-reentrant):
the forward keeps only the chunk's [n, H] hidden states, and the backward recomputes that chunk's
logits one chunk at a time. Plain autograd would instead keep every chunk's [n, V] log-softmax
output alive until backward, i.e. [B*T, V] float32 again. The recompute costs one extra
[n, H] x [H, V] matmul per chunk in backward. Measured on CPU (V=32000, H=32, B=4, P=T=128,
chunk 128, forward+backward, peak live tensor bytes): naive full logits 506 MB, chunks with plain
autograd 100 MB, chunks with checkpoint 57 MB, for ~15% more time than plain-autograd chunks
(and ~3x less than naive, which also computes logits for every prompt position).
When the whole [B*T, V] float32 is small (under CHECKPOINT_MIN_BYTES, e.g. a character
vocabulary) the chunks run under plain autograd instead: nothing worth saving, no recompute.
See tests/models/test_models_logprobs_memory.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from psirl.core.entropy import entropy_from_logprobs

from .backbone import apply_logit_transform, completion_hidden_states, split_backbone_and_head
from .sharded import through_fsdp_root

CHUNK_BYTES = 32 * 2**20  # default size of one chunk's float32 logits
# ...but never fewer rows than this: at V = 152k, 55-row chunks ran forward+backward 35% slower
# than 128-row chunks for the same peak memory (benchmarks/RESULTS.md, log-prob memory).
MIN_CHUNK_ROWS = 128
CHECKPOINT_MIN_BYTES = 16 * 2**20  # float32 log-probs autograd may keep before we checkpoint


@through_fsdp_root
def token_logprobs(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    n_completion: int,
    *,
    temperature: float = 1.0,
    with_entropy: bool = False,
    entropy_grad: bool = True,
    chunk_tokens: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probabilities of the last ``n_completion`` tokens of each row, and optionally entropy.

    Args:
        model: a ``*ForCausalLM`` (optionally PEFT-wrapped); any dtype.
        input_ids: [B, L] long, prompt LEFT-padded to P then completion RIGHT-padded to T = L - P.
        attention_mask: [B, L] (0/1, any dtype); position ids are ``cumsum(mask) - 1``.
        n_completion: T >= 1, the completion is ``input_ids[:, L-T:]``; P = L - T >= 1.
        temperature: logits are divided by it before the softmax (> 0), matching the sampler.
        with_entropy: also return the entropy of the temperature-scaled next-token distribution.
        entropy_grad: let gradients flow through the entropy (needed for an entropy bonus);
            False computes it as a detached metric, which keeps it out of backward.
        chunk_tokens: rows of the flattened [B*T, H] states sent through the head at once;
            None: as many as keep one chunk's float32 logits near CHUNK_BYTES (32 MiB), at least
            MIN_CHUNK_ROWS (128): about 260 rows for V = 32k, 128 for V = 152k, all rows at once
            for a character vocabulary.

    Returns:
        logp [B, T] float32 with ``logp[b, t] = log softmax(z_{b,P-1+t} / temperature)[input_ids[b, P+t]]``
        where ``z_i = lm_head(h_i)`` (upcast to float32 before the softmax), and entropy [B, T]
        float32 ``H = -sum_v p_v log p_v`` of the same distribution (or None). Positions of padding
        completion tokens hold finite garbage; the caller masks them. Differentiable w.r.t. the
        model's parameters (and equal to the naive full-logits computation, forward and backward).
    """
    if temperature <= 0:
        raise ValueError(f"temperature={temperature}: must be > 0 for log-probabilities")
    if chunk_tokens is not None and chunk_tokens < 1:
        raise ValueError(f"chunk_tokens={chunk_tokens}: must be >= 1")
    decoder, head = split_backbone_and_head(model)
    config = getattr(model, "config", None)
    hidden = completion_hidden_states(decoder, input_ids, attention_mask, n_completion)  # [B,T,H]
    batch, steps, width = hidden.shape
    flat_hidden = hidden.reshape(batch * steps, width)
    flat_targets = input_ids[:, -n_completion:].reshape(batch * steps)

    def chunk_fn(h: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = apply_logit_transform(head(h), config).float()
        if temperature != 1.0:
            logits = logits / temperature
        logp_all = F.log_softmax(logits, dim=-1)  # [n, V] float32, freed after this chunk
        logp = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        if with_entropy and entropy_grad:
            entropy = entropy_from_logprobs(logp_all)
        elif with_entropy:
            # A metric only (no entropy bonus): kept out of autograd, so backward skips it.
            with torch.no_grad():
                entropy = entropy_from_logprobs(logp_all)
        else:
            entropy = logp.new_zeros(())
        return logp, entropy

    # Without checkpointing, autograd keeps every chunk's float32 log-softmax until backward,
    # i.e. [B*T, V] in all. Checkpoint only when that is big enough to matter: for a small
    # vocabulary the recomputation in backward costs more time than the memory is worth.
    vocab = getattr(head, "out_features", None) or getattr(config, "vocab_size", None) or 2**20
    if chunk_tokens is None:
        chunk_tokens = max(MIN_CHUNK_ROWS, CHUNK_BYTES // (4 * vocab))
    kept_logit_bytes = batch * steps * vocab * 4
    use_checkpoint = (
        torch.is_grad_enabled()
        and kept_logit_bytes > CHECKPOINT_MIN_BYTES
        and (flat_hidden.requires_grad or any(p.requires_grad for p in head.parameters()))
    )
    logps, entropies = [], []
    for start in range(0, batch * steps, chunk_tokens):
        h = flat_hidden[start : start + chunk_tokens]
        t = flat_targets[start : start + chunk_tokens]
        if use_checkpoint:
            logp, entropy = checkpoint(chunk_fn, h, t, use_reentrant=False)
        else:
            logp, entropy = chunk_fn(h, t)
        logps.append(logp)
        entropies.append(entropy)
    logp = torch.cat(logps).view(batch, steps)
    entropy = torch.cat(entropies).view(batch, steps) if with_entropy else None
    return logp, entropy
