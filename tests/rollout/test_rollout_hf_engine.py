"""HFEngine: behaviour log-probs equal a separate forward pass, seeding, EOS / stop / truncation."""

import pytest
import torch

from psirl.models import token_logprobs
from psirl.rollout import Engine, HFEngine, RolloutBatch, SamplingParams

PROMPTS = ["1+2=", "12+345=", "7", "(3*4)-5="]  # 4, 7, 1 and 8 tokens: left padding differs per row


def forward_logprobs(model, batch: RolloutBatch, temperature: float) -> torch.Tensor:
    logp, _ = token_logprobs(
        model, batch.input_ids, batch.attention_mask, batch.completion_len, temperature=temperature
    )
    return logp.detach()


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1.0, max_new_tokens=12, n=3, seed=0),
        SamplingParams(temperature=0.7, max_new_tokens=12, n=2, seed=1),
        SamplingParams(temperature=1.3, top_p=0.8, top_k=20, max_new_tokens=12, n=2, seed=2),
    ],
)
def test_behaviour_logprobs_match_separate_forward_pass(policy, params):
    model, tok = policy
    batch = HFEngine(model, tok).generate(PROMPTS, params)
    assert batch.prompt_len == 8 and len(batch) == len(PROMPTS) * params.n
    expected = forward_logprobs(model, batch, params.temperature) * batch.completion_mask
    torch.testing.assert_close(batch.behaviour_logprobs, expected, atol=1e-5, rtol=0)


def test_greedy_logprobs_use_untempered_softmax(policy):
    model, tok = policy
    batch = HFEngine(model, tok).generate(PROMPTS, SamplingParams(temperature=0, max_new_tokens=8))
    expected = forward_logprobs(model, batch, 1.0) * batch.completion_mask
    torch.testing.assert_close(batch.behaviour_logprobs, expected, atol=1e-5, rtol=0)


def test_greedy_matches_transformers_generate(policy):
    """Batched, left-padded greedy decoding equals transformers' own generate on each prompt alone."""
    model, tok = policy
    batch = HFEngine(model, tok).generate(PROMPTS, SamplingParams(temperature=0, max_new_tokens=10))
    for i, prompt in enumerate(PROMPTS):
        ids = torch.tensor([tok(prompt)["input_ids"]])
        ref = model.generate(
            ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=10
        )
        ref_completion = ref[0, ids.shape[1] :].tolist()
        length = int(batch.completion_mask[i].sum())
        assert batch.completion_ids[i, :length].tolist() == ref_completion[:length]
        if length < 10:  # stopped at EOS exactly where generate did
            assert ref_completion[length - 1] == tok.eos_token_id


def test_top_k_one_and_tiny_top_p_are_greedy(policy):
    model, tok = policy
    engine = HFEngine(model, tok)
    greedy = engine.generate(PROMPTS, SamplingParams(temperature=0, max_new_tokens=8))
    top_k = engine.generate(
        PROMPTS, SamplingParams(temperature=1.0, top_k=1, max_new_tokens=8, seed=5)
    )
    top_p = engine.generate(
        PROMPTS, SamplingParams(temperature=1.0, top_p=1e-6, max_new_tokens=8, seed=6)
    )
    assert torch.equal(top_k.completion_ids, greedy.completion_ids)
    assert torch.equal(top_p.completion_ids, greedy.completion_ids)


def test_same_seed_same_output_different_seed_differs(policy):
    model, tok = policy
    engine = HFEngine(model, tok)
    params = SamplingParams(temperature=1.0, max_new_tokens=10, n=2, seed=123)
    first, second = engine.generate(PROMPTS, params), engine.generate(PROMPTS, params)
    assert (
        torch.equal(first.input_ids, second.input_ids) and first.completions == second.completions
    )
    torch.testing.assert_close(first.behaviour_logprobs, second.behaviour_logprobs, atol=0, rtol=0)
    other = engine.generate(
        PROMPTS, SamplingParams(temperature=1.0, max_new_tokens=10, n=2, seed=124)
    )
    assert not torch.equal(first.completion_ids, other.completion_ids)


def test_groups_layout_and_prompt_columns(policy):
    model, tok = policy
    batch = HFEngine(model, tok).generate(PROMPTS, SamplingParams(max_new_tokens=5, n=3, seed=0))
    assert batch.group_ids.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert torch.equal(batch.prompt_index, batch.group_ids)
    assert batch.prompts == [p for p in PROMPTS for _ in range(3)]
    # row 6 is prompt "7": 7 pads then one token
    assert batch.input_ids[6, :8].tolist() == [0] * 7 + tok("7")["input_ids"]
    assert batch.attention_mask[6, :8].tolist() == [0] * 7 + [1]
    assert torch.equal(batch.input_ids[:, batch.prompt_len :], batch.completion_ids)
    assert torch.equal(batch.attention_mask[:, batch.prompt_len :], batch.completion_mask.long())


def check_row_invariants(batch: RolloutBatch, tok, stop: tuple[str, ...], max_new: int):
    """Per row: mask is 1 up to and including the ending token, 0 after; the row ends at its
    first EOS or at the token completing a stop string, else it is truncated at max_new."""
    eos = tok.eos_token_id
    kinds = set()
    for i in range(len(batch)):
        mask = batch.completion_mask[i].tolist()
        length = int(sum(mask))
        assert mask == [1.0] * length + [0.0] * (batch.completion_len - length)
        ids = batch.completion_ids[i, :length].tolist()
        assert batch.completion_ids[i, length:].eq(tok.pad_token_id).all()
        logp = batch.behaviour_logprobs[i]
        assert (logp[length:] == 0).all() and (logp[:length] < 0).all()
        text = tok.decode(ids, skip_special_tokens=True)
        before = tok.decode(ids[:-1], skip_special_tokens=True)
        # nothing ended the row earlier
        assert eos not in ids[:-1] and not any(s in before for s in stop)
        if ids[-1] == eos:
            kinds.add("eos")
            assert not batch.truncated[i]
        elif any(s in text for s in stop):
            kinds.add("stop")
            assert not batch.truncated[i]
            cut = min(text.find(s) for s in stop if s in text)
            assert batch.completions[i] == text[:cut]
        else:
            kinds.add("truncated")
            assert batch.truncated[i] and length == max_new
        if ids[-1] == eos or not any(s in text for s in stop):
            assert batch.completions[i] == text
    return kinds


def test_eos_stop_strings_truncation_and_masks(ab_policy):
    model, tok = ab_policy
    params = SamplingParams(temperature=1.0, max_new_tokens=6, n=8, seed=1, stop=["ba"])
    batch = HFEngine(model, tok).generate(["ab", "b", "aab"], params)
    kinds = check_row_invariants(batch, tok, params.stop, params.max_new_tokens)
    assert kinds == {"eos", "stop", "truncated"}  # the seed exercises all three endings
    assert batch.completion_len == int(batch.completion_mask.sum(1).max())


def test_long_completions_never_miss_a_stop_string(ab_policy):
    """Beyond the decoded-tail window (2 * len + 8 tokens) and with special tokens in between,
    each stop string is still caught on the token that completes it."""
    model, tok = ab_policy
    params = SamplingParams(temperature=1.0, max_new_tokens=40, n=16, seed=1, stop=["bab", "aaa"])
    batch = HFEngine(model, tok).generate(["ab", "b"], params)
    kinds = check_row_invariants(batch, tok, params.stop, params.max_new_tokens)
    assert "stop" in kinds
    assert int(batch.completion_mask.sum(1).max()) > 14  # some rows went past the tail window


def test_without_stop_strings_only_eos_ends_rows(ab_policy):
    model, tok = ab_policy
    params = SamplingParams(temperature=1.0, max_new_tokens=5, n=6, seed=1)
    batch = HFEngine(model, tok).generate(["ab", "ba"], params)
    assert check_row_invariants(batch, tok, (), params.max_new_tokens) == {"eos", "truncated"}


def test_compaction_does_not_change_greedy_output(ab_policy):
    model, tok = ab_policy
    params = SamplingParams(temperature=0, max_new_tokens=6, stop=["ba"])
    prompts = ["ab", "b", "aab", "bbb", "a"]
    on = HFEngine(model, tok).generate(prompts, params)
    off = HFEngine(model, tok, compact_finished=False).generate(prompts, params)
    assert torch.equal(on.completion_ids, off.completion_ids)
    torch.testing.assert_close(on.behaviour_logprobs, off.behaviour_logprobs, atol=1e-6, rtol=0)


def test_batch_tensors_feed_autograd_and_model_mode_is_restored(policy):
    model, tok = policy
    seen = []  # the mode a layer is in while it runs during sampling
    hook = model.model.layers[0].register_forward_pre_hook(lambda m, a: seen.append(m.training))
    model.train()
    try:
        batch = HFEngine(model, tok).generate(PROMPTS[:2], SamplingParams(max_new_tokens=4, seed=0))
        assert model.training and all(m.training for m in model.modules())
        assert seen and not any(seen)  # sampled in eval mode (no dropout)
        # Top module in eval mode but one layer left in training mode: still sampled in eval.
        model.eval()
        model.model.layers[0].train()
        seen.clear()
        HFEngine(model, tok).generate(PROMPTS[:2], SamplingParams(max_new_tokens=4, seed=0))
        assert seen and not any(seen)
        model.train()
        logp, _ = token_logprobs(model, batch.input_ids, batch.attention_mask, batch.completion_len)
        (logp * batch.completion_mask).sum().backward()
        assert model.lm_head.weight.grad is not None
    finally:
        hook.remove()
        model.zero_grad(set_to_none=True)
        model.eval()


def test_sync_records_version_without_copying(policy):
    model, tok = policy
    engine = HFEngine(model, tok)
    assert isinstance(engine, Engine)
    engine.sync(model)
    engine.sync(model)
    assert engine.version == 2 and engine.model is model


def test_empty_prompt_is_named(policy):
    model, tok = policy
    with pytest.raises(ValueError, match=r"prompts\[1\]"):
        HFEngine(model, tok).generate(["1", ""], SamplingParams(max_new_tokens=2))
