"""Predictor inputs computed from architectures (numpy only, vectorised over candidates).

Three groups of features, all from the kept fractions of each decoder layer (attention: KV groups
kept / ``num_kv_heads``; MLP: channels kept / ``intermediate_size``; a dropped layer has 0 and 0):

- per-layer: ``attn_l{i}``, ``mlp_l{i}`` (and ``drop_l{i}`` with ``drop_flags=True``; redundant
  for trees since attention 0 means dropped, so off by default);
- derived: ``param_frac`` (params / base params), means, minima, dropped share, and the mean kept
  fraction over each depth third (``attn_third0..2``, ``mlp_third0..2``);
- depth profile: the per-layer fractions averaged over ``bins`` equal slices of normalised depth
  (area-weighted, so 16- and 24-layer models give comparable numbers): ``attn_p{b}``, ``mlp_p{b}``.

Feature sets: ``"model"`` = per-layer + derived + profile (valid for one base model only);
``"family"`` = derived + profile (depth-normalised, comparable across base models of one family).

Optional importance inputs: the share of a layer's attention / MLP importance (e.g. Taylor scores)
that an architecture removes, as two ``[N, L]`` arrays. Pass them to ``transform`` directly, or give
the ``Featurizer`` a callable ``importance(batch) -> (attn_removed, mlp_removed)`` such as an
``ImportanceTable`` (which the search can evaluate for candidates it generates). They add
per-layer (``*_imp_l{i}``, model set), mean and profile features.

Optional sensitivity profile (``optimizer.profile.Profile``, measured single-layer damages): the
additive model's summed damages of an architecture, ``damage_attn``, ``damage_mlp``,
``damage_drop`` and ``damage_sum`` (the rise over the base on the profile's cheap protocol: of
the log for perplexities, of KL itself for ``kl_base``, whose predictor's log target the line
then meets only approximately). One number that already ranks architectures well; the
predictors learn what the additive model misses (``profile_trees`` fits a line on it and trees
on the residual).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from archopt.archdb.arch import Architecture, BaseSpec

from .encoding import LayerBatch, encode

__all__ = ["DAMAGE_FEATURES", "FEATURE_SETS", "Featurizer", "ImportanceTable", "featurize", "depth_weights", "as_batch",
           "layer_attribution"]

FEATURE_SETS = ("model", "family")
DAMAGE_FEATURES = ("damage_attn", "damage_mlp", "damage_drop", "damage_sum")

ImportanceArrays = tuple[np.ndarray, np.ndarray]
ImportanceSource = Callable[[LayerBatch], ImportanceArrays]


def depth_weights(num_layers: int, bins: int) -> np.ndarray:
    """``[num_layers, bins]`` matrix W with ``F @ W`` = mean of F over each depth bin.

    Layer ``l`` covers ``[l/L, (l+1)/L)`` of normalised depth, bin ``b`` covers ``[b/B, (b+1)/B)``;
    W holds the overlap scaled by ``B`` (columns sum to 1), so it is exact for any L and B.
    """
    edges_l = np.arange(num_layers + 1) / num_layers
    edges_b = np.arange(bins + 1) / bins
    lo = np.maximum(edges_l[:-1, None], edges_b[None, :-1])
    hi = np.minimum(edges_l[1:, None], edges_b[None, 1:])
    return np.clip(hi - lo, 0.0, None) * bins


def as_batch(data: LayerBatch | Sequence[Architecture], spec: BaseSpec | None = None) -> LayerBatch:
    return data if isinstance(data, LayerBatch) else encode(data, spec)


@dataclass(eq=False)
class ImportanceTable:
    """Per-layer importance scores of KV groups and MLP channels of one base model.

    ``attn[l]`` holds one score per KV group of layer ``l`` (length ``num_kv_heads``), ``mlp[l]`` one
    per intermediate channel. A pruner keeps the highest-scoring units, so keeping ``k`` of them
    keeps the sum of the top ``k`` scores: the share removed is looked up in cumulative sums, for a
    whole batch at once. Callable as a ``Featurizer`` importance source.
    """

    attn: Sequence[Sequence[float]]
    mlp: Sequence[Sequence[float]]
    _attn_cum: np.ndarray = field(init=False, repr=False, compare=False)
    _mlp_cum: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._attn_cum = self._cumulative(self.attn)
        self._mlp_cum = self._cumulative(self.mlp)

    @staticmethod
    def _cumulative(rows: Sequence[Sequence[float]]) -> np.ndarray:
        mat = np.abs(np.asarray(rows, dtype=float))
        mat = -np.sort(-mat, axis=1)
        cum = np.concatenate([np.zeros((mat.shape[0], 1)), np.cumsum(mat, axis=1)], axis=1)
        total = cum[:, -1:]
        return np.divide(cum, total, out=np.linspace(0, 1, cum.shape[1])[None, :].repeat(len(cum), 0),
                         where=total > 0)

    def __call__(self, batch: LayerBatch) -> ImportanceArrays:
        L = batch.spec.num_layers
        if self._attn_cum.shape != (L, batch.spec.num_kv_heads + 1) or \
                self._mlp_cum.shape != (L, batch.spec.intermediate_size + 1):
            raise ValueError("importance table does not match the base model of the batch")
        rows = np.arange(L)[None, :]
        return 1.0 - self._attn_cum[rows, batch.kv], 1.0 - self._mlp_cum[rows, batch.inter]


@dataclass(eq=False)
class Featurizer:
    """Turns a ``LayerBatch`` (or architectures) into a feature matrix. Picklable; stored with a predictor."""

    feature_set: str = "model"
    num_layers: int | None = None
    bins: int = 8
    drop_flags: bool = False
    importance: ImportanceSource | None = None
    importance_features: bool = False
    profile: Any = None        # optimizer.profile.Profile: adds the damage_* features

    def __post_init__(self) -> None:
        if self.feature_set not in FEATURE_SETS:
            raise ValueError(f"feature set must be one of {FEATURE_SETS}, got {self.feature_set!r}")
        if self.feature_set == "model" and self.num_layers is None:
            raise ValueError("the 'model' feature set needs num_layers (it is valid for one base model)")
        if self.bins < 1:
            raise ValueError("bins must be positive")
        if self.importance is not None:
            self.importance_features = True

    @classmethod
    def for_spec(cls, spec: BaseSpec, feature_set: str = "model", **kw: Any) -> "Featurizer":
        return cls(feature_set=feature_set, num_layers=spec.num_layers, **kw)

    # -- names -------------------------------------------------------------------------------
    def _kinds(self) -> list[str]:
        kinds = ["attn", "mlp"] + (["drop"] if self.drop_flags else [])
        return kinds + (["attn_imp", "mlp_imp"] if self.importance_features else [])

    @property
    def names(self) -> list[str]:
        out: list[str] = []
        if self.feature_set == "model":
            for kind in self._kinds():
                out += [f"{kind}_l{i}" for i in range(self.num_layers)]
        out += ["param_frac", "attn_mean", "mlp_mean", "attn_min", "mlp_min", "drop_frac"]
        out += [f"{k}_third{t}" for k in ("attn", "mlp") for t in range(3)]
        if self.importance_features:
            out += ["attn_imp_mean", "mlp_imp_mean"]
        if self.profile is not None:
            out += list(DAMAGE_FEATURES)
        for kind in self._kinds():
            out += [f"{kind}_p{b}" for b in range(self.bins)]
        return out

    # -- transform ---------------------------------------------------------------------------
    def transform(self, data: LayerBatch | Sequence[Architecture],
                  importance: ImportanceArrays | ImportanceSource | None = None) -> np.ndarray:
        """Feature matrix ``[N, len(names)]`` (float64)."""
        batch = as_batch(data)
        L = batch.spec.num_layers
        if self.feature_set == "model" and L != self.num_layers:
            raise ValueError(f"'model' features were built for {self.num_layers} layers, the batch has {L}")
        per = {"attn": batch.attn_frac, "mlp": batch.mlp_frac}
        if self.drop_flags:
            per["drop"] = batch.dropped.astype(float)
        if self.importance_features:
            source = importance if importance is not None else self.importance
            if source is None:
                raise ValueError("this featurizer uses importance features: pass importance arrays")
            a_imp, m_imp = source(batch) if callable(source) else source
            a_imp = np.asarray(a_imp, dtype=float).reshape(len(batch), L)
            m_imp = np.asarray(m_imp, dtype=float).reshape(len(batch), L)
            per["attn_imp"], per["mlp_imp"] = a_imp, m_imp
        cols: list[np.ndarray] = []
        if self.feature_set == "model":
            cols += [per[k] for k in self._kinds()]
        thirds = depth_weights(L, 3)
        derived = [
            (batch.params / batch.spec.total_params)[:, None],
            per["attn"].mean(1, keepdims=True), per["mlp"].mean(1, keepdims=True),
            per["attn"].min(1, keepdims=True), per["mlp"].min(1, keepdims=True),
            batch.dropped.mean(1, keepdims=True),
            per["attn"] @ thirds, per["mlp"] @ thirds,
        ]
        if self.importance_features:
            derived += [per["attn_imp"].mean(1, keepdims=True), per["mlp_imp"].mean(1, keepdims=True)]
        if self.profile is not None:
            if self.profile.spec != batch.spec:
                raise ValueError("the sensitivity profile belongs to another base model than the batch")
            parts = self.profile.damage_parts(batch.kv, batch.inter)
            derived += [parts, parts.sum(1, keepdims=True)]
        cols += derived
        W = depth_weights(L, self.bins)
        cols += [per[k] @ W for k in self._kinds()]
        return np.concatenate(cols, axis=1)

    __call__ = transform

    def layer_attribution(self, num_layers: int) -> dict[str, tuple[str, np.ndarray]]:
        """See ``layer_attribution`` (module function) for this featurizer's names."""
        return layer_attribution(self.names, num_layers)


_PER_LAYER = re.compile(r"^(attn|mlp)(?:_imp)?_l(\d+)$")
_PROFILE = re.compile(r"^(attn|mlp)(_imp)?_p(\d+)$")
_THIRD = re.compile(r"^(attn|mlp)_third([012])$")
_MEAN = re.compile(r"^(attn|mlp)(?:_imp)?_mean$")


def layer_attribution(names: Sequence[str], num_layers: int) -> dict[str, tuple[str, np.ndarray]]:
    """For each feature tied to attention or MLP widths: ``(kind, weights over layers)``.

    ``kind`` is ``"attn"`` or ``"mlp"``; the weights sum to 1 and say how much each layer's width
    drives the feature: one-hot for per-layer features, the bin's overlap for depth-profile bins and
    thirds (so importance learnt on a 16-layer model maps onto a 24-layer one), even for means.
    Global features (``param_frac``, ``drop_frac``, minima, drop flags) are left out. Works from
    the names alone, so it applies to any predictor that uses this module's naming.
    """
    L = num_layers
    bins: dict[str, int] = {}
    for n in names:
        m = _PROFILE.match(n)
        if m:
            key = m.group(1) + (m.group(2) or "")
            bins[key] = max(bins.get(key, 0), int(m.group(3)) + 1)
    out: dict[str, tuple[str, np.ndarray]] = {}
    thirds = depth_weights(L, 3)
    for n in names:
        if m := _PER_LAYER.match(n):
            i = int(m.group(2))
            if i < L:
                out[n] = (m.group(1), np.eye(L)[i])
        elif m := _PROFILE.match(n):
            W = depth_weights(L, bins[m.group(1) + (m.group(2) or "")])
            col = W[:, int(m.group(3))]
            out[n] = (m.group(1), col / col.sum())
        elif m := _THIRD.match(n):
            col = thirds[:, int(m.group(2))]
            out[n] = (m.group(1), col / col.sum())
        elif m := _MEAN.match(n):
            out[n] = (m.group(1), np.full(L, 1.0 / L))
    return out


def featurize(data: LayerBatch | Sequence[Architecture], feature_set: str = "model", *,
              bins: int = 8, drop_flags: bool = False,
              importance: ImportanceArrays | ImportanceSource | None = None) -> tuple[np.ndarray, list[str], Featurizer]:
    """One-call form: ``(X, names, featurizer)`` for architectures of one base model."""
    batch = as_batch(data)
    fz = Featurizer(feature_set, batch.spec.num_layers, bins, drop_flags,
                    importance=importance if callable(importance) else None,
                    importance_features=importance is not None)
    return fz.transform(batch, importance), fz.names, fz
