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


def prefill_prompts(model: nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, **kwargs):
    """Run left-padded prompts [N, P] into a fresh ``DynamicCache``; returns the model's output,
    whose ``past_key_values`` holds the prompts' keys and values. Used by the sampler (prefill
    once per distinct prompt) and by the KV-cache layout of ``completion_hidden_states``.
    ``kwargs`` go to the model (e.g. ``logits_to_keep=1``)."""
    from transformers import DynamicCache  # only needed here; keeps the module import light

    return model(
        input_ids=prompt_ids,
        attention_mask=prompt_mask,
        position_ids=position_ids_from_mask(prompt_mask),
        past_key_values=DynamicCache(config=model.config),
        use_cache=True,
        **kwargs,
    )


LAYOUTS = ("plain", "packed", "kv_cache")


def completion_hidden_states(
    decoder: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    n_completion: int,
    *,
    layout: str | None = None,
) -> torch.Tensor:
    """Hidden states [B, T, H] (decoder dtype) at positions P-1 .. L-2, T = n_completion, P = L - T.

    Entry [b, t] is the decoder's state after reading every token before completion token t, i.e.
    the state that predicts ``input_ids[b, P + t]``. Raises ValueError naming the argument for
    shapes that leave no prompt token (P < 1) or no completion (T < 1).

    layout: how rows that repeat a prompt are run (prefix_sharing.py): "plain" (every row whole),
    "packed" (each distinct prompt once, its rows' completions packed behind it), "kv_cache"
    (each distinct prompt once, completions continued from its KV cache), or None (default):
    the cheapest by a FLOP estimate from the model config. All give the same states and gradients
    up to float rounding; a shared layout the batch cannot use falls back to "plain".
    """
    from . import prefix_sharing as sharing
    from .sharded import is_sharded

    if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"input_ids {tuple(input_ids.shape)} and attention_mask {tuple(attention_mask.shape)} "
            "must both be [B, L]"
        )
    if layout is not None and layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r}: must be one of {LAYOUTS} or None")
    batch, length = input_ids.shape
    if not 1 <= n_completion <= length - 1:
        raise ValueError(
            f"n_completion={n_completion}: must be in [1, L-1] with L={length} (at least one prompt token)"
        )
    prompt_len = length - n_completion
    if layout != "plain":
        groups, plan = sharing.prompt_groups(input_ids, attention_mask, prompt_len), None
        if layout is None:
            layout, plan = sharing.choose_layout(decoder.config, groups, batch, length,
                                                 prompt_len, n_completion)
            if layout == "kv_cache" and is_sharded(decoder):
                # FSDP: every rank must run the decoder the same number of times per call (each
                # layer's gather is a collective); kv_cache runs it twice, the others once.
                layout, plan = ("packed" if sharing.supports_packing(decoder.config) else "plain"), None
        elif groups is None or (layout == "packed" and not sharing.supports_packing(decoder.config)):
            layout = "plain"
        if layout == "packed":
            return sharing.packed_hidden_states(decoder, input_ids, n_completion, groups,
                                                plan=plan)
        if layout == "kv_cache":
            return sharing.kv_cache_hidden_states(decoder, input_ids, attention_mask,
                                                  n_completion, groups)
    out = decoder(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
    )
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    return hidden[:, prompt_len - 1 : length - 1, :]
