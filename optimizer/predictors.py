"""Non-neural accuracy predictors: (architecture features -> measured metric), with uncertainty.

``train_predictor`` follows the seed paper (a GBDT on per-layer pruning ratios) but lets k-fold
cross-validation choose among a few tree ensembles and a Gaussian process, because archives are
small and which model wins depends on the data; the candidate whose out-of-fold predictions rank
best (Kendall tau) wins. The Gaussian process (``gp``: an ARD RBF kernel plus white noise on the
standardised per-layer kept fractions; a candidate up to ``GP_MAX_ROWS`` training rows, since its
fit grows as n^3) is the most sample-efficient on pruning data: on ptb-llama-8l it ranks held-out
architectures with Kendall tau 0.85 from 25 measured ones where a GBDT reaches 0.68
(benchmarks/README.md). Each metric is modelled on the scale and in the direction that the metric
registry (``archdb.metrics``) gives it: perplexities on log scale, where the effect of pruning is
closer to additive, KL divergences on log(value + 1e-4), accuracies as they are.

Every prediction carries an uncertainty in the metric's own scale, calibrated to one sigma: about
68% of held-out measurements lie inside ``predicted ± uncertainty`` (``optimizer.calibration``).
Its shape is the model's own: the Gaussian process's posterior predictive standard deviation
(which includes the noise level its ``WhiteKernel`` learnt, so it does not shrink to zero at a
measured architecture), a forest's spread over its trees, a constant (relative, for log-scale
metrics) for boosting. Its width is a split-conformal scale learnt from the out-of-fold residuals
of cross-validation and stored with the predictor (``uncertainty_scale``).

Cross-validation is honest: every fold fits every candidate from scratch, the Gaussian process's
kernel hyperparameters included, so the scores stored in ``Predictor.cv`` (and shown by
``archopt predictors list`` and in every query answer) are out-of-fold scores of models that never
saw the rows they predict. ``cv["coverage"]`` is the cross-conformal share of held-out rows inside
the calibrated band.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np
import sklearn
from sklearn.dummy import DummyRegressor
from sklearn.ensemble import (ExtraTreesRegressor, GradientBoostingRegressor,
                              HistGradientBoostingRegressor, RandomForestRegressor)
from sklearn.model_selection import KFold
from sklearn.pipeline import Pipeline

from archopt.archdb.metrics import metric_info

from .calibration import LEVEL, conformal_scale, cross_coverage, scores as _norm_scores
from .residual import ProfileResidualForest
# The GP pieces live in optimizer/gp.py; the old private names stay importable here, because
# artifacts stored before the move pickled them under this module.
from .gp import _lbfgs, _QuietGP, _select_columns, gp_columns, gp_importances, gp_mean, gp_pipeline  # noqa: F401
from .gp import input_columns as _input_columns

__all__ = ["ALGORITHMS", "Predictor", "train_predictor", "metric_direction", "metric_transform",
           "kendall_tau", "spearman"]

ALGORITHMS = ("gbdt", "random_forest", "extra_trees", "hist_gbdt", "gp", "profile_trees")
PROFILE_ALGORITHMS = ("profile_trees",)   # need the damage_sum feature (a sensitivity profile)
_KL_EPS = 1e-4
_STD_FLOOR = 0.25   # share of the mean out-of-fold raw std added to every raw std
GP_MAX_ROWS = 400   # above, the GP's O(n^3) fit costs more than it gains over trees: not a candidate


class _OneThread:
    """Native thread pools limited to one thread while any caller needs it, from any Python thread.

    The limits are process state that the trainer thread and request threads share, so they are
    never entered and restored per call blindly (a first caller leaving would restore the old
    limits under a second one still inside). BLAS limits (OpenBLAS, MKL) are process-wide: the
    first caller in sets them, the last one out restores them (a lock-protected count). OpenMP
    limits (libgomp, libomp) belong to the calling thread: each caller sets and restores its own.
    One instance per process (``single_thread``), because the pools it guards are one per process.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._users = 0
        self._blas_limiter: Any = None
        self._pools: tuple[Any, Any] | None = None   # (BLAS controller, OpenMP controller)

    def _controllers(self) -> tuple[Any, Any]:
        if self._pools is None:   # ~7 ms (scans the loaded libraries): once
            from threadpoolctl import ThreadpoolController
            found = ThreadpoolController()
            self._pools = (found.select(user_api="blas"), found.select(user_api="openmp"))
        return self._pools

    @contextlib.contextmanager
    def limit(self) -> Iterator[None]:
        with self._lock:
            blas, openmp = self._controllers()
            if self._users == 0:
                self._blas_limiter = blas.limit(limits=1)
            self._users += 1
        try:
            own = openmp.limit(limits=1)
            try:
                yield
            finally:
                own.restore_original_limits()
        finally:
            with self._lock:
                self._users -= 1
                if self._users == 0:
                    self._blas_limiter.restore_original_limits()
                    self._blas_limiter = None


_ONE_THREAD = _OneThread()


def single_thread() -> contextlib.AbstractContextManager[None]:
    """Context limiting OpenMP/BLAS to one thread, safe to enter from several threads at once.
    Scoring small batches with HistGradientBoosting on 2 busy cores is up to 20x slower with OpenMP
    threads (start-up and spin-waits per tree)."""
    return _ONE_THREAD.limit()


def metric_direction(metric: str) -> str:
    """``"minimize"`` or ``"maximize"``, as the metric registry (``archdb.metrics``) says; a name it
    does not know is maximised."""
    return metric_info(metric, strict=False).direction


def metric_transform(metric: str) -> str:
    """The modelling scale from the metric registry: ``"log"`` (perplexities), ``"log_eps"`` (log of
    value + 1e-4: KL divergences) or ``"identity"``."""
    return metric_info(metric, strict=False).transform


def _forward(y: np.ndarray, kind: str) -> np.ndarray:
    y = np.asarray(y, dtype=float)
    if kind == "log":
        if np.any(y <= 0):
            raise ValueError("perplexity values must be positive")
        return np.log(y)
    if kind == "log_eps":
        if np.any(y < 0):
            raise ValueError("KL divergence values must be non-negative")
        return np.log(y + _KL_EPS)
    return y


def _inverse(t: np.ndarray, kind: str) -> np.ndarray:
    if kind == "log":
        return np.exp(t)
    if kind == "log_eps":
        return np.maximum(np.exp(t) - _KL_EPS, 0.0)
    return t


def _estimator(name: str, n: int, seed: int, columns: Sequence[int] | None = None, damage: int | None = None):
    """Modest hyperparameters: on this project's 2-core machines, 5-fold CV of all candidates
    plus the final fit on 200 rows x 90 features takes a few seconds. Tree count is what costs
    (scikit-learn spends ~1.5 ms of Python per tree), so ensembles stay small and shallow; the
    Gaussian process costs O(n^3) per hyperparameter step, cheap at archive sizes (hundreds)."""
    leaf = max(1, min(5, n // 40))
    if name == "gp":
        return gp_pipeline(columns if columns is not None else [], seed)
    if name == "gbdt":
        return GradientBoostingRegressor(n_estimators=60, learning_rate=0.12, max_depth=3, subsample=0.8,
                                         max_features=0.5, min_samples_leaf=leaf, random_state=seed)
    if name == "random_forest":
        return RandomForestRegressor(n_estimators=30, max_features=0.33, min_samples_leaf=leaf,
                                     random_state=seed, n_jobs=1)
    if name == "extra_trees":
        return ExtraTreesRegressor(n_estimators=30, max_features=0.5, min_samples_leaf=leaf,
                                   random_state=seed, n_jobs=1)
    if name == "profile_trees":
        return ProfileResidualForest(damage_column=-1 if damage is None else damage, n_estimators=30,
                                     max_features=0.5, min_samples_leaf=leaf, random_state=seed)
    if name == "hist_gbdt":
        return HistGradientBoostingRegressor(max_iter=60, learning_rate=0.15, max_depth=3, max_bins=64,
                                             min_samples_leaf=max(2, min(10, n // 20)),
                                             l2_regularization=0.1, early_stopping=False,
                                             random_state=seed)
    raise ValueError(f"unknown predictor algorithm {name!r} (choose from {', '.join(ALGORITHMS)})")


def _clean(value: float) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def kendall_tau(a: np.ndarray, b: np.ndarray) -> float:
    """Kendall's tau-b (``nan`` when either side is constant or fewer than 2 points)."""
    from scipy.stats import kendalltau
    if len(a) < 2:
        return float("nan")
    return float(kendalltau(a, b).statistic)


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr
    if len(a) < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(spearmanr(a, b).statistic)


def _scores(y: np.ndarray, pred: np.ndarray, y_t: np.ndarray, pred_t: np.ndarray) -> dict[str, float | None]:
    def r2(a, p):
        ss = float(np.sum((a - a.mean()) ** 2))
        return 1.0 - float(np.sum((a - p) ** 2)) / ss if ss > 0 else float("nan")
    return {
        "r2": _clean(r2(y, pred)),
        "r2_transformed": _clean(r2(y_t, pred_t)),
        "mae": _clean(float(np.mean(np.abs(y - pred)))),
        "rmse": _clean(float(np.sqrt(np.mean((y - pred) ** 2)))),
        "kendall_tau": _clean(kendall_tau(y, pred)),
        "spearman": _clean(spearman(y, pred)),
    }


@dataclass
class Predictor:
    """A trained predictor of one metric. Picklable with joblib (scikit-learn objects and numpy only)."""

    metric: str
    algorithm: str
    hyperparams: dict[str, Any]
    cv: dict[str, Any]
    n_train: int
    feature_names: list[str]
    transform: str
    direction: str
    model: Any
    members: list[Any] = field(default_factory=list)   # boosting's CV fold models (artifacts before calibration)
    featurizer: Any = None                              # optional features.Featurizer
    seed: int = 0
    feature_min: list[float] = field(default_factory=list)   # training range per feature
    feature_max: list[float] = field(default_factory=list)
    sklearn_version: str = sklearn.__version__
    train_seconds: float = 0.0
    uncertainty_scale: float = 1.0      # conformal scale of the raw std (1.0: an uncalibrated artifact)
    std_floor: float = 0.0              # added to the raw std on the model scale (``_STD_FLOOR``)
    coverage_level: float | None = None  # the share of measurements the calibrated band is meant to hold
    _importances: dict[str, float] | None = field(default=None, repr=False)
    _train_X: np.ndarray | None = field(default=None, repr=False)

    @property
    def n_features(self) -> int:
        return len(self.feature_names)

    def _check(self, X: np.ndarray) -> np.ndarray:
        X = np.asarray(X, dtype=float)
        if X.ndim == 1:
            X = X[None, :]
        if X.shape[1] != self.n_features:
            raise ValueError(f"predictor for {self.metric} expects {self.n_features} features, got {X.shape[1]}")
        return X

    def predict_transformed(self, X: np.ndarray) -> np.ndarray:
        """Mean prediction on the model scale (log for ppl/kl)."""
        X = self._check(X)
        if self.algorithm == "gp":
            fast = gp_mean(self.model, X)
            if fast is not None:
                return fast
        with single_thread():
            return self.model.predict(X)

    def predict_mean(self, X: np.ndarray) -> np.ndarray:
        return _inverse(self.predict_transformed(X), self.transform)

    def predict(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(mean, std)`` in the metric's original scale, vectorised over rows of ``X``; ``std`` is
        calibrated: about ``coverage_level`` of measurements lie within ``mean ± std``."""
        X = self._check(X)
        with single_thread():
            mean, std = raw_prediction(self.algorithm, self.model, X, self.transform, self.members, self.std_floor)
        return mean, std * self.uncertainty_scale

    def predict_architectures(self, data, importance=None) -> tuple[np.ndarray, np.ndarray]:
        """Predict for a ``LayerBatch`` or architectures, through the stored featurizer."""
        if self.featurizer is None:
            raise ValueError("this predictor has no featurizer: featurize yourself and call predict(X)")
        return self.predict(self.featurizer.transform(data, importance))

    def training_range(self) -> dict[str, tuple[float, float]]:
        """``{feature: (min, max)}`` seen in training (predictions outside extrapolate flat)."""
        return {n: (lo, hi) for n, lo, hi in zip(self.feature_names, self.feature_min, self.feature_max)}

    def feature_importances(self) -> dict[str, float]:
        """Importance per feature name (non-negative, summing to 1), largest first."""
        if self._importances is None:
            raw = _raw_importances(self)
            total = float(raw.sum())
            raw = raw / total if total > 0 else np.full(len(raw), 1.0 / max(1, len(raw)))
            order = np.argsort(-raw, kind="stable")
            self._importances = {self.feature_names[i]: float(raw[i]) for i in order}
        return dict(self._importances)

    def summary(self) -> dict[str, Any]:
        """JSON-ready description (no model)."""
        return {"metric": self.metric, "algorithm": self.algorithm, "hyperparams": self.hyperparams,
                "cv": self.cv, "n_train": self.n_train, "n_features": self.n_features,
                "transform": self.transform, "direction": self.direction, "seed": self.seed,
                "sklearn_version": self.sklearn_version, "train_seconds": round(self.train_seconds, 3)}


def raw_prediction(algorithm: str, model: Any, X: np.ndarray, transform: str, members: Sequence[Any] = (),
                   floor: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """``(mean, raw std)`` of a fitted model in the metric's original scale, before calibration.
    The raw std is ``floor`` plus, on the model scale, the GP's posterior std, a forest's spread
    over its trees, boosting's fold models' spread (old artifacts) or 1 (boosting); 0 for a
    constant model. It reaches the original scale by the delta method (the std of exp(t) is about
    exp(t) * std(t))."""
    t, sigma = _raw_model_scale(algorithm, model, X, members)
    if isinstance(model, DummyRegressor):
        return _inverse(t, transform), np.zeros(len(X))
    return _inverse(t, transform), (sigma + floor) * _slope(t, transform)


def _raw_model_scale(algorithm: str, model: Any, X: np.ndarray, members: Sequence[Any] = ()) -> tuple[np.ndarray, np.ndarray]:
    """(mean, raw std) on the model scale (see ``raw_prediction``)."""
    if isinstance(model, DummyRegressor):
        return model.predict(X), np.zeros(len(X))
    if algorithm == "gp" and isinstance(model, Pipeline):
        mu, sd = model.predict(X, return_std=True)
        return mu, np.asarray(sd, dtype=float)
    t = model.predict(X)
    forests = ("random_forest", "extra_trees", "profile_trees")
    trees = list(getattr(model, "estimators_", [])) if algorithm in forests else list(members)
    if len(trees) >= 2:
        return t, np.stack([m.predict(X) for m in trees]).std(axis=0)
    return t, np.ones(len(X))


def _slope(t: np.ndarray, transform: str) -> np.ndarray | float:
    """d value / d t of the inverse transform at ``t`` (the delta method's factor)."""
    return np.exp(np.asarray(t, dtype=float)) if transform in ("log", "log_eps") else 1.0


def _raw_importances(p: Predictor) -> np.ndarray:
    model = p.model
    if isinstance(model, DummyRegressor):
        return np.zeros(p.n_features)
    if getattr(model, "feature_importances_", None) is not None:
        return np.asarray(model.feature_importances_, dtype=float)
    if isinstance(model, Pipeline) and "gp" in model.named_steps:
        return gp_importances(model, p.n_features)
    # HistGradientBoosting: total split gain per feature (its tree nodes carry gains).
    gains = np.zeros(p.n_features)
    try:
        for stage in model._predictors:
            for tree in stage:
                nodes = tree.nodes[~tree.nodes["is_leaf"].astype(bool)]
                np.add.at(gains, nodes["feature_idx"], np.maximum(nodes["gain"], 0.0))
        return gains
    except AttributeError:  # private layout changed: permutation importance on the training rows
        from sklearn.inspection import permutation_importance
        X = p._train_X
        y = model.predict(X)
        res = permutation_importance(model, X, y, n_repeats=3, random_state=p.seed)
        return np.maximum(res.importances_mean, 0.0)


def _fold_count(n: int, folds: int) -> int:
    return n if n < folds else folds


def _cross_validate(name: str, X: np.ndarray, y: np.ndarray, y_t: np.ndarray, kind: str,
                    splits: Sequence[tuple[np.ndarray, np.ndarray]], seed: int,
                    columns: Sequence[int], damage: int | None = None) -> dict[str, Any]:
    """Out-of-fold scores of one candidate: each fold fits it from scratch on its training rows
    (hyperparameters included: the GP's kernel is fitted per fold), predicts the held-out rows,
    and gives each one's raw std; ``norm_scores`` are |residual| / raw std (original scale), the
    raw std plus ``_STD_FLOOR`` of its mean (a forest whose trees agree on a row would
    otherwise claim certainty there)."""
    n = len(y)
    oof, sigma = np.empty(n), np.empty(n)
    for tr, te in splits:
        if np.ptp(y_t[tr]) == 0:
            model_f = _constant(X[tr], y_t[tr])
        else:
            model_f = _estimator(name, len(tr), seed, columns, damage).fit(X[tr], y_t[tr])
        oof[te], sigma[te] = _raw_model_scale(name, model_f, X[te])
    mean = _inverse(oof, kind)
    scores = _scores(y, mean, y_t, oof)
    scores["mse_transformed"] = float(np.mean((oof - y_t) ** 2))
    floor = _STD_FLOOR * float(np.mean(sigma))
    return {"scores": scores, "floor": floor,
            "norm_scores": _norm_scores(y, mean, (sigma + floor) * _slope(oof, kind))}


def train_predictor(X: np.ndarray, y: Sequence[float], metric: str, *, seed: int = 0, folds: int = 5,
                    candidates: Sequence[str] = ALGORITHMS, feature_names: Sequence[str] | None = None,
                    featurizer: Any = None) -> Predictor:
    """Choose an algorithm by k-fold CV, fit it on all rows, and return a ``Predictor``.

    ``X``: ``[n, p]`` features (``n >= 2``; with fewer rows than ``folds``, leave-one-out), ``y``:
    measured values of ``metric``. CV scores (``r2``, ``mae``, ``rmse`` in the original scale,
    ``r2_transformed``, ``kendall_tau``, ``spearman``) come from pooled out-of-fold predictions;
    the algorithm whose out-of-fold predictions rank best (Kendall tau: the search only needs the
    order, and squared error is dominated by a few ruined architectures far from any optimum) wins;
    lower out-of-fold squared error on the model scale breaks ties (then the first listed). Every
    fold refits every candidate, hyperparameters included. The winner's out-of-fold residuals
    calibrate its uncertainty (``uncertainty_scale``; ``cv["coverage"]``, ``cv["calibration"]``).
    Deterministic for a seed. ``featurizer`` (a ``features.Featurizer``) is stored so callers can
    predict from architectures; its names are used when ``feature_names`` is not given.
    """
    start = time.perf_counter()
    X = np.asarray(X, dtype=float)
    y = np.asarray(y, dtype=float).ravel()
    if X.ndim != 2 or len(X) != len(y):
        raise ValueError(f"X must be [n, p] with one row per value of y (got {X.shape} and {y.shape})")
    n = len(y)
    if n < 2:
        raise ValueError(f"a predictor needs at least 2 measured architectures, got {n}")
    if not np.all(np.isfinite(y)) or not np.all(np.isfinite(X)):
        raise ValueError("features and targets must be finite")
    if feature_names is None:
        feature_names = featurizer.names if featurizer is not None else [f"x{i}" for i in range(X.shape[1])]
    feature_names = list(feature_names)
    if len(feature_names) != X.shape[1]:
        raise ValueError(f"{len(feature_names)} feature names for {X.shape[1]} features")
    candidates = list(dict.fromkeys(candidates))
    damage = feature_names.index("damage_sum") if "damage_sum" in feature_names else None
    if damage is None:   # without a sensitivity profile these have nothing to stand on
        candidates = [c for c in candidates if c not in PROFILE_ALGORITHMS]
    if n > GP_MAX_ROWS and len(candidates) > 1:
        candidates = [c for c in candidates if c != "gp"]
    if not candidates:
        raise ValueError("no candidate algorithms")
    for c in candidates:
        _estimator(c, n, seed)  # validates the name
    columns = gp_columns(feature_names, X.shape[1])
    kind = metric_transform(metric)
    y_t = _forward(y, kind)

    k = _fold_count(n, folds)
    splits = list(KFold(n_splits=k, shuffle=True, random_state=seed).split(X))
    per_algo: dict[str, dict[str, Any]] = {}
    best, best_key = candidates[0], (math.inf, math.inf)
    # One thread: on tiny data OpenMP start-up (HistGradientBoosting) costs more than it saves.
    with single_thread():
        for name in candidates:
            per_algo[name] = _cross_validate(name, X, y, y_t, kind, splits, seed, columns, damage)
            scores = per_algo[name]["scores"]
            tau = scores["kendall_tau"]
            key = (-round(tau, 9) if tau is not None else math.inf, scores["mse_transformed"])
            if key < best_key:
                best, best_key = name, key
        model = _constant(X, y_t) if np.ptp(y_t) == 0 else _estimator(best, n, seed, columns, damage).fit(X, y_t)
    norm, floor = per_algo[best]["norm_scores"], per_algo[best]["floor"]
    scale = conformal_scale(norm)
    cv = dict(per_algo[best]["scores"])
    cv.update({"folds": k, "scheme": "leave-one-out" if k == n else f"{k}-fold",
               "coverage": _clean(cross_coverage(norm, [te for _, te in splits])),
               "calibration": {"level": LEVEL, "scale": _clean(scale),
                               "coverage_uncalibrated": _clean(float(np.mean(norm <= 1.0))),
                               "method": "split-conformal scale of the raw std on out-of-fold residuals"},
               "candidates": {c: {key: per_algo[c]["scores"][key]
                                  for key in ("r2_transformed", "kendall_tau", "mae")} for c in candidates}})
    return Predictor(metric=metric, algorithm=best, hyperparams=_hyperparams(model), cv=cv, n_train=n,
                     feature_names=feature_names, transform=kind, direction=metric_direction(metric),
                     model=model, featurizer=featurizer, seed=seed, uncertainty_scale=scale, std_floor=floor,
                     coverage_level=LEVEL,
                     feature_min=X.min(0).tolist(), feature_max=X.max(0).tolist(),
                     train_seconds=time.perf_counter() - start, _train_X=X if best == "hist_gbdt" else None)


def _constant(X: np.ndarray, y: np.ndarray) -> DummyRegressor:
    """Stands in for a model when every training target is equal (trees cannot split)."""
    return DummyRegressor(strategy="mean").fit(X, y)


def _hyperparams(model) -> dict[str, Any]:
    if isinstance(model, Pipeline) and "gp" in model.named_steps:
        return {"kernel": str(model.named_steps["gp"].kernel_), "inputs": len(_input_columns(model))}
    keep = ("n_estimators", "learning_rate", "max_depth", "subsample", "min_samples_leaf", "max_features",
            "max_iter", "max_leaf_nodes", "l2_regularization")
    params = model.get_params()
    return {k: params[k] for k in keep if k in params}
