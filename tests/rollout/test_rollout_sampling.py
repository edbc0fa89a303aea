"""The engine's token sampler draws from the (truncated) temperature-scaled softmax exactly."""

from __future__ import annotations

import math

import torch

from psirl.rollout.batch import SamplingParams
from psirl.rollout.hf_engine import _inverse_cdf_sample, _sample
from psirl.rollout.seeding import prompt_seeds, row_seeds, stream_keys, stream_uniforms

DRAWS = 200_000


def _keys(seed: int) -> torch.Tensor:
    """DRAWS rows, each its own stream (one prompt each), as the engine builds them."""
    return stream_keys(row_seeds(prompt_seeds(seed, DRAWS), 1))


def _uniforms(seed: int, step: int = 0) -> torch.Tensor:
    return stream_uniforms(_keys(seed), step)


def _frequencies(tokens: torch.Tensor, vocab: int) -> torch.Tensor:
    return torch.bincount(tokens, minlength=vocab).double() / tokens.numel()


def _assert_matches(freq: torch.Tensor, probs: torch.Tensor) -> None:
    # 5 binomial standard deviations per token (the largest sd is 0.0011 at 200k draws).
    sd = (probs * (1 - probs) / DRAWS).sqrt()
    assert torch.all((freq - probs).abs() <= 5 * sd + 1e-12), (freq, probs)


def test_inverse_cdf_matches_the_distribution_and_never_draws_zero_mass():
    probs = torch.tensor([0.0, 0.1, 0.0, 0.2, 0.3, 0.4, 0.0])
    tokens = _inverse_cdf_sample(probs.expand(DRAWS, -1).contiguous(), _uniforms(0))
    freq = _frequencies(tokens, probs.numel())
    _assert_matches(freq, probs.double())
    assert freq[probs == 0].sum() == 0


def test_inverse_cdf_tolerates_unnormalised_rows():
    # Rows that sum to 0.5 (or to 1 up to float32 rounding) give the normalised distribution.
    probs = torch.tensor([0.05, 0.15, 0.3, 0.0])
    tokens = _inverse_cdf_sample(probs.expand(DRAWS, -1).contiguous(), _uniforms(1, step=5))
    _assert_matches(_frequencies(tokens, 4), (probs / probs.sum()).double())


def test_inverse_cdf_draw_at_the_top_of_the_range_stays_on_mass():
    # u rounds up to the total: the search must still end on the last token with mass.
    probs = torch.tensor([[0.25, 0.75, 0.0, 0.0]])

    token = _inverse_cdf_sample(probs, torch.ones(1))  # u = 1.0 exactly
    assert int(token) == 1
    # The largest uniform the streams give, 1 - 2**-24, too.
    token = _inverse_cdf_sample(probs, torch.tensor([1.0 - 2.0**-24]))
    assert int(token) == 1


def test_sample_top_k_and_top_p_truncate_then_renormalise():
    logits = torch.log(torch.tensor([0.05, 0.1, 0.15, 0.3, 0.4]))
    keys = _keys(2)
    rows = logits.expand(DRAWS, -1).contiguous()
    # top-k = 3 keeps {0.15, 0.3, 0.4}; top-p = 0.6 then keeps {0.4, 0.3} (0.4 < 0.6 <= 0.7).
    cases = {
        (0, 1.0): torch.tensor([0.05, 0.1, 0.15, 0.3, 0.4]),
        (3, 1.0): torch.tensor([0, 0, 0.15, 0.3, 0.4]) / 0.85,
        (0, 0.6): torch.tensor([0, 0, 0, 0.3, 0.4]) / 0.7,
    }
    for (top_k, top_p), expected in cases.items():
        params = SamplingParams(temperature=1.0, top_k=top_k, top_p=top_p, max_new_tokens=1)
        tokens, logp = _sample(rows, params, stream_uniforms(keys, top_k))
        _assert_matches(_frequencies(tokens, 5), expected.double())
        # The behaviour log-prob is the untruncated softmax's.
        assert torch.allclose(logp, logits.log_softmax(-1)[tokens], atol=1e-6)


def test_sample_temperature_scales_the_logits():
    logits = torch.tensor([0.0, 1.0, 2.0])
    params = SamplingParams(temperature=2.0, max_new_tokens=1)
    tokens, logp = _sample(logits.expand(DRAWS, -1).contiguous(), params, _uniforms(3))
    expected = (logits / 2.0).softmax(-1)
    _assert_matches(_frequencies(tokens, 3), expected.double())
    assert math.isclose(float(logp[tokens == 2][0]), float(expected[2].log()), rel_tol=1e-6)
