"""Architectures to measure for ``archopt evaluate``: random, the paper's ratio samples, uniform baselines."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from archopt.archdb.arch import Architecture, BaseSpec, from_ratios, uniform

from .space import build_space, size_window

SAMPLERS = ("random", "paper")
PAPER_RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5)


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


def random_samples(spec: BaseSpec, n: int, rng: np.random.Generator, layers: Sequence[int] | None = None,
                   target_params: int | None = None, tolerance: float = 0.02) -> list[Architecture]:
    """Per-layer widths from the search space's sampler (attention biased toward kept), optionally
    repaired into the size window ``[target * (1 - tolerance), target]``."""
    space = build_space(spec, list(layers) if layers is not None else None)
    batch = space.sample(n, rng)
    if target_params is not None:
        lo, hi = size_window(target_params, tolerance)
        batch, ok = space.repair(batch, lo, hi)
        batch = batch.take(np.flatnonzero(ok))
    return batch.architectures()


def sample_architectures(spec: BaseSpec, n: int, sampler: str = "random", *, seed: int = 0,
                         layers: Sequence[int] | None = None, ratios: Sequence[float] = PAPER_RATIOS,
                         target_params: int | None = None, tolerance: float = 0.02) -> list[Architecture]:
    """``n`` distinct architectures (fewer if the space is too small), deterministic for ``seed``."""
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
            batch = random_samples(spec, want, rng, layers, target_params, tolerance)
        for arch in batch:
            seen.setdefault(arch.canonical_json(), arch)
    return list(seen.values())[:n]


def uniform_baselines(spec: BaseSpec, ratios: Sequence[float], layers: Sequence[int] | None = None) -> list[Architecture]:
    """LLM-Pruner's baseline: one ratio on every prunable layer, attention and MLP alike."""
    return [uniform(spec, r, layers) for r in ratios]
