"""A tabular autoregressive policy small enough to enumerate every sequence.

The policy generates H tokens from a vocabulary of V tokens after one of P prompts. Every
*state* -- a prompt x together with the tokens generated so far, y_<t -- has its own vector of
V logits; those logits are the parameters:

    theta: [n_prefixes, V] float64,   pi_theta(a | x, y_<t) = softmax(theta[prefix(x, y_<t)])[a]

so the policy is exactly the MDP of ../shared/reference/000_7914f6881bc4a22c.txt ("the
language-model MDP": state = prompt + prefix, action = next token, deterministic transition)
and the sequence probability is the autoregressive product (002, "consequence 1"):

    log pi(y | x) = sum_t log pi(y_t | x, y_<t).

Prefixes are numbered per prompt in breadth-first order: depth h (h tokens generated) starts at
offset (V^h - 1) / (V - 1); inside a depth the prefix is read as a base-V number. With P prompts
there are P * (V^H - 1) / (V - 1) prefixes (P=2, V=3, H=3: 26 prefixes, 78 parameters).

Optional end-of-sequence token (``eos_token``): sampling that token ends the sequence; the
positions after it are padding (token id = eos_token, mask 0). Sequences then have lengths
1..H, and the prefixes that contain the EOS token are never visited (``reachable_prefixes``).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["TabularPolicy", "SequenceTable"]


@dataclass(frozen=True)
class SequenceTable:
    """Every distinct (prompt, completion) pair of a TabularPolicy, in a fixed order.

    prompt_ids: [N] long; tokens: [N, H] long (padding after EOS = eos_token);
    mask: [N, H] float64 (1 on generated tokens, EOS included; 0 on padding);
    seq_index: [N] long, index of the completion in ``TabularPolicy.completions()``.
    Row n = prompt_ids[n] * n_completions + seq_index[n].
    """

    prompt_ids: Tensor
    tokens: Tensor
    mask: Tensor
    seq_index: Tensor


@dataclass(frozen=True)
class TabularPolicy:
    """Shape of a tabular autoregressive policy: V tokens, horizon H, P prompts, optional EOS.

    The parameters are not stored here: every function takes ``theta`` [n_prefixes, V]
    float64 explicitly, so the same policy shape serves the trained policy and the reference.
    """

    vocab_size: int = 3
    horizon: int = 3
    n_prompts: int = 1
    eos_token: int | None = None

    def __post_init__(self) -> None:
        if self.vocab_size < 2:
            raise ValueError(f"TabularPolicy.vocab_size must be >= 2, got {self.vocab_size}")
        if self.horizon < 1:
            raise ValueError(f"TabularPolicy.horizon must be >= 1, got {self.horizon}")
        if self.n_prompts < 1:
            raise ValueError(f"TabularPolicy.n_prompts must be >= 1, got {self.n_prompts}")
        if self.eos_token is not None and not 0 <= self.eos_token < self.vocab_size:
            raise ValueError(
                f"TabularPolicy.eos_token must be in [0, {self.vocab_size}), got {self.eos_token}"
            )

    # ------------------------------------------------------------------ sizes and indexing
    @property
    def prefixes_per_prompt(self) -> int:
        """Number of states per prompt: sum_{h=0}^{H-1} V^h = (V^H - 1) / (V - 1)."""
        v = self.vocab_size
        return (v**self.horizon - 1) // (v - 1)

    @property
    def n_prefixes(self) -> int:
        """Rows of theta: P * (V^H - 1) / (V - 1)."""
        return self.n_prompts * self.prefixes_per_prompt

    def depth_offsets(self) -> list[int]:
        """offset[h] = (V^h - 1) / (V - 1): index of the first prefix of depth h (per prompt)."""
        v = self.vocab_size
        return [(v**h - 1) // (v - 1) for h in range(self.horizon)]

    def prefix_ids(self, prompt_ids: Tensor, tokens: Tensor) -> Tensor:
        """Row of theta that generates each token.

        prompt_ids: [B] long; tokens: [B, H] long. Returns [B, H] long with
            prefix_ids[b, t] = prompt_ids[b] * prefixes_per_prompt + offset[t]
                               + sum_{j<t} tokens[b, j] * V^(t-1-j).
        Positions after an EOS get the index their (unreachable) prefix would have; their
        mask is 0 so they never contribute.
        """
        if tokens.dim() != 2 or tokens.shape[1] != self.horizon:
            raise ValueError(f"tokens must be [B, {self.horizon}], got {tuple(tokens.shape)}")
        offsets = self.depth_offsets()
        code = torch.zeros_like(tokens[:, 0])
        cols = []
        for t in range(self.horizon):
            cols.append(offsets[t] + code)
            code = code * self.vocab_size + tokens[:, t]
        return torch.stack(cols, dim=1) + prompt_ids.unsqueeze(1) * self.prefixes_per_prompt

    def reachable_prefixes(self) -> Tensor:
        """[n_prefixes] bool: states that some sequence visits (all of them without EOS)."""
        table = self.enumerate()
        ids = self.prefix_ids(table.prompt_ids, table.tokens)
        out = torch.zeros(self.n_prefixes, dtype=torch.bool)
        out[ids[table.mask > 0]] = True
        return out

    # ------------------------------------------------------------------ enumeration
    def completions(self) -> tuple[Tensor, Tensor]:
        """Every distinct completion: (tokens [N_y, H] long, mask [N_y, H] float64).

        Without EOS: all V^H token strings, in lexicographic order.
        With EOS: the strings whose positions after the first EOS are all eos_token (the
        canonical padded form), so N_y = sum_{t<H} (V-1)^t + (V-1)^H.
        """
        rows = list(itertools.product(range(self.vocab_size), repeat=self.horizon))
        tokens = torch.tensor(rows, dtype=torch.long)
        mask = self._mask_after_eos(tokens)
        if self.eos_token is not None:
            canonical = ((mask > 0) | (tokens == self.eos_token)).all(dim=1)
            tokens, mask = tokens[canonical], mask[canonical]
        return tokens, mask

    def enumerate(self) -> SequenceTable:
        """Every (prompt, completion) pair: see SequenceTable. N = P * N_y rows."""
        tokens, mask = self.completions()
        n_y = tokens.shape[0]
        p = self.n_prompts
        return SequenceTable(
            prompt_ids=torch.arange(p).repeat_interleave(n_y),
            tokens=tokens.repeat(p, 1),
            mask=mask.repeat(p, 1),
            seq_index=torch.arange(n_y).repeat(p),
        )

    def completion_index(self, tokens: Tensor) -> Tensor:
        """Index in ``completions()`` of each (canonically padded) completion.

        tokens: [B, H] long -> [B] long. Uses the base-V code of the token string.
        """
        all_tokens, _ = self.completions()
        powers = self.vocab_size ** torch.arange(self.horizon - 1, -1, -1)
        lookup = torch.full((self.vocab_size**self.horizon,), -1, dtype=torch.long)
        lookup[(all_tokens * powers).sum(1)] = torch.arange(all_tokens.shape[0])
        idx = lookup[(tokens * powers).sum(1)]
        if (idx < 0).any():
            raise ValueError("tokens contain a non-canonical completion (token after EOS != EOS)")
        return idx

    def _mask_after_eos(self, tokens: Tensor) -> Tensor:
        """[B, H] float64 mask: 1 up to and including the first EOS, 0 after it."""
        if self.eos_token is None:
            return torch.ones(tokens.shape, dtype=torch.float64)
        is_eos = (tokens == self.eos_token).long()
        eos_before = torch.cumsum(is_eos, dim=1) - is_eos  # EOS strictly before position t
        return (eos_before == 0).to(torch.float64)

    # ------------------------------------------------------------------ parameters
    def init_theta(self, generator: torch.Generator, scale: float = 1.0) -> Tensor:
        """Random logits theta ~ scale * N(0, 1): [n_prefixes, V] float64."""
        return scale * torch.randn(
            self.n_prefixes, self.vocab_size, generator=generator, dtype=torch.float64
        )

    def _check_theta(self, theta: Tensor) -> None:
        if theta.shape[-2:] != (self.n_prefixes, self.vocab_size):
            raise ValueError(
                f"theta must end with [{self.n_prefixes}, {self.vocab_size}] "
                f"(n_prefixes, V), got {tuple(theta.shape)}"
            )

    # ------------------------------------------------------------------ log-probabilities
    def token_logprobs(
        self,
        theta: Tensor,
        prompt_ids: Tensor,
        tokens: Tensor,
        mask: Tensor,
        copy_ids: Tensor | None = None,
    ) -> Tensor:
        """Per-token log-probabilities, differentiable in theta.

            logp[b, t] = mask[b, t] * log softmax(theta[prefix_ids[b, t]])[tokens[b, t]]

        theta: [n_prefixes, V], or [K, n_prefixes, V] (K independent copies of the parameters;
        then ``copy_ids`` [B] long says which copy scores row b -- used to get one gradient per
        batch from a single backward pass). prompt_ids: [B] long; tokens: [B, H] long;
        mask: [B, H] 0/1. Returns [B, H] with theta's dtype; 0 on padding.
        """
        self._check_theta(theta)
        log_pi = torch.log_softmax(theta, dim=-1)
        rows = self.prefix_ids(prompt_ids, tokens)
        if theta.dim() == 3:
            if copy_ids is None:
                raise ValueError("theta has a copy dimension; pass copy_ids [B]")
            log_pi = log_pi.reshape(-1, self.vocab_size)
            rows = rows + copy_ids.unsqueeze(1) * self.n_prefixes
        logp = log_pi[rows, tokens]
        return torch.where(mask > 0, logp, torch.zeros((), dtype=logp.dtype))

    def sequence_logprobs(
        self, theta: Tensor, prompt_ids: Tensor, tokens: Tensor, mask: Tensor
    ) -> Tensor:
        """log pi(y | x) = sum_t mask_t * log pi(y_t | x, y_<t): [B] (differentiable)."""
        return self.token_logprobs(theta, prompt_ids, tokens, mask).sum(dim=1)

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def sample(
        self, theta: Tensor, prompt_ids: Tensor, generator: torch.Generator
    ) -> tuple[Tensor, Tensor]:
        """Ancestral sampling, one token at a time: y_t ~ pi_theta(. | x, y_<t).

        theta: [n_prefixes, V]; prompt_ids: [B] long; generator: torch.Generator (CPU).
        Returns (tokens [B, H] long, mask [B, H] float64). After an EOS the sequence is padded
        with eos_token and mask 0; without EOS the mask is all ones.
        """
        self._check_theta(theta)
        probs = torch.softmax(theta.detach().to(torch.float64), dim=-1)
        b = prompt_ids.shape[0]
        tokens = torch.zeros(b, self.horizon, dtype=torch.long)
        offsets = self.depth_offsets()
        code = torch.zeros(b, dtype=torch.long)
        alive = torch.ones(b, dtype=torch.bool)
        base = prompt_ids * self.prefixes_per_prompt
        for t in range(self.horizon):
            p_t = probs[base + offsets[t] + code]
            a = torch.multinomial(p_t, 1, generator=generator).squeeze(1)
            if self.eos_token is not None:
                a = torch.where(alive, a, torch.full_like(a, self.eos_token))
                alive = alive & (a != self.eos_token)
            tokens[:, t] = a
            code = code * self.vocab_size + a
        return tokens, self._mask_after_eos(tokens)
