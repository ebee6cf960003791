"""data/shuffle.py: per-epoch permutations of [0, n) evaluated on batches of stream positions."""

import numpy as np
import pytest

from data.shuffle import EpochShuffle


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 7, 8, 9, 1000, 1024, 1025, 12345])
def test_every_epoch_is_a_permutation_and_epochs_differ(n):
    s = EpochShuffle(n, seed=0)
    stream = s(np.arange(3 * n))
    epochs = stream.reshape(3, n)
    for e in epochs:
        np.testing.assert_array_equal(np.sort(e), np.arange(n))
    if n > 10:
        assert not np.array_equal(epochs[0], epochs[1]) and not np.array_equal(epochs[1], epochs[2])
        assert not np.array_equal(epochs[0], np.arange(n))  # actually shuffled


def test_positions_in_any_order_or_grouping_give_the_same_records():
    s = EpochShuffle(777, seed=5)
    whole = s(np.arange(2000))
    pos = np.random.default_rng(0).permutation(2000)
    np.testing.assert_array_equal(s(pos), whole[pos])  # mixed epochs in one call
    np.testing.assert_array_equal(
        np.concatenate([EpochShuffle(777, 5)(pos[i : i + 64]) for i in range(0, 2000, 64)]),
        whole[pos],
    )
    assert not np.array_equal(EpochShuffle(777, seed=6)(np.arange(777)), whole[:777])


def test_placement_is_roughly_uniform():
    """Over many seeds every element lands in every slot about equally often (chi-square)."""
    n, seeds = 8, 4000
    counts = np.zeros((n, n))
    for seed in range(seeds):
        counts[np.arange(n), EpochShuffle(n, seed)(np.arange(n))] += 1
    expected = seeds / n
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < 110  # 49 degrees of freedom: p ~ 1e-6 at 110


def test_jft_scale_without_materialising():
    s = EpochShuffle(4_000_000_000, seed=1)
    out = s(np.arange(10**10, 10**10 + 4096))
    assert out.min() >= 0 and out.max() < 4_000_000_000 and len(set(out.tolist())) == 4096


def test_bad_input():
    with pytest.raises(ValueError, match="at least one record"):
        EpochShuffle(0, seed=0)
    with pytest.raises(ValueError, match="positions must be >= 0"):
        EpochShuffle(10, seed=0)(np.array([3, -1]))
