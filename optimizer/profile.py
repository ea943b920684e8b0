"""A base model's sensitivity profile: what pruning each layer alone costs, and the architecture it
suggests for any size.

The profile is a set of single-layer variants of the base model, each measured once on a cheap
fidelity of the objective (the same text on fewer tokens, its own protocol): one layer's attention
at each smaller number of KV groups, its MLP at a few kept fractions, or the layer dropped. They
are ordinary architectures in the archive (origin ``profile``), so a later query of the same base
model, at any size, reuses them: a new target needs no new evaluation.

A layer's *damage* is the rise of the metric over the unpruned base under the same cheap protocol:
of its log for perplexities, of the value itself for ``kl_base`` (the base's own KL is 0, and KL
divergences of small independent changes add up); ``damage_scale`` says which. Damages are taken
as additive across layers and between a layer's attention and MLP (NVIDIA Puzzle's and EvoPress'
database assumption, which is only approximately true); MLP damage is interpolated linearly in
the kept fraction between measured levels. ``solve`` assembles, by a mixed-integer program (``scipy.optimize.milp``), the
architecture of least total damage in the size window ``[lo, target]``: a strong start for the
verification rounds, measured for real before it is trusted.

Torch-free: measuring is the caller's (``optimizer.verify.Verifier.profile``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from archopt.archdb.arch import DROPPED, Architecture, BaseSpec, LayerSpec, round_channels

from .encoding import layer_param_coefficients

MLP_FRACTIONS = (0.75, 0.5, 0.25, 0.125)   # kept MLP fractions measured per layer
GRID = 16                                 # MLP widths the program chooses among (interpolated)

__all__ = ["MLP_FRACTIONS", "Profile", "damage_scale", "profile_solutions", "profile_starts", "profile_variants",
           "solve"]


def damage_scale(metric: str) -> str | None:
    """``"log"`` for a perplexity, ``"raw"`` for ``kl_base``: the scale damages of ``metric`` are
    measured on; None for a metric that has no profile (accuracies)."""
    if metric.startswith("ppl"):
        return "log"
    return "raw" if metric == "kl_base" else None


@dataclass(frozen=True)
class Variant:
    """One single-layer variant: ``kind`` ``attn`` (``level`` KV groups kept), ``mlp`` (``level``
    channels kept) or ``drop``."""

    kind: str
    layer: int
    level: int
    architecture: Architecture


def profile_variants(spec: BaseSpec, fractions: Sequence[float] = MLP_FRACTIONS,
                     allow_drop: bool = True) -> list[Variant]:
    """Every single-layer variant the profile measures (attention, MLP levels, drop per layer)."""
    full = spec.full_layer()
    out: list[Variant] = []
    for layer in range(spec.num_layers):
        for kv in range(1, spec.num_kv_heads):
            out.append(Variant("attn", layer, kv, _with(spec, layer, LayerSpec(kv * spec.group_size, kv,
                                                                              full.intermediate, False))))
        for frac in fractions:
            inter = round_channels(spec, frac * spec.intermediate_size)
            if 0 < inter < spec.intermediate_size:
                out.append(Variant("mlp", layer, inter, _with(spec, layer, LayerSpec(full.q_heads, full.kv_heads,
                                                                                    inter, False))))
        if allow_drop:
            out.append(Variant("drop", layer, 0, _with(spec, layer, DROPPED)))
    return out


def _with(spec: BaseSpec, layer: int, spec_layer: LayerSpec) -> Architecture:
    layers = [spec.full_layer()] * spec.num_layers
    layers[layer] = spec_layer
    return Architecture(spec, tuple(layers))


@dataclass(frozen=True)
class Profile:
    """Measured damages of single-layer variants (base subtracted; on a log scale for perplexities,
    raw for ``kl_base``: ``damage_scale``)."""

    spec: BaseSpec
    attn: dict[tuple[int, int], float]      # (layer, kv groups kept) -> damage
    mlp: dict[tuple[int, int], float]       # (layer, channels kept) -> damage
    drop: dict[int, float]                  # layer -> damage of dropping it

    @classmethod
    def from_values(cls, spec: BaseSpec, variants: Sequence[Variant], values: Sequence[float | None],
                    base_value: float, log_scale: bool = True) -> "Profile":
        """Damages from measured values of ``variants`` (None: not measured) and the base's value."""
        def damage(v: float) -> float:
            return float(np.log(v) - np.log(base_value)) if log_scale else float(v - base_value)
        attn, mlp, drop = {}, {}, {}
        for var, value in zip(variants, values):
            if value is None or not np.isfinite(value):
                continue
            if var.kind == "attn":
                attn[(var.layer, var.level)] = damage(value)
            elif var.kind == "mlp":
                mlp[(var.layer, var.level)] = damage(value)
            else:
                drop[var.layer] = damage(value)
        return cls(spec, attn, mlp, drop)

    def mlp_damage(self, layer: int, inter: int) -> float | None:
        """Damage of ``layer``'s MLP at ``inter`` channels, interpolated between measured widths (the
        full width costs 0); None below the narrowest measured width."""
        points = sorted([(w, d) for (l, w), d in self.mlp.items() if l == layer] + [(self.spec.intermediate_size, 0.0)])
        if inter < points[0][0]:
            return None
        widths, damages = zip(*points)
        return float(np.interp(inter, widths, damages))

    def attn_damage(self, layer: int, kv: int) -> float | None:
        return 0.0 if kv == self.spec.num_kv_heads else self.attn.get((layer, kv))

    def tables(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per-layer damage lookup tables: ``attn [L, KV + 1]`` by KV groups kept, ``mlp [L, I + 1]``
        by channels kept and ``drop [L]``. Unmeasured levels are interpolated linearly between
        measured ones (the full layer costs 0) and extrapolated from the last measured segment
        below the narrowest; a layer with no measured level of a kind (its runs failed) costs, at
        each level, the most any layer costs there; an unmeasured drop costs the layer's narrowest
        attention and MLP together."""
        spec = self.spec
        L, KV, inter = spec.num_layers, spec.num_kv_heads, spec.intermediate_size
        attn = np.stack([_curve([(kv, d) for (l, kv), d in self.attn.items() if l == layer], KV)
                         for layer in range(L)])
        mlp = np.stack([_curve([(w, d) for (l, w), d in self.mlp.items() if l == layer], inter)
                        for layer in range(L)])
        for table in (attn, mlp):
            missing = np.isnan(table).all(axis=1)
            table[missing] = np.nanmax(table[~missing], axis=0) if (~missing).any() else 0.0
        drop = np.array([self.drop.get(layer, attn[layer, 1] + mlp[layer, 0]) for layer in range(L)])
        return attn, mlp, drop

    def damage_parts(self, kv: np.ndarray, inter: np.ndarray) -> np.ndarray:
        """``[N, 3]`` additive damage estimates (attention, MLP, dropped layers) of ``N``
        architectures given as ``[N, L]`` KV groups and MLP channels kept (``kv == 0``: dropped)."""
        attn, mlp, drop = self._tables()
        kv = np.atleast_2d(np.asarray(kv, dtype=np.int64))
        inter = np.atleast_2d(np.asarray(inter, dtype=np.int64))
        rows = np.arange(self.spec.num_layers)[None, :]
        dropped = kv == 0
        a = np.where(dropped, 0.0, attn[rows, np.clip(kv, 0, attn.shape[1] - 1)])
        m = np.where(dropped, 0.0, mlp[rows, np.clip(inter, 0, mlp.shape[1] - 1)])
        d = np.where(dropped, drop[rows], 0.0)
        return np.stack([a.sum(1), m.sum(1), d.sum(1)], axis=1)

    def _tables(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        cached = self.__dict__.get("_cached_tables")
        if cached is None:
            cached = self.tables()
            object.__setattr__(self, "_cached_tables", cached)
        return cached

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_cached_tables"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)


def _curve(points: Sequence[tuple[int, float]], full: int) -> np.ndarray:
    """Damage at every level ``0..full`` from measured ``(level, damage)`` points and ``(full, 0)``;
    all NaN without a measured point. Never below the least measured damage (or 0)."""
    if not points:
        return np.full(full + 1, np.nan)
    pts = sorted(set(points) | {(full, 0.0)})
    levels = np.array([p[0] for p in pts], dtype=float)
    damages = np.array([p[1] for p in pts], dtype=float)
    grid = np.arange(full + 1, dtype=float)
    out = np.interp(grid, levels, damages)
    below = grid < levels[0]
    slope = (damages[1] - damages[0]) / (levels[1] - levels[0])
    out[below] = damages[0] + slope * (grid[below] - levels[0])
    return np.maximum(out, min(0.0, float(damages.min())))


def solve(profile: Profile, lo: int, target: int, *, layers: Sequence[int] | None = None,
          exclude: Sequence[Architecture] = (), allow_drop: bool = True) -> Architecture | None:
    """The architecture of least total damage with ``lo <= params <= target`` (None if none fits),
    choosing per layer a number of KV groups, an MLP width on a grid of ``GRID`` steps (damage
    interpolated), or dropping it (unless ``allow_drop`` is off); ``layers`` limits what may change;
    ``exclude`` architectures are cut off (the next-best solutions)."""
    from scipy.optimize import Bounds, LinearConstraint, milp

    spec = profile.spec
    per_kv, per_ch, const = layer_param_coefficients(spec)
    free = set(range(spec.num_layers) if layers is None else layers)
    full = spec.full_layer()
    widths = sorted({round_channels(spec, k * full.intermediate / GRID) for k in range(1, GRID + 1)})
    cols: list[tuple[int, str, int]] = []      # (layer, kind, level)
    cost: list[float] = []
    size: list[int] = []
    for layer in range(spec.num_layers):
        attn_levels = range(1, spec.num_kv_heads + 1) if layer in free else [spec.num_kv_heads]
        for kv in attn_levels:
            d = profile.attn_damage(layer, kv)
            if d is not None:
                cols.append((layer, "attn", kv)), cost.append(d), size.append(per_kv * kv)
        for inter in (widths if layer in free else [full.intermediate]):
            d = profile.mlp_damage(layer, inter)
            if d is not None and inter > 0:
                cols.append((layer, "mlp", inter)), cost.append(d), size.append(per_ch * inter)
        if allow_drop and layer in free and layer in profile.drop:
            cols.append((layer, "drop", 0)), cost.append(profile.drop[layer]), size.append(-const)
    n = len(cols)
    rows_attn = np.zeros((spec.num_layers, n))
    rows_mlp = np.zeros((spec.num_layers, n))
    for j, (layer, kind, _) in enumerate(cols):
        if kind in ("attn", "drop"):
            rows_attn[layer, j] = 1
        if kind in ("mlp", "drop"):
            rows_mlp[layer, j] = 1
    fixed = spec.embedding_params() + const * spec.num_layers
    constraints = [LinearConstraint(rows_attn, 1, 1), LinearConstraint(rows_mlp, 1, 1),
                   LinearConstraint(np.array(size, dtype=float)[None, :], lo - fixed, target - fixed)]
    for arch in exclude:
        chosen = _columns_of(arch, cols)
        if chosen:
            row = np.zeros((1, n))
            row[0, chosen] = 1
            constraints.append(LinearConstraint(row, -np.inf, len(chosen) - 1))
    result = milp(np.array(cost), constraints=constraints, integrality=np.ones(n), bounds=Bounds(0, 1),
                  options={"time_limit": 30})
    if result.x is None:
        return None
    picked = [cols[j] for j in np.flatnonzero(result.x > 0.5)]
    layers_out = [full] * spec.num_layers
    kv = {layer: level for layer, kind, level in picked if kind == "attn"}
    inter = {layer: level for layer, kind, level in picked if kind == "mlp"}
    for layer in range(spec.num_layers):
        if any(l == layer and kind == "drop" for l, kind, _ in picked):
            layers_out[layer] = DROPPED
        else:
            groups = kv.get(layer, spec.num_kv_heads)
            layers_out[layer] = LayerSpec(groups * spec.group_size, groups, inter.get(layer, full.intermediate), False)
    return Architecture(spec, tuple(layers_out))


def profile_solutions(profile: Profile, lo: int, target: int, n: int, allow_drop: bool = False) -> list[Architecture]:
    """The ``n`` least-damage architectures in ``[lo, target]``, best first (each next one cut off
    the ones before it by a no-good constraint); fewer when the window holds fewer. Layers are
    dropped only with ``allow_drop`` (as the search drops them only with ``query --allow-drop``:
    a dropped layer's damage is the least additive of all, on ptb-llama-24l at 60% the
    least-damage architecture with three dropped layers measured 293.5 against 292.7 without)."""
    picked: list[Architecture] = []
    for _ in range(n):
        arch = solve(profile, lo, target, exclude=picked, allow_drop=allow_drop)
        if arch is None:
            break
        picked.append(arch)
    return picked


def profile_starts(profile: Profile, lo: int, target: int, n: int = 2,
                   allow_drop: bool = False) -> list[tuple[str, Architecture]]:
    """The ``n`` least-damage architectures in ``[lo, target]`` (``profile_solutions``), named
    ``profile-1``, ``profile-2``, ...: starts for the verification rounds."""
    return [(f"profile-{i + 1}", arch)
            for i, arch in enumerate(profile_solutions(profile, lo, target, n, allow_drop))]


def _columns_of(arch: Architecture, cols: Sequence[tuple[int, str, int]]) -> list[int]:
    """The program's columns that ``arch`` chooses (for a no-good cut)."""
    out = []
    for j, (layer, kind, level) in enumerate(cols):
        spec_layer = arch.layers[layer]
        if kind == "drop" and spec_layer.dropped:
            out.append(j)
        elif kind == "attn" and not spec_layer.dropped and spec_layer.kv_heads == level:
            out.append(j)
        elif kind == "mlp" and not spec_layer.dropped and spec_layer.intermediate == level:
            out.append(j)
    return out
