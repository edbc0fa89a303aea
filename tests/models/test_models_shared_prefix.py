"""Prompt sharing in completion_hidden_states: each distinct prompt runs once, and the states,
log-probs and gradients equal the plain pass and the naive full-logits computation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from psirl.models import load_policy, token_logprobs
from psirl.models.backbone import (
    completion_hidden_states,
    position_ids_from_mask,
    split_backbone_and_head,
)

PROMPTS, GROUP, PROMPT_LEN, COMPLETION_LEN = 3, 4, 6, 5


def grouped_batch(completion_len: int = COMPLETION_LEN):
    """3 prompts of 4, 6 and 5 tokens (left-padded), each repeated GROUP times with its own
    completion of 1 .. completion_len tokens (right-padded), rows of one group adjacent."""
    gen = torch.Generator().manual_seed(0)
    prompt_lens = [4, 6, 5]
    rows_ids, rows_mask = [], []
    for i in range(PROMPTS):
        prompt = torch.randint(4, 100, (PROMPT_LEN,), generator=gen)
        pmask = torch.zeros(PROMPT_LEN, dtype=torch.long)
        pmask[PROMPT_LEN - prompt_lens[i]:] = 1
        for j in range(GROUP):
            completion = torch.randint(4, 100, (completion_len,), generator=gen)
            cmask = torch.zeros(completion_len, dtype=torch.long)
            cmask[: 1 + (i + j) % completion_len] = 1
            rows_ids.append(torch.cat([prompt * pmask, completion * cmask]))
            rows_mask.append(torch.cat([pmask, cmask]))
    return torch.stack(rows_ids), torch.stack(rows_mask)


def naive_logprobs(model, ids, mask, n_completion):
    logits = model(input_ids=ids, attention_mask=mask,
                   position_ids=position_ids_from_mask(mask)).logits
    logp_all = F.log_softmax(logits.float(), -1)[:, -n_completion - 1 : -1]
    return logp_all.gather(-1, ids[:, -n_completion:, None]).squeeze(-1)


def param_grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_grads_close(ours: dict, reference: dict, rel: float = 1e-5) -> None:
    """Per parameter, the largest difference is within ``rel`` of the largest reference entry
    (float32 sums in another order differ by ~1e-7 relative; a wrong gradient by O(1))."""
    assert ours.keys() == reference.keys()
    for name, ref in reference.items():
        err = float((ours[name] - ref).abs().max())
        assert err <= rel * float(ref.abs().max()) + 1e-8, (name, err, float(ref.abs().max()))


class CallCounter:
    """Records the [rows, tokens] shape of every decoder call."""

    def __init__(self, decoder):
        self.shapes: list[tuple[int, ...]] = []
        self.handle = decoder.register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs):
        self.shapes.append(tuple(kwargs["input_ids"].shape))


@pytest.mark.parametrize("fixture", ["tiny_dir", "tiny_llama_dir"])
def test_shared_equals_plain_and_naive_values_and_gradients(fixture, request):
    model, _ = load_policy(request.getfixturevalue(fixture))
    ids, mask = grouped_batch()
    cmask = mask[:, -COMPLETION_LEN:].float()
    results = {}
    for share in (True, False):
        model.zero_grad()
        decoder, _ = split_backbone_and_head(model)
        counter = CallCounter(decoder)
        hidden = completion_hidden_states(decoder, ids, mask, COMPLETION_LEN, share_prefix=share)
        counter.handle.remove()
        weights = torch.linspace(-1, 1, hidden.numel()).view_as(hidden)
        ((hidden * weights) * cmask.unsqueeze(-1)).sum().backward()
        results[share] = (hidden.detach() * cmask.unsqueeze(-1), param_grads(model), counter.shapes)
    shared, plain = results[True], results[False]
    # Shared: the 3 distinct prompts once, then the completions' first T-1 tokens of all 12 rows.
    assert shared[2] == [(PROMPTS, PROMPT_LEN), (PROMPTS * GROUP, COMPLETION_LEN - 1)]
    assert plain[2] == [(PROMPTS * GROUP, PROMPT_LEN + COMPLETION_LEN)]
    torch.testing.assert_close(shared[0], plain[0], atol=1e-5, rtol=1e-5)
    assert_grads_close(shared[1], plain[1])

    # The public entry point (auto: 12 rows, 3 prompts -> shared) against full logits.
    model.zero_grad()
    logp, _ = token_logprobs(model, ids, mask, COMPLETION_LEN)
    (logp * cmask).sum().backward()
    ours = param_grads(model)
    model.zero_grad()
    naive = naive_logprobs(model, ids, mask, COMPLETION_LEN)
    (naive * cmask).sum().backward()
    torch.testing.assert_close(logp * cmask, naive * cmask, atol=1e-5, rtol=1e-5)
    assert_grads_close(ours, param_grads(model))


def test_single_completion_token_needs_one_prompt_pass(tiny_dir):
    model, _ = load_policy(tiny_dir)
    ids, mask = grouped_batch(completion_len=1)
    decoder, _ = split_backbone_and_head(model)
    counter = CallCounter(decoder)
    with torch.no_grad():
        shared = completion_hidden_states(decoder, ids, mask, 1, share_prefix=True)
        plain = completion_hidden_states(decoder, ids, mask, 1, share_prefix=False)
    counter.handle.remove()
    assert counter.shapes == [(PROMPTS, PROMPT_LEN), (PROMPTS * GROUP, PROMPT_LEN + 1)]
    torch.testing.assert_close(shared, plain, atol=1e-5, rtol=1e-5)


def test_auto_shares_only_when_it_saves_work(tiny_dir):
    model, _ = load_policy(tiny_dir)
    decoder, _ = split_backbone_and_head(model)
    ids, mask = grouped_batch()
    counter = CallCounter(decoder)
    with torch.no_grad():
        completion_hidden_states(decoder, ids, mask, COMPLETION_LEN)  # 3 prompts x 4: shared
        distinct = ids[::GROUP], mask[::GROUP]
        completion_hidden_states(decoder, *distinct, COMPLETION_LEN)  # no repeated prompt: plain
        # Repeated prompts but long completions: sharing would skip < 25% of the tokens.
        long_ids = torch.cat([ids, torch.full((len(ids), 40), 5)], 1)
        long_mask = torch.cat([mask, torch.ones(len(ids), 40, dtype=torch.long)], 1)
        completion_hidden_states(decoder, long_ids, long_mask, COMPLETION_LEN + 40)
    counter.handle.remove()
    assert counter.shapes == [
        (PROMPTS, PROMPT_LEN), (PROMPTS * GROUP, COMPLETION_LEN - 1),
        (PROMPTS, PROMPT_LEN + COMPLETION_LEN),
        (PROMPTS * GROUP, PROMPT_LEN + COMPLETION_LEN + 40),
    ]


def test_rows_in_any_order_get_their_own_prompt(tiny_dir):
    model, _ = load_policy(tiny_dir)
    decoder, _ = split_backbone_and_head(model)
    ids, mask = grouped_batch()
    perm = torch.randperm(len(ids), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        shared = completion_hidden_states(decoder, ids[perm], mask[perm], COMPLETION_LEN,
                                          share_prefix=True)
        plain = completion_hidden_states(decoder, ids, mask, COMPLETION_LEN, share_prefix=False)
    cmask = mask[:, -COMPLETION_LEN:, None].float()
    torch.testing.assert_close(shared * cmask[perm], (plain * cmask)[perm], atol=1e-5, rtol=1e-5)
