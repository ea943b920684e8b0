"""Scoring candidates for the search: predictions in vectorised batches, the pool of every distinct
candidate scored so far, and NSGA-II-style selection (non-dominated rank, then crowding)."""

from __future__ import annotations

import time
from typing import Any, Mapping, Sequence

import numpy as np

from archopt.archdb.arch import BaseSpec
from archopt.archdb.errors import ArchoptError

from .encoding import LayerBatch
from .pareto import _mask_min, crowding_distance

ORIGINS = ("warm", "uniform", "random", "optuna", "evolution")   # where a pooled candidate came from


class SearchError(ArchoptError, ValueError):
    """A search that cannot run as asked (no predictor for an objective, a target out of reach): one line."""


class Scorer:
    """Featurises a batch once per distinct featurizer and predicts the objectives' means."""

    def __init__(self, predictors: Mapping[str, Any], objectives: Sequence[str]) -> None:
        self.predictors = dict(predictors)
        self.objectives = list(objectives)
        for name in self.objectives:
            p = self.predictors[name]
            if getattr(p, "featurizer", None) is None:
                raise SearchError(f"predictor for {name!r} has no featurizer: train it with "
                                 f"train_predictor(..., featurizer=Featurizer(...))")
        self.seconds = 0.0

    def _features(self, batch: LayerBatch, names: Sequence[str]) -> dict[int, np.ndarray]:
        cache: dict[int, np.ndarray] = {}
        for name in names:
            fz = self.predictors[name].featurizer
            if id(fz) not in cache:
                cache[id(fz)] = fz.transform(batch)
        return cache

    def means(self, batch: LayerBatch) -> np.ndarray:
        t = time.perf_counter()
        if len(batch) == 0:
            return np.zeros((0, len(self.objectives)))
        feats = self._features(batch, self.objectives)
        cols = [np.asarray(self.predictors[n].predict_mean(feats[id(self.predictors[n].featurizer)]), dtype=float)
                for n in self.objectives]
        self.seconds += time.perf_counter() - t
        return np.stack(cols, axis=1)

    def full(self, batch: LayerBatch) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Mean and std of every predictor that can featurise this base model."""
        means, stds = {}, {}
        for name, p in self.predictors.items():
            fz = getattr(p, "featurizer", None)
            if fz is None:
                continue
            try:
                X = fz.transform(batch)
            except ValueError:
                continue
            if hasattr(p, "predict"):
                m, s = p.predict(X)
            else:
                m, s = p.predict_mean(X), np.zeros(len(batch))
            means[name], stds[name] = np.asarray(m, dtype=float), np.asarray(s, dtype=float)
        return means, stds


class CandidatePool:
    """Every distinct candidate scored so far."""

    def __init__(self, spec: BaseSpec, lo: int, hi: int, n_obj: int) -> None:
        self.spec, self.lo, self.hi = spec, lo, hi
        self.seen: set[bytes] = set()
        self.kv: list[np.ndarray] = []
        self.inter: list[np.ndarray] = []
        self.F: list[np.ndarray] = []
        self.params: list[np.ndarray] = []
        self.origin: list[np.ndarray] = []
        self.n_obj = n_obj
        self._cat: tuple | None = None

    def new_rows(self, batch: LayerBatch) -> np.ndarray:
        keys = np.concatenate([batch.kv, batch.inter], axis=1).astype(np.int64)
        keep = []
        local: set[bytes] = set()
        for i, row in enumerate(keys):
            k = row.tobytes()
            if k in self.seen or k in local:
                continue
            local.add(k)
            keep.append(i)
        return np.asarray(keep, dtype=np.int64)

    def add(self, batch: LayerBatch, F: np.ndarray, origin: str) -> None:
        keys = np.concatenate([batch.kv, batch.inter], axis=1).astype(np.int64)
        for row in keys:
            self.seen.add(row.tobytes())
        self.kv.append(batch.kv)
        self.inter.append(batch.inter)
        self.F.append(F)
        self.params.append(batch.params)
        self.origin.append(np.full(len(batch), ORIGINS.index(origin), dtype=np.int8))
        self._cat = None

    def arrays(self):
        if self._cat is None:
            if not self.kv:
                L = self.spec.num_layers
                self._cat = (np.zeros((0, L), np.int64), np.zeros((0, L), np.int64),
                             np.zeros((0, self.n_obj)), np.zeros(0, np.int64), np.zeros(0, np.int8))
            else:
                self._cat = (np.concatenate(self.kv), np.concatenate(self.inter), np.concatenate(self.F),
                             np.concatenate(self.params), np.concatenate(self.origin))
        return self._cat

    @property
    def size(self) -> int:
        return len(self.seen)

    def feasible(self) -> np.ndarray:
        _, _, _, p, _ = self.arrays()
        return np.flatnonzero((p >= self.lo) & (p <= self.hi))


def select_best(Fmin: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` best rows (minimisation): non-dominated rank, then crowding distance."""
    n = len(Fmin)
    if n <= k:
        order = np.arange(n)
        return order[np.lexsort(Fmin.T[::-1])] if n else order
    if Fmin.shape[1] == 1:
        return np.argsort(Fmin[:, 0], kind="stable")[:k]
    # pre-filter: a row outside the best 4k of every objective is rarely needed
    keep = np.zeros(n, dtype=bool)
    for j in range(Fmin.shape[1]):
        keep[np.argsort(Fmin[:, j], kind="stable")[:4 * k]] = True
    remaining = np.flatnonzero(keep)
    chosen: list[np.ndarray] = []
    count = 0
    while count < k and len(remaining):
        mask = _mask_min(Fmin[remaining])
        front = remaining[mask]
        if count + len(front) > k:
            cd = crowding_distance(Fmin[front], ["minimize"] * Fmin.shape[1])
            front = front[np.argsort(-cd, kind="stable")[:k - count]]
        chosen.append(front)
        count += len(front)
        remaining = remaining[~mask]
    return np.concatenate(chosen) if chosen else np.zeros(0, dtype=np.int64)


def score_into(pool: CandidatePool, scorer: Scorer, batch: LayerBatch, origin: str, limit: int | None = None) -> LayerBatch:
    rows = pool.new_rows(batch)
    if limit is not None:
        rows = rows[:max(0, limit)]
    sub = batch.take(rows)
    if len(sub):
        pool.add(sub, scorer.means(sub), origin)
    return sub
