"""policy_loss: hand-computed loss and gradient, metrics, micro-batch invariance, every preset."""

import inspect
import math
from types import SimpleNamespace

import pytest
import torch

import psirl.core.objective as objective
from psirl.algorithms import PRESETS, PolicyLossKnobs, resolve_preset
from psirl.core.aggregate import AGGREGATION_MODES, step_normaliser
from psirl.core.objective import policy_loss

D = torch.float64
MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]], dtype=D)
ADV = torch.tensor([[1.0, 1.0, 1.0], [-2.0, -2.0, 0.0]], dtype=D)
LOGP = [[-0.5, -1.0, -2.0], [-0.3, -0.7, -5.0]]
REF = torch.tensor([[-0.4, -1.5, -2.0], [-0.2, -0.9, -1.0]], dtype=D)


def knobs(**kw):
    base = dict(ratio="token", clip="symmetric", eps_low=0.2, eps_high=0.2, dual_clip_c=3.0,
                aggregation="token_mean", constant_normaliser=None, kl_estimator="k3",
                kl_placement="none", kl_coef=0.0, entropy_coef=0.0)
    base.update(kw)
    return SimpleNamespace(**base)  # duck-typed: core does not import algorithms.py


def test_grpo_style_loss_and_gradient_by_hand():
    beta = 0.1
    k = knobs(aggregation="seq_mean_token_mean", kl_placement="loss", kl_coef=beta)
    logp = torch.tensor(LOGP, dtype=D, requires_grad=True)
    n = step_normaliser(MASK, k.aggregation)
    assert n == 2.0
    loss, metrics = policy_loss(logp, logp.detach(), ADV, MASK, k, n, ref_logp=REF)
    rho = REF - logp.detach()
    k3 = torch.exp(rho) - rho - 1
    kl_agg = ((k3[0].sum() / 3) + (k3[1, :2].sum() / 2)) / 2
    # ratio = 1: pg = -(1/2) [ mean(1,1,1) + mean(-2,-2) ] = 0.5
    assert metrics["pg_loss"] == pytest.approx(0.5, rel=1e-15)
    assert loss.item() == pytest.approx(0.5 + beta * kl_agg.item(), rel=1e-14)
    assert metrics["kl_loss"] == pytest.approx(kl_agg.item(), rel=1e-14)
    loss.backward()
    # d/dlogp = (-A + beta * (1 - pi_ref/pi)) / (n_b * N_seq), 0 on padding
    n_b = MASK.sum(1, keepdim=True)
    expected = (-ADV + beta * (1 - torch.exp(rho))) / (n_b * 2) * MASK
    assert torch.allclose(logp.grad, expected, rtol=1e-13, atol=1e-15)


def test_reinforce_gradient_is_minus_advantage_over_sequence_count():
    k = knobs(ratio="on_policy", clip="none", aggregation="seq_mean_token_sum")
    logp = torch.tensor(LOGP, dtype=D, requires_grad=True)
    loss, m = policy_loss(logp, torch.zeros(2, 3, dtype=D), ADV, MASK, k, 2.0)
    loss.backward()
    assert torch.allclose(logp.grad, -ADV * MASK / 2.0, rtol=0, atol=1e-15)
    assert m["ratio_mean"] == 1.0 and m["ratio_max"] == 1.0 and m["ratio_min"] == 1.0


def test_clip_metrics_count_response_tokens_only():
    # ratios on response tokens: 1.5 (A>0: clipped high), 1.0, 1.0 | 0.5 (A<0: clipped low), 1.0
    logp = torch.zeros(2, 3, dtype=D, requires_grad=True)
    old = -torch.log(torch.tensor([[1.5, 1.0, 1.0], [0.5, 1.0, 9.0]], dtype=D))
    loss, m = policy_loss(logp, old, ADV, MASK, knobs(), 5.0)
    assert m["clip_frac_high"] == pytest.approx(1 / 5) and m["clip_frac_low"] == pytest.approx(1 / 5)
    assert m["clip_frac_dual"] == 0.0
    assert m["ratio_max"] == pytest.approx(1.5) and m["ratio_min"] == pytest.approx(0.5)
    assert m["ratio_mean"] == pytest.approx((1.5 + 1 + 1 + 0.5 + 1) / 5)
    loss.backward()
    assert logp.grad[0, 0].item() == 0.0 and logp.grad[1, 0].item() == 0.0


def test_kl_in_reward_is_not_added_to_the_loss_but_is_reported():
    logp = torch.tensor(LOGP, dtype=D, requires_grad=True)
    k = knobs(kl_estimator="k1", kl_placement="reward_token", kl_coef=0.5)
    loss, m = policy_loss(logp, logp.detach(), ADV, MASK, k, 5.0, ref_logp=REF)
    assert loss.item() == m["pg_loss"] and m["kl_loss"] == 0.0
    kl = ((logp.detach() - REF) * MASK).sum().item() / 5
    assert m["kl_mean"] == pytest.approx(kl, rel=1e-14)


def test_kl_coef_argument_overrides_the_knob():
    logp = torch.tensor(LOGP, dtype=D, requires_grad=True)
    k = knobs(kl_placement="loss", kl_coef=0.1)
    a, ma = policy_loss(logp, logp.detach(), ADV, MASK, k, 5.0, ref_logp=REF)
    b, _ = policy_loss(logp, logp.detach(), ADV, MASK, k, 5.0, ref_logp=REF, kl_coef=0.3)
    assert b.item() - a.item() == pytest.approx(0.2 * ma["kl_loss"], rel=1e-12)


def test_entropy_bonus_lowers_the_loss_by_coef_times_aggregated_entropy():
    logp = torch.tensor(LOGP, dtype=D, requires_grad=True)
    ent = torch.full((2, 3), 2.0, dtype=D, requires_grad=True)
    loss, m = policy_loss(logp, logp.detach(), ADV, MASK, knobs(entropy_coef=0.01), 5.0,
                          entropy=ent)
    assert loss.item() == pytest.approx(m["pg_loss"] - 0.01 * 2.0, rel=1e-14)
    assert m["entropy_mean"] == 2.0
    loss.backward()
    assert torch.allclose(ent.grad, -0.01 * MASK / 5.0)


def test_errors_name_what_is_missing():
    logp = torch.tensor(LOGP, dtype=D, requires_grad=True)
    with pytest.raises(ValueError, match="ref_logp"):
        policy_loss(logp, logp.detach(), ADV, MASK, knobs(kl_placement="loss", kl_coef=0.1), 5.0)
    with pytest.raises(ValueError, match="entropy"):
        policy_loss(logp, logp.detach(), ADV, MASK, knobs(entropy_coef=0.1), 5.0)
    with pytest.raises(ValueError, match="knobs.clip"):
        policy_loss(logp, logp.detach(), ADV, MASK, knobs(clip="ppo"), 5.0)


@pytest.mark.parametrize("mode", AGGREGATION_MODES)
@pytest.mark.parametrize(
    ("ratio", "clip"), [("token", "dual"), ("sequence", "asymmetric"), ("token", "cispo")]
)
def test_micro_batch_invariance_of_the_full_policy_loss(mode, ratio, clip):
    gen = torch.Generator().manual_seed(0)
    B, T = 6, 5
    lengths = torch.tensor([5, 1, 3, 0, 4, 2])
    mask = (torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)).to(D)
    theta = torch.randn(B, T, generator=gen, dtype=D, requires_grad=True)
    old = theta.detach() + 0.3 * torch.randn(B, T, generator=gen, dtype=D)
    ref = theta.detach() + 0.2 * torch.randn(B, T, generator=gen, dtype=D)
    adv = torch.randn(B, T, generator=gen, dtype=D)
    k = knobs(ratio=ratio, clip=clip, eps_low=0.1, eps_high=0.15, dual_clip_c=1.5,
              aggregation=mode, constant_normaliser=8.0, kl_placement="loss", kl_coef=0.05,
              entropy_coef=0.01)
    n = step_normaliser(mask, mode, constant=8.0)

    def loss_of(sl):
        logp = -torch.nn.functional.softplus(theta[sl])  # log-probs < 0, non-linear in theta
        ent = torch.sigmoid(theta[sl])
        return policy_loss(logp, old[sl], adv[sl], mask[sl], k, n, ref_logp=ref[sl], entropy=ent)[0]

    full = loss_of(slice(0, B))
    (g_full,) = torch.autograd.grad(full, theta)
    parts = [loss_of(slice(a, b)) for a, b in ((0, 2), (2, 3), (3, 6))]
    g_parts = torch.autograd.grad(sum(parts), theta)[0]
    assert abs(sum(p.item() for p in parts) - full.item()) < 1e-6
    assert torch.allclose(g_parts, g_full, atol=1e-6, rtol=0)
    assert abs(sum(p.item() for p in parts) - full.item()) < 1e-12


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_runs_through_policy_loss(name):
    k = resolve_preset(name).loss
    gen = torch.Generator().manual_seed(1)
    logp = (-torch.rand(4, 3, generator=gen, dtype=D)).requires_grad_(True)
    old = logp.detach() - 0.05
    n = step_normaliser(MASK.repeat(2, 1), k.aggregation, k.constant_normaliser)
    loss, metrics = policy_loss(logp, old, ADV.repeat(2, 1), MASK.repeat(2, 1), k, n,
                                ref_logp=old - 0.1)
    loss.backward()
    assert math.isfinite(loss.item()) and torch.isfinite(logp.grad).all()
    assert logp.grad.abs().sum().item() > 0
    assert all(math.isfinite(v) for v in metrics.values())


def test_real_knobs_dataclass_is_accepted():
    logp = torch.tensor(LOGP, dtype=D, requires_grad=True)
    loss, _ = policy_loss(logp, logp.detach(), ADV, MASK, PolicyLossKnobs(), 5.0)
    assert loss.item() == pytest.approx(-(3 - 4) / 5)


def test_objective_never_branches_on_an_algorithm_name():
    source = inspect.getsource(objective)
    for name in PRESETS:
        assert f'"{name}"' not in source and f"'{name}'" not in source


def test_gspo_clips_whole_sequences():
    # Sequence 0: s = exp(mean log r) = exp(0.1) > 1 + 4e-4 with A > 0 -> every token flat.
    # Sequence 1: s = exp(-1e-4) inside the band -> every token keeps its gradient.
    k = resolve_preset("gspo").loss
    logp = torch.zeros(2, 3, dtype=D, requires_grad=True)
    old = torch.tensor([[-0.1, -0.2, 0.0], [1e-4, 1e-4, 7.0]], dtype=D)
    adv = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]], dtype=D)
    loss, m = policy_loss(logp, old, adv, MASK, k, 2.0)
    loss.backward()
    assert (logp.grad[0] == 0).all()
    s1 = math.exp(-1e-4)
    assert logp.grad[1, :2].tolist() == pytest.approx([-s1 / (2 * 2)] * 2, rel=1e-12)
    assert m["clip_frac_high"] == pytest.approx(3 / 5)
    assert m["ratio_max"] == pytest.approx(math.exp(0.1), rel=1e-12)


def test_metrics_of_a_micro_batch_without_response_tokens():
    logp = torch.zeros(1, 2, dtype=D, requires_grad=True)
    loss, m = policy_loss(logp, logp.detach(), torch.ones(1, 2, dtype=D),
                          torch.zeros(1, 2, dtype=D), knobs(), 1.0)
    assert loss.item() == 0.0
    assert (m["ratio_mean"], m["ratio_min"], m["ratio_max"]) == (1.0, 1.0, 1.0)
