"""Non-dominated sorting for objectives with mixed directions (numpy).

``values`` is ``[N, M]``; ``directions`` holds ``"minimize"`` or ``"maximize"`` per column. A point
dominates another when it is at least as good in every objective and better in one; equal points
do not dominate each other (both stay on the front).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = ["to_minimization", "pareto_mask", "nondominated_ranks", "crowding_distance", "dominates"]


def to_minimization(values: np.ndarray, directions: Sequence[str]) -> np.ndarray:
    F = np.asarray(values, dtype=float)
    if F.ndim == 1:
        F = F[:, None]
    if F.shape[1] != len(directions):
        raise ValueError(f"{F.shape[1]} objective columns but {len(directions)} directions")
    sign = np.array([1.0 if d == "minimize" else -1.0 if d == "maximize" else np.nan for d in directions])
    if np.isnan(sign).any():
        raise ValueError(f"directions must be 'minimize' or 'maximize', got {list(directions)}")
    return F * sign


def dominates(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether minimisation vector ``a`` dominates ``b``."""
    return bool(np.all(a <= b) and np.any(a < b))


def _mask_min(F: np.ndarray) -> np.ndarray:
    n, m = F.shape
    if n == 0:
        return np.zeros(0, dtype=bool)
    if m == 1:
        return F[:, 0] == F[:, 0].min()
    if m == 2:
        order = np.lexsort((F[:, 1], F[:, 0]))  # by f0, then f1
        f0, f1 = F[order, 0], F[order, 1]
        new_group = np.r_[True, f0[1:] != f0[:-1]]
        group_id = np.cumsum(new_group) - 1
        starts = np.flatnonzero(new_group)
        group_min = f1[starts][group_id]                 # smallest f1 within the same f0
        cummin = np.minimum.accumulate(f1)
        prev_best = np.r_[np.inf, cummin[starts[1:] - 1]][group_id]  # best f1 with strictly smaller f0
        keep_sorted = (f1 == group_min) & (group_min < prev_best)
        mask = np.zeros(n, dtype=bool)
        mask[order] = keep_sorted
        return mask
    # General case: sweep in lexicographic order against the growing front (front is usually small).
    order = np.lexsort(F.T[::-1])
    front: list[int] = []
    for i in order:
        p = F[i]
        if front:
            Q = F[front]
            if np.any(np.all(Q <= p, axis=1) & np.any(Q < p, axis=1)):
                continue
        front.append(i)
    mask = np.zeros(n, dtype=bool)
    mask[front] = True
    return mask


def pareto_mask(values: np.ndarray, directions: Sequence[str]) -> np.ndarray:
    """Boolean mask of the non-dominated rows of ``values``."""
    return _mask_min(to_minimization(values, directions))


def nondominated_ranks(values: np.ndarray, directions: Sequence[str], max_rank: int | None = None) -> np.ndarray:
    """Front index per row (0 = non-dominated); rows beyond ``max_rank`` fronts get ``max_rank``."""
    F = to_minimization(values, directions)
    n = len(F)
    ranks = np.full(n, -1 if max_rank is None else max_rank, dtype=np.int64)
    remaining = np.arange(n)
    r = 0
    while len(remaining) and (max_rank is None or r < max_rank):
        m = _mask_min(F[remaining])
        ranks[remaining[m]] = r
        remaining = remaining[~m]
        r += 1
    return ranks


def crowding_distance(values: np.ndarray, directions: Sequence[str]) -> np.ndarray:
    """NSGA-II crowding distance within one set of points (boundary points: inf)."""
    F = to_minimization(values, directions)
    n, m = F.shape
    dist = np.zeros(n)
    if n <= 2:
        return np.full(n, np.inf)
    for j in range(m):
        order = np.argsort(F[:, j], kind="stable")
        span = F[order[-1], j] - F[order[0], j]
        dist[order[0]] = dist[order[-1]] = np.inf
        if span > 0:
            dist[order[1:-1]] += (F[order[2:], j] - F[order[:-2], j]) / span
    return dist
