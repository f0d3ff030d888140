"""``kmedtl.data.hashing.popcount``: ``np.bitwise_count`` on numpy >= 2, a byte table on
numpy 1.x (the tensorflow-io environment of ``.ci/tfio.sh``); both give the same counts."""

import numpy as np
import pytest

from kmedtl.data import hashing


@pytest.mark.parametrize("numpy1", [False, True])
def test_popcount_counts_set_bits_with_and_without_np_bitwise_count(numpy1, monkeypatch):
    if numpy1:
        monkeypatch.delattr(np, "bitwise_count", raising=False)
    elif not hasattr(np, "bitwise_count"):
        pytest.skip("numpy < 2 here: the byte-table case covers it")
    rng = np.random.default_rng(0)
    h = rng.integers(0, 2**63, size=(5, 7), dtype=np.int64).view(np.uint64)
    h[0, 0], h[0, 1] = 0, np.uint64(2**64 - 1)
    got = hashing.popcount(h)
    assert got.dtype == np.uint8 and got.shape == h.shape
    assert got.tolist() == [[bin(int(v)).count("1") for v in row] for row in h]
    assert got[0, 0] == 0 and got[0, 1] == 64
    # signed: bits of the absolute value, as np.bitwise_count counts them
    signed = hashing.popcount(np.array([-1, 5, -2**63], dtype=np.int64))
    assert signed.tolist() == [1, 2, 1]
    pairs = hashing.hamming_pairs(np.array([0, 1, 3, 2**40], dtype=np.uint64), 1)
    assert pairs == [(0, 1), (0, 3), (1, 2)]
