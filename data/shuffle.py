"""Seeded per-epoch permutations of [0, n) in O(1) memory, evaluated for a whole batch of stream
positions at once.

Stream position p belongs to epoch p // n and reads record `permutation(seed, epoch)[p % n]`.
The permutation is a keyed Feistel network on the smallest number of bits covering n, with
cycle walking to stay inside [0, n) (the construction of Grain's `index_shuffle`, which
JFT-scale datasets need: a materialised permutation of 4B indices does not fit a host). Grain's
version is scalar (~18 us a call, as much as the rest of a record's read); this one is numpy
over a batch (~1.7 us a position for ImageNet's 1.28M records, ~0.7 us for 4B).
"""

from __future__ import annotations

import numpy as np

ROUNDS = 6  # Luby-Rackoff: 4 give a strong pseudo-random permutation; 2 spare for a cheap F

_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)  # splitmix64 finaliser


def _mix(x: np.ndarray) -> np.ndarray:
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


class EpochShuffle:
    """positions -> record indices; a new permutation of the n records every epoch."""

    def __init__(self, n: int, seed: int, rounds: int = ROUNDS):
        if n < 1:
            raise ValueError(f"shuffle: need at least one record, got n={n}")
        self.n, self.seed, self.rounds = n, seed, rounds
        bits = max(2, int(n - 1).bit_length())  # the domain [0, 2**bits) holds < 2n values
        self._widths = (bits // 2, bits - bits // 2)  # an unbalanced Feistel: (left, right)
        self._keys_cache: tuple[int, np.ndarray] | None = None

    def _keys(self, epoch: int) -> np.ndarray:
        cached = self._keys_cache
        if cached is None or cached[0] != epoch:
            cached = self._keys_cache = (
                epoch,
                np.random.SeedSequence([self.seed, epoch]).generate_state(self.rounds, np.uint64),
            )
        return cached[1]

    def _permute(self, x: np.ndarray, keys: np.ndarray) -> np.ndarray:
        """One pass of the Feistel bijection on [0, 2**bits): (L, R) -> (R, L ^ F(R)), the
        halves' widths swapping each round."""
        wl, wr = self._widths
        left, right = x >> np.uint64(wr), x & np.uint64((1 << wr) - 1)
        for key in keys:
            left, right = right, left ^ (_mix(right ^ key) & np.uint64((1 << wl) - 1))
            wl, wr = wr, wl
        return (left << np.uint64(wr)) | right

    def permutation_of(self, indices: np.ndarray, epoch: int) -> np.ndarray:
        """`permutation(seed, epoch)[indices]` for indices in [0, n)."""
        keys = self._keys(epoch)
        with np.errstate(over="ignore"):  # the mixing multiplies wrap mod 2**64 on purpose
            out = self._permute(np.asarray(indices, np.uint64), keys)
            outside = np.flatnonzero(out >= self.n)
            while outside.size:  # cycle walking back into [0, n): < 2 passes on average
                out[outside] = self._permute(out[outside], keys)
                outside = outside[out[outside] >= self.n]
        return out.astype(np.int64)

    def __call__(self, positions: np.ndarray) -> np.ndarray:
        """Record index of each stream position (any int array; epochs may mix)."""
        positions = np.asarray(positions, np.int64)
        if (positions < 0).any():
            raise ValueError("shuffle: stream positions must be >= 0")
        epochs, offsets = np.divmod(positions, self.n)
        out = np.empty_like(positions)
        for epoch in np.unique(epochs):
            sel = epochs == epoch
            out[sel] = self.permutation_of(offsets[sel], int(epoch))
        return out
