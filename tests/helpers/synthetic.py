"""Synthetic ground truths for tests and benchmarks: metrics as known functions of the widths.

Defined on normalised depth ``z = (l + 0.5) / L`` so that one truth applies to base models of a
family with different depths (what ``"family"`` features must learn). With ``r_a = 1 - attn_frac``
and ``r_m = 1 - mlp_frac`` per layer:

    log PPL = log(ppl0) + (1 / L) * sum_l [ w_a(z_l) * r_a^1.5 + w_m(z_l) * r_m^2 ] + noise

with small weights everywhere, attention dearer than MLP, and a few depth peaks far more
sensitive (by default the first layers and the last one, as in real Llamas). A second metric
``mmlu`` weighs other depths (the middle), so two objectives conflict and have a real front.
A dropped layer counts as ``r_a = r_m = 1`` plus a penalty.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Sequence

import numpy as np

from archopt.archdb.arch import BaseSpec
from archopt.optimizer.encoding import LayerBatch

__all__ = ["SyntheticTruth", "random_archive", "OraclePredictor", "greedy_optimum"]


def _bump(z: np.ndarray, centers: Sequence[float], width: float) -> np.ndarray:
    out = np.zeros_like(z)
    for c in centers:
        out += np.exp(-0.5 * ((z - c) / width) ** 2)
    return out


@dataclass
class SyntheticTruth:
    ppl0: float = 10.0
    attn_weight: float = 1.0
    mlp_weight: float = 0.4
    peak_weight: float = 12.0
    peaks: tuple[float, ...] = (0.03, 0.97)
    peak_width: float = 0.04
    mmlu_peaks: tuple[float, ...] = (0.45,)
    mmlu_width: float = 0.15
    drop_penalty: float = 0.5
    noise: float = 0.0
    seed: int = 0
    _rng: np.random.Generator = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._rng = np.random.default_rng(self.seed)

    def _damage(self, batch: LayerBatch, peaks, width) -> np.ndarray:
        L = batch.spec.num_layers
        z = (np.arange(L) + 0.5) / L
        sens = 1.0 + self.peak_weight * _bump(z, peaks, width)
        ra = 1.0 - batch.attn_frac
        rm = 1.0 - batch.mlp_frac
        per = sens * (self.attn_weight * ra ** 1.5 + self.mlp_weight * rm ** 2)
        per = per + self.drop_penalty * batch.dropped
        return per.sum(axis=1) / L * 4.0

    def log_ppl(self, batch: LayerBatch, noisy: bool = False) -> np.ndarray:
        out = np.log(self.ppl0) + self._damage(batch, self.peaks, self.peak_width)
        if noisy and self.noise > 0:
            out = out + self._rng.normal(0.0, self.noise, size=len(out))
        return out

    def ppl(self, batch: LayerBatch, noisy: bool = False) -> np.ndarray:
        return np.exp(self.log_ppl(batch, noisy))

    def mmlu(self, batch: LayerBatch, noisy: bool = False) -> np.ndarray:
        dmg = self._damage(batch, self.mmlu_peaks, self.mmlu_width)
        out = 0.25 + 0.25 * np.exp(-1.5 * dmg)
        if noisy and self.noise > 0:
            out = out + self._rng.normal(0.0, self.noise * 0.05, size=len(out))
        return out


def random_archive(spec: BaseSpec, n: int, seed: int = 0, *, layers: Sequence[int] | None = None,
                   attn_ratios: Sequence[float] = (0.0, 0.125, 0.25, 0.375, 0.5),
                   mlp_ratios: Sequence[float] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6),
                   p_attn_kept: float = 0.5) -> LayerBatch:
    """``n`` random architectures like an archive of the seed paper's kind: per-layer ratios from
    small sets (attention kept whole with probability ``p_attn_kept``)."""
    rng = np.random.default_rng(seed)
    L = spec.num_layers
    idx = np.arange(L) if layers is None else np.asarray(layers)
    kv = np.full((n, L), spec.num_kv_heads, dtype=np.int64)
    inter = np.full((n, L), spec.intermediate_size, dtype=np.int64)
    ar = np.asarray(attn_ratios, dtype=float)
    mr = np.asarray(mlp_ratios, dtype=float)
    a = np.where(rng.random((n, len(idx))) < p_attn_kept, 0.0, rng.choice(ar, size=(n, len(idx))))
    m = rng.choice(mr, size=(n, len(idx)))
    kv[:, idx] = np.maximum(1, np.floor((1 - a) * spec.num_kv_heads + 0.5)).astype(np.int64)
    mult = 8
    ch = np.floor((1 - m) * spec.intermediate_size / mult + 0.5).astype(np.int64) * mult
    inter[:, idx] = np.clip(np.where(m == 0, spec.intermediate_size, ch), min(mult, spec.intermediate_size),
                            spec.intermediate_size)
    return LayerBatch(spec, kv, inter)


class _OracleFeaturizer:
    """Features = the per-layer fractions themselves (attention, MLP, dropped)."""

    def __init__(self, num_layers: int) -> None:
        self.num_layers = num_layers

    @property
    def names(self) -> list[str]:
        L = self.num_layers
        return [f"attn_l{i}" for i in range(L)] + [f"mlp_l{i}" for i in range(L)] + [f"drop_l{i}" for i in range(L)]

    def transform(self, batch: LayerBatch, importance=None) -> np.ndarray:
        return np.concatenate([batch.attn_frac, batch.mlp_frac, batch.dropped.astype(float)], axis=1)


class OraclePredictor:
    """Predictor-shaped access to the truth itself (``ppl*`` -> ppl, anything else -> mmlu), for
    testing a search apart from learning. Reports no feature importances."""

    def __init__(self, truth: SyntheticTruth, metric: str, spec: BaseSpec) -> None:
        from archopt.optimizer.predictors import metric_direction
        self.truth, self.metric, self.spec = truth, metric, spec
        self.featurizer = _OracleFeaturizer(spec.num_layers)
        self.direction = metric_direction(metric)

    def predict_mean(self, X: np.ndarray) -> np.ndarray:
        X = np.asarray(X, dtype=float)
        L = self.spec.num_layers
        view = SimpleNamespace(spec=self.spec, attn_frac=X[:, :L], mlp_frac=X[:, L:2 * L], dropped=X[:, 2 * L:] > 0.5)
        return self.truth.ppl(view) if self.metric.startswith("ppl") else self.truth.mmlu(view)

    def predict(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        m = self.predict_mean(X)
        return m, np.zeros(len(m))


def greedy_optimum(truth: SyntheticTruth, spec: BaseSpec, hi: int, *, mlp_min: int, kv_min: int = 1,
                   layers: Sequence[int] | None = None, chunk: int = 8) -> tuple[LayerBatch, float]:
    """The best architecture under ``hi`` parameters for the true log PPL, by marginal analysis:
    from the full model, remove one KV group or one ``chunk`` of MLP channels at a time, always the
    unit with the smallest increase of log PPL per parameter removed. The truth is separable and
    convex per layer, so this is optimal up to about one unit. Returns ``(batch of 1, log PPL)``."""
    from archopt.optimizer.encoding import layer_param_coefficients
    L = spec.num_layers
    idx = list(range(L)) if layers is None else list(layers)
    per_kv, per_ch, _ = layer_param_coefficients(spec)
    b = LayerBatch(spec, np.full((1, L), spec.num_kv_heads), np.full((1, L), spec.intermediate_size))
    cur = float(truth.log_ppl(b)[0])
    while b.params[0] > hi:
        moves_kv, moves_in, saved = [], [], []
        for l in idx:
            if b.kv[0, l] > kv_min:
                k2 = b.kv.copy()
                k2[0, l] -= 1
                moves_kv.append(k2[0]); moves_in.append(b.inter[0]); saved.append(per_kv)
            step = min(chunk, int(b.inter[0, l]) - mlp_min)
            if step > 0:
                i2 = b.inter.copy()
                i2[0, l] -= step
                moves_kv.append(b.kv[0]); moves_in.append(i2[0]); saved.append(per_ch * step)
        if not saved:
            raise ValueError("the target cannot be reached")
        cand = LayerBatch(spec, np.array(moves_kv), np.array(moves_in))
        vals = truth.log_ppl(cand)
        j = int(np.argmin((vals - cur) / np.array(saved, dtype=float)))
        b, cur = cand.take([j]), float(vals[j])
    return b, cur
