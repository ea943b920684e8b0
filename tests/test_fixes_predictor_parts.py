"""Issue 16: predictors use scikit-learn's own pieces (``DummyRegressor``, ``ColumnTransformer``) instead
of hand-written ones, and an artifact pickled with classes that no longer exist is stale, not a crash."""

from __future__ import annotations

import hashlib
import io
import sys
import types

import joblib
import numpy as np
import pytest
from sklearn.compose import ColumnTransformer
from sklearn.dummy import DummyRegressor

from archopt.archdb import models as m
from archopt.optimizer.predictors import Predictor, train_predictor
from archopt.optimizer.training import StalePredictor, library_versions, loads


def test_constant_targets_use_a_dummy_regressor():
    X = np.random.default_rng(0).random((10, 4))
    p = train_predictor(X, np.full(10, 0.3), "mmlu", seed=0)
    assert isinstance(p.model, DummyRegressor)
    mean, std = p.predict(X[:3])
    np.testing.assert_allclose(mean, 0.3) and np.testing.assert_allclose(std, 0.0)
    assert set(p.feature_importances()) == {f"x{i}" for i in range(4)}


def test_gp_inputs_are_selected_by_a_column_transformer():
    rng = np.random.default_rng(1)
    X = rng.random((30, 6))
    y = np.exp(1 + X[:, 1] + 2 * X[:, 4] + 0.01 * rng.normal(size=30))
    names = ["attn_l0", "attn_l1", "param_frac", "mlp_l0", "mlp_l1", "other"]
    p = train_predictor(X, y, "ppl_x", seed=0, candidates=("gp",), feature_names=names)
    step = p.model.named_steps["columns"]
    assert isinstance(step, ColumnTransformer) and step.remainder == "drop"
    assert p.hyperparams["inputs"] == 4
    # the fast mean (one matrix product) and scikit-learn's predict agree
    np.testing.assert_allclose(p.predict_transformed(X), p.model.predict(X), rtol=1e-6, atol=1e-8)
    importances = p.feature_importances()
    assert importances["param_frac"] == 0.0 and importances["other"] == 0.0
    assert max(importances, key=importances.get) in ("mlp_l1", "attn_l1")


def _row(artifact: bytes) -> m.PredictorVersion:
    return m.PredictorVersion(metric="ppl_x", version=1, artifact=artifact,
                              artifact_sha256=hashlib.sha256(artifact).hexdigest(),
                              library_versions=library_versions())


def test_an_artifact_of_vanished_classes_is_stale_not_a_crash(monkeypatch):
    """Artifacts stored before the change reference ``predictors.ColumnSelect`` and ``_Constant``."""
    module = types.ModuleType("archopt_vanished_module")

    class Gone:
        pass

    Gone.__module__ = module.__name__
    Gone.__qualname__ = "Gone"
    module.Gone = Gone
    monkeypatch.setitem(sys.modules, module.__name__, module)
    buffer = io.BytesIO()
    joblib.dump({"model": Gone()}, buffer)
    artifact = buffer.getvalue()
    del module.Gone                                  # the class went away: AttributeError on load
    with pytest.raises(StalePredictor, match="retrain"):
        loads(_row(artifact))
    monkeypatch.delitem(sys.modules, module.__name__)  # the module went away: ModuleNotFoundError
    with pytest.raises(StalePredictor, match="retrain"):
        loads(_row(artifact))


def test_a_current_artifact_still_loads():
    X = np.random.default_rng(0).random((12, 3))
    p = train_predictor(X, 1 + X.sum(1), "ppl_x", seed=0, candidates=("random_forest",))
    buffer = io.BytesIO()
    joblib.dump(p, buffer)
    assert isinstance(loads(_row(buffer.getvalue())), Predictor)
