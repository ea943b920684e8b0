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

Every prediction carries a standard deviation in the metric's own scale. For the tree ensembles it
is the spread of the ensemble's members (the trees of a random / extra-trees forest; for boosting,
the k models fitted during cross-validation, each on (k-1)/k of the rows, a CV+ / jackknife
ensemble that costs no extra training): epistemic spread only. The Gaussian process gives its
posterior predictive standard deviation, which includes the noise level its ``WhiteKernel`` learnt
(the scatter of repeated measurements), so it does not shrink to zero at a measured architecture.
The held-out error of the whole model is in ``Predictor.cv``.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import re
import warnings

import numpy as np
import sklearn
from sklearn.compose import ColumnTransformer
from sklearn.dummy import DummyRegressor
from sklearn.exceptions import ConvergenceWarning
from sklearn.gaussian_process import GaussianProcessRegressor
from sklearn.gaussian_process.kernels import RBF, ConstantKernel, WhiteKernel
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.ensemble import (ExtraTreesRegressor, GradientBoostingRegressor,
                              HistGradientBoostingRegressor, RandomForestRegressor)
from sklearn.model_selection import KFold

from archopt.archdb.metrics import metric_info

__all__ = ["ALGORITHMS", "Predictor", "train_predictor", "metric_direction", "metric_transform",
           "kendall_tau", "spearman"]

ALGORITHMS = ("gbdt", "random_forest", "extra_trees", "hist_gbdt", "gp")
_GP_COLUMNS = re.compile(r"^(attn|mlp)_l\d+$")
_GP_FALLBACK = re.compile(r"^((attn|mlp)_p\d+|param_frac)$")
_KL_EPS = 1e-4
GP_REFIT_ROWS = 80
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


def _select_columns(columns: Sequence[int]) -> ColumnTransformer:
    """Keeps the columns ``columns`` (indices, in that order) of a feature matrix."""
    return ColumnTransformer([("inputs", "passthrough", list(columns))], remainder="drop")


def _input_columns(model: Pipeline) -> list[int]:
    """The feature columns the GP pipeline reads (its ``columns`` step)."""
    return list(model.named_steps["columns"].transformers[0][2])


def gp_columns(feature_names: Sequence[str] | None, n_features: int) -> list[int]:
    """The Gaussian process's inputs: per-layer kept fractions (``attn_l*``, ``mlp_l*``), or for
    depth-normalised feature sets the depth profile and ``param_frac``; all columns otherwise."""
    names = list(feature_names or [])
    for pattern in (_GP_COLUMNS, _GP_FALLBACK):
        cols = [i for i, n in enumerate(names) if pattern.match(n)]
        if cols:
            return cols
    return list(range(n_features))


class _QuietGP(GaussianProcessRegressor):
    """A GP whose hyperparameter fit does not warn when a length scale sits at its bound (an
    irrelevant layer: that is the answer, not a problem)."""

    def fit(self, X: np.ndarray, y: np.ndarray) -> "_QuietGP":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            return super().fit(X, y)


def _lbfgs(obj_func: Any, initial_theta: np.ndarray, bounds: np.ndarray) -> tuple[np.ndarray, float]:
    """The GP's hyperparameter fit, capped at 60 L-BFGS steps (enough to settle on archive data;
    uncapped, 32 inputs x 200 rows took seconds)."""
    from scipy.optimize import minimize
    res = minimize(obj_func, initial_theta, method="L-BFGS-B", jac=True, bounds=bounds, options={"maxiter": 60})
    return res.x, float(res.fun)


def _gp(columns: Sequence[int], seed: int, kernel: Any = None) -> Pipeline:
    """The GP pipeline; with ``kernel`` (a fitted ``kernel_``) its hyperparameters stay fixed."""
    if kernel is None:
        d = max(1, len(columns))
        start = (ConstantKernel(1.0, (1e-3, 1e3)) * RBF(np.full(d, 3.0), (5e-2, 1e3))
                 + WhiteKernel(1e-2, (1e-6, 1.0)))
        gp = _QuietGP(start, normalize_y=True, optimizer=_lbfgs, random_state=seed)
    else:
        gp = _QuietGP(kernel, normalize_y=True, optimizer=None, random_state=seed)
    return Pipeline([("columns", _select_columns(columns)), ("scale", StandardScaler()), ("gp", gp)])


def _estimator(name: str, n: int, seed: int, columns: Sequence[int] | None = None):
    """Modest hyperparameters: on this project's 2-core machines, 5-fold CV of all candidates
    plus the final fit on 200 rows x 90 features takes a few seconds. Tree count is what costs
    (scikit-learn spends ~1.5 ms of Python per tree), so ensembles stay small and shallow; the
    Gaussian process costs O(n^3) per hyperparameter step, cheap at archive sizes (hundreds)."""
    leaf = max(1, min(5, n // 40))
    if name == "gp":
        return _gp(columns if columns is not None else [], seed)
    if name == "gbdt":
        return GradientBoostingRegressor(n_estimators=60, learning_rate=0.12, max_depth=3, subsample=0.8,
                                         max_features=0.5, min_samples_leaf=leaf, random_state=seed)
    if name == "random_forest":
        return RandomForestRegressor(n_estimators=30, max_features=0.33, min_samples_leaf=leaf,
                                     random_state=seed, n_jobs=1)
    if name == "extra_trees":
        return ExtraTreesRegressor(n_estimators=30, max_features=0.5, min_samples_leaf=leaf,
                                   random_state=seed, n_jobs=1)
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
    members: list[Any] = field(default_factory=list)   # CV fold models (boosting only)
    featurizer: Any = None                              # optional features.Featurizer
    seed: int = 0
    feature_min: list[float] = field(default_factory=list)   # training range per feature
    feature_max: list[float] = field(default_factory=list)
    sklearn_version: str = sklearn.__version__
    train_seconds: float = 0.0
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
            fast = _gp_mean(self.model, X)
            if fast is not None:
                return fast
        with single_thread():
            return self.model.predict(X)

    def predict_mean(self, X: np.ndarray) -> np.ndarray:
        return _inverse(self.predict_transformed(X), self.transform)

    def _member_models(self) -> list[Any]:
        if self.algorithm in ("random_forest", "extra_trees"):
            return list(getattr(self.model, "estimators_", []))
        return list(self.members)

    def predict(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(mean, std)`` in the metric's original scale, vectorised over rows of ``X``."""
        X = self._check(X)
        with single_thread():
            if self.algorithm == "gp" and isinstance(self.model, Pipeline):
                mu, sd = self.model.predict(X, return_std=True)
                mean = _inverse(mu, self.transform)
                # delta method: the std of exp(t) (log-scale metrics) is about exp(t) * std(t)
                scale = np.abs(mean) if self.transform in ("log", "log_eps") else 1.0
                return mean, np.asarray(sd, dtype=float) * scale
            mean = _inverse(self.model.predict(X), self.transform)
            models = self._member_models()
            if len(models) < 2:
                return mean, np.zeros(len(X))
            members = _inverse(np.stack([m.predict(X) for m in models]), self.transform)
        return mean, members.std(axis=0)

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


def _raw_importances(p: Predictor) -> np.ndarray:
    model = p.model
    if isinstance(model, DummyRegressor):
        return np.zeros(p.n_features)
    if getattr(model, "feature_importances_", None) is not None:
        return np.asarray(model.feature_importances_, dtype=float)
    if isinstance(model, Pipeline) and "gp" in model.named_steps:
        return _gp_importances(model, p.n_features)
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


def _gp_mean(model: Any, X: np.ndarray) -> np.ndarray | None:
    """The GP pipeline's posterior mean through one matrix product (the search scores tens of
    thousands of candidates; scikit-learn's kernel call goes through ``cdist``, 4-5x slower here).
    None when the model is not the fitted ``_gp`` pipeline this expects (then use ``predict``)."""
    try:
        cols = _input_columns(model)
        scaler = model.named_steps["scale"]
        gp = model.named_steps["gp"]
        kernel = gp.kernel_
        const, rbf = kernel.k1.k1, kernel.k1.k2
        if not (isinstance(const, ConstantKernel) and isinstance(rbf, RBF) and isinstance(kernel.k2, WhiteKernel)):
            return None
        ls = np.asarray(rbf.length_scale, dtype=float)
        A = scaler.transform(np.asarray(X, dtype=float)[:, cols]) / ls
        B = gp.X_train_ / ls
        sq = (A * A).sum(1)[:, None] + (B * B).sum(1)[None, :] - 2.0 * (A @ B.T)
        K = const.constant_value * np.exp(-0.5 * np.maximum(sq, 0.0))
        mean = K @ np.asarray(gp.alpha_).reshape(len(B), -1)[:, 0]
        return mean * float(np.ravel(gp._y_train_std)[0]) + float(np.ravel(gp._y_train_mean)[0])
    except (AttributeError, KeyError, IndexError, TypeError):
        return None


def _gp_importances(model: Pipeline, n_features: int) -> np.ndarray:
    """ARD relevance of each input: 1 / length scale (standardised units: the number of length
    scales the input's spread covers, i.e. how far it moves the prediction); an input that never
    varied in training gets none."""
    out = np.zeros(n_features)
    columns = _input_columns(model)
    kernel = model.named_steps["gp"].kernel_
    rbf = next((k for k in (getattr(kernel, "k1", None), kernel) if k is not None and hasattr(k, "k2")
                and isinstance(k.k2, RBF)), None)
    if rbf is None:
        return out
    scales = np.broadcast_to(np.asarray(rbf.k2.length_scale, dtype=float), (len(columns),))
    varied = model.named_steps["scale"].scale_ > 1e-12
    rel = np.where(varied[:len(columns)] if len(varied) == len(columns) else True, 1.0 / scales, 0.0)
    out[columns] = rel
    return out


def _fold_count(n: int, folds: int) -> int:
    return n if n < folds else folds


def train_predictor(X: np.ndarray, y: Sequence[float], metric: str, *, seed: int = 0, folds: int = 5,
                    candidates: Sequence[str] = ALGORITHMS, feature_names: Sequence[str] | None = None,
                    featurizer: Any = None) -> Predictor:
    """Choose an algorithm by k-fold CV, fit it on all rows, and return a ``Predictor``.

    ``X``: ``[n, p]`` features (``n >= 2``; with fewer rows than ``folds``, leave-one-out), ``y``:
    measured values of ``metric``. CV scores (``r2``, ``mae``, ``rmse`` in the original scale,
    ``r2_transformed``, ``kendall_tau``, ``spearman``) come from pooled out-of-fold predictions;
    the algorithm whose out-of-fold predictions rank best (Kendall tau: the search only needs the
    order, and squared error is dominated by a few ruined architectures far from any optimum) wins;
    lower out-of-fold squared error on the model scale breaks ties (then the first listed). Deterministic for a seed. ``featurizer`` (a ``features.Featurizer``) is stored so
    callers can predict from architectures; its names are used when ``feature_names`` is not given.
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
    if n > GP_MAX_ROWS and len(candidates) > 1:
        candidates = [c for c in candidates if c != "gp"]
    if not candidates:
        raise ValueError("no candidate algorithms")
    for c in candidates:
        _estimator(c, n, seed)  # validates the name
    columns = gp_columns(feature_names, X.shape[1])
    # Above GP_REFIT_ROWS rows the GP's hyperparameters are fitted once, on every row, and its CV
    # folds reuse that kernel (a fit per fold would cost 5x as much; the leak is small with many
    # rows). Below, every fold fits its own, so small archives get honest CV scores.
    gp_full = None
    kind = metric_transform(metric)
    y_t = _forward(y, kind)

    k = _fold_count(n, folds)
    splits = list(KFold(n_splits=k, shuffle=True, random_state=seed).split(X))
    per_algo: dict[str, dict[str, Any]] = {}
    best, best_key = candidates[0], (math.inf, math.inf)
    # One thread: on tiny data OpenMP start-up (HistGradientBoosting) costs more than it saves.
    with single_thread():
        for name in candidates:
            oof = np.empty(n)
            fold_models = []
            if name == "gp" and np.ptp(y_t) > 0:
                gp_full = _estimator(name, n, seed, columns).fit(X, y_t)
            for tr, te in splits:
                if np.ptp(y_t[tr]) == 0:
                    model_f = _constant(X[tr], y_t[tr])
                elif name == "gp" and n > GP_REFIT_ROWS:
                    model_f = _gp(columns, seed, gp_full.named_steps["gp"].kernel_).fit(X[tr], y_t[tr])
                else:
                    model_f = _estimator(name, len(tr), seed, columns).fit(X[tr], y_t[tr])
                oof[te] = model_f.predict(X[te])
                fold_models.append(model_f)
            mse = float(np.mean((oof - y_t) ** 2))
            scores = _scores(y, _inverse(oof, kind), y_t, oof)
            scores["mse_transformed"] = mse
            per_algo[name] = {"scores": scores, "fold_models": fold_models}
            tau = scores["kendall_tau"]
            key = (-round(tau, 9) if tau is not None else math.inf, mse)
            if key < best_key:
                best, best_key = name, key
        if np.ptp(y_t) == 0:
            model = _constant(X, y_t)
        elif best == "gp" and gp_full is not None:
            model = gp_full
        else:
            model = _estimator(best, n, seed, columns).fit(X, y_t)
    members = per_algo[best]["fold_models"] if best in ("gbdt", "hist_gbdt") else []
    cv = dict(per_algo[best]["scores"])
    cv.update({"folds": k, "scheme": "leave-one-out" if k == n else f"{k}-fold",
               "candidates": {c: {key: per_algo[c]["scores"][key]
                                  for key in ("r2_transformed", "kendall_tau", "mae")} for c in candidates}})
    return Predictor(metric=metric, algorithm=best, hyperparams=_hyperparams(model), cv=cv, n_train=n,
                     feature_names=feature_names, transform=kind, direction=metric_direction(metric),
                     model=model, members=members, featurizer=featurizer, seed=seed,
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
