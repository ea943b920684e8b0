"""The metric registry: what a metric name means (direction, bounds, modelling scale), in one place.

Like lm-evaluation-harness's ``@register_metric(metric="acc", higher_is_better=True, ...)``, every
metric archopt knows is registered with its direction. The archive (validation, sorting), the
predictors (transform, direction) and the search ask ``metric_info``; nothing else decides.

A name is looked up in this order: lm-eval's ``,filter`` suffix is dropped; of a ``task/metric``
name (how ``archopt ingest`` stores lm-eval results) the metric part is used; of ``mmlu:<subject>``
the part before the colon. Then an exact registered name, else the longest registered prefix
(``ppl_x`` is a perplexity, ``kl_dense`` a KL divergence, ``acc_norm`` an accuracy).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, replace
from typing import Literal

from .errors import ArchoptError

Transform = Literal["log", "log_eps", "identity"]

EVALUATED = ("ppl_wikitext2", "ppl_ptb", "mmlu")
"""The metrics ``archopt evaluate`` measures itself."""


class UnknownMetric(ArchoptError, ValueError):
    """A metric name the registry does not know (the message suggests a close one)."""


@dataclass(frozen=True)
class MetricInfo:
    """What a metric is: better when higher or lower, the range of its values, and the scale a
    predictor models it on (``log`` for perplexities, ``log_eps`` = log(value + 1e-4) for KL
    divergences, which may be 0, ``identity`` for the rest)."""

    name: str
    higher_is_better: bool
    transform: Transform = "identity"
    lower_bound: float | None = 0.0
    upper_bound: float | None = None
    description: str = ""
    known: bool = True

    @property
    def direction(self) -> str:
        """Optuna's word for it: ``"maximize"`` or ``"minimize"``."""
        return "maximize" if self.higher_is_better else "minimize"

    @property
    def is_accuracy(self) -> bool:
        return self.lower_bound == 0.0 and self.upper_bound == 1.0


def _lower(description: str, transform: Transform = "identity") -> MetricInfo:
    return MetricInfo("", False, transform, 0.0, None, description)


def _accuracy(description: str) -> MetricInfo:
    return MetricInfo("", True, "identity", 0.0, 1.0, description)


_PERPLEXITY = _lower("perplexity, exp(mean token NLL)", "log")

_EXACT: dict[str, MetricInfo] = {
    "ppl_wikitext2": replace(_PERPLEXITY, description="WikiText-2 raw test perplexity (LLM-Pruner protocol)"),
    "ppl_ptb": replace(_PERPLEXITY, description="PTB perplexity (LLM-Pruner protocol)"),
    "mmlu": _accuracy("MMLU accuracy (micro average; mmlu:<subject> per subject)"),
    "kl_base": _lower("KL divergence from the base model's next-token distribution", "log_eps"),
    "perplexity": _PERPLEXITY,
    "word_perplexity": replace(_PERPLEXITY, description="lm-eval word perplexity"),
    "byte_perplexity": replace(_PERPLEXITY, description="lm-eval byte perplexity"),
    "bits_per_byte": _lower("lm-eval bits per byte (already a log scale)"),
    "mcc": MetricInfo("", True, "identity", -1.0, 1.0, "Matthews correlation"),
    "ter": _lower("translation edit rate"),
    "brier_score": _lower("Brier score"),
}

_PREFIXES: dict[str, MetricInfo] = {
    "ppl": _PERPLEXITY,
    "kl": _lower("KL divergence", "log_eps"),
    "loss": _lower("a loss (mean NLL: already a log scale)"),
    "perplexity": _PERPLEXITY,
    "word_perplexity": _EXACT["word_perplexity"],
    "byte_perplexity": _EXACT["byte_perplexity"],
    "bits_per_byte": _EXACT["bits_per_byte"],
    "mmlu": _accuracy("MMLU accuracy"),
    "acc": _accuracy("accuracy"),
    "exact_match": _accuracy("exact match rate"),
    "f1": _accuracy("F1 score"),
    "bleu": MetricInfo("", True, "identity", 0.0, None, "BLEU"),
    "chrf": MetricInfo("", True, "identity", 0.0, None, "chrF"),
    "rouge": MetricInfo("", True, "identity", 0.0, None, "ROUGE"),
}
_BY_LENGTH = sorted(_PREFIXES, key=len, reverse=True)


def _core(name: str) -> str:
    """The part of a stored name that says what kind of metric it is."""
    core = name.split(",", 1)[0]
    if "/" in core:
        core = core.rsplit("/", 1)[1]
    return core.split(":", 1)[0].lower()


def known_names() -> list[str]:
    """Registered names and prefixes (for help texts and suggestions)."""
    return sorted(set(_EXACT) | {f"{p}*" for p in _PREFIXES})


def metric_info(name: str, *, strict: bool = True) -> MetricInfo:
    """The registry's entry for ``name`` (see the module doc for how names are matched).

    An unknown name raises ``UnknownMetric`` with a close match; with ``strict=False`` it is
    taken as higher-is-better, non-negative, on its own scale (``known`` is False): what the
    archive needs to store and sort a value it cannot interpret.
    """
    core = _core(name)
    info = _EXACT.get(core)
    if info is None:
        info = next((_PREFIXES[p] for p in _BY_LENGTH if core.startswith(p)), None)
    if info is not None:
        return replace(info, name=name)
    if not strict:
        return MetricInfo(name, True, "identity", 0.0, None, "not registered", known=False)
    close = difflib.get_close_matches(core, list(_EXACT) + list(_PREFIXES), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else f" (known: {', '.join(EVALUATED)}, ppl*, kl*, acc*, ...)"
    raise UnknownMetric(f"unknown metric {name!r}{hint}")
