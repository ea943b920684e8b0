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

import importlib
from typing import Any

# public name -> the submodule that defines it
_EXPORTS = {
    "METRICS": "evaluator", "Evaluator": "evaluator",
    "Importance": "importance", "compute_importance": "importance",
    "BaseModel": "loading", "load_base_model": "loading",
    "MmluTask": "mmlu", "PerplexityTask": "perplexity", "prune_model": "pruning",
    "load_pruned": "saving", "read_pruned_info": "saving", "save_pruned": "saving",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
