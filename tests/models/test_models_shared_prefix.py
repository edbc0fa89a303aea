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


def hidden_and_grads(model, ids, mask, n_completion, layout, run=None):
    """Masked hidden states, parameter gradients of a fixed linear function of them, and the
    decoder calls' input shapes, for one layout (or for ``run(decoder)``, when given)."""
    model.zero_grad()
    decoder, _ = split_backbone_and_head(model)
    counter = CallCounter(decoder)
    if run is None:
        hidden = completion_hidden_states(decoder, ids, mask, n_completion, layout=layout)
    else:
        hidden = run(decoder)
    counter.handle.remove()
    cmask = mask[:, -n_completion:, None].float()
    weights = torch.linspace(-1, 1, hidden.numel()).view_as(hidden)
    (hidden * weights * cmask).sum().backward()
    return hidden.detach() * cmask, param_grads(model), counter.shapes


@pytest.mark.parametrize("fixture", ["tiny_dir", "tiny_llama_dir"])
@pytest.mark.parametrize("layout", ["packed", "kv_cache"])
def test_shared_layouts_equal_plain_values_and_gradients(fixture, layout, request):
    model, _ = load_policy(request.getfixturevalue(fixture))
    ids, mask = grouped_batch()
    shared = hidden_and_grads(model, ids, mask, COMPLETION_LEN, layout)
    plain = hidden_and_grads(model, ids, mask, COMPLETION_LEN, "plain")
    assert plain[2] == [(PROMPTS * GROUP, PROMPT_LEN + COMPLETION_LEN)]
    if layout == "kv_cache":  # the 3 prompts once, then the first T-1 completion tokens of all rows
        assert shared[2] == [(PROMPTS, PROMPT_LEN), (PROMPTS * GROUP, COMPLETION_LEN - 1)]
    else:  # one block per prompt (its real tokens + its rows' completions minus the last token)
        assert shared[2] == [packed_shape(model, ids, mask)]
    torch.testing.assert_close(shared[0], plain[0], atol=1e-5, rtol=1e-5)
    assert_grads_close(shared[1], plain[1])


@pytest.mark.parametrize("fixture", ["tiny_dir", "tiny_llama_dir"])
def test_default_layout_matches_full_logits(fixture, request):
    """The public entry point (auto layout: 12 rows, 3 prompts, short completions -> packed)
    against log_softmax over the full logits of ``model(...)``."""
    model, _ = load_policy(request.getfixturevalue(fixture))
    ids, mask = grouped_batch()
    cmask = mask[:, -COMPLETION_LEN:].float()
    model.zero_grad()
    logp, _ = token_logprobs(model, ids, mask, COMPLETION_LEN)
    (logp * cmask).sum().backward()
    ours = param_grads(model)
    model.zero_grad()
    naive = naive_logprobs(model, ids, mask, COMPLETION_LEN)
    (naive * cmask).sum().backward()
    torch.testing.assert_close(logp * cmask, naive * cmask, atol=1e-5, rtol=1e-5)
    assert_grads_close(ours, param_grads(model))


def test_eager_attention_packs_with_an_additive_mask(tiny_dir):
    model, _ = load_policy(tiny_dir)
    model.config._attn_implementation = "eager"
    model.model.config._attn_implementation = "eager"
    ids, mask = grouped_batch()
    packed = hidden_and_grads(model, ids, mask, COMPLETION_LEN, "packed")
    plain = hidden_and_grads(model, ids, mask, COMPLETION_LEN, "plain")
    assert packed[2] == [packed_shape(model, ids, mask)]
    torch.testing.assert_close(packed[0], plain[0], atol=1e-5, rtol=1e-5)
    assert_grads_close(packed[1], plain[1])


@pytest.mark.parametrize("layout", ["packed", "kv_cache"])
def test_single_completion_token(tiny_dir, layout):
    model, _ = load_policy(tiny_dir)
    ids, mask = grouped_batch(completion_len=1)
    shared = hidden_and_grads(model, ids, mask, 1, layout)
    plain = hidden_and_grads(model, ids, mask, 1, "plain")
    # The prompts alone: nothing else is fed (packed: their 4 + 6 + 5 real tokens in rows).
    expected = (PROMPTS, PROMPT_LEN) if layout == "kv_cache" else packed_shape(model, ids, mask)
    assert shared[2] == [expected]
    assert layout == "kv_cache" or expected[0] * expected[1] >= 4 + 6 + 5
    torch.testing.assert_close(shared[0], plain[0], atol=1e-5, rtol=1e-5)
    assert_grads_close(shared[1], plain[1])


def test_auto_layout_follows_the_cost(tiny_dir):
    model, _ = load_policy(tiny_dir)
    decoder, _ = split_backbone_and_head(model)
    ids, mask = grouped_batch()
    counter = CallCounter(decoder)
    with torch.no_grad():
        completion_hidden_states(decoder, ids, mask, COMPLETION_LEN)  # repeated, short: packed
        completion_hidden_states(decoder, ids[::GROUP], mask[::GROUP], COMPLETION_LEN)  # distinct
        # Repeated prompts but 60 more completion tokens: a packed row would hold 4 x 64 tokens
        # and sharing the 6 prompt tokens would skip < 10% of the tokens: plain.
        long_ids = torch.cat([ids, torch.full((len(ids), 60), 5)], 1)
        long_mask = torch.cat([mask, torch.ones(len(ids), 60, dtype=torch.long)], 1)
        long_mask[:, PROMPT_LEN:] = 1
        completion_hidden_states(decoder, long_ids, long_mask, COMPLETION_LEN + 60)
        # Without a custom-mask attention the cheaper shared layout left is the KV cache.
        model.model.config._attn_implementation = "flash_attention_2"
        assert choose(decoder, ids, mask) == "kv_cache"
        model.model.config._attn_implementation = "sdpa"
        assert choose(decoder, ids, mask) == "packed"
    counter.handle.remove()
    assert counter.shapes[0] == packed_shape(model, ids, mask)  # packed
    assert counter.shapes[1:] == [
        (PROMPTS, PROMPT_LEN + COMPLETION_LEN),
        (PROMPTS * GROUP, PROMPT_LEN + COMPLETION_LEN + 60),
    ]


def block_lengths(mask) -> list[int]:
    """Tokens of each prompt's packed block: real prompt tokens + its rows' fed completion tokens."""
    fed = mask[:, PROMPT_LEN:].sum(1) - 1
    return [int(mask[g * GROUP, :PROMPT_LEN].sum() + fed[g * GROUP:(g + 1) * GROUP].sum())
            for g in range(PROMPTS)]


def packed_shape(model, ids, mask, n_rows=None) -> tuple[int, int]:
    """[rows, width] of the packed decoder call, from ``pack_rows``."""
    from psirl.models.prefix_sharing import layer_costs, pack_rows, prompt_groups

    plan = pack_rows(prompt_groups(ids, mask, PROMPT_LEN), *layer_costs(model.config), n_rows)
    return (plan.rows, plan.width)


@pytest.mark.parametrize("n_rows", [1, 2, PROMPTS])
def test_any_packing_of_blocks_into_rows_equals_plain(tiny_dir, n_rows):
    """All blocks in one row, two rows (one holding two blocks), one block per row: the same
    states and gradients as the plain pass, and the decoder sees [n_rows, widest row]."""
    from psirl.models import prefix_sharing as sharing

    model, _ = load_policy(tiny_dir)
    ids, mask = grouped_batch()
    groups = sharing.prompt_groups(ids, mask, PROMPT_LEN)
    plan = sharing.pack_rows(groups, *sharing.layer_costs(model.config), n_rows)
    # Block lengths in the groups' prompt order (torch.unique sorts the prompts).
    by_batch_group = block_lengths(mask)
    lengths = [by_batch_group[int((groups.inverse == k).nonzero()[0]) // GROUP]
               for k in range(PROMPTS)]
    # LPT: longest block first, each into the shortest row so far.
    expected_width = {1: sum(lengths), 2: max(max(lengths), sum(lengths) - max(lengths)),
                      PROMPTS: max(lengths)}[n_rows]
    assert (plan.rows, plan.width) == (n_rows, expected_width)
    blocks = sorted(zip(plan.row.tolist(), plan.start.tolist(), lengths, strict=True))
    for (r1, s1, l1), (r2, s2, _) in zip(blocks, blocks[1:], strict=False):
        assert r1 != r2 or s1 + l1 <= s2  # blocks of one row do not overlap

    packed = hidden_and_grads(model, ids, mask, COMPLETION_LEN, "packed", run=lambda decoder:
                              sharing.packed_hidden_states(decoder, ids, COMPLETION_LEN, groups,
                                                           plan=plan))
    plain = hidden_and_grads(model, ids, mask, COMPLETION_LEN, "plain")
    assert packed[2] == [(n_rows, expected_width)]
    torch.testing.assert_close(packed[0], plain[0], atol=1e-5, rtol=1e-5)
    assert_grads_close(packed[1], plain[1])


def test_pack_rows_picks_the_cheapest_estimate():
    """Blocks of 30, 20, 20, 10 tokens. LPT into 3 rows: [30 | 20+10 | 20], width 30; into 2:
    [30+10 | 20+20], width 40. Cost R x W x (linear + W x attention): with cheap attention the
    2 x 40 packing wins (80 x 1040 < 90 x 1030), with dear attention the 3 x 30 one."""
    from psirl.models.prefix_sharing import PromptGroups, pack_rows

    groups = PromptGroups(keys=torch.zeros(4, 2, dtype=torch.long), inverse=torch.arange(4),
                          prompt_lens=torch.tensor([30, 20, 20, 10]),
                          fed_lens=torch.zeros(4, dtype=torch.long))
    cheap = pack_rows(groups, linear=1000.0, attention=1.0)
    assert (cheap.rows, cheap.width, cheap.cost) == (2, 40, 2 * 40 * (1000 + 40))
    row, start = cheap.row.tolist(), cheap.start.tolist()
    assert row[0] == row[3] != row[1] == row[2] and (start[0], start[3]) == (0, 30)
    assert sorted([start[1], start[2]]) == [0, 20]
    dear = pack_rows(groups, linear=1.0, attention=1000.0)
    assert (dear.rows, dear.width) == (3, 30)
    assert pack_rows(groups, 1.0, 1.0, n_rows=4).width == 30
    with pytest.raises(ValueError, match="n_rows=5"):
        pack_rows(groups, 1.0, 1.0, n_rows=5)


def test_shared_rows_stay_under_the_width_cap(monkeypatch):
    """Blocks of 30, 20, 20, 10 with the cap at 35 tokens: the estimate's favourite 2 x 40
    ([30+10 | 20+20]) is too wide, so 3 x 30 ([30 | 20+10 | 20]); rows as wide as the longest
    block are allowed even above the cap ([50 | 10+10+10], but not one row of 80)."""
    from psirl.models import prefix_sharing as sharing

    def groups(lengths):
        n = len(lengths)
        return sharing.PromptGroups(keys=torch.zeros(n, 2, dtype=torch.long),
                                    inverse=torch.arange(n), prompt_lens=torch.tensor(lengths),
                                    fed_lens=torch.zeros(n, dtype=torch.long))

    monkeypatch.setattr(sharing, "MAX_SHARED_ROW_TOKENS", 35)
    plan = sharing.pack_rows(groups([30, 20, 20, 10]), linear=1000.0, attention=1.0)
    assert (plan.rows, plan.width) == (3, 30)
    assert sharing.pack_rows(groups([30, 20, 20, 10]), 1000.0, 1.0, n_rows=2).width == 40
    long_block = sharing.pack_rows(groups([50, 10, 10, 10]), linear=1000.0, attention=1.0)
    assert (long_block.rows, long_block.width) == (2, 50)  # [50 | 10+10+10]


def choose(decoder, ids, mask):
    from psirl.models.prefix_sharing import choose_layout, prompt_groups

    groups = prompt_groups(ids, mask, PROMPT_LEN)
    layout, plan = choose_layout(decoder.config, groups, ids.shape[0], ids.shape[1], PROMPT_LEN,
                                 COMPLETION_LEN)
    assert (plan is None) == (decoder.config._attn_implementation not in ("sdpa", "eager"))
    return layout


def test_sliding_window_models_do_not_pack(tiny_dir):
    from psirl.models.prefix_sharing import supports_packing

    model, _ = load_policy(tiny_dir)
    config = model.model.config
    assert supports_packing(config)
    config.layer_types = ["sliding_attention"] + list(config.layer_types[1:])
    assert not supports_packing(config)


def test_unpadded_layouts_fall_back_to_plain(tiny_dir):
    """A prompt with a hole in its mask (not left-padded) is run plain even when asked to share."""
    model, _ = load_policy(tiny_dir)
    decoder, _ = split_backbone_and_head(model)
    ids, mask = grouped_batch()
    mask[:, PROMPT_LEN - 2] = 0  # a hole just before the prompt's last token
    counter = CallCounter(decoder)
    with torch.no_grad():
        completion_hidden_states(decoder, ids, mask, COMPLETION_LEN, layout="packed")
    counter.handle.remove()
    assert counter.shapes == [(PROMPTS * GROUP, PROMPT_LEN + COMPLETION_LEN)]


@pytest.mark.parametrize("layout", ["packed", "kv_cache"])
def test_rows_in_any_order_get_their_own_prompt(tiny_dir, layout):
    model, _ = load_policy(tiny_dir)
    decoder, _ = split_backbone_and_head(model)
    ids, mask = grouped_batch()
    perm = torch.randperm(len(ids), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        shared = completion_hidden_states(decoder, ids[perm], mask[perm], COMPLETION_LEN,
                                          layout=layout)
        plain = completion_hidden_states(decoder, ids, mask, COMPLETION_LEN, layout="plain")
    cmask = mask[:, -COMPLETION_LEN:, None].float()
    torch.testing.assert_close(shared * cmask[perm], (plain * cmask)[perm], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layout", ["packed", "kv_cache"])
def test_lora_adapter_gradients_match_plain(tiny_dir, layout):
    pytest.importorskip("peft")
    from psirl.models import apply_lora

    model, _ = load_policy(tiny_dir)
    wrapped = apply_lora(model, r=4, alpha=8)
    # Non-zero B so that gradients reach both A and B.
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02, generator=torch.Generator().manual_seed(0))
    ids, mask = grouped_batch()
    shared = hidden_and_grads(wrapped, ids, mask, COMPLETION_LEN, layout)
    plain = hidden_and_grads(wrapped, ids, mask, COMPLETION_LEN, "plain")
    assert shared[1] and all("lora_" in n for n in shared[1])
    torch.testing.assert_close(shared[0], plain[0], atol=1e-5, rtol=1e-5)
    assert_grads_close(shared[1], plain[1])


def test_value_model_reads_the_same_states_when_shared(tiny_dir):
    from psirl.models.value import ValueModel

    critic = ValueModel.from_policy(tiny_dir)
    ids, mask = grouped_batch()
    cmask = mask[:, -COMPLETION_LEN:].float()
    values = critic.values(ids, mask, COMPLETION_LEN)  # auto: packed for this batch
    hidden = completion_hidden_states(critic.backbone, ids, mask, COMPLETION_LEN, layout="plain")
    expected = critic.head(hidden.float()).squeeze(-1)
    torch.testing.assert_close(values * cmask, expected * cmask, atol=1e-5, rtol=1e-5)


def test_bfloat16_packed_stays_close_to_plain(tiny_dir):
    model, _ = load_policy(tiny_dir, dtype="bfloat16")
    decoder, _ = split_backbone_and_head(model)
    ids, mask = grouped_batch()
    cmask = mask[:, -COMPLETION_LEN:, None]
    with torch.no_grad():
        packed = completion_hidden_states(decoder, ids, mask, COMPLETION_LEN, layout="packed")
        plain = completion_hidden_states(decoder, ids, mask, COMPLETION_LEN, layout="plain")
    assert packed.dtype == torch.bfloat16
    diff = ((packed.float() - plain.float()) * cmask).abs().max()
    assert float(diff) <= 0.05 * float((plain.float() * cmask).abs().max())
