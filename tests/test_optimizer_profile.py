"""The sensitivity profile: single-layer variants, damages, and the least-damage architecture at a size."""

from __future__ import annotations

import math

import numpy as np
import pytest

from archopt.archdb.arch import BaseSpec
from archopt.optimizer.profile import Profile, profile_starts, profile_variants, solve

DEEP = BaseSpec(family="llama", num_layers=24, hidden_size=192, num_heads=6, num_kv_heads=2, head_dim=32,
                intermediate_size=512, vocab_size=4096, tie_embeddings=True)
GQA93 = BaseSpec(family="llama", num_layers=30, hidden_size=576, num_heads=9, num_kv_heads=3, head_dim=64,
                 intermediate_size=1536, vocab_size=49152, tie_embeddings=True)


def synthetic(spec: BaseSpec, sensitive: set[int], attn: float = 0.2, drop: float = 1.0) -> Profile:
    """Damages: MLP quadratic in the removed share, 20x worse in ``sensitive`` layers."""
    variants = profile_variants(spec)
    base = 100.0
    values = []
    for v in variants:
        if v.kind == "mlp":
            removed = 1 - v.level / spec.intermediate_size
            values.append(base * math.exp(removed ** 2 * (0.2 if v.layer in sensitive else 0.01)))
        elif v.kind == "attn":
            values.append(base * math.exp(attn))
        else:
            values.append(base * math.exp(drop))
    return Profile.from_values(spec, variants, values, base)


@pytest.mark.parametrize("spec", [DEEP, GQA93], ids=["24l-6q2kv", "30l-9q3kv"])
def test_variants_change_one_layer_each(spec):
    variants = profile_variants(spec)
    per_layer = (spec.num_kv_heads - 1) + 4 + 1
    assert len(variants) == spec.num_layers * per_layer
    full = spec.full_layer()
    for v in variants:
        changed = [i for i, layer in enumerate(v.architecture.layers) if layer != full]
        assert changed == [v.layer]


def test_solve_prunes_where_it_hurts_least_and_fits_the_window():
    profile = synthetic(DEEP, sensitive={0, 1, 2, 23})
    target = int(DEEP.total_params * 0.6)
    lo = int(target * 0.98)
    arch = solve(profile, lo, target)
    assert arch is not None and lo <= arch.params <= target
    kept = np.array([layer.intermediate for layer in arch.layers])
    # the sensitive layers keep (much) more of their MLP than the others
    assert kept[[0, 1, 2, 23]].min() > kept[3:23].max()
    assert all(layer.kv_heads == DEEP.num_kv_heads for layer in arch.layers)  # attention is costly here
    nxt = solve(profile, lo, target, exclude=[arch])
    assert nxt is not None and nxt != arch and lo <= nxt.params <= target


def test_solve_drops_a_layer_when_that_is_cheapest():
    profile = synthetic(DEEP, sensitive=set(range(24)), attn=0.5, drop=0.01)
    target = int(DEEP.total_params * 0.8)
    arch = solve(profile, int(target * 0.98), target)
    assert arch is not None and any(layer.dropped for layer in arch.layers)
    # starts and proposals follow the search: no dropped layer unless allowed (query --allow-drop)
    kept = solve(profile, int(target * 0.98), target, allow_drop=False)
    assert kept is not None and not any(layer.dropped for layer in kept.layers)
    assert not any(l.dropped for _, a in profile_starts(profile, int(target * 0.98), target) for l in a.layers)
    assert any(l.dropped for _, a in profile_starts(profile, int(target * 0.98), target, allow_drop=True)
               for l in a.layers)


def test_solve_says_none_when_nothing_fits():
    profile = synthetic(DEEP, sensitive=set())
    tiny = DEEP.embedding_params() + 10
    assert solve(profile, tiny - 5, tiny) is None


def test_unmeasured_variants_are_never_chosen():
    variants = profile_variants(DEEP)
    values = [None if v.kind == "drop" else 100.0 * math.exp(0.01) for v in variants]
    profile = Profile.from_values(DEEP, variants, values, 100.0)
    target = int(DEEP.total_params * 0.7)
    arch = solve(profile, int(target * 0.98), target)
    assert arch is not None and not any(layer.dropped for layer in arch.layers)


def test_profile_starts_are_the_best_distinct_solutions():
    profile = synthetic(DEEP, sensitive={0, 1, 2, 23})
    target = int(DEEP.total_params * 0.6)
    starts = profile_starts(profile, int(target * 0.98), target, n=3)
    assert [name for name, _ in starts] == ["profile-1", "profile-2", "profile-3"]
    assert starts[0][1] == solve(profile, int(target * 0.98), target, allow_drop=False)
    assert len({arch for _, arch in starts}) == 3
