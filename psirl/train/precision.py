"""The bfloat16 recipe: bf16 weights in the model, float32 master weights and AdamW state.

A run with ``dtype: bfloat16`` holds the model (policy, reference, critic backbone, engine) in
bf16, so every forward, backward and generated token runs at bf16 matmul speed and memory. The
optimiser keeps a float32 copy of each trainable parameter ("master weights") with float32
moments: each step casts the bf16 gradients up, runs the (fused) AdamW update on the float32
masters and writes them back rounded to bf16. Without masters an update below half a bf16 ulp
is lost (at |w| = 1 the ulp is 2^-7 ~ 0.0078, so an lr of 1e-4 never moves the weight); with
them small updates accumulate exactly as in float32 training. Memory per trainable parameter:
2 (bf16 weight) + 2 (bf16 grad) + 12 (float32 master, exp_avg, exp_avg_sq) bytes, the same 16
as float32 AdamW, plus a transient float32 gradient during the step.

Log-probabilities, KL, advantages, values and the gradient norm are float32 whatever the model
dtype (models/logprobs.py upcasts each logits chunk before the log-softmax; the value head is
float32; train/base.py clip_and_step accumulates the norm in float32).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

LOW_PRECISION = (torch.bfloat16, torch.float16)


class MasterWeightAdamW(torch.optim.AdamW):
    """AdamW over float32 master copies of low-precision parameters.

    ``step`` reads the model parameters' gradients (any dtype), updates the float32 masters
    (honouring ``grad_scale`` set by ``train.base.clip_and_step``) and copies them back into the
    model parameters. ``state_dict`` carries the masters, so a resumed run continues from the
    exact float32 weights, not from their bf16 rounding.
    """

    def __init__(self, params: Iterable[torch.nn.Parameter], **adamw_kwargs):
        self.model_params = [p for p in params if p.requires_grad]
        masters = [torch.nn.Parameter(p.detach().to(torch.float32).clone())
                   for p in self.model_params]
        super().__init__(masters, **adamw_kwargs)
        self.master_params = masters
        # The masters are re-read from the model before the first step: weights changed in place
        # after construction (e.g. run_loop's data-parallel broadcast from rank 0) are kept.
        self._masters_current = False

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("MasterWeightAdamW.step: closures are not supported")
        if not self._masters_current:
            torch._foreach_copy_(self.master_params, [p.detach() for p in self.model_params])
            self._masters_current = True
        for p, m in zip(self.model_params, self.master_params, strict=True):
            if p.grad is None:
                m.grad = None
            elif m.grad is None:
                m.grad = p.grad.to(torch.float32)
            else:
                m.grad.copy_(p.grad)
        super().step()
        torch._foreach_copy_(self.model_params, self.master_params)  # round to the model dtype
        return None

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none=set_to_none)
        for p in self.model_params:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    def state_dict(self):
        state = super().state_dict()
        state["master_weights"] = list(self.master_params)
        return state

    def load_state_dict(self, state_dict) -> None:
        state_dict = dict(state_dict)
        masters = state_dict.pop("master_weights", None)
        super().load_state_dict(state_dict)
        self._masters_current = True
        with torch.no_grad():
            if masters is None:  # a float32 run's optimiser state: start from the model's weights
                for p, m in zip(self.model_params, self.master_params, strict=True):
                    m.copy_(p)
                return
            if len(masters) != len(self.master_params):
                raise ValueError(f"optimiser state: {len(masters)} master weights for "
                                 f"{len(self.master_params)} trainable parameters")
            for saved, m, p in zip(masters, self.master_params, self.model_params, strict=True):
                if saved.shape != m.shape:
                    raise ValueError(f"optimiser state: master weight of shape {tuple(saved.shape)}"
                                     f" for a parameter of shape {tuple(m.shape)}")
                m.copy_(saved)
                p.copy_(m)


def adamw(params: Iterable[torch.nn.Parameter], **adamw_kwargs) -> torch.optim.AdamW:
    """AdamW for `params`: plain when every trainable parameter is float32, else with float32
    master weights (`MasterWeightAdamW`). This is where `train.base.build_optimizer` picks the
    bf16 recipe."""
    params = [p for p in params if p.requires_grad]
    if any(p.dtype in LOW_PRECISION for p in params):
        return MasterWeightAdamW(params, **adamw_kwargs)
    return torch.optim.AdamW(params, **adamw_kwargs)
