"""TRL's further preference losses against their papers' formulas, computed by hand (math)."""

import math

import pytest
import torch

from psirl.core.preference import (
    DPO_LOSS_TYPES,
    alphapo_loss,
    cpo_loss,
    dpo_family_loss,
    dpo_loss,
    ipo_loss,
    kto_apo_zero_unpaired_loss,
    likelihood_displacement,
    mixed_dpo_loss,
    orpo_loss,
    reward_centering_penalty,
    simpo_loss,
)

D = torch.float64
# One pair: log pi(y_w) = -3, log pi(y_l) = -5, log ref(y_w) = -4, log ref(y_l) = -4.5
PW, PL, RW, RL = -3.0, -5.0, -4.0, -4.5
AW, AL = PW - RW, PL - RL  # 1.0, -0.5
H = AW - AL  # 1.5
BETA = 0.5


def t(x):
    return torch.tensor([x], dtype=D)


def lsig(x):
    return -math.log1p(math.exp(-x))


def sig(x):
    return 1.0 / (1.0 + math.exp(-x))


def value(loss_type, **kw):
    return float(dpo_family_loss(loss_type, t(PW), t(PL), t(RW), t(RL), beta=BETA, **kw)[0])


@pytest.mark.parametrize("loss_type,want", [
    ("sigmoid", -lsig(BETA * H)),
    ("hinge", max(0.0, 1 - BETA * H)),
    ("nca_pair", -lsig(BETA * AW) - 0.5 * lsig(-BETA * AW) - 0.5 * lsig(-BETA * AL)),
    ("bco_pair", -lsig(BETA * AW) - lsig(-BETA * AL)),
    ("sppo_hard", (AW - 1 / (2 * BETA)) ** 2 + (AL + 1 / (2 * BETA)) ** 2),
    ("apo_zero", (1 - sig(BETA * AW)) + sig(BETA * AL)),
    ("apo_down", sig(BETA * AW) + (1 - sig(BETA * H))),
    ("aot", -lsig(BETA * H)),  # one pair: sorting changes nothing
    ("aot_unpaired", -lsig(BETA * H)),
    ("discopop", -lsig(BETA * H) * (1 - sig(BETA * H / 0.05)) + math.exp(-BETA * H) * sig(BETA * H / 0.05)),
    ("exo_pair", sig(BETA * H) * (lsig(BETA * H) - math.log(1 - 1e-3))
     + sig(-BETA * H) * (lsig(-BETA * H) - math.log(1e-3))),
])
def test_each_loss_type_matches_its_formula(loss_type, want):
    assert value(loss_type) == pytest.approx(want, rel=1e-12)


def test_every_loss_type_is_tested_and_unknown_is_rejected():
    assert set(DPO_LOSS_TYPES) == {
        "sigmoid", "robust", "hinge", "exo_pair", "nca_pair", "bco_pair", "sppo_hard", "aot",
        "aot_unpaired", "apo_zero", "apo_down", "discopop",
    }
    with pytest.raises(ValueError, match="loss_type"):
        value("dpop")


def test_sigmoid_is_dpo_and_robust_with_smoothing():
    dpo = float(dpo_loss(t(PW), t(PL), t(RW), t(RL), beta=BETA, label_smoothing=0.1)[0])
    assert value("sigmoid", label_smoothing=0.1) == pytest.approx(dpo, rel=1e-12)
    e, z = 0.1, BETA * H
    assert value("robust", label_smoothing=e) == pytest.approx(
        (-(1 - e) * lsig(z) + e * lsig(-z)) / (1 - 2 * e), rel=1e-12)
    assert value("bco_pair", bco_delta=0.2) == pytest.approx(
        -lsig(BETA * AW - 0.2) - lsig(-(BETA * AL - 0.2)), rel=1e-12)


def test_f_divergences():
    # f-DPO: z = f'(u_w) - f'(u_l), u = pi/ref; forward KL f' = -1/u; JS f' = log(2u/(1+u));
    # alpha: f' = (1 - u^-alpha)/alpha.
    uw, ul = math.exp(AW), math.exp(AL)
    fwd = -1 / uw + 1 / ul
    js = math.log(2 * uw / (1 + uw)) - math.log(2 * ul / (1 + ul))
    a = 0.5
    alpha_z = (1 - uw ** -a) / a - (1 - ul ** -a) / a
    assert value("sigmoid", f_divergence="forward_kl") == pytest.approx(-lsig(BETA * fwd), rel=1e-12)
    assert value("sigmoid", f_divergence="js_divergence") == pytest.approx(-lsig(BETA * js), rel=1e-12)
    assert value("sigmoid", f_divergence="alpha_divergence", alpha=a) == pytest.approx(
        -lsig(BETA * alpha_z), rel=1e-12)
    with pytest.raises(ValueError, match="f_divergence"):
        value("sigmoid", f_divergence="chi2")


def test_aot_sorts_over_the_batch():
    pw, pl = torch.tensor([-1.0, -2.0], dtype=D), torch.tensor([-3.0, -1.0], dtype=D)
    rw, rl = torch.tensor([-1.5, -1.0], dtype=D), torch.tensor([-1.0, -2.0], dtype=D)
    # policy margins [2, -1] -> sorted [-1, 2]; reference margins [-0.5, 1] -> [-0.5, 1]
    out = dpo_family_loss("aot", pw, pl, rw, rl, beta=1.0)
    assert out.tolist() == pytest.approx([-lsig(-0.5), -lsig(1.0)], rel=1e-12)


def test_mixture_is_the_weighted_sum():
    mix = mixed_dpo_loss({"sigmoid": 0.8, "bco_pair": 0.2}, t(PW), t(PL), t(RW), t(RL), beta=BETA)
    assert float(mix[0]) == pytest.approx(0.8 * value("sigmoid") + 0.2 * value("bco_pair"), rel=1e-12)


def test_kto_apo_zero_unpaired_cpo_alphapo_centring():
    out = kto_apo_zero_unpaired_loss(torch.tensor([PW, PL], dtype=D), torch.tensor([RW, RL], dtype=D),
                                     torch.tensor([True, False]), beta=BETA)
    assert out.tolist() == pytest.approx([1 - sig(BETA * AW), sig(BETA * AL)], rel=1e-12)
    lw = torch.tensor([4.0], dtype=D)
    cpo = float(cpo_loss(t(PW), t(PL), lw, beta=BETA)[0])
    assert cpo == pytest.approx(-lsig(BETA * (PW - PL)) + 3.0 / 4.0, rel=1e-12)
    hinge = float(cpo_loss(t(PW), t(PL), lw, beta=BETA, hinge=True)[0])
    assert hinge == pytest.approx(max(0.0, 1 - BETA * 2.0) + 0.75, rel=1e-12)
    ll, a = torch.tensor([5.0], dtype=D), 0.3
    aw, al = PW / 4, PL / 5
    rw_, rl_ = (1 - math.exp(-a * aw)) / a, (1 - math.exp(-a * al)) / a
    got = float(alphapo_loss(t(PW), t(PL), lw, ll, beta=2.0, gamma=0.5, alpha=a)[0])
    assert got == pytest.approx(-lsig(2.0 * (rw_ - rl_) - 0.5), rel=1e-12)
    simpo = float(simpo_loss(t(PW), t(PL), lw, ll, beta=2.0, gamma=0.5)[0])
    assert float(alphapo_loss(t(PW), t(PL), lw, ll, beta=2.0, gamma=0.5, alpha=0.0)[0]) == simpo
    assert float(reward_centering_penalty(t(1.5), t(-0.5), 0.01)[0]) == pytest.approx(0.01)


def test_ipo_length_normalised_and_simpo_smoothing_and_orpo_nll():
    lw, ll = t(2.0), t(4.0)
    h_avg = (PW / 2 - RW / 2) - (PL / 4 - RL / 4)
    got = float(ipo_loss(t(PW), t(PL), t(RW), t(RL), beta=BETA, chosen_lengths=lw,
                         rejected_lengths=ll)[0])
    assert got == pytest.approx((h_avg - 1 / (2 * BETA)) ** 2, rel=1e-12)
    assert float(ipo_loss(t(PW), t(PL), t(RW), t(RL), beta=BETA)[0]) == pytest.approx(
        (H - 1 / (2 * BETA)) ** 2, rel=1e-12)
    z = 2.0 * (PW / 2 - PL / 4) - 0.5
    s = float(simpo_loss(t(PW), t(PL), lw, ll, beta=2.0, gamma=0.5, label_smoothing=0.2)[0])
    assert s == pytest.approx(-0.8 * lsig(z) - 0.2 * lsig(-z), rel=1e-12)
    base = float(orpo_loss(t(PW), t(PL), lw, ll, lam=0.1)[0])
    trl = float(orpo_loss(t(PW), t(PL), lw, ll, lam=0.1, chosen_nll=t(0.9))[0])
    assert trl - base == pytest.approx(0.9 - (-PW / 2), rel=1e-12)


def test_likelihood_displacement_flags_falling_chosen_with_growing_margin():
    out = likelihood_displacement(t(-3.0), t(-3.5), t(-5.0), t(-7.0))
    assert out == {"chosen_logp_change": -0.5, "margin_change": 1.5, "displaced": 1.0}
    assert likelihood_displacement(t(-3.0), t(-2.5), t(-5.0), t(-7.0))["displaced"] == 0.0


def test_preference_loop_rejects_label_smoothing_where_undefined_and_uses_it_for_simpo():
    from types import SimpleNamespace

    from psirl.train.preference import pair_loss

    lw, ll = t(2.0), t(4.0)
    for name in ("ipo", "orpo"):
        cfg = SimpleNamespace(loss=name, beta=BETA, label_smoothing=0.1, gamma=0.5, orpo_lambda=0.1)
        with pytest.raises(ValueError, match="label_smoothing"):
            pair_loss(cfg, t(PW), t(PL), t(RW), t(RL), lw, ll)
    cfg = SimpleNamespace(loss="simpo", beta=2.0, label_smoothing=0.2, gamma=0.5)
    loss, _, _ = pair_loss(cfg, t(PW), t(PL), None, None, lw, ll)
    z = 2.0 * (PW / 2 - PL / 4) - 0.5
    assert float(loss[0]) == pytest.approx(-0.8 * lsig(z) - 0.2 * lsig(-z), rel=1e-12)
    ipo = SimpleNamespace(loss="ipo", beta=BETA, label_smoothing=0.0, length_normalize=True)
    loss, _, _ = pair_loss(ipo, t(PW), t(PL), t(RW), t(RL), lw, ll)
    h_avg = (PW / 2 - RW / 2) - (PL / 4 - RL / 4)
    assert float(loss[0]) == pytest.approx((h_avg - 1 / (2 * BETA)) ** 2, rel=1e-12)


def test_dpo_provokes_likelihood_displacement_on_a_shared_feature_policy():
    """Three responses with one shared feature phi = [1 (chosen), 2 (rejected), 0 (other)] and
    log pi(y) = theta phi(y) - logsumexp(theta phi). DPO's gradient on the margin is
    phi_w - phi_l = -1, so theta falls; d log pi(y_w) / d theta = 1 - E[phi] > 0 once theta < 0,
    so the chosen log-prob falls while the margin grows (Razin et al. 2024; reference 003)."""
    phi = torch.tensor([1.0, 2.0, 0.0], dtype=D)
    theta = torch.zeros(1, dtype=D, requires_grad=True)
    ref = torch.log_softmax(phi * 0.0, dim=0).detach()

    def logps():
        return torch.log_softmax(theta * phi, dim=0)

    before = logps().detach()
    opt = torch.optim.SGD([theta], lr=5.0)
    for _ in range(20):
        lp = logps()
        loss = dpo_loss(lp[:1], lp[1:2], ref[:1], ref[1:2], beta=0.1).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = logps().detach()
    shift = likelihood_displacement(before[:1], after[:1], before[1:2], after[1:2])
    assert shift["margin_change"] > 0.5
    assert shift["chosen_logp_change"] < -0.1
    assert shift["displaced"] == 1.0
