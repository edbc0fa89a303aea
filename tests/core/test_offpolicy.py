"""Truncated importance weights (core/offpolicy.py) on worked examples."""

import math

import pytest
import torch

from psirl.algorithms import PolicyLossKnobs
from psirl.core.offpolicy import mismatch_metrics, truncated_is_weights

# one row of two tokens and one pad: deltas l_tr - l_eng = (+0.5, -1.0), pad ignored
TRAINER = torch.tensor([[-1.0, -2.0, -7.0]])
ENGINE = torch.tensor([[-1.5, -1.0, 3.0]])
MASK = torch.tensor([[1.0, 1.0, 0.0]])


def test_token_level_worked_example():
    w = truncated_is_weights(TRAINER, ENGINE, MASK, cap=1.5, level="token")
    # min(e^0.5 = 1.6487, 1.5) = 1.5; min(e^-1, 1.5) = 0.3679; pad 0
    assert torch.allclose(w, torch.tensor([[1.5, math.exp(-1.0), 0.0]]))
    uncapped = truncated_is_weights(TRAINER, ENGINE, MASK, cap=math.inf)
    assert torch.allclose(uncapped, torch.tensor([[math.exp(0.5), math.exp(-1.0), 0.0]]))


def test_sequence_level_worked_example():
    # sequence log-ratio 0.5 - 1.0 = -0.5 -> e^-0.5 = 0.6065 on every real token
    w = truncated_is_weights(TRAINER, ENGINE, MASK, cap=2.0, level="sequence")
    assert torch.allclose(w, torch.tensor([[math.exp(-0.5), math.exp(-0.5), 0.0]]))
    # a sequence ratio above the cap is cut to the cap on every token
    w = truncated_is_weights(ENGINE, TRAINER, MASK, cap=1.2, level="sequence")  # ratio e^0.5
    assert torch.allclose(w, torch.tensor([[1.2, 1.2, 0.0]]))


def test_weights_are_detached_and_do_not_overflow():
    trainer = torch.tensor([[0.0]], requires_grad=True)
    w = truncated_is_weights(trainer, torch.tensor([[-1000.0]]), torch.ones(1, 1), cap=3.0)
    assert not w.requires_grad and w.item() == pytest.approx(3.0)


def test_bad_arguments_name_the_knob():
    with pytest.raises(ValueError, match="tis_level"):
        truncated_is_weights(TRAINER, ENGINE, MASK, cap=2.0, level="row")
    with pytest.raises(ValueError, match="tis_cap"):
        truncated_is_weights(TRAINER, ENGINE, MASK, cap=0.0)
    with pytest.raises(ValueError, match="tis_cap"):
        PolicyLossKnobs(tis_cap=-1.0)
    with pytest.raises(ValueError, match="tis_level"):
        PolicyLossKnobs(tis_cap=2.0, tis_level="row")
    assert PolicyLossKnobs(tis_cap=2, tis_level="sequence").tis_cap == 2.0


def test_mismatch_metrics_worked_example():
    m = mismatch_metrics(TRAINER, ENGINE, MASK, cap=1.5)
    assert m["mismatch/abs_mean"] == pytest.approx(0.75)
    assert m["mismatch/abs_max"] == pytest.approx(1.0)
    k3 = ((math.exp(0.5) - 1 - 0.5) + (math.exp(-1.0) - 1 + 1.0)) / 2
    assert m["mismatch/kl_k3"] == pytest.approx(k3)
    assert m["tis/truncated_frac"] == pytest.approx(0.5)  # only the +0.5 token exceeds log 1.5


def test_policy_loss_weights_each_token_term():
    # on-policy ratio 1, no clip, token mean over 2 tokens: l_t = -A_t, weighted by w_t
    # loss = -(0.5 * 1 + 2 * 2) / 2 = -2.25; d loss / d logp_t = -w_t A_t / 2
    from psirl.core.objective import policy_loss

    logp = torch.zeros(1, 2, requires_grad=True)
    knobs = PolicyLossKnobs(ratio="on_policy", clip="none")
    advantages, mask, weights = (
        torch.tensor([[1.0, 2.0]]),
        torch.ones(1, 2),
        torch.tensor([[0.5, 2.0]]),
    )
    loss, _ = policy_loss(logp, logp.detach(), advantages, mask, knobs, 2.0, is_weights=weights)
    assert loss.item() == pytest.approx(-2.25)
    (grad,) = torch.autograd.grad(loss, logp)
    assert torch.allclose(grad, torch.tensor([[-0.25, -2.0]]))
    plain, _ = policy_loss(logp, logp.detach(), advantages, mask, knobs, 2.0)
    assert plain.item() == pytest.approx(-1.5)
