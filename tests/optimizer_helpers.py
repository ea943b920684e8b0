"""Shared helpers for the optimizer tests: tiny base models, oracle predictors, a greedy optimum."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from archopt.archdb.arch import BaseSpec
from archopt.optimizer.encoding import LayerBatch, layer_param_coefficients
from archopt.optimizer.predictors import metric_direction

SMALL = BaseSpec("llama", 16, 256, 8, 4, 32, 688, 1000)


class OracleFeaturizer:
    """Features = the per-layer fractions themselves; the oracle below reads them back."""

    def __init__(self, num_layers: int) -> None:
        self.num_layers = num_layers

    def transform(self, batch, importance=None):
        return np.concatenate([batch.attn_frac, batch.mlp_frac, batch.dropped.astype(float)], axis=1)


class OraclePredictor:
    """A 'predictor' that returns the synthetic truth exactly (tests the search, not learning)."""

    def __init__(self, truth, metric: str, spec: BaseSpec) -> None:
        self.truth, self.metric, self.spec = truth, metric, spec
        self.featurizer = OracleFeaturizer(spec.num_layers)
        self.direction = metric_direction(metric)

    def _batch(self, X):
        L = self.spec.num_layers
        return SimpleNamespace(spec=self.spec, attn_frac=X[:, :L], mlp_frac=X[:, L:2 * L],
                               dropped=X[:, 2 * L:] > 0.5)

    def predict_mean(self, X):
        b = self._batch(np.asarray(X, dtype=float))
        return self.truth.ppl(b) if self.metric.startswith("ppl") else self.truth.mmlu(b)

    def predict(self, X):
        m = self.predict_mean(X)
        return m, np.zeros(len(m))


def greedy_optimum(truth, spec: BaseSpec, hi: int, *, mlp_min: int, layers=None, chunk: int = 8):
    """Remove, one unit at a time, the KV group or MLP chunk with the smallest increase of the true
    log PPL per parameter removed, until the model fits under ``hi``. For the separable, convex
    synthetic truth this marginal-analysis greedy is optimal up to one unit."""
    L = spec.num_layers
    idx = list(range(L)) if layers is None else list(layers)
    per_kv, per_ch, _ = layer_param_coefficients(spec)
    kv = np.full((1, L), spec.num_kv_heads)
    inter = np.full((1, L), spec.intermediate_size)
    b = LayerBatch(spec, kv, inter)
    cur = truth.log_ppl(b)[0]
    while b.params[0] > hi:
        best, best_rate, best_state = None, np.inf, None
        for l in idx:
            for kind in ("attn", "mlp"):
                k2, i2 = b.kv.copy(), b.inter.copy()
                if kind == "attn":
                    if k2[0, l] <= 1:
                        continue
                    k2[0, l] -= 1
                    saved = per_kv
                else:
                    step = min(chunk, i2[0, l] - mlp_min)
                    if step <= 0:
                        continue
                    i2[0, l] -= step
                    saved = per_ch * step
                nb = LayerBatch(spec, k2, i2)
                rate = (truth.log_ppl(nb)[0] - cur) / saved
                if rate < best_rate:
                    best_rate, best_state = rate, nb
        if best_state is None:
            raise ValueError("cannot reach the target")
        b = best_state
        cur = truth.log_ppl(b)[0]
    return b, cur
