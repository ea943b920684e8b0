"""``profile_trees``: a line on the sensitivity profile's summed damage plus extra trees on what the
line leaves.

The additive model of single-layer damages (``optimizer.profile``) ranks architectures well with
no training pair at all, but trees cannot extrapolate it and learn it only from many pairs. This
estimator fits ``y ~ a + b * damage_sum`` (``b >= 0``) and an ``ExtraTreesRegressor`` on the
residual over every feature, so a few dozen measured architectures correct the additive model
where interactions between layers break it. A scikit-learn estimator (picklable, refitted per
cross-validation fold like every candidate).
"""

from __future__ import annotations

import numpy as np
from sklearn.base import BaseEstimator, RegressorMixin
from sklearn.ensemble import ExtraTreesRegressor
from sklearn.linear_model import LinearRegression

__all__ = ["ProfileResidualForest"]


class ProfileResidualForest(RegressorMixin, BaseEstimator):
    """``line(X[:, damage_column]) + trees(X)``; ``estimators_`` are the residual's trees (their
    spread is the raw uncertainty, as for a forest)."""

    def __init__(self, damage_column: int = -1, n_estimators: int = 30, max_features: float = 0.5,
                 min_samples_leaf: int = 1, random_state: int | None = None) -> None:
        self.damage_column = damage_column
        self.n_estimators = n_estimators
        self.max_features = max_features
        self.min_samples_leaf = min_samples_leaf
        self.random_state = random_state

    def _line_input(self, X: np.ndarray) -> np.ndarray:
        return np.asarray(X, dtype=float)[:, [self.damage_column]]

    def fit(self, X: np.ndarray, y: np.ndarray) -> "ProfileResidualForest":
        X = np.asarray(X, dtype=float)
        y = np.asarray(y, dtype=float)
        self.line_ = LinearRegression(positive=True).fit(self._line_input(X), y)
        trend = self.line_.predict(self._line_input(X))
        residual = y - trend
        self.forest_ = ExtraTreesRegressor(n_estimators=self.n_estimators, max_features=self.max_features,
                                           min_samples_leaf=self.min_samples_leaf,
                                           random_state=self.random_state, n_jobs=1).fit(X, residual)
        spread = float(np.var(trend)) + float(np.var(residual))
        self.line_share_ = float(np.var(trend)) / spread if spread > 0 else 0.0
        self.n_features_in_ = X.shape[1]
        return self

    def predict(self, X: np.ndarray) -> np.ndarray:
        X = np.asarray(X, dtype=float)
        return self.line_.predict(self._line_input(X)) + self.forest_.predict(X)

    @property
    def estimators_(self) -> list:
        return self.forest_.estimators_

    @property
    def feature_importances_(self) -> np.ndarray:
        """The trees' importances, with the line's share of the explained spread on the damage column."""
        out = (1.0 - self.line_share_) * np.asarray(self.forest_.feature_importances_, dtype=float)
        out[self.damage_column] += self.line_share_
        return out
