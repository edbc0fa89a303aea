"""Dynamic sampling (zero-signal groups) and self-training selection."""

import pytest
import torch

from psirl.core.filters import (
    dynamic_sampling_keep,
    threshold_keep,
    top_k_per_group,
    zero_signal_groups,
)

# Group 5: all right; group 2: mixed; group 9: all wrong; group 4: a single sample.
REWARDS = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.5])
GROUPS = torch.tensor([5, 2, 5, 9, 2, 9, 2, 4])


def test_zero_signal_groups_in_ascending_id_order():
    # ids ascending: 2 (mixed), 4 (single), 5 (all 1), 9 (all 0)
    assert zero_signal_groups(REWARDS, GROUPS).tolist() == [False, True, True, True]


def test_dynamic_sampling_keeps_only_groups_with_signal():
    assert dynamic_sampling_keep(REWARDS, GROUPS).tolist() == [
        False, True, False, False, True, False, True, False,
    ]


def test_rounding_level_differences_count_as_equal():
    r = torch.tensor([1.0 - 0.2 - 0.1, 1.0 - 0.3], dtype=torch.float64)  # 0.7000000000000001, 0.7
    assert r[0].item() != r[1].item()
    assert zero_signal_groups(r, torch.tensor([0, 0])).tolist() == [True]
    assert zero_signal_groups(torch.tensor([0.7, 0.7 + 1e-9], dtype=torch.float64),
                              torch.tensor([0, 0])).tolist() == [False]


def test_threshold_keep():
    assert threshold_keep(REWARDS, 0.5).tolist() == [True, False, True, False, True, False, False, True]


def test_top_k_per_group_with_ties_broken_by_index():
    r = torch.tensor([0.3, 0.9, 0.9, 0.1, 0.5, 0.5, 0.7])
    g = torch.tensor([1, 1, 1, 0, 0, 0, 2])
    assert top_k_per_group(r, g, 1).tolist() == [False, True, False, False, True, False, True]
    assert top_k_per_group(r, g, 2).tolist() == [False, True, True, False, True, True, True]
    assert top_k_per_group(r, g, 5).all()
    with pytest.raises(ValueError, match="k must be"):
        top_k_per_group(r, g, 0)


def test_shape_errors():
    with pytest.raises(ValueError, match="group_ids"):
        zero_signal_groups(torch.zeros(3), torch.zeros(2, dtype=torch.long))


@pytest.mark.parametrize("fn", ["zero_signal_groups", "dynamic_sampling_keep", "top_k_per_group"])
def test_outputs_live_on_the_rewards_device(fn):
    """Every output is on the rewards' device (the group ids follow the rewards); the CUDA case
    with rewards on the host and ids on the GPU is in tests/gpu/test_cuda_loops.py."""
    import psirl.core.filters as filters

    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0])
    groups = torch.tensor([0, 0, 1, 1])
    args = (rewards, groups, 1) if fn == "top_k_per_group" else (rewards, groups)
    out = getattr(filters, fn)(*args)
    assert out.device == rewards.device and out.dtype == torch.bool
    expected = {"zero_signal_groups": [False, True], "dynamic_sampling_keep": [True, True, False, False],
                "top_k_per_group": [True, False, True, False]}[fn]
    assert out.tolist() == expected
