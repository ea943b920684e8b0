"""Non-dominated sorting with mixed directions, against brute force (ties included)."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from archopt.optimizer import crowding_distance, nondominated_ranks, pareto_mask


def brute(values, directions):
    F = np.asarray(values, float) * np.array([1 if d == "minimize" else -1 for d in directions])
    n = len(F)
    return np.array([not any(np.all(F[j] <= F[i]) and np.any(F[j] < F[i]) for j in range(n) if j != i)
                     for i in range(n)], dtype=bool)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(0, 40), m=st.integers(1, 3), seed=st.integers(0, 10**6), coarse=st.booleans())
def test_mask_matches_brute_force(n, m, seed, coarse):
    rng = np.random.default_rng(seed)
    F = rng.integers(0, 4, (n, m)).astype(float) if coarse else rng.random((n, m))
    dirs = [("minimize", "maximize")[int(rng.integers(0, 2))] for _ in range(m)]
    np.testing.assert_array_equal(pareto_mask(F.reshape(n, m), dirs), brute(F.reshape(n, m), dirs))


def test_ranks_peel_fronts():
    F = np.array([[1, 5], [2, 4], [3, 3], [2, 5], [3, 4], [4, 4], [1, 5]], float)
    r = nondominated_ranks(F, ["minimize", "minimize"])
    assert r.tolist() == [0, 0, 0, 1, 1, 2, 0]
    r2 = nondominated_ranks(F, ["minimize", "minimize"], max_rank=1)
    assert r2.tolist() == [0, 0, 0, 1, 1, 1, 0]


def test_mixed_directions_and_crowding():
    ppl = np.array([10.0, 12.0, 11.0, 9.0])
    acc = np.array([0.40, 0.50, 0.38, 0.30])
    F = np.c_[ppl, acc]
    mask = pareto_mask(F, ["minimize", "maximize"])
    assert mask.tolist() == [True, True, False, True]
    cd = crowding_distance(F[mask], ["minimize", "maximize"])
    assert np.isinf(cd).sum() == 2 and np.isfinite(cd).sum() == 1
    with pytest.raises(ValueError):
        pareto_mask(F, ["minimize", "up"])
