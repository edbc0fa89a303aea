"""RolloutBatch shape checks, select, cat (re-padding), to; SamplingParams validation."""

import pytest
import torch

from psirl.rollout import RolloutBatch, SamplingParams


def make_batch(prompt_rows, completion_rows, groups, pad=0):
    """Build a batch from lists of token lists (prompts left-padded, completions right-padded)."""
    prompt_len = max(len(p) for p in prompt_rows)
    steps = max(len(c) for c in completion_rows)
    ids, mask, cids, cmask = [], [], [], []
    for p, c in zip(prompt_rows, completion_rows, strict=True):
        left = [pad] * (prompt_len - len(p))
        right = [pad] * (steps - len(c))
        ids.append(left + p + c + right)
        mask.append([0] * len(left) + [1] * (len(p) + len(c)) + [0] * len(right))
        cids.append(c + right)
        cmask.append([1.0] * len(c) + [0.0] * len(right))
    b = len(prompt_rows)
    return RolloutBatch(
        input_ids=torch.tensor(ids),
        attention_mask=torch.tensor(mask),
        completion_ids=torch.tensor(cids),
        completion_mask=torch.tensor(cmask),
        behaviour_logprobs=-torch.tensor(cmask) * 0.5,
        group_ids=torch.tensor(groups),
        prompt_index=torch.tensor(groups),
        truncated=torch.zeros(b, dtype=torch.bool),
        prompt_len=prompt_len,
        prompts=[f"p{i}" for i in range(b)],
        completions=[f"c{i}" for i in range(b)],
        pad_token_id=pad,
    )


def test_shape_or_dtype_mismatch_names_the_field():
    batch = make_batch([[5, 6]], [[7]], [0])
    with pytest.raises(ValueError, match="completion_mask"):
        RolloutBatch(**{**batch.__dict__, "completion_mask": batch.completion_mask.long()})
    with pytest.raises(ValueError, match="prompts"):
        RolloutBatch(**{**batch.__dict__, "prompts": []})


def test_select_by_index_and_mask():
    batch = make_batch([[5], [6, 7], [8]], [[9, 9], [10], [11, 12]], [0, 0, 1])
    picked = batch.select([2, 0])
    assert picked.prompts == ["p2", "p0"] and picked.completions == ["c2", "c0"]
    assert torch.equal(picked.input_ids, batch.input_ids[[2, 0]])
    assert picked.prompt_len == 2 and picked.completion_len == 2
    by_mask = batch.select(torch.tensor([False, True, True]))
    assert torch.equal(by_mask.group_ids, torch.tensor([0, 1]))
    assert by_mask.prompts == ["p1", "p2"]


def test_cat_repads_prompts_left_and_completions_right():
    a = make_batch([[5], [6]], [[7, 8, 9], [10]], [0, 1], pad=3)  # P=1, T=3
    b = make_batch([[11, 12]], [[13]], [0], pad=3)  # P=2, T=1
    both = RolloutBatch.cat([a, b])
    assert both.prompt_len == 2 and both.completion_len == 3
    assert both.input_ids.tolist() == [
        [3, 5, 7, 8, 9],
        [3, 6, 10, 3, 3],
        [11, 12, 13, 3, 3],
    ]
    assert both.attention_mask.tolist() == [[0, 1, 1, 1, 1], [0, 1, 1, 0, 0], [1, 1, 1, 0, 0]]
    assert both.completion_mask.tolist() == [[1, 1, 1], [1, 0, 0], [1, 0, 0]]
    assert both.behaviour_logprobs.tolist() == [[-0.5] * 3, [-0.5, 0, 0], [-0.5, 0, 0]]
    assert both.group_ids.tolist() == [0, 1, 2]  # b's group 0 becomes 2
    assert both.prompt_index.tolist() == [0, 1, 0]
    assert both.prompts == ["p0", "p1", "p0"]
    assert torch.equal(both.input_ids[:, both.prompt_len :], both.completion_ids)


def test_to_device_keeps_everything():
    batch = make_batch([[5]], [[6]], [0])
    moved = batch.to("cpu")
    assert torch.equal(moved.input_ids, batch.input_ids) and moved.prompts == batch.prompts


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"temperature": -1.0}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"n": 0}, "n"),
        ({"stop": [""]}, "stop"),
    ],
)
def test_sampling_params_validation_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"SamplingParams.{field}"):
        SamplingParams(**kwargs)


def test_sampling_params_stop_accepts_str_or_list():
    assert SamplingParams(stop="\n").stop == ("\n",)
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b")


def test_cat_renumbers_groups_contiguously():
    a = make_batch([[5], [6], [7]], [[1], [2], [3]], [0, 1, 1]).select([1, 2])  # ids [1, 1]
    b = make_batch([[8], [9], [4]], [[1], [2], [3]], [4, 4, 7])
    assert RolloutBatch.cat([a, b]).group_ids.tolist() == [0, 0, 1, 1, 2]
    assert RolloutBatch.cat([a]).group_ids.tolist() == [0, 0]
