"""Pruning and measurement: load a base model, score its units, prune to an architecture, measure it.

Typical use::

    base = load_base_model("path/or/hub-id")
    imp = compute_importance(base, "taylor", cache_dir=Path("cache"))
    ev = Evaluator(base.tokenizer, ["ppl_wikitext2", "ppl_ptb"], data_dir="../shared/data")
    for arch in archs:
        measurements = ev.evaluate_architecture(base, arch, imp)
"""

from __future__ import annotations

from .evaluator import METRICS, Evaluator
from .importance import Importance, compute_importance
from .loading import BaseModel, load_base_model
from .mmlu import MmluTask
from .perplexity import PerplexityTask
from .pruning import prune_model
from .saving import load_pruned, read_pruned_info, save_pruned

__all__ = [
    "METRICS", "BaseModel", "Evaluator", "Importance", "MmluTask", "PerplexityTask", "compute_importance",
    "load_base_model", "load_pruned", "prune_model", "read_pruned_info", "save_pruned",
]
