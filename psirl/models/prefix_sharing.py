"""Run each distinct prompt once when a batch repeats prompts (GRPO groups, RLOO, DPO pairs).

A GRPO batch holds G completions of every prompt. The plain pass runs the decoder on
[B, P + T] rows, i.e. every prompt G times. ``completion_hidden_states`` (backbone.py) asks
``choose_layout`` for the cheapest of three layouts that give the same hidden states:

* ``plain``: [B, P + T], one row per sample.
* ``packed``: one block per distinct prompt: its real prompt tokens, then each of its samples'
  completion tokens 0 .. l-2 back to back, with a 4D attention mask in which a completion token
  sees its block's prompt and the earlier tokens of its own completion only, and position ids
  that continue the prompt's. Blocks are laid into rows (``pack_rows``: one or several per row,
  whichever the cost estimate prefers). No prompt is repeated and no completion padding is run.
  Needs an attention that takes a custom 4D mask (sdpa, eager) and no sliding window.
* ``kv_cache``: the distinct prompts [N, P] with ``use_cache=True``, then every row's completion
  tokens [B, T - 1] continued from its prompt's KV cache. Works with any cache-capable decoder.

The choice is a FLOP estimate per decoder layer: tokens x (linear FLOPs per token) +
sum over rows of (query length x key length) x (attention FLOPs per query-key pair), from the
model config, with ``kv_cache`` charged KV_CACHE_OVERHEAD for its second call and cache gather.
A shared layout must beat the plain one by SHARED_MIN_GAIN (it costs an index build). Short
completions of a repeated prompt pack; long completions stay plain (a packed row would be G
completions long, and attention grows with its square). Measured on the GRPO benchmark's tiny
model (8 prompts x 8 samples, ~6 prompt and ~4 completion tokens, 2 CPU threads): policy
forward + backward 71 ms plain, 44 ms kv_cache, 29 ms packed one block per row.

All layouts give the plain pass's hidden states and gradients up to float rounding
(tests/models/test_models_shared_prefix.py).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import torch
from torch import nn

SHARED_MIN_GAIN = 0.9  # a shared layout is used when its cost is below 0.9 x the plain cost
# kv_cache's estimate is scaled by this: it makes two decoder calls and gathers (then, in
# backward, scatters) a KV cache per row. Measured at equal FLOP estimates (the tiny benchmark
# batch): forward + backward 44 ms kv_cache against 29 ms packed.
KV_CACHE_OVERHEAD = 1.3


@dataclass(frozen=True)
class PromptGroups:
    """Distinct prompts of a [B, L] batch whose last T columns are the completion.

    keys: [N, 2P] long, prompt ids then prompt mask of each distinct prompt;
    inverse: [B] long, row b's prompt is keys[inverse[b]];
    prompt_lens: [N] long, real (mask 1) prompt tokens of each distinct prompt;
    fed_lens: [B] long, completion tokens each row feeds to the decoder (l_b - 1, at least 0,
        l_b = attended completion tokens): the last token predicts nothing.
    """

    keys: torch.Tensor
    inverse: torch.Tensor
    prompt_lens: torch.Tensor
    fed_lens: torch.Tensor


def prompt_groups(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_len: int
) -> PromptGroups | None:
    """Group rows by prompt, or None when the batch is not prompt-left-padded /
    completion-right-padded (or a prompt has no real token): sharing then is not attempted."""
    mask = attention_mask.to(torch.long)
    prompt_mask, completion_mask = mask[:, :prompt_len], mask[:, prompt_len:]
    left_padded = bool((prompt_mask[:, 1:] >= prompt_mask[:, :-1]).all())
    right_padded = bool((completion_mask[:, 1:] <= completion_mask[:, :-1]).all())
    if not (left_padded and right_padded) or bool((prompt_mask[:, -1] == 0).any()):
        return None
    keys = torch.cat([input_ids[:, :prompt_len], prompt_mask.to(input_ids.dtype)], dim=1)
    keys, inverse = torch.unique(keys, dim=0, return_inverse=True)
    return PromptGroups(
        keys=keys,
        inverse=inverse,
        prompt_lens=keys[:, prompt_len:].sum(dim=1),
        fed_lens=(completion_mask.sum(dim=1) - 1).clamp(min=0),
    )


def supports_packing(config) -> bool:
    """Whether the decoder takes a custom 4D mask that means what ``packed`` needs: sdpa or eager
    attention (flash-attention kernels take no mask) and full attention in every layer (a custom
    mask would replace a sliding window's)."""
    if getattr(config, "_attn_implementation", None) not in ("sdpa", "eager"):
        return False
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        return False
    layer_types = getattr(config, "layer_types", None) or ()
    return all(kind == "full_attention" for kind in layer_types)


def layer_costs(config) -> tuple[float, float]:
    """(linear FLOPs per token, attention FLOPs per query-key pair) of one decoder layer."""
    width = int(getattr(config, "hidden_size", 0) or 1)
    heads = int(getattr(config, "num_attention_heads", 0) or 1)
    head_dim = int(getattr(config, "head_dim", None) or width // heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    ffn = int(getattr(config, "intermediate_size", None) or 4 * width)
    q_width, kv_width = heads * head_dim, kv_heads * head_dim
    linear = 2 * (2 * width * q_width + 2 * width * kv_width + 3 * width * ffn)
    attention = 4 * q_width  # scores (Q K^T) and output (A V), 2 FLOPs per multiply-add each
    return float(linear), float(attention)


def choose_layout(
    config, groups: PromptGroups | None, batch: int, length: int, prompt_len: int, n_completion: int
) -> tuple[str, PackPlan | None]:
    """('plain' | 'packed' | 'kv_cache', packing plan): the cheapest layout by the FLOP estimate
    in the module doc, and the ``pack_rows`` plan it costed for 'packed' (None if not costed)."""
    if groups is None or groups.keys.shape[0] == batch:
        return "plain", None
    linear, attention = layer_costs(config)
    n_prompts = groups.keys.shape[0]
    costs = {"plain": batch * length * linear + batch * length * length * attention}
    fed = n_completion - 1
    costs["kv_cache"] = KV_CACHE_OVERHEAD * (
        n_prompts * prompt_len * (linear + prompt_len * attention)
        + batch * fed * (linear + (prompt_len + fed) * attention)
    )
    plan = pack_rows(groups, linear, attention) if supports_packing(config) else None
    if plan is not None:
        costs["packed"] = plan.cost
    best = min(costs, key=costs.get)
    return (best if costs[best] < SHARED_MIN_GAIN * costs["plain"] else "plain"), plan


def packed_group_lengths(groups: PromptGroups) -> torch.Tensor:
    """[N] tokens each distinct prompt brings to a packed row: its real prompt tokens plus its
    rows' fed completion tokens."""
    fed_per_prompt = torch.zeros_like(groups.prompt_lens).index_add_(
        0, groups.inverse, groups.fed_lens
    )
    return groups.prompt_lens + fed_per_prompt


@dataclass(frozen=True)
class PackPlan:
    """Where each distinct prompt's block goes in the packed [rows, width] batch.

    row, start: [N] long, prompt k's block occupies columns start[k] .. start[k] + len_k - 1 of
    packed row row[k]; cost: the FLOP estimate rows x width x (linear + width x attention).
    """

    row: torch.Tensor
    start: torch.Tensor
    rows: int
    width: int
    cost: float


MAX_BLOCKS_PER_ROW = 8  # widest packing tried: rows about 8 x the longest block
# Rows holding several blocks stay at most this wide: the 4D mask is [rows, 1, width, width], and
# a wide row buys little (padding is at most the gap to the longest block).
MAX_SHARED_ROW_TOKENS = 2048


def pack_rows(groups: PromptGroups, linear: float, attention: float,
              n_rows: int | None = None) -> PackPlan:
    """The cheapest packing of the prompt blocks into rows, by the FLOP estimate (or the LPT
    packing into exactly ``n_rows`` rows, 1 <= n_rows <= N, when given).

    One block per row pads every row to the longest block (GRPO groups differ in total completion
    length); several blocks per row cut that padding but attention grows with the row's square.
    Tried: for R rows with R = N (one block each) and R = ceil(total / (m x longest)),
    m = 1 .. MAX_BLOCKS_PER_ROW, blocks are placed longest first, each into the row that is
    shortest so far (LPT). A packing with several blocks in a row is kept only while its rows
    are at most MAX_SHARED_ROW_TOKENS wide (one block per row is always possible). Measured on
    the GRPO benchmark's tiny model (fwd + bwd, 2 threads): [8, 30] 25.1-25.6 ms, [4, 52]
    22.3 ms, [2, 104] 23.6 ms, [1, 208] 24.6 ms, in the order the estimate ranks them.
    """
    lengths = packed_group_lengths(groups).tolist()
    n_blocks, total, longest = len(lengths), sum(lengths), max(lengths)
    order = sorted(range(n_blocks), key=lambda k: -lengths[k])
    candidates = {n_blocks} | {
        max(1, -(-total // (m * longest))) for m in range(1, MAX_BLOCKS_PER_ROW + 1)
    }
    if n_rows is not None:
        if not 1 <= n_rows <= n_blocks:
            raise ValueError(f"n_rows={n_rows}: must be in [1, {n_blocks}] (one block per prompt)")
        candidates = {n_rows}
    best = None
    for rows in sorted(candidates, reverse=True):
        loads = [(0, r) for r in range(rows)]  # (tokens so far, row): a min-heap
        row, start = [0] * n_blocks, [0] * n_blocks
        for k in order:
            load, r = heapq.heappop(loads)
            row[k], start[k] = r, load
            heapq.heappush(loads, (load + lengths[k], r))
        width = max(load for load, _ in loads)
        if rows < n_blocks and width > max(longest, MAX_SHARED_ROW_TOKENS) and n_rows is None:
            continue
        cost = float(rows * width * (linear + width * attention))
        if best is None or cost < best[0]:
            best = (cost, row, start, rows, width)
    cost, row, start, rows, width = best
    device = groups.inverse.device
    return PackPlan(row=torch.tensor(row, device=device), start=torch.tensor(start, device=device),
                    rows=rows, width=width, cost=cost)


def packed_hidden_states(
    decoder: nn.Module,
    input_ids: torch.Tensor,
    n_completion: int,
    groups: PromptGroups,
    pad_token_id: int = 0,
    plan: PackPlan | None = None,
) -> torch.Tensor:
    """``completion_hidden_states`` through the ``packed`` layout. Returns [B, T, H].

    Prompt k's block (``plan``; default ``pack_rows``) sits in packed row r_k from column s_k:
    its p_k real tokens at positions 0 .. p_k-1, then for each row b of prompt k (in batch
    order) its completion tokens 0 .. f_b-1 (f_b = l_b - 1) at positions p_k .. p_k+f_b-1.
    Token j attends to token i of its packed row iff i <= j, both are in the same block, and i
    is a prompt token or in j's own completion. Output [b, 0] is the state of prompt k's last
    token, [b, t] (1 <= t <= f_b) the state of b's completion token t-1; beyond that (padding)
    the prompt's last state, which the caller masks out like the plain pass's padding states.
    """
    device = input_ids.device
    batch, length = input_ids.shape
    prompt_len = length - n_completion
    inverse, prompt_lens, fed = groups.inverse, groups.prompt_lens, groups.fed_lens
    n_prompts = groups.keys.shape[0]
    if plan is None:
        plan = pack_rows(groups, *layer_costs(decoder.config))
    width, block_base = plan.width, plan.row * plan.width + plan.start  # [N] flat block starts

    # Where each row's completion segment starts: after its prompt and the segments of the
    # earlier rows of the same prompt (stable sort keeps batch order).
    sorted_prompt, order = torch.sort(inverse, stable=True)
    fed_sorted = fed[order]
    within = torch.cumsum(fed_sorted, 0) - fed_sorted  # exclusive cumsum over sorted rows
    first = torch.searchsorted(sorted_prompt, torch.arange(n_prompts, device=device))
    offsets = torch.empty_like(fed)  # flat index of row b's first fed token
    offsets[order] = (block_base + prompt_lens)[sorted_prompt] + within - within[first][sorted_prompt]

    size = plan.rows * width
    tokens = torch.full((size,), pad_token_id, dtype=input_ids.dtype, device=device)
    positions = torch.zeros(size, dtype=torch.long, device=device)
    block = torch.full((size,), -1, dtype=torch.long, device=device)  # -1: padding
    segment = torch.zeros(size, dtype=torch.long, device=device)  # 0: prompt, b + 1: row b

    # Prompt tokens: prompt k's real tokens are the last p_k columns of its left-padded prompt.
    tok_prompt = torch.repeat_interleave(torch.arange(n_prompts, device=device), prompt_lens)
    j = torch.arange(tok_prompt.numel(), device=device) - torch.repeat_interleave(
        torch.cumsum(prompt_lens, 0) - prompt_lens, prompt_lens
    )  # token index within its prompt
    dest = block_base[tok_prompt] + j
    tokens[dest] = groups.keys[tok_prompt, prompt_len - prompt_lens[tok_prompt] + j]
    positions[dest] = j
    block[dest] = tok_prompt

    # Completion segments: one flat index per fed token.
    seg_row = torch.repeat_interleave(torch.arange(batch, device=device), fed)  # [F]
    step = torch.arange(seg_row.numel(), device=device) - torch.repeat_interleave(
        torch.cumsum(fed, 0) - fed, fed
    )  # token index within its completion
    dest = offsets[seg_row] + step
    tokens[dest] = input_ids[seg_row, prompt_len + step]
    positions[dest] = prompt_lens[inverse[seg_row]] + step
    block[dest] = inverse[seg_row]
    segment[dest] = seg_row + 1

    shape = (plan.rows, width)
    tokens, positions = tokens.view(shape), positions.view(shape)
    block, segment = block.view(shape), segment.view(shape)
    cols = torch.arange(width, device=device)
    causal = cols.unsqueeze(0) <= cols.unsqueeze(1)  # [q, k]
    key_block, query_block = block.unsqueeze(1), block.unsqueeze(2)  # [R, 1, k], [R, q, 1]
    key_seg, query_seg = segment.unsqueeze(1), segment.unsqueeze(2)
    allowed = (causal & (key_block >= 0) & (key_block == query_block)
               & ((key_seg == 0) | (key_seg == query_seg)))
    # Padding queries attend to themselves only (a fully masked row would give NaN in sdpa).
    allowed |= torch.eye(width, dtype=torch.bool, device=device) & (query_block < 0)
    mask4d = allowed.unsqueeze(1)  # [R, 1, q, k]
    if getattr(decoder.config, "_attn_implementation", None) == "eager":
        dtype = next(decoder.parameters()).dtype
        mask4d = torch.zeros(mask4d.shape, dtype=dtype, device=device).masked_fill(
            ~mask4d, torch.finfo(dtype).min
        )

    out = decoder(input_ids=tokens, attention_mask=mask4d, position_ids=positions, use_cache=False)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    flat = hidden.reshape(size, hidden.shape[-1])

    # Output index [B, T]: t = 0 -> prompt's last token; 1 <= t <= f_b -> completion token t-1.
    t = torch.arange(n_completion, device=device).unsqueeze(0)
    last_prompt = (block_base + prompt_lens - 1)[inverse].unsqueeze(1)
    in_segment = (t >= 1) & (t <= fed.unsqueeze(1))
    index = torch.where(in_segment, offsets.unsqueeze(1) + t - 1, last_prompt)
    # index_select, not flat[index]: the latter's backward (index_put_ with accumulate) adds with
    # atomics on CPU, so repeated runs differed in the last bits; index_add_ is deterministic.
    return flat.index_select(0, index.reshape(-1)).view(batch, n_completion, hidden.shape[-1])


def kv_cache_hidden_states(
    decoder: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    n_completion: int,
    groups: PromptGroups,
) -> torch.Tensor:
    """``completion_hidden_states`` through the ``kv_cache`` layout. Returns [B, T, H].

    Pass 1: the N distinct prompts [N, P] with ``use_cache=True``; the last prompt position's
    state predicts completion token 0. Pass 2: every row's completion tokens 0 .. T-2 [B, T-1],
    attending to its prompt's KV cache gathered by ``inverse`` and to its own earlier tokens,
    with position ids continuing the prompt's. Gradients flow through the gathered cache, so each
    prompt's states receive the sum over its rows, as in the plain pass.
    """
    from .backbone import position_ids_from_mask, prefill_prompts

    length = input_ids.shape[1]
    prompt_len = length - n_completion
    out = prefill_prompts(decoder, groups.keys[:, :prompt_len], groups.keys[:, prompt_len:])
    first = out.last_hidden_state[:, -1:, :].index_select(0, groups.inverse)  # [B, 1, H]
    if n_completion == 1:
        return first
    cache = out.past_key_values
    _gather_cache_rows(cache, groups.inverse)
    rest = decoder(
        input_ids=input_ids[:, prompt_len : length - 1],
        attention_mask=attention_mask[:, : length - 1],
        position_ids=position_ids_from_mask(attention_mask)[:, prompt_len : length - 1],
        past_key_values=cache,
        use_cache=True,
    )
    return torch.cat([first, rest.last_hidden_state], dim=1)


def _gather_cache_rows(cache, rows: torch.Tensor) -> None:
    """Give row b of the cache the prompt rows[b]'s keys and values, in place.

    ``index_select`` per layer where the cache exposes its layers (transformers 5), because its
    backward (index_add_) is deterministic on CPU, unlike the advanced indexing of
    ``DynamicCache.batch_select_indices`` (index_put_ with atomic adds)."""
    layers = getattr(cache, "layers", None)
    if not layers or not all(hasattr(layer, "keys") and hasattr(layer, "values") for layer in layers):
        cache.batch_select_indices(rows)
        return
    for layer in layers:
        if layer.keys is not None and layer.keys.numel():
            layer.keys = layer.keys.index_select(0, rows)
            layer.values = layer.values.index_select(0, rows)
