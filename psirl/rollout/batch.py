"""The tensors of one rollout step, from the engine to the loss, and the sampling parameters.

Layout of one row (P = prompt_len, T = completion length of the batch):

    input_ids      = [pad ... pad  p_1 ... p_k | c_1 ... c_m  pad ... pad]
    attention_mask = [ 0  ...  0    1  ...  1  |  1  ...  1    0  ...  0 ]
                     <-------- P (left-padded) -><----- T (right-padded) ---->

so completion token t of every row sits at column P + t and is predicted by the logits at column
P - 1 + t (``psirl.models.token_logprobs(model, input_ids, attention_mask, T)``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields

import torch


@dataclass(frozen=True)
class SamplingParams:
    """How to sample completions (validated; a bad value raises ValueError naming the field).

    temperature: softmax temperature (> 0), or 0 for greedy decoding.
    top_p: nucleus sampling mass in (0, 1]; 1 disables it.
    top_k: keep the k most likely tokens; 0 disables it.
    max_new_tokens: completion length cap (>= 1); a completion that reaches it without EOS or a
        stop string is marked ``truncated``.
    stop: strings that end a completion (checked on the decoded text after every token); the
        completion text is cut before the stop string, its tokens stay (masked in).
    n: completions per prompt (the group size G); rows of a prompt are consecutive.
    seed: seeds the call; prompt i gets the seed ``psirl.rollout.seeding.prompt_seeds(seed,
        len(prompts))[i]``. Same seed + same model + same prompts -> same completions. None draws
        a seed from torch's global RNG (so ``torch.manual_seed`` still makes a run reproducible).
    seeds: one seed per prompt, instead of ``seed``. Sample j of prompt i draws from a random
        stream keyed by (seeds[i], j) alone (psirl.rollout.seeding), so its tokens do not depend
        on which other prompts share the call, their order or the rank that samples them: a run
        samples the same tokens at any world size.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 64
    stop: tuple[str, ...] = ()
    n: int = 1
    seed: int | None = None
    seeds: tuple[int, ...] | None = None

    def __post_init__(self):
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop))
        if self.temperature < 0:
            raise ValueError(f"SamplingParams.temperature={self.temperature}: must be >= 0")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"SamplingParams.top_p={self.top_p}: must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError(f"SamplingParams.top_k={self.top_k}: must be >= 0 (0 = off)")
        if self.max_new_tokens < 1:
            raise ValueError(f"SamplingParams.max_new_tokens={self.max_new_tokens}: must be >= 1")
        if self.n < 1:
            raise ValueError(f"SamplingParams.n={self.n}: must be >= 1")
        if self.seeds is not None:
            object.__setattr__(self, "seeds", tuple(self.seeds))
            if any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in self.seeds):
                raise ValueError("SamplingParams.seeds: must be non-negative integers")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"SamplingParams.stop={self.stop!r}: must be non-empty strings")


_TENSOR_FIELDS = (
    "input_ids",
    "attention_mask",
    "completion_ids",
    "completion_mask",
    "behaviour_logprobs",
    "group_ids",
    "prompt_index",
    "truncated",
)


@dataclass
class RolloutBatch:
    """B sampled completions with everything the loss needs (B rows, P prompt cols, T completion cols).

    input_ids: [B, P+T] int64. Prompt LEFT-padded to P, completion RIGHT-padded to T, pad =
        ``pad_token_id``.
    attention_mask: [B, P+T] int64 (0/1). 1 on real prompt tokens and on completion tokens where
        ``completion_mask`` is 1, and on the environment's tokens of a multi-turn episode
        (psirl/rollout/episode.py: attended, completion_mask 0). Attended completion columns are
        contiguous from column P (right padding only).
    completion_ids: [B, T] int64, ``input_ids[:, P:]``.
    completion_mask: [B, T] float32 (0/1). 1 for every generated token up to and including the
        EOS token or the token that completed a stop string, 0 after.
    behaviour_logprobs: [B, T] float32. log pi_behaviour(c_t | prefix) of each sampled token under
        the temperature-scaled softmax the sampler used (before top-p / top-k truncation; T=1
        softmax for greedy decoding); 0 where ``completion_mask`` is 0.
    group_ids: [B] int64. Rows with the same id were sampled from the same prompt (GRPO/RLOO
        groups); ids are 0 .. n_groups-1 from ``generate`` and ``cat`` (``select`` keeps them).
    prompt_index: [B] int64. Index of the row's prompt in the list passed to ``generate``
        (the caller may remap it to dataset records).
    truncated: [B] bool. True when the completion hit ``max_new_tokens`` without EOS / stop string.
    prompt_len: P (int).
    prompts: list of B str, the prompt text of each row.
    completions: list of B str, decoded completion without special tokens, cut before any stop
        string.
    pad_token_id: int, the id used for padding (an addition to the shared contract, used by
        ``cat`` when it re-pads).
    token_rewards: [B, T] float32 or None. Rewards an environment gave during the episode, each
        on the last model token of its turn (psirl/rollout/episode.py); None for single-turn
        batches, whose reward comes from the reward function. Kept by ``select``, ``to`` and
        ``cat`` (zeros for a batch without them).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    behaviour_logprobs: torch.Tensor
    group_ids: torch.Tensor
    prompt_index: torch.Tensor
    truncated: torch.Tensor
    prompt_len: int
    prompts: list[str] = field(default_factory=list)
    completions: list[str] = field(default_factory=list)
    pad_token_id: int = 0
    token_rewards: torch.Tensor | None = None

    def __post_init__(self):
        batch, width = self.input_ids.shape
        steps = width - self.prompt_len
        expected = {
            "input_ids": ((batch, width), torch.long),
            "attention_mask": ((batch, width), torch.long),
            "completion_ids": ((batch, steps), torch.long),
            "completion_mask": ((batch, steps), torch.float32),
            "behaviour_logprobs": ((batch, steps), torch.float32),
            "group_ids": ((batch,), torch.long),
            "prompt_index": ((batch,), torch.long),
            "truncated": ((batch,), torch.bool),
        }
        for name, (shape, dtype) in expected.items():
            value = getattr(self, name)
            if tuple(value.shape) != shape or value.dtype != dtype:
                raise ValueError(
                    f"RolloutBatch.{name}: expected shape {shape} dtype {dtype}, "
                    f"got {tuple(value.shape)} {value.dtype}"
                )
        if self.token_rewards is not None and (
            tuple(self.token_rewards.shape) != (batch, steps)
            or self.token_rewards.dtype != torch.float32
        ):
            raise ValueError(
                f"RolloutBatch.token_rewards: expected shape {(batch, steps)} dtype "
                f"torch.float32, got {tuple(self.token_rewards.shape)} {self.token_rewards.dtype}"
            )
        for name in ("prompts", "completions"):
            if len(getattr(self, name)) != batch:
                raise ValueError(
                    f"RolloutBatch.{name}: expected {batch} strings, got {len(getattr(self, name))}"
                )

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def completion_len(self) -> int:
        """T, the number of completion columns."""
        return self.input_ids.shape[1] - self.prompt_len

    def group_first_rows(self) -> list[int]:
        """Row index of each group's first row, for groups 0 .. n_groups-1 (what a per-prompt
        quantity, e.g. the prompt's ids or record, is read from)."""
        first: dict[int, int] = {}
        for row, g in enumerate(self.group_ids.tolist()):
            first.setdefault(g, row)
        return [first[g] for g in range(len(first))]

    def select(self, indices: Sequence[int] | torch.Tensor) -> RolloutBatch:
        """Rows ``indices`` (ints, an int64 tensor, or a [B] bool mask), same P and T.

        group_ids are kept as they are (a minibatch keeps its rows' group identity), so they may
        no longer be contiguous; ``RolloutBatch.cat([batch])`` renumbers them.
        """
        index = torch.as_tensor(indices, device=self.input_ids.device)
        if index.dtype == torch.bool:
            if index.shape != (len(self),):
                raise ValueError(
                    f"select: bool mask must have shape ({len(self)},), got {tuple(index.shape)}"
                )
            index = index.nonzero().squeeze(-1)
        index = index.long().reshape(-1)
        rows = index.tolist()
        tensors = {name: getattr(self, name)[index] for name in _TENSOR_FIELDS}
        return RolloutBatch(
            **tensors,
            prompt_len=self.prompt_len,
            prompts=[self.prompts[i] for i in rows],
            completions=[self.completions[i] for i in rows],
            pad_token_id=self.pad_token_id,
            token_rewards=None if self.token_rewards is None else self.token_rewards[index],
        )

    def to(self, device: str | torch.device) -> RolloutBatch:
        """The same batch with every tensor on ``device``."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        for name in _TENSOR_FIELDS:
            values[name] = values[name].to(device)
        if self.token_rewards is not None:
            values["token_rewards"] = self.token_rewards.to(device)
        return RolloutBatch(**values)

    @staticmethod
    def cat(batches: Sequence[RolloutBatch]) -> RolloutBatch:
        """Stack batches row-wise, re-padding prompts (left) to the largest P and completions
        (right) to the largest T.

        group_ids are renumbered 0 .. n_groups-1 in order (batch by batch, id by id) so groups of
        different batches stay distinct and ids are contiguous; prompt_index is kept as is.
        """
        if not batches:
            raise ValueError("RolloutBatch.cat: needs at least one batch")
        prompt_len = max(b.prompt_len for b in batches)
        steps = max(b.completion_len for b in batches)
        pad = batches[0].pad_token_id
        parts: dict[str, list[torch.Tensor]] = {name: [] for name in _TENSOR_FIELDS}
        offset = 0
        for b in batches:
            left = prompt_len - b.prompt_len
            right = steps - b.completion_len
            ids_prompt = b.input_ids[:, : b.prompt_len]
            mask_prompt = b.attention_mask[:, : b.prompt_len]
            ids = torch.cat(
                [
                    _pad_cols(ids_prompt, left, pad, left_side=True),
                    _pad_cols(b.completion_ids, right, pad),
                ],
                dim=1,
            )
            mask = torch.cat(
                [
                    _pad_cols(mask_prompt, left, 0, left_side=True),
                    _pad_cols(b.attention_mask[:, b.prompt_len :], right, 0),
                ],
                dim=1,
            )
            parts["input_ids"].append(ids)
            parts["attention_mask"].append(mask)
            parts["completion_ids"].append(_pad_cols(b.completion_ids, right, pad))
            parts["completion_mask"].append(_pad_cols(b.completion_mask, right, 0))
            parts["behaviour_logprobs"].append(_pad_cols(b.behaviour_logprobs, right, 0))
            parts["group_ids"].append(b.group_ids + offset)
            parts["prompt_index"].append(b.prompt_index)
            parts["truncated"].append(b.truncated)
            if len(b):
                offset += int(b.group_ids.max()) + 1
        tensors = {name: torch.cat(ts) for name, ts in parts.items()}
        tensors["group_ids"] = torch.unique(tensors["group_ids"], return_inverse=True)[1]
        if any(b.token_rewards is not None for b in batches):
            tensors["token_rewards"] = torch.cat([
                _pad_cols(b.token_rewards if b.token_rewards is not None
                          else torch.zeros_like(b.completion_mask), steps - b.completion_len, 0)
                for b in batches
            ])
        return RolloutBatch(
            **tensors,
            prompt_len=prompt_len,
            prompts=[p for b in batches for p in b.prompts],
            completions=[c for b in batches for c in b.completions],
            pad_token_id=pad,
        )


def _pad_cols(x: torch.Tensor, n: int, value: float, left_side: bool = False) -> torch.Tensor:
    """Add ``n`` columns filled with ``value`` on the right (or left) of a [B, W] tensor."""
    if n == 0:
        return x
    filler = torch.full((x.shape[0], n), value, dtype=x.dtype, device=x.device)
    return torch.cat([filler, x] if left_side else [x, filler], dim=1)
