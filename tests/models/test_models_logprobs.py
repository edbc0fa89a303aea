"""token_logprobs equals the naive full-logits computation (values and gradients) and closed forms."""

import math

import pytest
import torch
import torch.nn.functional as F

from psirl.models import load_policy, token_logprobs
from psirl.models.backbone import position_ids_from_mask

PROMPT_LEN, COMPLETION_LEN = 5, 4


def left_right_padded_batch():
    """3 rows: prompts of 3, 4, 5 tokens (left-padded) and completions of 4, 4, 2 tokens."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 100, (3, PROMPT_LEN + COMPLETION_LEN), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    mask[1, :1] = 0
    mask[2, -2:] = 0
    return ids.masked_fill(mask == 0, 0), mask


def naive_logprobs(model, ids, mask, temperature):
    """log_softmax over the full [B, L, V] logits, gathered at the completion tokens."""
    logits = model(
        input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)
    ).logits
    logp_all = F.log_softmax(logits.float() / temperature, dim=-1)[:, PROMPT_LEN - 1 : -1]
    logp = logp_all.gather(-1, ids[:, PROMPT_LEN:, None]).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


def grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("fixture", ["tiny_dir", "tiny_llama_dir"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_matches_naive_values_and_gradients(fixture, temperature, request):
    model, _ = load_policy(request.getfixturevalue(fixture))
    ids, mask = left_right_padded_batch()
    completion_mask = mask[:, PROMPT_LEN:].float()

    model.zero_grad()
    logp, entropy = token_logprobs(
        model, ids, mask, COMPLETION_LEN, temperature=temperature, with_entropy=True, chunk_tokens=4
    )
    ((logp * completion_mask).sum() + 0.1 * (entropy * completion_mask).sum()).backward()
    ours = grads(model)

    model.zero_grad()
    ref_logp, ref_entropy = naive_logprobs(model, ids, mask, temperature)
    ((ref_logp * completion_mask).sum() + 0.1 * (ref_entropy * completion_mask).sum()).backward()
    reference = grads(model)

    assert logp.dtype == torch.float32 and logp.shape == (3, COMPLETION_LEN)
    torch.testing.assert_close(logp, ref_logp, atol=1e-6, rtol=0)
    torch.testing.assert_close(entropy, ref_entropy, atol=1e-6, rtol=0)
    assert ours.keys() == reference.keys() and len(ours) == len(list(model.parameters()))
    for name, g in reference.items():
        scale = g.abs().max().item()
        torch.testing.assert_close(ours[name], g, atol=1e-5 * scale + 1e-9, rtol=0, msg=name)
        assert torch.isfinite(ours[name]).all()


def test_uniform_head_gives_closed_form(tiny_dir):
    """With a zero output head every next-token distribution is uniform over V tokens:
    log p = -log V and entropy = log V, whatever the temperature."""
    model, _ = load_policy(tiny_dir)
    with torch.no_grad():
        model.lm_head.weight.zero_()
    ids, mask = left_right_padded_batch()
    vocab = model.config.vocab_size
    for temperature in (1.0, 0.3):
        logp, entropy = token_logprobs(
            model, ids, mask, COMPLETION_LEN, temperature=temperature, with_entropy=True
        )
        torch.testing.assert_close(logp, torch.full_like(logp, -math.log(vocab)), atol=1e-6, rtol=0)
        torch.testing.assert_close(
            entropy, torch.full_like(entropy, math.log(vocab)), atol=1e-5, rtol=0
        )


def test_chunk_size_does_not_change_result(tiny_dir):
    model, _ = load_policy(tiny_dir)
    ids, mask = left_right_padded_batch()
    with torch.no_grad():
        whole, _ = token_logprobs(model, ids, mask, COMPLETION_LEN, chunk_tokens=1024)
        for chunk in (2, 5, 7):
            part, _ = token_logprobs(model, ids, mask, COMPLETION_LEN, chunk_tokens=chunk)
            torch.testing.assert_close(part, whole, atol=1e-6, rtol=0)


def test_without_grad_and_in_half_precision(tiny_dir):
    model, _ = load_policy(tiny_dir, dtype="bfloat16")
    ids, mask = left_right_padded_batch()
    with torch.inference_mode():
        logp, entropy = token_logprobs(model, ids, mask, COMPLETION_LEN)
    assert logp.dtype == torch.float32 and entropy is None
    assert not logp.requires_grad
    assert (logp < 0).all()


def test_bad_arguments_are_named(tiny_dir):
    model, _ = load_policy(tiny_dir)
    ids, mask = left_right_padded_batch()
    with pytest.raises(ValueError, match="n_completion"):
        token_logprobs(model, ids, mask, ids.shape[1])
    with pytest.raises(ValueError, match="n_completion"):
        token_logprobs(model, ids, mask, 0)
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs(model, ids, mask, 2, temperature=0.0)
    with pytest.raises(ValueError, match="attention_mask"):
        token_logprobs(model, ids, mask[:, 1:], 2)
