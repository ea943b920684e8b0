"""Architectures to measure for ``archopt evaluate``: random, the paper's ratio samples, uniform baselines.

Random samples keep attention whole in a share of them (``MLP_ONLY_SHARE``, a quarter by
default). The space's sampler keeps each layer's attention whole with probability 0.5, so on a
deep model nearly every sample prunes attention somewhere (on a 24-layer, 2-KV-group model at 60%
of the size: all of 200 samples, 12 layers each on average), while measurements say pruning the
MLP alone is far cheaper there (see ``optimizer.starts``). Without MLP-only samples the
predictors would never see that region.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from archopt.archdb.arch import Architecture, BaseSpec, from_ratios, uniform

from .encoding import LayerBatch
from .space import build_space, size_window

SAMPLERS = ("random", "paper")
PAPER_RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5)
MLP_ONLY_SHARE = 0.25


def paper_samples(spec: BaseSpec, n: int, rng: np.random.Generator, layers: Sequence[int] | None = None,
                  ratios: Sequence[float] = PAPER_RATIOS) -> list[Architecture]:
    """The seed paper's encoding: an attention and an MLP ratio per pruned layer, drawn from ``ratios``."""
    idx = list(range(spec.num_layers)) if layers is None else list(layers)
    values = np.asarray(ratios, dtype=float)
    out = []
    for _ in range(n):
        attn = rng.choice(values, size=len(idx))
        mlp = rng.choice(values, size=len(idx))
        out.append(from_ratios(spec, attn.tolist(), mlp.tolist(), idx))
    return out


def mlp_only_rows(n: int, share: float) -> np.ndarray:
    """Which of ``n`` samples keep attention whole: evenly interleaved, ``floor(n * share)`` of them
    (rows 3, 7, 11, ... for a quarter), so the random stream of the others does not change."""
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"mlp_only_share must lie in [0, 1], got {share!r}")
    i = np.arange(n)
    return np.floor((i + 1) * share + 1e-9) > np.floor(i * share + 1e-9)


def random_samples(spec: BaseSpec, n: int, rng: np.random.Generator, layers: Sequence[int] | None = None,
                   target_params: int | None = None, tolerance: float = 0.02,
                   mlp_only_share: float = MLP_ONLY_SHARE) -> list[Architecture]:
    """Per-layer widths from the search space's sampler (attention biased toward kept; in
    ``mlp_only_share`` of the samples kept whole, see the module doc), optionally repaired into the
    size window ``[target * (1 - tolerance), target]`` (the repair removes KV groups only when the
    narrowest MLP cannot reach it)."""
    space = build_space(spec, list(layers) if layers is not None else None)
    batch = space.sample(n, rng)
    whole = mlp_only_rows(n, mlp_only_share)
    if whole.any():
        kv = batch.kv.copy()
        kv[whole] = np.where(kv[whole] > 0, spec.num_kv_heads, 0)
        batch = LayerBatch(spec, kv, batch.inter)
    if target_params is not None:
        lo, hi = size_window(target_params, tolerance)
        batch, ok = space.repair(batch, lo, hi)
        batch = batch.take(np.flatnonzero(ok))
    return batch.architectures()


def sample_architectures(spec: BaseSpec, n: int, sampler: str = "random", *, seed: int = 0,
                         layers: Sequence[int] | None = None, ratios: Sequence[float] = PAPER_RATIOS,
                         target_params: int | None = None, tolerance: float = 0.02,
                         mlp_only_share: float = MLP_ONLY_SHARE) -> list[Architecture]:
    """``n`` distinct architectures (fewer if the space is too small), deterministic for ``seed``;
    ``mlp_only_share``: see ``random_samples``."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}: use {' or '.join(SAMPLERS)}")
    rng = np.random.default_rng(seed)
    seen: dict[str, Architecture] = {}
    for _ in range(20):
        want = n - len(seen)
        if want <= 0:
            break
        if sampler == "paper":
            batch = paper_samples(spec, want, rng, layers, ratios)
        else:
            batch = random_samples(spec, want, rng, layers, target_params, tolerance, mlp_only_share)
        for arch in batch:
            seen.setdefault(arch.canonical_json(), arch)
    return list(seen.values())[:n]


def uniform_baselines(spec: BaseSpec, ratios: Sequence[float], layers: Sequence[int] | None = None) -> list[Architecture]:
    """LLM-Pruner's baseline: one ratio on every prunable layer, attention and MLP alike."""
    return [uniform(spec, r, layers) for r in ratios]
