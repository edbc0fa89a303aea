"""Split a causal LM into its decoder backbone and its output head, and run the backbone.

Both the policy log-probs (``logprobs.py``) and the critic (``value.py``) need the hidden states
at the positions that *predict* the completion, without the [B, L, V] logits a plain
``model(input_ids).logits`` call would build. For a prompt of P tokens (left-padded) followed by
T completion tokens (right-padded), L = P + T, the state before completion token t (0-based) is
the hidden state at position P - 1 + t, so positions P-1 .. L-2 are the ones we keep.

Checked against transformers 5 (``Qwen2ForCausalLM`` / ``LlamaForCausalLM``): the CausalLM class
holds the decoder in ``.model`` (``get_decoder()`` returns it) and the head in ``.lm_head``
(``get_output_embeddings()`` returns it); its forward is ``lm_head(model(...).last_hidden_state)``
with no other transformation. Models with ``config.final_logit_softcapping`` (Gemma 2/3) or
``config.logit_scale`` (Cohere) are handled by ``apply_logit_transform``.
"""

from __future__ import annotations

import torch
from torch import nn


def unwrap_peft(model: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT wrapper (LoRA layers stay injected), else ``model``."""
    get_base = getattr(model, "get_base_model", None)
    if callable(get_base) and hasattr(model, "peft_config"):
        return get_base()
    return model


def split_backbone_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """``(decoder, lm_head)`` of a ``*ForCausalLM`` model (PEFT-wrapped or not).

    decoder(input_ids, attention_mask, position_ids) returns ``last_hidden_state`` [B, L, H];
    lm_head maps [..., H] -> [..., V]. Raises TypeError naming the class when either is missing.
    """
    inner = unwrap_peft(model)
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    decoder = inner.get_decoder() if hasattr(inner, "get_decoder") else None
    if head is None or decoder is None or decoder is inner:
        raise TypeError(
            f"{type(inner).__name__}: expected a *ForCausalLM model with a decoder (get_decoder()) "
            "and an output head (get_output_embeddings())"
        )
    return decoder, head


def apply_logit_transform(logits: torch.Tensor, config) -> torch.Tensor:
    """Apply the model's own post-head logit transform, if its config declares one.

    Cohere: ``logits * logit_scale``; Gemma 2/3: ``tanh(logits / c) * c`` with
    ``c = final_logit_softcapping``. Identity for Qwen2 / Llama / Mistral.
    """
    scale = getattr(config, "logit_scale", None)
    if scale is not None:
        logits = logits * scale
    cap = getattr(config, "final_logit_softcapping", None)
    if cap is not None:
        logits = torch.tanh(logits / cap) * cap
    return logits


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids [B, L] long for a left-padded batch: ``clamp(cumsum(mask) - 1, min=0)``.

    Each real token's position is the number of real tokens before it, so a left-padded prompt gets
    the same positions as the unpadded one (what ``generate`` does; transformers 5's decoder
    defaults to ``arange(L)``, which would shift every left-padded row).
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


SHARE_PREFIX_MIN_SAVING = 0.25  # share prompts when it skips at least this fraction of tokens


def completion_hidden_states(
    decoder: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    n_completion: int,
    *,
    share_prefix: bool | None = None,
) -> torch.Tensor:
    """Hidden states [B, T, H] (decoder dtype) at positions P-1 .. L-2, T = n_completion, P = L - T.

    Entry [b, t] is the decoder's state after reading every token before completion token t, i.e.
    the state that predicts ``input_ids[b, P + t]``. Raises ValueError naming the argument for
    shapes that leave no prompt token (P < 1) or no completion (T < 1).

    share_prefix: run each distinct prompt (prompt ids and mask) once and continue its rows'
    completions from its KV cache (``shared_prefix_hidden_states``). None (default) decides by
    the token count: share when that skips at least SHARE_PREFIX_MIN_SAVING of the tokens the
    plain pass would run, e.g. GRPO groups of G completions of one prompt, or DPO pairs. Both
    paths give the same states and gradients up to float rounding.
    """
    if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"input_ids {tuple(input_ids.shape)} and attention_mask {tuple(attention_mask.shape)} "
            "must both be [B, L]"
        )
    length = input_ids.shape[1]
    if not 1 <= n_completion <= length - 1:
        raise ValueError(
            f"n_completion={n_completion}: must be in [1, L-1] with L={length} (at least one prompt token)"
        )
    prompt_len = length - n_completion
    if share_prefix is not False:
        keys, inverse = distinct_prompts(input_ids, attention_mask, prompt_len)
        plain_tokens = input_ids.shape[0] * length
        shared_tokens = keys.shape[0] * prompt_len + input_ids.shape[0] * (n_completion - 1)
        saving = 1.0 - shared_tokens / plain_tokens
        if share_prefix or (keys.shape[0] < input_ids.shape[0] and saving >= SHARE_PREFIX_MIN_SAVING):
            return shared_prefix_hidden_states(decoder, input_ids, attention_mask, n_completion,
                                               keys, inverse)
    out = decoder(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
    )
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    return hidden[:, prompt_len - 1 : length - 1, :]


def distinct_prompts(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct prompt rows: ``keys`` [N, 2P] long (ids then mask of each distinct prompt) and
    ``inverse`` [B] long, row b's prompt being ``keys[inverse[b]]``."""
    keys = torch.cat(
        [input_ids[:, :prompt_len], attention_mask[:, :prompt_len].to(input_ids.dtype)], dim=1
    )
    keys, inverse = torch.unique(keys, dim=0, return_inverse=True)
    return keys, inverse


def shared_prefix_hidden_states(
    decoder: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    n_completion: int,
    keys: torch.Tensor,
    inverse: torch.Tensor,
) -> torch.Tensor:
    """``completion_hidden_states`` computed with each distinct prompt run once.

    Pass 1: the N distinct prompts [N, P] with ``use_cache=True``; the last prompt position's
    state predicts completion token 0. Pass 2: every row's completion tokens 0 .. T-2 (token T-1
    predicts nothing) [B, T-1], attending to its prompt's KV cache gathered by ``inverse`` and
    to its own earlier tokens, with position ids continuing the prompt's. Work: N*P + B*(T-1)
    tokens instead of B*(P+T). Gradients flow through the gathered cache, so each prompt's
    states receive the sum over its rows, as in the plain pass.
    """
    from transformers import DynamicCache  # only needed here; keeps the module import light

    length = input_ids.shape[1]
    prompt_len = length - n_completion
    prompt_ids, prompt_mask = keys[:, :prompt_len], keys[:, prompt_len:]
    cache = DynamicCache(config=decoder.config)
    out = decoder(
        input_ids=prompt_ids,
        attention_mask=prompt_mask,
        position_ids=position_ids_from_mask(prompt_mask),
        past_key_values=cache,
        use_cache=True,
    )
    first = out.last_hidden_state[:, -1:, :][inverse]  # [B, 1, H], predicts completion token 0
    if n_completion == 1:
        return first
    cache = out.past_key_values
    cache.batch_select_indices(inverse)
    positions = position_ids_from_mask(attention_mask)[:, prompt_len : length - 1]
    rest = decoder(
        input_ids=input_ids[:, prompt_len : length - 1],
        attention_mask=attention_mask[:, : length - 1],
        position_ids=positions,
        past_key_values=cache,
        use_cache=True,
    )
    return torch.cat([first, rest.last_hidden_state], dim=1)
