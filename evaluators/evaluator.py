"""``Evaluator``: the prepared tasks of a metric list, applied to one model after another."""

from __future__ import annotations

import difflib
import gc
import weakref
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from archopt.archdb.arch import Architecture
from archopt.archdb.protocol import DEFAULT_PRECISION, METRICS, Measurement

from .importance import Importance
from .kl import DEFAULT_TEXT, DEFAULT_TOP_K, KLBaseTask
from .kl import METRIC as KL_METRIC
from .loading import BaseModel, activation_budget, free_device_memory, model_device, param_bytes, release_memory
from .mmlu import MmluTask
from .perplexity import PerplexityTask
from .pruning import prune_model, sliced_bytes

Task = PerplexityTask | MmluTask | KLBaseTask


def free_memory(device: torch.device | str | None = None, collect: bool = True) -> None:
    """Collect garbage (unless ``collect`` is off), return freed heap memory to the system and
    cached CUDA memory to the device (between architectures)."""
    if collect:
        gc.collect()
    release_memory()
    if torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda"):
        torch.cuda.empty_cache()


class Evaluator:
    """Tasks for ``metrics`` (``ppl_wikitext2``, ``ppl_ptb``, ``mmlu``, ``kl_base``), tokenized once at
    construction.

    ``precision``: what the models will compute in (``perplexity.precision_of(model)``), so that the
    tasks' protocols, and their keys, are known before anything runs; a model that runs in another
    precision still gets measurements under the protocol of its own. ``metric_tokens``: perplexity
    (and ``kl_base``) metrics that read their own number of tokens instead of ``max_tokens``.

    ``kl_base`` (``kl.KLBaseTask``): the calibration text ``kl_text`` (a name of ``kl.KL_TEXTS``),
    ``max_tokens`` of it (default ``kl.DEFAULT_TOKENS``), the base's top ``kl_top_k`` tokens (None:
    all). Its reference is the base model's own distribution, computed from the unpruned base by
    ``prepare`` (``evaluate_architecture`` calls it before pruning) and cached in ``reference_dir``.

    Memory: ``max_memory`` (bytes the process may use; default: automatic, ``loading.activation_budget``)
    sizes the perplexity batches, and decides how a pruned model is built: its sliced projections
    copied once when they fit beside the base and the activations, else formed per call from the
    base's tensors (``prune_model(..., lazy=True)``), so measuring architecture after architecture
    never holds more than the base, one projection's slice and a budget of activations.
    """

    def __init__(self, tokenizer: Any, metrics: Sequence[str] = ("ppl_wikitext2",), *,
                 data_dir: str | Path | None = None, seq_len: int = 128, max_tokens: int | None = None,
                 max_questions: int | None = None, shots: int = 5, ptb_split: str = "validation",
                 batch_size: int | None = None, cache_dir: str | Path | None = None,
                 precision: str = DEFAULT_PRECISION, metric_tokens: Mapping[str, int] | None = None,
                 max_memory: int | None = None, kl_text: str = DEFAULT_TEXT, kl_top_k: int | None = DEFAULT_TOP_K,
                 reference_dir: str | Path | None = None) -> None:
        unknown = [m for m in metrics if m not in METRICS]
        if unknown:
            close = difflib.get_close_matches(unknown[0], METRICS, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ValueError(f"unknown metric {unknown[0]!r}: {hint}archopt evaluates {', '.join(METRICS)}")
        if not metrics:
            raise ValueError("no metric to evaluate")
        self.metrics = list(dict.fromkeys(metrics))
        self.max_memory = max_memory
        self.reference_tokens = 0   # tokens the base model forwarded for the references this evaluator computed
        self.tasks: dict[str, Task] = {}
        for metric in self.metrics:
            if metric == "mmlu":
                self.tasks[metric] = MmluTask.prepare(tokenizer, data_dir=data_dir, shots=shots,
                                                      max_questions=max_questions, precision=precision)
            elif metric == KL_METRIC:
                self.tasks[metric] = KLBaseTask.prepare(
                    tokenizer, text=kl_text, data_dir=data_dir, seq_len=seq_len,
                    max_tokens=(metric_tokens or {}).get(metric, max_tokens), top_k=kl_top_k, batch_size=batch_size,
                    cache_dir=cache_dir, reference_dir=reference_dir, precision=precision)
            else:
                self.tasks[metric] = PerplexityTask.prepare(
                    tokenizer, metric, data_dir=data_dir, split=ptb_split if metric == "ppl_ptb" else None,
                    seq_len=seq_len, max_tokens=(metric_tokens or {}).get(metric, max_tokens),
                    batch_size=batch_size, cache_dir=cache_dir,
                    precision=precision)

    @property
    def forwarded_tokens(self) -> int:
        """Tokens one ``evaluate`` puts through a model: the budget unit of search comparisons."""
        return sum(task.forwarded_tokens for task in self.tasks.values())

    def prepare(self, base: BaseModel) -> int:
        """Make the tasks that compare with the base model (``kl_base``) ready for ``base``: its
        reference, from the cache or computed from the unpruned base (its tokens added to
        ``reference_tokens``). Returns how many were computed."""
        computed = [task for task in self.tasks.values() if isinstance(task, KLBaseTask) and task.prepare_reference(base)]
        self.reference_tokens += sum(task.forwarded_tokens for task in computed)
        return len(computed)

    def evaluate(self, model: torch.nn.Module, budget: int | None = None) -> list[Measurement]:
        """Every metric on ``model``; MMLU adds one ``mmlu:<subject>`` measurement per subject.
        ``budget``: bytes of activations a batch may hold (default: from ``max_memory`` and ``model``).
        With ``kl_base``, ``prepare(base)`` must have run for the base ``model`` was pruned from."""
        budget = budget or activation_budget(model, self.max_memory)
        out: list[Measurement] = []
        for task in self.tasks.values():
            result = task.evaluate(model, memory_budget=budget)
            out.extend(result if isinstance(result, list) else [result])
        return out

    def lazy_pruning(self, base: BaseModel, arch: Architecture, budget: int) -> bool:
        """Build ``arch`` with per-call slices when its sliced copies would not fit: beside the base
        within ``max_memory``, or without it within the activation budget (CPU) or half the free
        device memory (CUDA)."""
        extra = sliced_bytes(base, arch)
        if extra == 0:
            return False
        if self.max_memory is not None:
            return param_bytes(base.model) + extra + budget > self.max_memory
        free = free_device_memory(model_device(base.model))
        return extra > (budget if free is None else free // 2)

    def evaluate_architecture(self, base: BaseModel, arch: Architecture,
                              importance: Importance | None) -> list[Measurement]:
        """Prune ``base`` to ``arch``, measure it, and free the pruned model before returning (the
        base's references are prepared first, from the unpruned base). Garbage is collected only
        when the pruned model outlives its last reference (a reference cycle, an exception's
        traceback): a full collection takes about 0.2 s on the CPU, longer than measuring a
        profile's one-window variant, and finds nothing when reference counting freed the model."""
        self.prepare(base)
        budget = activation_budget(base.model, self.max_memory)
        model = prune_model(base, arch, importance, lazy=self.lazy_pruning(base, arch, budget))
        device = model_device(model)
        alive = weakref.ref(model)
        try:
            return self.evaluate(model, budget)
        finally:
            del model
            free_memory(device, collect=alive() is not None)
