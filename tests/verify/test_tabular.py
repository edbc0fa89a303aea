"""The tabular autoregressive policy: indexing by hand, probabilities, sampling frequencies."""

import math

import pytest
import torch

from psirl.verify.tabular import TabularPolicy


def test_sizes_and_prefix_ids_by_hand():
    pol = TabularPolicy(vocab_size=3, horizon=3, n_prompts=2)
    assert pol.prefixes_per_prompt == 1 + 3 + 9
    assert pol.n_prefixes == 26
    assert pol.depth_offsets() == [0, 1, 4]
    tokens = torch.tensor([[2, 1, 0], [0, 0, 0]])
    ids = pol.prefix_ids(torch.tensor([0, 1]), tokens)
    # prompt 0, y = (2, 1, 0): root 0; prefix (2) -> 1 + 2 = 3; prefix (2, 1) -> 4 + 2*3 + 1 = 11
    # prompt 1 adds 13 to every index.
    assert ids.tolist() == [[0, 3, 11], [13, 14, 17]]


def test_enumeration_and_probabilities_sum_to_one():
    pol = TabularPolicy(3, 3, n_prompts=2)
    table = pol.enumerate()
    assert table.tokens.shape == (2 * 27, 3)
    assert len({tuple(r) for r in table.tokens[:27].tolist()}) == 27
    theta = pol.init_theta(torch.Generator().manual_seed(0))
    p = pol.sequence_logprobs(theta, table.prompt_ids, table.tokens, table.mask).exp()
    assert torch.allclose(p[:27].sum(), torch.tensor(1.0, dtype=torch.float64))
    assert torch.allclose(p[27:].sum(), torch.tensor(1.0, dtype=torch.float64))


def test_token_logprobs_match_softmax_by_hand():
    pol = TabularPolicy(vocab_size=2, horizon=2)
    theta = torch.tensor([[0.0, 1.0], [2.0, 0.0], [0.0, 0.0]], dtype=torch.float64)
    logp = pol.token_logprobs(theta, torch.tensor([0]), torch.tensor([[1, 0]]), torch.ones(1, 2))
    # token 1 at the root: softmax([0, 1])[1]; then token 0 after prefix (1) = row 1 + 1 = 2
    expected = [math.log(math.e / (1 + math.e)), math.log(0.5)]
    assert torch.allclose(logp[0], torch.tensor(expected, dtype=torch.float64))


def test_sampling_frequencies_match_exact_probabilities():
    """Pearson chi-square of 60k ancestral samples against the enumerated probabilities."""
    pol = TabularPolicy(3, 3)
    gen = torch.Generator().manual_seed(0)
    theta = pol.init_theta(gen)
    table = pol.enumerate()
    p = pol.sequence_logprobs(theta, table.prompt_ids, table.tokens, table.mask).exp()
    n = 60_000
    tokens, mask = pol.sample(theta, torch.zeros(n, dtype=torch.long), gen)
    assert bool((mask == 1).all())
    counts = torch.bincount(pol.completion_index(tokens), minlength=27).to(torch.float64)
    chi2 = float(((counts - n * p) ** 2 / (n * p)).sum())
    # 26 degrees of freedom: P(chi2 > 60) < 2e-4
    assert chi2 < 60.0


def test_eos_variable_length():
    pol = TabularPolicy(3, 3, eos_token=0)
    tokens, mask = pol.completions()
    # lengths 1, 2, 3: 1 + 2 + 4 strings that end with EOS, plus 8 with no EOS at all
    assert tokens.shape[0] == 1 + 2 + 4 + 8
    assert mask.sum(1).tolist().count(1.0) == 1
    assert pol.reachable_prefixes().sum().item() == 1 + 2 + 4
    gen = torch.Generator().manual_seed(3)
    theta = pol.init_theta(gen)
    table = pol.enumerate()
    p = pol.sequence_logprobs(theta, table.prompt_ids, table.tokens, table.mask).exp()
    assert torch.allclose(p.sum(), torch.tensor(1.0, dtype=torch.float64))
    # P(y = EOS first) = pi(EOS | root)
    first = torch.softmax(theta[0], -1)[0]
    assert torch.allclose(p[pol.completion_index(torch.tensor([[0, 0, 0]]))], first)
    s_tok, s_mask = pol.sample(theta, torch.zeros(5000, dtype=torch.long), gen)
    pol.completion_index(s_tok)  # canonical padding (raises otherwise)
    assert torch.equal(s_mask, pol._mask_after_eos(s_tok))
    logp = pol.token_logprobs(theta, torch.zeros(5000, dtype=torch.long), s_tok, s_mask)
    assert bool((logp[s_mask == 0] == 0).all())


def test_theta_copies_route_gradients_to_their_copy():
    pol = TabularPolicy(3, 2)
    theta = torch.zeros(2, pol.n_prefixes, 3, dtype=torch.float64, requires_grad=True)
    tokens = torch.tensor([[1, 2], [0, 0]])
    logp = pol.token_logprobs(theta, torch.zeros(2, dtype=torch.long), tokens, torch.ones(2, 2),
                              copy_ids=torch.tensor([1, 0]))
    logp[0].sum().backward()
    assert theta.grad[0].abs().sum() == 0
    # d log softmax(0)[a] / d theta = onehot(a) - 1/3 at the root and at prefix (1) = row 2
    expected_root = torch.tensor([-1, 2, -1], dtype=torch.float64) / 3
    assert torch.allclose(theta.grad[1, 0], expected_root)
    assert torch.allclose(theta.grad[1, 2], torch.tensor([-1, -1, 2], dtype=torch.float64) / 3)


def test_bad_input_names_the_field():
    with pytest.raises(ValueError, match="vocab_size"):
        TabularPolicy(vocab_size=1)
    with pytest.raises(ValueError, match="eos_token"):
        TabularPolicy(3, 3, eos_token=5)
    pol = TabularPolicy(3, 3)
    with pytest.raises(ValueError, match="theta"):
        pol.token_logprobs(torch.zeros(4, 3), torch.zeros(1, dtype=torch.long),
                           torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 3))
