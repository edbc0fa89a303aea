"""train/precision.py: bf16 weights with float32 master weights and AdamW state."""

from __future__ import annotations

import io

import pytest
import torch

from psirl.train.base import clip_and_step
from psirl.train.precision import MasterWeightAdamW, adamw

KW = {"lr": 1e-2, "betas": (0.9, 0.99), "eps": 1e-8, "weight_decay": 0.1, "fused": True}


def _grads(step: int, shapes) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    return [torch.randn(s, generator=g).to(torch.bfloat16) for s in shapes]


def test_masters_follow_float32_adamw_exactly():
    """Same bf16 gradients: the masters equal a float32 AdamW's weights bit for bit, and the
    model holds their bf16 rounding."""
    shapes = [(5, 3), (3,)]
    init = [torch.randn(s, generator=torch.Generator().manual_seed(9)) for s in shapes]
    model = [torch.nn.Parameter(w.to(torch.bfloat16)) for w in init]
    ref = [torch.nn.Parameter(w.to(torch.bfloat16).float()) for w in init]
    opt, ref_opt = MasterWeightAdamW(model, **KW), torch.optim.AdamW(ref, **KW)
    for step in range(5):
        for p, r, g in zip(model, ref, _grads(step, shapes), strict=True):
            p.grad, r.grad = g, g.float()
        opt.step(), ref_opt.step()
        opt.zero_grad(), ref_opt.zero_grad()
    for p, m, r in zip(model, opt.master_params, ref, strict=True):
        assert torch.equal(m, r)
        assert p.dtype == torch.bfloat16 and torch.equal(p, r.detach().to(torch.bfloat16))
        assert p.grad is None and m.grad is None


def test_updates_below_half_a_bf16_ulp_accumulate():
    """w = 1, constant gradient, lr 1e-4: each Adam step moves w by lr, under half the bf16 ulp
    at 1 (2^-8): plain bf16 AdamW never moves; the master reaches 1 - 100 lr = 0.99."""
    plain = torch.nn.Parameter(torch.ones(1, dtype=torch.bfloat16))
    mixed = torch.nn.Parameter(torch.ones(1, dtype=torch.bfloat16))
    kw = {"lr": 1e-4, "eps": 0.0, "weight_decay": 0.0, "fused": True}
    plain_opt, mixed_opt = torch.optim.AdamW([plain], **kw), adamw([mixed], **kw)
    assert isinstance(mixed_opt, MasterWeightAdamW)
    for _ in range(100):
        for p, o in ((plain, plain_opt), (mixed, mixed_opt)):
            p.grad = torch.ones(1, dtype=torch.bfloat16)
            o.step()
    assert plain.item() == 1.0
    # float32 rounding: 100 subtractions, each within half an ulp (6e-8) of the exact step
    assert mixed_opt.master_params[0].item() == pytest.approx(0.99, abs=100 * 6e-8)
    assert mixed.item() == torch.tensor(0.99).to(torch.bfloat16).item() < 1.0


def test_float32_parameters_get_plain_adamw():
    assert type(adamw([torch.nn.Parameter(torch.ones(2))], lr=1e-3)) is torch.optim.AdamW


def test_state_dict_round_trip_continues_exactly():
    """A checkpoint (torch.save, weights_only load) holds the masters: resuming from it gives
    the same weights as not stopping, although the model itself only saved bf16 weights."""
    shapes = [(4, 4)]

    def run(opt, model, steps):
        for step in steps:
            model[0].grad = _grads(step, shapes)[0]
            clip_and_step(model, opt, None, 0.5)

    straight = [torch.nn.Parameter(torch.zeros(4, 4, dtype=torch.bfloat16))]
    opt = MasterWeightAdamW(straight, **KW)
    run(opt, straight, range(6))

    first = [torch.nn.Parameter(torch.zeros(4, 4, dtype=torch.bfloat16))]
    opt1 = MasterWeightAdamW(first, **KW)
    run(opt1, first, range(3))
    buf = io.BytesIO()
    torch.save(opt1.state_dict(), buf)
    buf.seek(0)
    resumed = [torch.nn.Parameter(first[0].detach().clone())]  # the bf16 weights a checkpoint has
    opt2 = MasterWeightAdamW(resumed, **KW)
    opt2.load_state_dict(torch.load(buf, weights_only=True))
    run(opt2, resumed, range(3, 6))
    assert torch.equal(opt2.master_params[0], opt.master_params[0])
    assert torch.equal(resumed[0], straight[0])


def test_clipped_step_uses_float32_grad_scale():
    """clip_and_step's divisor reaches the master update: first step with eps = 1 is
    -lr g_c / (|g_c| + 1), g_c the gradient clipped to norm 1."""
    a = torch.nn.Parameter(torch.zeros(3, dtype=torch.bfloat16))
    a.grad = torch.tensor([3.0, 0.0, 4.0], dtype=torch.bfloat16)
    opt = MasterWeightAdamW([a], lr=0.1, eps=1.0, weight_decay=0.0, fused=True)
    assert clip_and_step([a], opt, None, 1.0) == 5.0
    g = torch.tensor([3.0, 0.0, 4.0]) / (5.0 + 1e-6)
    torch.testing.assert_close(opt.master_params[0], -0.1 * g / (g.abs() + 1.0),
                               rtol=1e-6, atol=1e-7)


def test_load_state_dict_rejects_a_mismatched_checkpoint():
    opt = MasterWeightAdamW([torch.nn.Parameter(torch.zeros(2, dtype=torch.bfloat16))], lr=1e-3)
    state = opt.state_dict()
    state["master_weights"] = [torch.zeros(3)]
    with pytest.raises(ValueError, match="shape"):
        opt.load_state_dict(state)


def test_weights_changed_before_the_first_step_are_kept():
    """run_loop broadcasts rank 0's weights after the optimiser is built: the masters follow."""
    p = torch.nn.Parameter(torch.zeros(2, dtype=torch.bfloat16))
    opt = MasterWeightAdamW([p], lr=0.0, weight_decay=0.0, fused=True)
    with torch.no_grad():
        p.copy_(torch.tensor([1.5, -2.0]))
    p.grad = torch.ones(2, dtype=torch.bfloat16)
    opt.step()
    assert p.tolist() == [1.5, -2.0] and opt.master_params[0].tolist() == [1.5, -2.0]
