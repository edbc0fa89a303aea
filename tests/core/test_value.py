"""PPO clipped value loss and explained variance against hand-computed values."""

import math

import pytest
import torch

from psirl.core.value import clipped_value_loss, explained_variance, value_clip_fraction

D = torch.float64


def test_clipped_value_loss_by_hand():
    # token 0: V=1.5, old=1.0, G=2.0: V_clip=1.2 -> max(0.25, 0.64) -> 0.32, flat in V.
    # token 1: V=1.1 (inside the band) -> 0.5*(1.1-2)^2 = 0.405, gradient V - G = -0.9.
    # token 2: padding.
    v = torch.tensor([[1.5, 1.1, 50.0]], dtype=D, requires_grad=True)
    old = torch.tensor([[1.0, 1.0, 0.0]], dtype=D)
    g = torch.tensor([[2.0, 2.0, 0.0]], dtype=D)
    m = torch.tensor([[1.0, 1.0, 0.0]], dtype=D)
    loss = clipped_value_loss(v, old, g, m, 0.2, 2.0, "token_mean")
    assert loss.item() == pytest.approx((0.32 + 0.405) / 2, rel=1e-14)
    loss.backward()
    assert v.grad.tolist()[0] == pytest.approx([0.0, -0.9 / 2, 0.0], abs=1e-15)
    assert value_clip_fraction(v, old, g, m, 0.2) == 0.5
    assert value_clip_fraction(v, old, g, m, None) == 0.0


def test_unclipped_value_loss_is_half_squared_error():
    v = torch.tensor([[1.5, 1.1]], dtype=D, requires_grad=True)
    loss = clipped_value_loss(v, torch.zeros(1, 2, dtype=D), torch.full((1, 2), 2.0, dtype=D),
                              torch.ones(1, 2, dtype=D), None, 2.0)
    assert loss.item() == pytest.approx(0.5 * (0.25 + 0.81) / 2, rel=1e-14)


def test_explained_variance():
    g = torch.tensor([[1.0, 2.0, 3.0, 4.0]], dtype=D)
    m = torch.tensor([[1.0, 1.0, 1.0, 0.0]], dtype=D)
    assert explained_variance(g, g, m) == 1.0
    assert explained_variance(torch.full_like(g, 7.0), g, m) == pytest.approx(0.0, abs=1e-15)
    # V = [1, 1, 1]: residual [0, 1, 2] has variance 1 = Var[G] -> 0; V = [2, 2, 3]: residual
    # [-1, 0, 0] has variance 1/3 -> 1 - 1/3.
    assert explained_variance(torch.tensor([[2.0, 2.0, 3.0, 0.0]], dtype=D), g, m) == pytest.approx(2 / 3)
    assert math.isnan(explained_variance(g, torch.ones_like(g), m))


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="must all be"):
        clipped_value_loss(torch.zeros(1, 2), torch.zeros(1, 3), torch.zeros(1, 2),
                           torch.ones(1, 2), 0.2, 1.0)
