"""The search space over per-layer widths, exact batch parameter counts, budget repair, refinement.

Space. For every prunable layer: attention kept in whole KV groups (``kv_lo..kv_hi``, by default
1..num_kv_heads), MLP channels kept in ``mlp_lo..mlp_hi`` (by default from ``mlp_min_frac`` of the
width to the full width) on a grid of fractions (``mlp_grid_step``) rounded with
``round_channels`` to the channel multiple; layer drop is optional (off by default). Layers outside
the prunable range stay whole.

Attention is sampled with a bias toward keeping it. KV groups are coarse (Llama-3-8B has 8 per
layer: one group is 12.5% of the layer's attention; a 9-head / 3-KV model has 3), and in our
measurements pruning attention costs far more perplexity per parameter removed than pruning MLP
channels. A space that samples attention as freely as the MLP spends most of its candidates on
architectures that cut attention deeply, which the predictors then reject: wasted budget. So the
full attention width gets probability ``attn_keep_prob`` (0.5) and the rest decays with the groups
removed, ``exp(-attn_decay * removed / num_kv)``; every choice keeps a non-zero probability, so the
search can still find layers whose attention is cheap to cut.

Repair. Sampled or mutated candidates rarely land in the size window ``[target * (1 - tol),
target]``. ``SearchSpace.repair`` moves them there exactly and vectorised: if even the narrowest MLP
cannot get under the target, it removes KV groups one at a time, round robin over the layers whose
attention matters least (and adds groups to the most important ones when too small); then it solves
for the MLP widths in closed form, shrinking (growing) every free MLP layer along its room with a
rate that is higher for unimportant (important) layers, rounds to the channel multiple and fills
the rounding remainder, ending at most one channel multiple under the target.

Refinement (the seed paper's step, automated). ``refine_space`` maps predictor feature
importances onto per-layer attention / MLP dimensions, keeps the dimensions that carry
``coverage`` of the importance free (at least ``min_free_frac`` of them) and narrows the others to
the range the best candidates occupy (quantiles of an elite set: the archive's best or the search's
own best predicted seed candidates), fixing attention where the elite agrees. Only the free
dimensions are sampled by Optuna; the others sit at the elite median there. The record is
JSON-ready (``--explain``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Mapping, Sequence

import numpy as np

from archopt.archdb.arch import (DEFAULT_CHANNEL_MULTIPLE, Architecture, BaseSpec, parse_layer_range,
                                 round_channels)

from .encoding import LayerBatch, batch_params, encode, layer_param_coefficients
from .features import layer_attribution

__all__ = ["SearchSpace", "build_space", "refine_space", "dimension_importance", "batch_params",
           "size_window", "trust_bounds"]


def size_window(target_params: int, tolerance: float) -> tuple[int, int]:
    """``(lo, hi)``: every result lies in ``[ceil(target * (1 - tol)), target]``."""
    if not (0.0 <= tolerance < 1.0):
        raise ValueError(f"tolerance must lie in [0, 1), got {tolerance!r}")
    target = int(target_params)
    return int(math.ceil(target * (1.0 - tolerance))), target


@dataclass(frozen=True, eq=False)
class SearchSpace:
    """Per prunable layer (position ``p`` in ``layers``): KV groups ``kv_lo[p]..kv_hi[p]`` (0 =
    dropped, only with ``allow_drop``), MLP channels ``mlp_lo[p]..mlp_hi[p]``."""

    spec: BaseSpec
    layers: tuple[int, ...]
    kv_lo: np.ndarray
    kv_hi: np.ndarray
    mlp_lo: np.ndarray
    mlp_hi: np.ndarray
    multiple: int = DEFAULT_CHANNEL_MULTIPLE
    mlp_grid_step: float = 0.05
    allow_drop: bool = False
    drop_prob: float = 0.03
    attn_keep_prob: float = 0.5
    attn_decay: float = 4.0
    attn_importance: np.ndarray | None = None   # [P], for repair order (None: equal)
    mlp_importance: np.ndarray | None = None    # [P]
    free_attn: np.ndarray | None = None         # [P] bool: dims the Optuna phase samples (None: all movable)
    free_mlp: np.ndarray | None = None
    center_kv: np.ndarray | None = None         # [P] value of a non-free dim in Optuna proposals
    center_mlp: np.ndarray | None = None
    refinement: dict[str, Any] | None = field(default=None, compare=False)

    # -- basic facts -------------------------------------------------------------------------
    @property
    def P(self) -> int:
        return len(self.layers)

    @property
    def idx(self) -> np.ndarray:
        return np.asarray(self.layers, dtype=np.int64)

    def movable_attn(self) -> np.ndarray:
        return self.kv_hi > self.kv_lo

    def movable_mlp(self) -> np.ndarray:
        return self.mlp_hi > self.mlp_lo

    def optuna_attn(self) -> np.ndarray:
        return self.movable_attn() if self.free_attn is None else (self.free_attn & self.movable_attn())

    def optuna_mlp(self) -> np.ndarray:
        return self.movable_mlp() if self.free_mlp is None else (self.free_mlp & self.movable_mlp())

    def _imp(self, which: str) -> np.ndarray:
        v = self.attn_importance if which == "attn" else self.mlp_importance
        if v is None:
            return np.ones(self.P)
        v = np.asarray(v, dtype=float)
        return v / v.mean() if v.mean() > 0 else np.ones(self.P)

    def full_arrays(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        s = self.spec
        return (np.full((n, s.num_layers), s.num_kv_heads, dtype=np.int64),
                np.full((n, s.num_layers), s.intermediate_size, dtype=np.int64))

    def bounds_params(self) -> tuple[int, int]:
        """Smallest and largest parameter count in the space (drops not counted)."""
        kv, inter = self.full_arrays(2)
        kv[0, self.idx], inter[0, self.idx] = np.maximum(self.kv_lo, 1), self.mlp_lo
        kv[1, self.idx], inter[1, self.idx] = self.kv_hi, self.mlp_hi
        p = batch_params(self.spec, kv, inter)
        return int(p[0]), int(p[1])

    def smallest_params(self) -> int:
        """Smallest parameter count the space reaches: ``bounds_params()[0]``, or with ``allow_drop``
        every droppable layer dropped but one kept layer."""
        low = self.bounds_params()[0]
        if not self.allow_drop:
            return low
        kv, inter = self.full_arrays(1)
        kv[0, self.idx], inter[0, self.idx] = np.maximum(self.kv_lo, 1), self.mlp_lo
        droppable = self.idx[self.kv_lo == 0]
        if len(droppable) == self.spec.num_layers:
            droppable = droppable[1:]
        kv[0, droppable] = inter[0, droppable] = 0
        return int(batch_params(self.spec, kv, inter)[0])

    def mlp_grid(self, p: int) -> np.ndarray:
        """Grid of MLP widths of position ``p``: fractions on ``mlp_grid_step`` rounded to the multiple."""
        I = self.spec.intermediate_size
        fracs = np.arange(self.mlp_grid_step, 1.0 + 1e-9, self.mlp_grid_step)
        vals = {round_channels(self.spec, f * I, self.multiple) for f in fracs}
        vals |= {int(self.mlp_lo[p]), int(self.mlp_hi[p])}
        g = np.array(sorted(v for v in vals if self.mlp_lo[p] <= v <= self.mlp_hi[p]), dtype=np.int64)
        return g

    def attn_probs(self, p: int) -> tuple[np.ndarray, np.ndarray]:
        """Choices and sampling probabilities of KV groups at position ``p`` (biased to keep; see module doc)."""
        lo, hi = int(self.kv_lo[p]), int(self.kv_hi[p])
        choices = np.arange(max(lo, 1), hi + 1)
        K = self.spec.num_kv_heads
        if len(choices) == 1:
            probs = np.ones(1)
        else:
            w = np.exp(-self.attn_decay * (hi - choices[:-1]) / K)
            probs = np.r_[(1 - self.attn_keep_prob) * w / w.sum(), self.attn_keep_prob]
        if self.allow_drop and lo == 0:
            choices = np.r_[0, choices]
            probs = np.r_[self.drop_prob, probs * (1 - self.drop_prob)]
        return choices, probs

    # -- sampling and projection -------------------------------------------------------------
    def sample(self, n: int, rng: np.random.Generator) -> LayerBatch:
        """``n`` candidates drawn from the space (not yet repaired to a budget)."""
        kv, inter = self.full_arrays(n)
        for p, l in enumerate(self.layers):
            choices, probs = self.attn_probs(p)
            kv[:, l] = rng.choice(choices, size=n, p=probs)
            grid = self.mlp_grid(p)
            inter[:, l] = grid[rng.integers(0, len(grid), size=n)]
        inter[kv == 0] = 0
        return LayerBatch(self.spec, kv, inter)

    def round_mlp(self, channels: np.ndarray) -> np.ndarray:
        """Round widths (float, [..., P]) to the multiple, clipped to each position's range."""
        m = self.multiple
        out = np.floor(np.asarray(channels, dtype=float) / m + 0.5).astype(np.int64) * m
        out = np.where(channels >= self.mlp_hi - 1e-9, self.mlp_hi, out)
        return np.clip(out, self.mlp_lo, self.mlp_hi)

    def project(self, batch: LayerBatch) -> LayerBatch:
        """Clip a batch into the space: other layers whole, widths within range and on the multiple."""
        s = self.spec
        kv, inter = self.full_arrays(len(batch))
        idx = self.idx
        bkv, binter = batch.kv[:, idx], batch.inter[:, idx]
        dropped = bkv == 0
        kvp = np.clip(bkv, np.maximum(self.kv_lo, 1), self.kv_hi)
        interp = self.round_mlp(binter)
        if self.allow_drop:
            can_drop = self.kv_lo == 0
            kvp = np.where(dropped & can_drop, 0, kvp)
        interp = np.where(kvp == 0, 0, interp)
        kv[:, idx], inter[:, idx] = kvp, interp
        out = LayerBatch(s, kv, inter)
        return out

    # -- repair ------------------------------------------------------------------------------
    def repair(self, batch: LayerBatch, lo: int, hi: int) -> tuple[LayerBatch, np.ndarray]:
        """Move every candidate into ``[lo, hi]`` parameters where the space allows; returns the
        repaired batch and its feasibility mask. Candidates already inside are left unchanged."""
        s = self.spec
        kv, inter = batch.kv.copy(), batch.inter.copy()
        n = len(kv)
        if n == 0:
            return LayerBatch(s, kv, inter), np.zeros(0, dtype=bool)
        idx = self.idx
        per_kv, c, const = layer_param_coefficients(s)
        params = batch_params(s, kv, inter)
        dropped = kv[:, idx] == 0
        mn = np.where(dropped, 0, self.mlp_lo[None, :])
        mx = np.where(dropped, 0, self.mlp_hi[None, :])
        cur = inter[:, idx]
        base = params - c * cur.sum(1)
        s_min, s_max = mn.sum(1), mx.sum(1)

        # 1. attention, only where the MLP alone cannot reach the window
        too_big = np.flatnonzero(base + c * s_min > hi)
        if len(too_big):
            self._shift_attention(kv, base, too_big, lambda b, r: b + c * s_min[r] > hi, -1, per_kv)
        # 1b. with allow_drop, where even the narrowest kept layers are too big: drop layers, least
        #     important first, keeping at least one layer
        if self.allow_drop and len(too_big):
            rows = too_big[base[too_big] + c * s_min[too_big] > hi]
            kept = (kv > 0).sum(1)
            for p in np.argsort(self._imp("attn") + self._imp("mlp"), kind="stable"):
                if not len(rows):
                    break
                if self.kv_lo[p] != 0:
                    continue
                l = idx[p]
                drop = rows[(kv[rows, l] > 0) & (kept[rows] > 1)]
                base[drop] -= per_kv * kv[drop, l] + const
                s_min[drop] -= mn[drop, p]
                s_max[drop] -= mx[drop, p]
                mn[drop, p] = mx[drop, p] = cur[drop, p] = 0
                kv[drop, l] = inter[drop, l] = 0
                kept[drop] -= 1
                rows = rows[base[rows] + c * s_min[rows] > hi]
        too_small = np.flatnonzero(base + c * s_max < lo)
        if len(too_small):
            self._shift_attention(kv, base, too_small, lambda b, r: b + c * s_max[r] < lo, +1, per_kv)

        # 2. MLP widths in closed form
        s_cur = cur.sum(1)
        s_hi = np.floor((hi - base) / c).astype(np.int64)
        s_lo = np.ceil((lo - base) / c).astype(np.int64)
        move = (s_cur > s_hi) | (s_cur < s_lo)
        if move.any():
            rows = np.flatnonzero(move)
            target = np.clip(s_hi[rows], s_min[rows], s_max[rows])
            inter[np.ix_(rows, idx)] = self._solve_mlp(cur[rows], mn[rows], mx[rows], target)
        out = LayerBatch(s, kv, inter)
        p = out.params
        return out, (p >= lo) & (p <= hi)

    def _shift_attention(self, kv, base, rows, still, step, per_kv) -> None:
        """Round robin: one KV group per layer per pass, least (step -1) / most (+1) important first."""
        imp = self._imp("attn")
        order = np.argsort(imp if step < 0 else -imp, kind="stable")
        idx = self.idx
        sub_kv = kv[np.ix_(rows, idx)]
        sub_base = base[rows].copy()
        need = still(sub_base, rows)
        for _ in range(self.spec.num_kv_heads):
            if not need.any():
                break
            for p in order:
                if step < 0:
                    can = need & (sub_kv[:, p] > max(1, self.kv_lo[p]))
                else:
                    can = need & (sub_kv[:, p] > 0) & (sub_kv[:, p] < self.kv_hi[p])
                sub_kv[can, p] += step
                sub_base[can] += step * per_kv
                need = still(sub_base, rows)
                if not need.any():
                    break
        kv[np.ix_(rows, idx)] = sub_kv
        base[rows] = sub_base

    def _solve_mlp(self, cur: np.ndarray, mn: np.ndarray, mx: np.ndarray, target: np.ndarray) -> np.ndarray:
        """Widths with sum == target (up to one multiple below), moving each layer along its room."""
        cur = cur.astype(float)
        s_cur = cur.sum(1)
        shrink = target < s_cur
        imp = self._imp("mlp")
        new = cur.copy()
        for sel, room, rate, sign in (
                (shrink, cur - mn, 1.0 / (0.2 + imp), -1.0),
                (~shrink, mx - cur, 0.2 + imp, 1.0)):
            if not sel.any():
                continue
            r = room[sel]
            demand = np.abs(target[sel] - s_cur[sel]).astype(float)
            order = np.argsort(1.0 / rate, kind="stable")            # breakpoints t_l = 1 / rate_l
            bp = (1.0 / rate)[order]
            rs = r[:, order]
            C = np.cumsum(rs, axis=1)                                  # saturated room
            W = (rs * rate[order]).sum(1, keepdims=True) - np.cumsum(rs * rate[order], axis=1)
            f_bp = C + bp[None, :] * W                                 # moved amount at each breakpoint
            j = (f_bp < demand[:, None] - 1e-9).sum(1)                 # segment index
            C0 = np.c_[np.zeros(len(r)), C][np.arange(len(r)), j]
            W_full = (rs * rate[order]).sum(1)
            W0 = np.c_[W_full, W][np.arange(len(r)), j]
            t = np.where(W0 > 0, (demand - C0) / np.where(W0 > 0, W0, 1.0), np.inf)
            moved = r * np.minimum(1.0, t[:, None] * rate[None, :])
            new[sel] = cur[sel] + sign * moved
        # round down to the multiple (full width stays), then fill the remainder
        m = self.multiple
        fl = np.floor(new / m + 1e-9).astype(np.int64) * m
        fl = np.where(new >= mx - 1e-6, mx, fl)
        fl = np.clip(fl, mn, mx)
        resid = target - fl.sum(1)
        frac = new - fl
        order = np.argsort(-frac, axis=1, kind="stable")
        rows = np.arange(len(fl))
        for k in range(fl.shape[1]):
            pos = order[:, k]
            head = mx[rows, pos] - fl[rows, pos]
            step = np.minimum(m, head)
            ok = (step > 0) & (step <= resid)
            fl[rows[ok], pos[ok]] += step[ok]
            resid = resid - np.where(ok, step, 0)
        return fl

    # -- description -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        I, K = self.spec.intermediate_size, self.spec.num_kv_heads
        dims = []
        for p, l in enumerate(self.layers):
            dims.append({"layer": int(l), "kv": [int(self.kv_lo[p]), int(self.kv_hi[p])],
                         "mlp": [int(self.mlp_lo[p]), int(self.mlp_hi[p])],
                         "attn_frac": [round(self.kv_lo[p] / K, 4), round(self.kv_hi[p] / K, 4)],
                         "mlp_frac": [round(self.mlp_lo[p] / I, 4), round(self.mlp_hi[p] / I, 4)]})
        return {"layers": [int(l) for l in self.layers], "multiple": self.multiple,
                "mlp_grid_step": self.mlp_grid_step, "allow_drop": self.allow_drop,
                "attn_keep_prob": self.attn_keep_prob, "attn_decay": self.attn_decay,
                "dims": dims, "refinement": self.refinement}


def build_space(spec: BaseSpec, layers: Sequence[int] | str | None = None, *, mlp_min_frac: float = 0.1,
                attn_min_groups: int = 1, mlp_grid_step: float = 0.05,
                multiple: int = DEFAULT_CHANNEL_MULTIPLE, allow_drop: bool = False,
                attn_keep_prob: float = 0.5, attn_decay: float = 4.0, drop_prob: float = 0.03) -> SearchSpace:
    """The default space: every layer in ``layers`` (``"3-29"`` inclusive, a list, or all) prunable."""
    if layers is None or isinstance(layers, str):
        idx = parse_layer_range(layers, spec.num_layers)
    else:
        idx = sorted(set(int(i) for i in layers))
        if idx and (idx[0] < 0 or idx[-1] >= spec.num_layers):
            raise ValueError(f"prunable layers must lie in 0..{spec.num_layers - 1}")
    if not idx:
        raise ValueError("the search space needs at least one prunable layer")
    if not (0.0 < mlp_min_frac <= 1.0):
        raise ValueError("mlp_min_frac must lie in (0, 1]")
    if not (0.0 < attn_keep_prob < 1.0):
        raise ValueError("attn_keep_prob must lie in (0, 1)")
    P = len(idx)
    kv_lo = np.full(P, 0 if allow_drop else max(1, min(attn_min_groups, spec.num_kv_heads)), dtype=np.int64)
    kv_hi = np.full(P, spec.num_kv_heads, dtype=np.int64)
    mlp_lo = np.full(P, round_channels(spec, mlp_min_frac * spec.intermediate_size, multiple), dtype=np.int64)
    mlp_hi = np.full(P, spec.intermediate_size, dtype=np.int64)
    return SearchSpace(spec, tuple(idx), kv_lo, kv_hi, mlp_lo, mlp_hi, multiple=multiple,
                       mlp_grid_step=mlp_grid_step, allow_drop=allow_drop, drop_prob=drop_prob,
                       attn_keep_prob=attn_keep_prob, attn_decay=attn_decay)


def trust_bounds(predictors: Mapping[str, Any] | Sequence[Any]) -> dict[str, float] | None:
    """Smallest kept fractions of attention and MLP the predictors saw in training.

    Tree ensembles extrapolate flat: beyond the narrowest width in the archive, pruning more looks
    free to them, and a search would exploit exactly that. Reads per-layer (``attn_l*``,
    ``mlp_l*``) or depth-profile (``attn_p*``, ``mlp_p*``) feature ranges; the largest minimum over
    the predictors wins. ``None`` when no predictor records ranges.
    """
    preds = list(predictors.values()) if isinstance(predictors, Mapping) else list(predictors)
    out: dict[str, float] = {}
    for pr in preds:
        rng = pr.training_range() if hasattr(pr, "training_range") else {}
        for kind in ("attn", "mlp"):
            vals = [lo for n, (lo, _) in rng.items() if n.startswith(kind + "_l") or n.startswith(kind + "_p")]
            if vals:
                out[kind] = max(out.get(kind, 0.0), float(min(vals)))
    return out or None


def dimension_importance(predictors: Mapping[str, Any] | Sequence[Any], spec: BaseSpec,
                         layers: Sequence[int]) -> tuple[np.ndarray, np.ndarray] | None:
    """Per prunable layer, attention and MLP importance from the predictors' feature importances.

    Each predictor's importances (summing to 1) are mapped to layers with ``layer_attribution``;
    predictors count equally; the result is normalised to sum to 1 over both kinds together.
    ``None`` when no predictor reports importances tied to layer widths.
    """
    preds = list(predictors.values()) if isinstance(predictors, Mapping) else list(predictors)
    L = spec.num_layers
    attn, mlp = np.zeros(L), np.zeros(L)
    for pr in preds:
        if not hasattr(pr, "feature_importances"):
            continue
        imps = pr.feature_importances()
        attr = layer_attribution(list(imps), L)
        a, m = np.zeros(L), np.zeros(L)
        for name, value in imps.items():
            if name in attr:
                kind, w = attr[name]
                (a if kind == "attn" else m)[:] += value * w
        total = a.sum() + m.sum()
        if total > 0:
            attn += a / total
            mlp += m / total
    idx = np.asarray(layers, dtype=np.int64)
    a, m = attn[idx], mlp[idx]
    total = a.sum() + m.sum()
    if total <= 0:
        return None
    return a / total, m / total


def refine_space(space: SearchSpace, predictors: Mapping[str, Any] | Sequence[Any], *,
                 elite: LayerBatch | Sequence[Architecture] | None = None, coverage: float = 0.9,
                 min_free_frac: float = 0.25, margin: float = 0.05, quantiles: tuple[float, float] = (0.1, 0.9),
                 elite_source: str | None = None) -> SearchSpace:
    """Narrow ``space`` using predictor importances; returns a new space whose ``refinement`` is a
    JSON-ready record of every dimension's importance, status and range.

    The dimensions (attention and MLP of each prunable layer) that together carry ``coverage`` of
    the importance stay free (at least ``min_free_frac`` of them). The others are narrowed to where
    the ``elite`` (the best architectures known: archive or predicted) lives: attention to the
    elite's ``quantiles`` range of KV groups (fixed when the elite agrees on one value), MLP to its
    quantile range widened by ``margin`` of the width on each side (the repair needs slack there).
    Without an elite, unimportant attention is fixed at full width (see the module doc on attention)
    and MLP ranges stay as they are. Without importances, the space is returned unchanged.
    """
    spec, idx, P = space.spec, space.idx, space.P
    names = list(predictors) if isinstance(predictors, Mapping) else [getattr(p, "metric", "?") for p in predictors]
    di = dimension_importance(predictors, spec, space.layers)
    if di is None:
        return replace(space, refinement={"method": "skipped: no predictor reports feature importances",
                                          "metrics": names, "dims": []})
    a_imp, m_imp = di
    movable = np.r_[space.movable_attn(), space.movable_mlp()]
    imp = np.r_[a_imp, m_imp]
    order = np.argsort(-np.where(movable, imp, -1.0), kind="stable")
    n_mov = int(movable.sum())
    need = min(n_mov, max(1, int(math.ceil(min_free_frac * n_mov))))
    total = float(imp[movable].sum())
    free = np.zeros(2 * P, dtype=bool)
    acc = 0.0
    for rank, d in enumerate(order[:n_mov]):
        if rank >= need and total > 0 and acc >= coverage * total:
            break
        free[d] = True
        acc += imp[d]

    eb = None
    if elite is not None:
        eb = space.project(elite if isinstance(elite, LayerBatch) else encode(elite, spec))
        if not len(eb):
            eb = None
    m = space.multiple
    I = spec.intermediate_size
    kv_lo, kv_hi = space.kv_lo.copy(), space.kv_hi.copy()
    mlp_lo, mlp_hi = space.mlp_lo.copy(), space.mlp_hi.copy()
    if eb is not None:
        ekv, emlp = eb.kv[:, idx], eb.inter[:, idx]
        center_kv = np.clip(np.floor(np.median(ekv, axis=0) + 0.5).astype(np.int64), space.kv_lo, space.kv_hi)
        center_mlp = space.round_mlp(np.median(emlp, axis=0))
        q_kv = np.quantile(ekv, quantiles, axis=0, method="nearest").astype(np.int64)
        q_mlp = np.quantile(emlp, quantiles, axis=0)
    else:
        center_kv = space.kv_hi.copy()
        center_mlp = space.round_mlp((space.mlp_lo + space.mlp_hi) / 2.0)
    pad = int(round(margin * I))
    dims = []
    for d in range(2 * P):
        p, kind = d % P, ("attn" if d < P else "mlp")
        before = [int(kv_lo[p]), int(kv_hi[p])] if kind == "attn" else [int(mlp_lo[p]), int(mlp_hi[p])]
        fav = int(center_kv[p] if kind == "attn" else center_mlp[p])
        if not movable[d]:
            status = "fixed"
        elif free[d]:
            status = "free"
        elif kind == "attn":
            lo_, hi_ = (int(q_kv[0, p]), int(q_kv[1, p])) if eb is not None else (int(kv_hi[p]), int(kv_hi[p]))
            lo_, hi_ = max(lo_, int(kv_lo[p])), min(hi_, int(kv_hi[p]))
            kv_lo[p], kv_hi[p] = lo_, hi_
            status = "fixed" if lo_ == hi_ else "narrowed"
            fav = int(np.clip(fav, lo_, hi_))
            center_kv[p] = fav
        elif eb is not None:
            lo_ = max(int(space.mlp_lo[p]), int(q_mlp[0, p] - pad) // m * m)
            hi_ = min(int(space.mlp_hi[p]), -(-int(q_mlp[1, p] + pad) // m) * m)
            mlp_lo[p], mlp_hi[p] = lo_, max(lo_, hi_)
            status = "narrowed" if (lo_, hi_) != tuple(before) else "unchanged"
        else:
            status = "unchanged"
        after = [int(kv_lo[p]), int(kv_hi[p])] if kind == "attn" else [int(mlp_lo[p]), int(mlp_hi[p])]
        dims.append({"layer": int(idx[p]), "kind": kind, "importance": round(float(imp[d]), 5),
                     "status": status, "range_before": before, "range_after": after, "favoured": fav})
    dims.sort(key=lambda r: -r["importance"])
    record = {
        "method": "feature-importance refinement (Ji, Cao, Liu 2023), automated",
        "metrics": names, "coverage": coverage, "min_free_frac": min_free_frac, "margin": margin,
        "quantiles": list(quantiles),
        "free": int(free.sum()), "fixed": sum(r["status"] == "fixed" for r in dims),
        "narrowed": sum(r["status"] == "narrowed" for r in dims),
        "importance_covered": round(float(imp[free].sum() / total), 4) if total > 0 else None,
        "elite": {"source": elite_source or ("given" if eb is not None else "none"),
                  "size": 0 if eb is None else int(len(eb))},
        "dims": dims,
    }
    return replace(space, kv_lo=kv_lo, kv_hi=kv_hi, mlp_lo=mlp_lo, mlp_hi=mlp_hi,
                   attn_importance=a_imp, mlp_importance=m_imp, free_attn=free[:P], free_mlp=free[P:],
                   center_kv=center_kv, center_mlp=np.clip(center_mlp, mlp_lo, mlp_hi), refinement=record)
