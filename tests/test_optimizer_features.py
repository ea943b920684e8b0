"""Features: names, depth resampling, family comparability, importance inputs, vectorisation."""


import numpy as np
import pytest

from archopt.archdb.arch import BaseSpec, from_ratios, uniform
from archopt.optimizer import Featurizer, ImportanceTable, LayerBatch, depth_weights, encode, featurize
from archopt.optimizer.features import layer_attribution

SPEC = BaseSpec("llama", 6, 64, 4, 2, 16, 96, 100)


def test_depth_weights_average_exactly():
    for L, B in [(8, 8), (16, 8), (24, 8), (6, 4), (5, 3), (32, 8)]:
        W = depth_weights(L, B)
        assert W.shape == (L, B)
        np.testing.assert_allclose(W.sum(0), 1.0)          # each bin is an average
        np.testing.assert_allclose(W.sum(1), B / L)         # each layer spread by its width
        np.testing.assert_allclose(np.full((1, L), 0.7) @ W, 0.7)  # constant profile stays constant
    np.testing.assert_allclose(depth_weights(8, 8), np.eye(8))


def test_model_features_per_layer_values():
    arch = from_ratios(SPEC, [0.5] + [0.0] * 5, [0.0, 0.5, 0, 0, 0, 0])
    X, names, fz = featurize([arch], "model")
    row = dict(zip(names, X[0]))
    assert row["attn_l0"] == 0.5 and row["attn_l1"] == 1.0
    assert row["mlp_l1"] == pytest.approx(48 / 96)
    assert row["param_frac"] == pytest.approx(arch.params / SPEC.total_params)
    assert row["attn_third0"] == pytest.approx(0.75)
    assert X.shape == (1, len(names)) and len(set(names)) == len(names)


def test_batch_and_architectures_agree():
    archs = [uniform(SPEC, r) for r in (0.0, 0.2, 0.4)]
    fz = Featurizer.for_spec(SPEC, "model", drop_flags=True)
    np.testing.assert_array_equal(fz.transform(archs), fz.transform(encode(archs)))


def test_family_features_same_columns_across_depths():
    deep = BaseSpec("llama", 12, 64, 4, 2, 16, 96, 100)
    fz = Featurizer("family")
    a, b = fz.transform([uniform(SPEC, 0.25)]), fz.transform([uniform(deep, 0.25)])
    assert a.shape == b.shape == (1, len(fz.names))
    prof = [i for i, n in enumerate(fz.names) if n.startswith(("attn_p", "mlp_p", "attn_third", "mlp_third"))]
    np.testing.assert_allclose(a[0, prof], b[0, prof])   # same uniform ratio: same profile
    with pytest.raises(ValueError):
        Featurizer.for_spec(SPEC, "model").transform([uniform(deep, 0.1)])


def test_dropped_layers_and_drop_flags():
    b = LayerBatch(SPEC, np.array([[2, 0, 2, 2, 2, 2]]), np.array([[96, 0, 96, 96, 96, 96]]))
    X, names, _ = featurize(b, "model", drop_flags=True)
    row = dict(zip(names, X[0]))
    assert row["drop_l1"] == 1.0 and row["attn_l1"] == 0.0 and row["drop_frac"] == pytest.approx(1 / 6)


def test_importance_table_shares_and_callable():
    rng = np.random.default_rng(0)
    table = ImportanceTable(rng.random((6, 2)).tolist(), rng.random((6, 96)).tolist())
    full = encode([uniform(SPEC, 0.0)])
    a, m = table(full)
    np.testing.assert_allclose(a, 0.0, atol=1e-12)
    np.testing.assert_allclose(m, 0.0, atol=1e-12)
    half = encode([uniform(SPEC, 0.5)])
    a, m = table(half)
    assert np.all((a > 0) & (a < 0.5))          # the kept group is the more important one
    assert np.all((m > 0) & (m < 0.5))
    fz = Featurizer.for_spec(SPEC, "model", importance=table)
    X = fz.transform(half)
    assert "attn_imp_l0" in fz.names and "mlp_imp_p0" in fz.names and X.shape[1] == len(fz.names)
    # arrays supplied by the caller instead of a callable
    fz2 = Featurizer.for_spec(SPEC, "family", importance_features=True)
    X2 = fz2.transform(half, importance=(a, m))
    assert X2.shape == (1, len(fz2.names))
    with pytest.raises(ValueError):
        fz2.transform(half)


def test_attribution_maps_to_layers():
    fz = Featurizer.for_spec(SPEC, "model", bins=3)
    attr = layer_attribution(fz.names, 6)
    kind, w = attr["mlp_p1"]
    assert kind == "mlp" and w.sum() == pytest.approx(1.0) and w[2] > 0 and w[0] == 0
    assert attr["attn_l4"][1][4] == 1.0
    assert "param_frac" not in attr


def test_vectorised_transform_of_20000_candidates():
    spec = BaseSpec("llama", 32, 4096, 32, 32, 128, 11008, 32000)
    rng = np.random.default_rng(0)
    b = LayerBatch(spec, rng.integers(1, 33, (20000, 32)), rng.integers(1, 1377, (20000, 32)) * 8)
    fz = Featurizer.for_spec(spec, "model")
    X = fz.transform(b)
    assert X.shape == (20000, len(fz.names)) and np.isfinite(X).all()
