"""The CUDA generation path: static KV cache + torch.compile (CUDA graphs) of the decode step.

Same seed, same samples (the compiled path run twice); the behaviour log-probs equal a separate
forward pass over the sampled batch (1e-4 in float32: the compiled kernels sum in another order
than the eager forward); tokens agree with the eager static loop except where two tokens' logits
tie to float rounding (at most 2% of positions here).
"""

from __future__ import annotations

import torch

from psirl.models import load_policy, token_logprobs
from psirl.rollout import HFEngine, SamplingParams

PROMPTS = ["1+2=", "12+34=", "7+", "99+1="]


def test_compiled_decode_is_deterministic_and_exact(tiny_path):
    model, tok = load_policy(tiny_path, device="cuda")
    engine = HFEngine(model, tok)  # decode="auto": compiled on CUDA
    params = SamplingParams(temperature=1.0, max_new_tokens=16, n=4, seed=3)
    first = engine.generate(PROMPTS, params)
    assert engine.decode_used == "compiled"
    second = engine.generate(PROMPTS, params)
    assert torch.equal(first.completion_ids, second.completion_ids)
    assert torch.equal(first.behaviour_logprobs, second.behaviour_logprobs)
    logp, _ = token_logprobs(model, first.input_ids, first.attention_mask, first.completion_len)
    torch.testing.assert_close(first.behaviour_logprobs, logp.detach() * first.completion_mask,
                               rtol=0, atol=1e-4)
    eager = HFEngine(model, tok, decode="static").generate(PROMPTS, params)
    same = (eager.completion_ids == first.completion_ids).float().mean().item()
    assert same >= 0.98, same


def test_static_equals_dynamic_on_cuda(tiny_path):
    model, tok = load_policy(tiny_path, device="cuda")
    params = SamplingParams(temperature=0.8, max_new_tokens=12, n=3, seed=5)
    dynamic = HFEngine(model, tok, decode="dynamic", compact_finished=False).generate(PROMPTS, params)
    static = HFEngine(model, tok, decode="static").generate(PROMPTS, params)
    assert torch.equal(static.completion_ids, dynamic.completion_ids)
    torch.testing.assert_close(static.behaviour_logprobs, dynamic.behaviour_logprobs,
                               rtol=0, atol=1e-4)


def test_bf16_compiled_decode_runs(tiny_path):
    model, tok = load_policy(tiny_path, device="cuda", dtype="bfloat16")
    engine = HFEngine(model, tok)
    batch = engine.generate(PROMPTS, SamplingParams(max_new_tokens=8, n=2, seed=0))
    assert engine.decode_used == "compiled"
    assert batch.behaviour_logprobs.dtype == torch.float32
    assert torch.isfinite(batch.behaviour_logprobs).all()
