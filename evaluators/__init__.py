"""Pruning and measurement: load a base model, score its units, prune to an architecture, measure it.

Typical use::

    base = load_base_model("path/or/hub-id")
    imp = compute_importance(base, "taylor", cache_dir=Path("cache"))
    ev = Evaluator(base.tokenizer, ["ppl_wikitext2", "ppl_ptb"], data_dir="../shared/data")
    for arch in archs:
        measurements = ev.evaluate_architecture(base, arch, imp)

The names below are imported on first use (PEP 562): ``evaluators.hub`` (where models and texts
come from) answers without loading torch.
"""

from __future__ import annotations

from archopt.lazy import lazy_exports

# public name -> the submodule that defines it
_EXPORTS = {
    "METRICS": "evaluator", "Evaluator": "evaluator",
    "Importance": "importance", "compute_importance": "importance",
    "BaseModel": "loading", "load_base_model": "loading",
    "MmluTask": "mmlu", "PerplexityTask": "perplexity", "prune_model": "pruning",
    "load_pruned": "saving", "read_pruned_info": "saving", "save_pruned": "saving",
}

__all__ = list(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
