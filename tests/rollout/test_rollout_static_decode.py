"""HFEngine's static-cache decode loop (the CUDA fast path) against the dynamic loop, on the CPU.

`decode="static"` is the loop CUDA runs under torch.compile / CUDA graphs, minus the compilation:
with the same seed it must give the tokens, lengths, masks and texts of the dynamic loop without
row compaction (both draw one uniform per row per step) and the same behaviour log-probs up to
float summation order.
"""

import warnings

import pytest
import torch

from psirl.models import token_logprobs
from psirl.rollout import HFEngine, SamplingParams

PROMPTS = ["1+2=", "12+345=", "7", "(3*4)-5="]
CASES = [
    SamplingParams(temperature=1.0, max_new_tokens=12, n=3, seed=0),
    SamplingParams(temperature=0, max_new_tokens=9),
    SamplingParams(temperature=0.7, top_p=0.9, top_k=5, max_new_tokens=12, n=2, seed=5),
]


def assert_same_batch(a, b, logp_atol=2e-5):
    for name in ("input_ids", "attention_mask", "completion_ids", "completion_mask", "group_ids",
                 "truncated"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert a.completions == b.completions and a.prompt_len == b.prompt_len
    torch.testing.assert_close(a.behaviour_logprobs, b.behaviour_logprobs, rtol=0, atol=logp_atol)


@pytest.mark.parametrize("params", CASES)
def test_static_loop_equals_dynamic_loop_without_compaction(policy, params):
    model, tok = policy
    dynamic = HFEngine(model, tok, compact_finished=False, decode="dynamic").generate(PROMPTS, params)
    engine = HFEngine(model, tok, decode="static", static_check_every=3)
    static = engine.generate(PROMPTS, params)
    assert engine.decode_used == "static"
    assert_same_batch(static, dynamic)


def test_rows_ending_at_eos_and_early_exit(ab_policy):
    """Over "ab" EOS comes within a few tokens: lengths, the trimmed width and the early exit
    (done checked every 2 tokens) match the dynamic loop."""
    model, tok = ab_policy
    params = SamplingParams(temperature=1.0, max_new_tokens=40, n=4, seed=3)
    dynamic = HFEngine(model, tok, compact_finished=False, decode="dynamic").generate(
        ["ab", "b", "aab"], params)
    static = HFEngine(model, tok, decode="static", static_check_every=2).generate(
        ["ab", "b", "aab"], params)
    assert (~static.truncated).any()  # some rows really ended at EOS
    assert_same_batch(static, dynamic)


def test_behaviour_logprobs_match_a_separate_forward_pass(policy):
    model, tok = policy
    params = SamplingParams(temperature=0.8, max_new_tokens=10, n=2, seed=7)
    batch = HFEngine(model, tok, decode="static").generate(PROMPTS, params)
    logp, _ = token_logprobs(model, batch.input_ids, batch.attention_mask, batch.completion_len,
                             temperature=0.8)
    torch.testing.assert_close(batch.behaviour_logprobs, logp.detach() * batch.completion_mask,
                               rtol=0, atol=2e-5)


def test_reused_cache_same_seed_same_samples(policy):
    """The static cache of a shape is kept between calls (fixed addresses for CUDA graphs), also
    across a call of another shape; reuse does not change what a seed samples."""
    model, tok = policy
    engine = HFEngine(model, tok, decode="static")
    params = SamplingParams(max_new_tokens=8, n=2, seed=11)
    first = engine.generate(PROMPTS, params)
    cache = list(engine._static.values())[-1]
    engine.generate(PROMPTS[:2], SamplingParams(max_new_tokens=5, n=3, seed=1))  # another shape
    assert len(engine._static) == 2
    engine.generate(PROMPTS, SamplingParams(max_new_tokens=8, n=2, seed=12))
    assert list(engine._static.values())[-1] is cache and len(engine._static) == 2
    again = engine.generate(PROMPTS, params)
    assert_same_batch(first, again, logp_atol=0)


def test_cpu_default_is_the_dynamic_loop_and_stop_strings_stay_dynamic(policy):
    model, tok = policy
    engine = HFEngine(model, tok)
    engine.generate(PROMPTS[:1], SamplingParams(max_new_tokens=3, seed=0))
    assert engine.decode_used == "dynamic"
    static = HFEngine(model, tok, decode="static")
    static.generate(PROMPTS[:1], SamplingParams(max_new_tokens=3, seed=0, stop=("=",)))
    assert static.decode_used == "dynamic"


def test_a_failing_compile_falls_back_to_the_static_loop(policy, monkeypatch):
    model, tok = policy

    def broken_compile(*args, **kwargs):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(torch, "compile", broken_compile)
    params = SamplingParams(max_new_tokens=6, n=2, seed=4)
    engine = HFEngine(model, tok, decode="compiled")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batch = engine.generate(PROMPTS, params)
    assert any("compiled decoding failed" in str(w.message) for w in caught)
    assert engine.decode_used == "static" and engine.decode == "static"
    assert_same_batch(batch, HFEngine(model, tok, decode="static").generate(PROMPTS, params),
                      logp_atol=0)


def test_bad_settings_are_named(policy):
    model, tok = policy
    with pytest.raises(ValueError, match="decode"):
        HFEngine(model, tok, decode="graphs")
    with pytest.raises(ValueError, match="static_check_every"):
        HFEngine(model, tok, static_check_every=0)
