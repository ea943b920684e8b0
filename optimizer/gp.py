"""The Gaussian-process predictor's pieces: its pipeline, a fast hyperparameter fit, a fast mean.

The pipeline (``gp_pipeline``) selects the per-layer kept fractions, standardises them and fits an
ARD RBF kernel plus white noise (``ConstantKernel * RBF + WhiteKernel``) with ``normalize_y``. Its
hyperparameters are fitted by L-BFGS on the log marginal likelihood, whose gradient is computed
here without scikit-learn's ``[n, n, d]`` kernel-gradient tensor (``_QuietGP``): two matrix
products instead, the same numbers 5-10x faster on archive sizes, which is what lets every
cross-validation fold fit its own hyperparameters (``predictors.train_predictor``).
"""

from __future__ import annotations

import re
import warnings
from typing import Any, Sequence

import numpy as np
from scipy.linalg import cho_solve, cholesky
from sklearn.compose import ColumnTransformer
from sklearn.exceptions import ConvergenceWarning
from sklearn.gaussian_process import GaussianProcessRegressor
from sklearn.gaussian_process.kernels import RBF, ConstantKernel, Product, Sum, WhiteKernel
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

__all__ = ["gp_columns", "gp_importances", "gp_mean", "gp_pipeline", "input_columns"]

_GP_COLUMNS = re.compile(r"^(attn|mlp)_l\d+$")
_GP_FALLBACK = re.compile(r"^((attn|mlp)_p\d+|param_frac)$")


def _select_columns(columns: Sequence[int]) -> ColumnTransformer:
    """Keeps the columns ``columns`` (indices, in that order) of a feature matrix."""
    return ColumnTransformer([("inputs", "passthrough", list(columns))], remainder="drop")


def input_columns(model: Pipeline) -> list[int]:
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


def _fast_lml(gp: GaussianProcessRegressor, theta: np.ndarray) -> tuple[float, np.ndarray] | None:
    """Log marginal likelihood and its gradient for ``ConstantKernel * RBF + WhiteKernel`` (free
    hyperparameters, one output), as scikit-learn computes them; None for any other kernel.

    With M = (alpha alpha^T - K^-1) o K_rbf and s = M 1, the gradient of a length scale l_k is
    0.5 sum_ij M_ij (z_ik - z_jk)^2 = sum_i z_ik^2 s_i - z_k^T M z_k (z = x / l)."""
    kernel = gp.kernel_
    if not (isinstance(kernel, Sum) and isinstance(kernel.k1, Product) and isinstance(kernel.k2, WhiteKernel)
            and isinstance(kernel.k1.k1, ConstantKernel) and isinstance(kernel.k1.k2, RBF)):
        return None
    if any(h.fixed for h in kernel.hyperparameters):
        return None
    y = np.asarray(gp.y_train_, dtype=float)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    X = np.asarray(gp.X_train_, dtype=float)
    n_scales = np.size(kernel.k1.k2.length_scale)
    if y.ndim != 1 or len(theta) != n_scales + 2 or n_scales not in (1, X.shape[1]):
        return None
    const, scales, noise = np.exp(theta[0]), np.exp(theta[1:-1]), np.exp(theta[-1])
    Z = X / scales
    sq = (Z * Z).sum(1)
    K1 = const * np.exp(-0.5 * np.maximum(sq[:, None] + sq[None, :] - 2.0 * (Z @ Z.T), 0.0))
    np.fill_diagonal(K1, const)
    K = K1.copy()
    K[np.diag_indices_from(K)] += noise + gp.alpha
    try:
        L = cholesky(K, lower=True, check_finite=False)
    except np.linalg.LinAlgError:
        return -np.inf, np.zeros_like(theta)
    alpha = cho_solve((L, True), y, check_finite=False)
    lml = -0.5 * float(y @ alpha) - float(np.log(np.diag(L)).sum()) - len(y) / 2 * np.log(2 * np.pi)
    inner = np.outer(alpha, alpha) - cho_solve((L, True), np.eye(len(y)), check_finite=False)
    M = inner * K1
    s = M.sum(1)
    per_input = (Z * Z * s[:, None]).sum(0) - (Z * (M @ Z)).sum(0)
    grad_scales = per_input if n_scales > 1 else np.array([per_input.sum()])
    grad = np.concatenate([[0.5 * M.sum()], grad_scales, [0.5 * noise * np.trace(inner)]])
    return lml, grad


class _QuietGP(GaussianProcessRegressor):
    """A GP whose hyperparameter fit does not warn when a length scale sits at its bound (an
    irrelevant layer: that is the answer, not a problem), with the fast gradient of ``_fast_lml``."""

    def fit(self, X: np.ndarray, y: np.ndarray) -> "_QuietGP":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            return super().fit(X, y)

    def log_marginal_likelihood(self, theta: Any = None, eval_gradient: bool = False,
                                clone_kernel: bool = True) -> Any:
        if theta is not None and eval_gradient:
            fast = _fast_lml(self, np.asarray(theta, dtype=float))
            if fast is not None:
                return fast
        return super().log_marginal_likelihood(theta, eval_gradient, clone_kernel)


def _lbfgs(obj_func: Any, initial_theta: np.ndarray, bounds: np.ndarray) -> tuple[np.ndarray, float]:
    """The GP's hyperparameter fit, capped at 60 L-BFGS steps (enough to settle on archive data)."""
    from scipy.optimize import minimize
    res = minimize(obj_func, initial_theta, method="L-BFGS-B", jac=True, bounds=bounds, options={"maxiter": 60})
    return res.x, float(res.fun)


def gp_pipeline(columns: Sequence[int], seed: int) -> Pipeline:
    """The GP pipeline on ``columns`` of the feature matrix; ``fit`` fits its hyperparameters."""
    d = max(1, len(columns))
    start = (ConstantKernel(1.0, (1e-3, 1e3)) * RBF(np.full(d, 3.0), (5e-2, 1e3))
             + WhiteKernel(1e-2, (1e-6, 1.0)))
    gp = _QuietGP(start, normalize_y=True, optimizer=_lbfgs, random_state=seed)
    return Pipeline([("columns", _select_columns(columns)), ("scale", StandardScaler()), ("gp", gp)])


def gp_mean(model: Any, X: np.ndarray) -> np.ndarray | None:
    """The GP pipeline's posterior mean through one matrix product (the search scores tens of
    thousands of candidates; scikit-learn's kernel call goes through ``cdist``, 4-5x slower here).
    None when the model is not the fitted ``gp_pipeline`` this expects (then use ``predict``)."""
    try:
        cols = input_columns(model)
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


def gp_importances(model: Pipeline, n_features: int) -> np.ndarray:
    """ARD relevance of each input: 1 / length scale (standardised units: the number of length
    scales the input's spread covers, i.e. how far it moves the prediction); an input that never
    varied in training gets none."""
    out = np.zeros(n_features)
    columns = input_columns(model)
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
