"""The PPO critic: a decoder backbone with a scalar value head, V_phi(s_t).

PPO's advantage needs a learned state value (reference 000_7914f6881bc4a22c.txt, "A learned
critic": L_critic = E_t[(V_phi(s_t) - V_target_t)^2]; 004_0ae34f1505be1cc8.txt, GAE with
delta_t = r_t + gamma V(s_{t+1}) - V(s_t)). State s_t is the prompt plus the completion tokens
before t, so the value of s_t is read from the hidden state at position P - 1 + t, the same
position whose logits give pi(a_t | s_t).

Design choice: the critic has **its own copy of the backbone**, initialised from the policy
checkpoint, rather than a value head on the policy's shared trunk. Reasons:
  * stability: the value loss (regression to returns of arbitrary scale) and the policy loss
    (clipped ratio surrogate) push a shared trunk in different directions; with a shared trunk
    their relative weight ``vf_coef`` becomes a tuning knob that changes the policy's step
    (the "four models" PPO-RLHF pipeline of 003_e8bd019fa090e190.txt keeps them separate);
  * independent optimisers and schedules (critics usually want a larger learning rate and
    warm-up) and independent checkpoints;
  * the policy stays a plain ``*ForCausalLM``: LoRA, the rollout engine, weight sync and saving
    never have to know about an extra head.
The cost is a second backbone in memory, the price the references quote for PPO; the other
presets (GRPO, RLOO, REINFORCE++ ...) never build a ValueModel.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM, PreTrainedModel

from .backbone import completion_hidden_states, split_backbone_and_head
from .loading import CheckpointError, check_safetensors_folder, resolve_dtype
from .sharded import through_fsdp_root

VALUE_HEAD_FILE = "value_head.safetensors"


class ValueModel(nn.Module):
    """Scalar critic ``V(s) = w . h(s) + b`` over a decoder backbone's final hidden state.

    backbone: a transformers decoder (e.g. ``Qwen2Model``) mapping input_ids -> [B, L, H].
    head: ``nn.Linear(H, 1)`` kept in float32 (values are regressed to returns, small errors
    matter); zero-initialised when created, so a fresh critic predicts V = 0 everywhere and the
    first GAE advantages equal the discounted returns.
    """

    def __init__(self, backbone: PreTrainedModel, head: nn.Linear | None = None):
        super().__init__()
        self.backbone = backbone
        if head is None:
            head = nn.Linear(backbone.config.hidden_size, 1, dtype=torch.float32)
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)
        self.head = head.to(device=next(backbone.parameters()).device, dtype=torch.float32)

    @classmethod
    def from_policy(
        cls,
        policy: str | Path | nn.Module,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
    ) -> ValueModel:
        """A new critic whose backbone is a copy of the policy's decoder (weights copied, not shared).

        policy: a safetensors model folder, or an in-memory ``*ForCausalLM`` (deep-copied; a PEFT
        model is copied with its LoRA adapters merged, so the critic is a plain full backbone).
        device / dtype: default to the policy's (a folder loads as float32 on CPU). Every backbone
        parameter of the critic is trainable, whatever the policy's ``requires_grad`` flags.
        """
        if isinstance(policy, nn.Module):
            if hasattr(policy, "peft_config"):
                from .lora import merged_copy

                backbone, _ = split_backbone_and_head(merged_copy(policy))
            else:
                decoder, _ = split_backbone_and_head(policy)
                backbone = copy.deepcopy(decoder)
        else:
            folder = check_safetensors_folder(policy)
            causal_lm = AutoModelForCausalLM.from_pretrained(
                folder,
                dtype=resolve_dtype(dtype or "float32"),
                use_safetensors=True,
                local_files_only=True,
            )
            backbone, _ = split_backbone_and_head(causal_lm)
        backbone.requires_grad_(True)
        if dtype is not None:
            backbone = backbone.to(dtype=resolve_dtype(dtype))
        if device is not None:
            backbone = backbone.to(device)
        return cls(backbone)

    @through_fsdp_root
    def values(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, n_completion: int
    ) -> torch.Tensor:
        """Values [B, T] float32 of the states before each of the last T = n_completion tokens.

        input_ids / attention_mask: [B, L] laid out as in ``RolloutBatch`` (prompt left-padded to
        P, completion right-padded to T). ``values[b, t] = V(prompt_b + completion_b[:t])`` read
        from hidden position P - 1 + t. Padding positions hold finite garbage; mask them.
        """
        hidden = completion_hidden_states(self.backbone, input_ids, attention_mask, n_completion)
        return self.head(hidden.float()).squeeze(-1)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, n_completion: int
    ) -> torch.Tensor:
        """Same as ``values``."""
        return self.values(input_ids, attention_mask, n_completion)

    def save_pretrained(self, out_dir: str | Path) -> Path:
        """Write the backbone (config.json + model.safetensors, loadable with ``AutoModel``) and
        the head (``value_head.safetensors``: weight [1, H], bias [1], float32) to ``out_dir``."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.backbone.save_pretrained(out)
        head = {k: v.detach().to("cpu").contiguous() for k, v in self.head.state_dict().items()}
        save_file(
            head, str(out / VALUE_HEAD_FILE), metadata={"format": "pt", "psirl": "value_head"}
        )
        return out

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "float32",
    ) -> ValueModel:
        """Load a critic written by ``save_pretrained`` (safetensors only)."""
        folder = check_safetensors_folder(path)
        head_file = folder / VALUE_HEAD_FILE
        if not head_file.is_file():
            raise CheckpointError(f"{head_file}: missing; not a psirl value-model folder")
        backbone = AutoModel.from_pretrained(
            folder, dtype=resolve_dtype(dtype), use_safetensors=True, local_files_only=True
        )
        state = load_file(str(head_file))
        if set(state) != {"weight", "bias"} or state["weight"].shape != (
            1,
            backbone.config.hidden_size,
        ):
            raise CheckpointError(
                f"{head_file}: expected tensors weight [1, {backbone.config.hidden_size}] and "
                f"bias [1], got { {k: tuple(v.shape) for k, v in state.items()} }"
            )
        head = nn.Linear(backbone.config.hidden_size, 1, dtype=torch.float32)
        head.load_state_dict(state)
        return cls(backbone.to(device), head)
