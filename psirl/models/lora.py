"""Optional LoRA adapters through PEFT (``pip install psirl[peft]``).

LoRA replaces a weight update dW [out, in] by B A with A [r, in], B [out, r], scaled by
alpha / r (Hu et al., 2021); only A and B are trained. PEFT initialises B = 0, so a freshly
wrapped model computes exactly the same function as the base model.
"""

from __future__ import annotations

import copy

from torch import nn


def apply_lora(
    model: nn.Module,
    r: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.0,
    target_modules: str | list[str] | None = None,
):
    """Wrap a ``*ForCausalLM`` in a PEFT ``PeftModel`` with LoRA adapters; return the wrapper.

    r: adapter rank (>= 1); alpha: scale numerator (update = alpha / r * B A); dropout: LoRA
    dropout on the adapter input; target_modules: module names (e.g. ["q_proj", "v_proj"]) or
    None for PEFT's "all-linear" (every Linear except the output head). After the call only the
    adapter parameters have ``requires_grad=True``. ``token_logprobs``, ``HFEngine`` and
    ``save_policy`` (which merges the adapters into a plain transformers folder) accept the
    wrapper directly.
    """
    try:
        from peft import LoraConfig, TaskType, get_peft_model
    except ImportError as err:  # pragma: no cover - peft is an optional dependency
        raise ImportError("LoRA needs PEFT: pip install 'psirl[peft]'") from err
    if r < 1:
        raise ValueError(f"lora r={r}: must be >= 1")
    if alpha <= 0:
        raise ValueError(f"lora alpha={alpha}: must be > 0")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"lora dropout={dropout}: must be in [0, 1)")
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=target_modules if target_modules is not None else "all-linear",
        task_type=TaskType.CAUSAL_LM,
        bias="none",
    )
    return get_peft_model(model, config)


def merged_copy(peft_model) -> nn.Module:
    """A plain transformers model equal to ``peft_model`` with its adapters merged (W + alpha/r B A).

    Works on a deep copy, so the trainer's wrapped model keeps training unmerged.
    """
    return copy.deepcopy(peft_model).merge_and_unload()
