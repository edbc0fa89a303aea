"""ShuffledReward: same rewards, link to samples cut, reproducible per batch."""

from psirl.rewards.base import PerSampleReward, ShuffledReward


def _index_reward():
    # reward = the record's index, so a permutation is visible
    return PerSampleReward(lambda completion, record: float(record["i"]))


def test_shuffle_is_a_permutation_and_reproducible():
    n = 32
    records = [{"i": i} for i in range(n)]
    completions = [f"c{i}" for i in range(n)]
    fn = ShuffledReward(_index_reward())
    a = fn([""] * n, completions, records)
    b = fn([""] * n, completions, records)
    assert sorted(a) == [float(i) for i in range(n)]  # same multiset of rewards
    assert a == b  # same batch -> same permutation (resume-safe)
    assert a != [float(i) for i in range(n)]  # the link to the samples is cut
    other = fn([""] * n, [f"d{i}" for i in range(n)], records)
    assert other != a  # another batch draws another permutation
