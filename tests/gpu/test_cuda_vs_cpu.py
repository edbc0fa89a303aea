"""CUDA and CPU agree: per-token log-probs and one clipped AdamW step of the tiny model.

Tolerances (float32, TF32 off): log-probs 1e-4 absolute (values of order 1-10 summed over a
hidden size of 32 in a different order); weights after one step 1e-6 absolute, i.e. 0.1% of the
step. Adam's first update is lr * g / (|g| + eps): with eps = 1e-3 (about the gradients' size) it
is smooth in g (|d update / d g| <= lr / eps = 1), so float32-level gradient differences stay
float32-level; with eps = 1e-8 a gradient of 1e-9 whose sign differs between devices would move
by 2 lr * 0.1. bf16 on CUDA against float32 on the CPU: log-probs within 0.15.
"""

from __future__ import annotations

import torch

from psirl.models import load_policy, token_logprobs
from psirl.train.base import clip_and_step
from psirl.train.precision import adamw


def _batch(tokenizer):
    from psirl.train.setup import pad_prompt_completion

    enc = lambda texts: [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]  # noqa: E731
    return pad_prompt_completion(enc(["1+2=", "7+8=", "3+3="]), enc(["3", "15", "6x"]),
                                 tokenizer.pad_token_id)


def _logp(model, ids, attn, cmask):
    dev = next(model.parameters()).device
    logp, _ = token_logprobs(model, ids.to(dev), attn.to(dev), cmask.shape[1])
    return logp


def test_logprobs_agree(tiny_path):
    cpu, tok = load_policy(tiny_path, device="cpu")
    gpu, _ = load_policy(tiny_path, device="cuda")
    ids, attn, cmask = _batch(tok)
    with torch.no_grad():
        a, b = _logp(cpu, ids, attn, cmask) * cmask, _logp(gpu, ids, attn, cmask).cpu() * cmask
    torch.testing.assert_close(b, a, rtol=0, atol=1e-4)
    bf16, _ = load_policy(tiny_path, device="cuda", dtype="bfloat16")
    with torch.no_grad():
        c = _logp(bf16, ids, attn, cmask)
    assert c.dtype == torch.float32  # log-probs are float32 whatever the weights
    torch.testing.assert_close(c.cpu() * cmask, a, rtol=0, atol=0.15)


def test_one_optimiser_step_agrees(tiny_path):
    ids, attn, cmask = None, None, None
    after = {}
    for device in ("cpu", "cuda"):
        model, tok = load_policy(tiny_path, device=device)
        model.train()
        if ids is None:
            ids, attn, cmask = _batch(tok)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = adamw(params, lr=1e-3, eps=1e-3, fused=True)
        logp = _logp(model, ids, attn, cmask)
        loss = -(logp * cmask.to(logp.device)).sum() / cmask.sum()
        loss.backward()
        norm = clip_and_step(params, opt, None, 0.5)  # clipped: the norm is far above 0.5
        assert norm > 0.5
        after[device] = [p.detach().cpu() for p in params]
    for a, b in zip(after["cpu"], after["cuda"], strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6)
