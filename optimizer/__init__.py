"""archopt's optimizer: features, accuracy predictors, search space and multi-objective search.

What this package exports (features, predictors, space, search, Pareto) is numpy / scikit-learn /
Optuna only. Its other modules read and write the archive: ``plan`` and ``training`` (predictor
versions), ``query``, ``loop`` (rounds of query and verification) and ``starts``; ``campaign`` and
``verify`` measure architectures through ``archopt.evaluators`` (torch, imported when they run).
"""

from .encoding import LayerBatch, batch_params, encode, layer_param_coefficients
from .features import FEATURE_SETS, Featurizer, ImportanceTable, depth_weights, featurize, layer_attribution
from .pareto import crowding_distance, nondominated_ranks, pareto_mask
from .predictors import ALGORITHMS, Predictor, metric_direction, metric_transform, train_predictor
from .search import Candidate, SearchResult, search
from .space import SearchSpace, build_space, dimension_importance, refine_space, size_window

__all__ = [
    "LayerBatch", "batch_params", "encode", "layer_param_coefficients",
    "FEATURE_SETS", "Featurizer", "ImportanceTable", "depth_weights", "featurize", "layer_attribution",
    "crowding_distance", "nondominated_ranks", "pareto_mask",
    "ALGORITHMS", "Predictor", "metric_direction", "metric_transform", "train_predictor",
    "Candidate", "SearchResult", "search",
    "SearchSpace", "build_space", "dimension_importance", "refine_space", "size_window",
]
