"""archopt's optimizer: features, accuracy predictors, search space and multi-objective search.

What this package exports (features, predictors, space, search, Pareto) is numpy / scikit-learn /
Optuna only, imported on first use (PEP 562): ``optimizer.query`` answers a stored query without
loading scikit-learn. Its other modules read and write the archive: ``plan`` and ``training``
(predictor versions), ``query``, ``loop`` (rounds of query and verification) and ``starts``;
``campaign`` and ``verify`` measure architectures through ``archopt.evaluators`` (torch, imported
when they run).
"""

from __future__ import annotations

import sys
import types
from typing import Any

from archopt.lazy import lazy_exports

# public name -> the submodule that defines it
_EXPORTS = {
    "LayerBatch": "encoding", "batch_params": "encoding", "encode": "encoding", "layer_param_coefficients": "encoding",
    "FEATURE_SETS": "features", "Featurizer": "features", "ImportanceTable": "features",
    "depth_weights": "features", "featurize": "features", "layer_attribution": "features",
    "crowding_distance": "pareto", "nondominated_ranks": "pareto", "pareto_mask": "pareto",
    "ALGORITHMS": "predictors", "Predictor": "predictors", "metric_direction": "predictors",
    "metric_transform": "predictors", "train_predictor": "predictors",
    "Candidate": "search", "SearchResult": "search", "search": "search",
    "SearchSpace": "space", "build_space": "space", "dimension_importance": "space", "refine_space": "space",
    "size_window": "space",
}

__all__ = list(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)


class _Package(types.ModuleType):
    """This package's module type: ``search`` names both a submodule and the function it exports.
    When the import system binds the loaded submodule on the package, the function is bound
    instead, so ``from archopt.optimizer import search`` is always the function (as when this
    package imported everything eagerly)."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _EXPORTS and _EXPORTS[name] == name and isinstance(value, types.ModuleType):
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
