"""Calibrated uncertainty: the stated band ``predicted ± uncertainty`` is one sigma, and holds.

A predictor's raw standard deviation (the GP's posterior std, a forest's spread over its trees,
a constant for boosting) is only a shape: how wide it should be is learnt from out-of-fold
residuals, by split conformal calibration on normalised scores. For each out-of-fold prediction,
the score is |measured - predicted| / raw std (all in the metric's own scale); the stated
uncertainty is the raw std times ``scale``, the ceil((n + 1) * LEVEL)-th smallest score, so that
about ``LEVEL`` (68.3%, one Gaussian sigma) of held-out measurements lie inside the band.

The cross-validated ``coverage`` stored with a predictor is honest: rows of each fold are judged
with a scale learnt from the other folds' scores only (cross-conformal). ``coverage`` measures the
band of a trained predictor on architectures it never saw (``benchmarks/predictor_calibration.py``).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

__all__ = ["LEVEL", "conformal_scale", "coverage", "cross_coverage", "scores"]

LEVEL = 0.6827   # the share of measurements inside predicted ± uncertainty (one Gaussian sigma)


def scores(y: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """Normalised residuals |y - mean| / std (0 where both are 0, inf where only std is)."""
    y, mean, std = (np.asarray(a, dtype=float) for a in (y, mean, std))
    resid = np.abs(y - mean)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(std > 0, resid / np.where(std > 0, std, 1.0), np.where(resid > 0, np.inf, 0.0))
    return out


def conformal_scale(values: Sequence[float] | np.ndarray, level: float = LEVEL) -> float:
    """The split-conformal quantile of normalised scores: the ceil((n + 1) * level)-th smallest
    (the largest when that index passes n). 1.0 when there is nothing to learn from (no finite
    score, or every score 0: a constant predictor)."""
    s = np.sort(np.asarray(values, dtype=float))
    finite = s[np.isfinite(s)]
    if not len(finite) or not np.any(finite > 0):
        return 1.0
    k = min(len(s), max(1, math.ceil((len(s) + 1) * level)))
    q = s[k - 1]
    return float(q if np.isfinite(q) and q > 0 else finite.max())


def cross_coverage(values: np.ndarray, folds: Sequence[np.ndarray], level: float = LEVEL) -> float | None:
    """The share of out-of-fold rows inside their band when each fold's scale is learnt from the
    other folds' scores only (cross-conformal): an honest estimate of held-out coverage."""
    values = np.asarray(values, dtype=float)
    inside, total = 0, 0
    for te in folds:
        rest = np.ones(len(values), dtype=bool)
        rest[te] = False
        if not rest.any():
            continue
        scale = conformal_scale(values[rest], level)
        inside += int(np.sum(values[te] <= scale * (1 + 1e-12)))
        total += len(te)
    return inside / total if total else None


def coverage(predictor: Any, X: np.ndarray, y: Sequence[float] | np.ndarray) -> float:
    """The share of measured values ``y`` of architectures ``X`` (features, as the predictor was
    trained on) inside the stated band ``predicted ± uncertainty``."""
    mean, std = predictor.predict(np.asarray(X, dtype=float))
    resid = np.abs(np.asarray(y, dtype=float) - mean)
    return float(np.mean(resid <= std * (1 + 1e-12)))
