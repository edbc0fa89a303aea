"""Entropy from logits: closed forms, -inf logits, agreement with -sum p log p."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from psirl.core.entropy import entropy_from_logits


def test_uniform_and_one_hot():
    assert entropy_from_logits(torch.zeros(2, 3, 8)).flatten().tolist() == pytest.approx([math.log(8)] * 6)
    z = torch.tensor([0.0, -float("inf"), -float("inf")], requires_grad=True)
    h = entropy_from_logits(z)
    h.backward()
    assert h.item() == 0.0
    assert torch.isfinite(z.grad).all()


def test_two_point_closed_form():
    p = 0.2
    z = torch.tensor([math.log(p), math.log(1 - p)], dtype=torch.float64)
    expected = -(p * math.log(p) + (1 - p) * math.log(1 - p))
    assert entropy_from_logits(z).item() == pytest.approx(expected, rel=1e-14)


def test_low_precision_input_keeps_its_dtype():
    out = entropy_from_logits(torch.zeros(4, 16, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16
    assert out.float().tolist() == pytest.approx([math.log(16)] * 4, rel=1e-2)


@settings(max_examples=50, deadline=None, database=None)
@given(st.lists(st.floats(-20, 20), min_size=2, max_size=10))
def test_matches_minus_sum_p_log_p(logits):
    z = torch.tensor(logits, dtype=torch.float64)
    p = torch.softmax(z, 0)
    expected = -(p * torch.log_softmax(z, 0)).sum().item()
    assert entropy_from_logits(z).item() == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_entropy_from_logprobs_equals_entropy_from_logits_with_masked_entries():
    import torch

    from psirl.core.entropy import entropy_from_logits, entropy_from_logprobs

    z = torch.tensor([[0.0, 1.0, -2.0, float("-inf")], [3.0, 3.0, 3.0, 3.0]], requires_grad=True)
    h = entropy_from_logprobs(torch.log_softmax(z, dim=-1))
    assert torch.allclose(h, entropy_from_logits(z))
    assert abs(float(h[1]) - math.log(4)) < 1e-6  # uniform over 4: log 4
    h.sum().backward()
    assert torch.isfinite(z.grad).all()
