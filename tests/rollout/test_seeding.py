"""Per-row random streams (psirl/rollout/seeding.py): uniform, independent across steps, rows and
prompts, and a row's samples do not depend on the other rows of the call."""

from __future__ import annotations

import math
import random

import pytest
import torch

from psirl.rollout.batch import SamplingParams
from psirl.rollout.hf_engine import HFEngine
from psirl.rollout.seeding import (
    RowStreams,
    call_seeds,
    hash32,
    hash32_int,
    mix_seed,
    prompt_seeds,
    row_seeds,
    stream_keys,
    stream_uniforms,
)


def test_tensor_hash_equals_the_exact_integer_hash():
    rng = random.Random(0)
    values = [0, 1, 2**31 - 1, 2**31, 2**32 - 1] + [rng.getrandbits(32) for _ in range(2000)]
    got = hash32(torch.tensor(values, dtype=torch.int64)).tolist()
    assert got == [hash32_int(v) for v in values]
    # lowbias32 is a bijection on 32 bits: no two of these inputs collide.
    assert len(set(got)) == len(set(values))


def test_uniforms_are_uniform_on_their_24_bits():
    keys = stream_keys(row_seeds(prompt_seeds(11, 500), 4))  # 2000 streams
    u = torch.cat([stream_uniforms(keys, t) for t in range(500)]).double()  # 1e6 draws
    n = u.numel()
    assert u.min() >= 0 and u.max() < 1
    assert torch.equal(u * 2**24, (u * 2**24).floor())  # exactly 24 bits
    # Mean and variance within 5 standard errors of U[0, 1)'s 1/2 and 1/12.
    assert abs(float(u.mean()) - 0.5) < 5 * math.sqrt(1 / 12 / n)
    assert abs(float(u.var()) - 1 / 12) < 5 * math.sqrt(1 / 180 / n)
    # Chi-square over 1024 bins: df 1023, sd sqrt(2 df) = 45; 6 sd either side.
    counts = torch.bincount((u * 1024).long(), minlength=1024).double()
    chi2 = float(((counts - n / 1024) ** 2 / (n / 1024)).sum())
    assert abs(chi2 - 1023) < 6 * math.sqrt(2 * 1023), chi2


@pytest.mark.parametrize("pairing", ["next step", "next sample", "next prompt"])
def test_neighbouring_streams_and_steps_are_independent(pairing):
    """Pairs (u, v) of neighbouring draws fill the unit square evenly (chi-square over 16 x 16
    cells) and are uncorrelated: consecutive steps of a row, samples j and j + 1 of a prompt,
    prompts i and i + 1 of a call."""
    seeds = prompt_seeds(5, 2000)
    keys = stream_keys(row_seeds(seeds, 2))  # rows 2i, 2i + 1: samples 0, 1 of prompt i
    if pairing == "next step":
        u = torch.cat([stream_uniforms(keys, t) for t in range(0, 100, 2)])
        v = torch.cat([stream_uniforms(keys, t + 1) for t in range(0, 100, 2)])
    else:
        draws = torch.stack([stream_uniforms(keys, t) for t in range(50)])  # [50, 4000]
        if pairing == "next sample":
            u, v = draws[:, 0::2].reshape(-1), draws[:, 1::2].reshape(-1)
        else:
            u, v = draws[:, 0:-2:2].reshape(-1), draws[:, 2::2].reshape(-1)
    u, v = u.double(), v.double()
    n = u.numel()
    corr = float(((u - u.mean()) * (v - v.mean())).mean() / (u.std() * v.std()))
    assert abs(corr) < 5 / math.sqrt(n), corr
    cells = torch.bincount((u * 16).long() * 16 + (v * 16).long(), minlength=256).double()
    chi2 = float(((cells - n / 256) ** 2 / (n / 256)).sum())
    assert abs(chi2 - 255) < 6 * math.sqrt(2 * 255), chi2


def test_seeds_mix_all_their_parts():
    assert mix_seed(1, 2) != mix_seed(2, 1)
    assert len({mix_seed(7, i) for i in range(10_000)}) == 10_000
    assert all(0 <= s < 2**62 for s in prompt_seeds(3, 100))
    assert prompt_seeds(3, 4, start=2) == prompt_seeds(3, 6)[2:]


def test_call_seeds_checks_the_count_and_draws_from_torch_when_unseeded():
    assert call_seeds(SamplingParams(seed=4), 3) == prompt_seeds(4, 3)
    assert call_seeds(SamplingParams(seeds=(9, 8)), 2) == (9, 8)
    with pytest.raises(ValueError, match="2 seeds for 3 prompts"):
        call_seeds(SamplingParams(seeds=(9, 8)), 3)
    with pytest.raises(ValueError, match="seeds"):
        SamplingParams(seeds=(1, -2))
    torch.manual_seed(0)
    first = call_seeds(SamplingParams(), 2)
    torch.manual_seed(0)
    assert call_seeds(SamplingParams(), 2) == first


@pytest.mark.parametrize("compact", [True, False])
def test_a_prompts_samples_do_not_depend_on_the_rest_of_the_call(ab_policy, compact):
    """The same prompt with the same seed gets the same completions alone, in a batch, in another
    order, with other prompts around it -- what makes a data-parallel run sample the same tokens
    at any world size."""
    model, tok = ab_policy
    engine = HFEngine(model, tok, compact_finished=compact)
    prompts = ["ab", "bba", "a", "babab"]
    seeds = prompt_seeds(21, len(prompts))
    kw = dict(temperature=1.0, max_new_tokens=12, n=3, stop=("bb",))
    whole = engine.generate(prompts, SamplingParams(seeds=seeds, **kw))
    assert len(set(whole.completions)) > 4  # the call really samples
    for subset in ([2], [3, 0], [1, 3, 2]):
        part = engine.generate([prompts[i] for i in subset],
                               SamplingParams(seeds=tuple(seeds[i] for i in subset), **kw))
        for k, i in enumerate(subset):
            rows = slice(3 * i, 3 * i + 3)
            assert part.completions[3 * k: 3 * k + 3] == whole.completions[rows]
            mask = part.completion_mask[3 * k: 3 * k + 3].bool()
            width = mask.shape[1]
            torch.testing.assert_close(
                part.behaviour_logprobs[3 * k: 3 * k + 3][mask],
                whole.behaviour_logprobs[rows][:, :width][mask], rtol=0, atol=1e-5)
    # `seed` is shorthand for the derived per-prompt seeds.
    again = engine.generate(prompts, SamplingParams(seed=21, **kw))
    assert again.completions == whole.completions


def test_row_streams_in_blocks_give_each_rows_draws_at_its_offset():
    seeds = row_seeds(prompt_seeds(8, 3), 2)
    offsets = [0, 5, 64, 0, 130, 7]
    streams = RowStreams(seeds, offsets, block=16)
    keys = stream_keys(seeds)
    for t in (0, 1, 15, 16, 17, 40, 15, 100):  # forwards, backwards, across blocks
        want = stream_uniforms(keys, torch.tensor(offsets) + t)
        assert torch.equal(streams(t), want)
    # Row 1 at offset 5 draws at t what row 1 at offset 0 draws at t + 5 (one stream).
    plain = RowStreams(seeds)
    assert float(streams(3)[1]) == float(plain(8)[1])
