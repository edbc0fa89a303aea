"""One SFT optimiser step on given token sequences: the update the SFT loop and self-training share.

    L = -(1/N) sum_{i,t} m_{i,t} log pi(y_{i,t} | x_i, y_{i,<t}),  N = completion tokens of the step

(core/sft.py ``sft_token_loss``). The examples are sorted by length and cut into ``grad_accum``
micro-batches; N is computed once for the whole step, so the summed micro-batch gradients equal
the full-batch gradient. Under data parallelism (train/distributed.py) the examples are this
rank's shard, N counts the tokens of every rank's shard (all-reduced), and the gradients are
summed over ranks before clipping: again exactly the full-batch gradient.
"""

from __future__ import annotations

import torch

from psirl.core.sft import sft_token_loss
from psirl.train.base import clip_and_step, split_microbatches
from psirl.train.distributed import all_reduce_gradients, all_reduce_sum
from psirl.train.setup import pad_prompt_completion


def sft_update(
    model,
    params: list[torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    scheduler,
    prompts: list[list[int]],
    completions: list[list[int]],
    *,
    pad_id: int,
    grad_accum: int = 1,
    grad_clip: float | None = None,
    loss_masks: list[list[float]] | None = None,
) -> dict[str, float]:
    """Backward the SFT loss of (prompt, completion) token lists and take one optimiser step.

    prompts[i], completions[i]: token ids (completion non-empty, prompt non-empty).
    loss_masks[i]: 0/1 per completion token (None: all 1), e.g. 0 on a demonstration's
    environment tokens, which are then attended but neither in the loss nor in N. With no
    examples the optimiser and scheduler still step (nothing changes; the LR schedule stays
    aligned with the step count). Returns {"loss", "grad_norm", "tokens"} (floats), of the
    global step when data-parallel (loss and tokens summed over ranks).
    """
    from psirl.models.logprobs import token_logprobs

    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]) + len(completions[i]))
    # The step's normaliser, computed once (summed over data-parallel ranks).
    if loss_masks is None:
        loss_masks = [[1.0] * len(c) for c in completions]
    for c, m in zip(completions, loss_masks, strict=True):
        if len(c) != len(m):
            raise ValueError(f"loss_masks: {len(m)} entries for a completion of {len(c)} tokens")
    n_tokens = all_reduce_sum(float(sum(sum(m) for m in loss_masks)))
    total = 0.0
    if order:
        for mb in split_microbatches(len(order), grad_accum):
            sel = order[mb]
            ids, attn, cmask = pad_prompt_completion(
                [prompts[i] for i in sel], [completions[i] for i in sel], pad_id
            )
            for row, i in enumerate(sel):  # environment tokens out of the loss
                cmask[row, : len(loss_masks[i])] = torch.tensor(loss_masks[i])
            ids, attn, cmask = ids.to(model.device), attn.to(model.device), cmask.to(model.device)
            logp, _ = token_logprobs(model, ids, attn, cmask.shape[1])
            loss = sft_token_loss(logp, cmask, n_tokens)
            loss.backward()
            total += float(loss.detach())
    all_reduce_gradients(params)
    grad_norm = clip_and_step(params, optimizer, scheduler, grad_clip)
    return {"loss": all_reduce_sum(total), "grad_norm": grad_norm, "tokens": float(n_tokens)}
