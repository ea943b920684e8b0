"""Mean KL divergence of a pruned model from its base model, per token: the fitness of EvoPress.

A calibration text is tokenized once and cut into non-overlapping windows of ``seq_len`` tokens
(as ``PerplexityTask`` does; the tail that fills no window is left out, ``max_tokens`` keeps the
first whole windows). The base model's next-token log-probabilities on those windows, the
*reference*, are computed once per (base model, text, tokens, seq_len, top-k) and cached on disk;
a pruned model's divergence is then one forward pass:

    KL = sum over windows and positions of sum_v p(v) (log p(v) - log q(v)) / positions,

p the base's distribution, q the pruned model's, every position of a window counted (no target is
needed). Log-softmax and the per-position sums are float32; the total is accumulated in float64.

``top_k``: store only the base's ``k`` most likely tokens per position (their indices and
log-probabilities) and treat the rest as one tail token, ``p_tail = 1 - sum top-k p``:

    KL ~= sum_{v in top k} p(v) (log p(v) - log q(v)) + p_tail (log p_tail - log q_tail),

a lower bound of the full KL (the log-sum inequality) that needs ``k / vocab`` of the memory.
Without ``top_k`` the reference holds ``tokens x vocab`` float32 values (8,192 tokens of a
4,096-token vocabulary: 128 MiB).

Windows may be chosen per call (``windows=``: indices into the prepared ones), so a search can
score candidates on a few windows and the survivors on more, all against one reference.

``KLBaseTask`` is ``kl_base`` as a metric of ``archopt evaluate`` (an ``Evaluator`` task): a
calibration text of ``KL_TEXTS`` (PTB train by default: a calibration text is never a split
perplexities are reported on; those splits are there too, for comparisons such as
``benchmarks/profile_metric.py``'s, of KL and perplexity on the very same tokens), the first
``max_tokens`` tokens (default ``DEFAULT_TOKENS``), the base's top ``DEFAULT_TOP_K`` tokens per
position; its protocol records all of them and the precision of the run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import time
import weakref
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

import archopt
from archopt.archdb.protocol import DEFAULT_PRECISION, Measurement, Protocol

from . import data
from .loading import BaseModel, model_device
from .perplexity import (LOGITS_BUDGET, MAX_BATCH_TOKENS, autocast_for, batch_tokens, cut_windows, device_label,
                         protocol_for)
from .tokenization import encode_text, text_sha256, tokenizer_hash, tokenizer_name

METRIC = "kl_base"
KEY_VERSION = 1
# text name -> (dataset, split): ``--kl-text``'s calibration texts, never a split perplexities are
# reported on, then those splits (for comparisons on the same tokens; ``--kl-text`` does not offer them)
KL_TEXTS = {"ptb-train": (data.PTB, "train"), "wikitext2-validation": (data.WIKITEXT2, "validation"),
            "wikitext2-test": (data.WIKITEXT2, "test"), "ptb-validation": (data.PTB, "validation"),
            "ptb-test": (data.PTB, "test")}
DEFAULT_TEXT = "ptb-train"       # in ../shared/data and on the hub (WikiText-2 raw validation: hub only)
DEFAULT_TOKENS = 32768           # kl_base's tokens when ``max_tokens`` is not given
DEFAULT_TOP_K = 256              # 32,768 tokens x 256: 64 MiB of reference, whatever the vocabulary

__all__ = ["DEFAULT_TEXT", "DEFAULT_TOKENS", "DEFAULT_TOP_K", "KL_TEXTS", "METRIC", "KLBaseTask", "KLTask",
           "kl_from_logits"]


def kl_from_logits(logits: torch.Tensor, ref_logp: torch.Tensor, ref_idx: torch.Tensor | None = None) -> torch.Tensor:
    """Per-position KL(p || q) [..., ] in float32: ``logits`` [..., V] of the pruned model (q);
    ``ref_logp`` the base's log-probabilities, [..., V], or [..., k] of the tokens ``ref_idx``
    [..., k] with the rest as one tail bucket (see the module doc)."""
    logq = F.log_softmax(logits.float(), dim=-1)
    logp = ref_logp.float()
    if ref_idx is None:
        p = logp.exp()
        return torch.where(p > 0, p * (logp - logq), torch.zeros_like(p)).sum(-1)
    lq = logq.gather(-1, ref_idx.long())
    p = logp.exp()
    head = torch.where(p > 0, p * (logp - lq), torch.zeros_like(p)).sum(-1)
    p_tail = (1.0 - p.sum(-1)).clamp_min(0.0)
    q_tail = (1.0 - lq.exp().sum(-1)).clamp_min(torch.finfo(torch.float32).tiny)
    tail = torch.where(p_tail > 0, p_tail * (p_tail.clamp_min(torch.finfo(torch.float32).tiny).log() - q_tail.log()),
                       torch.zeros_like(p_tail))
    return head + tail


@contextlib.contextmanager
def _no_grad(model: torch.nn.Module) -> Iterator[None]:
    """Inference mode, with bfloat16 autocast on CUDA (as ``PerplexityTask``)."""
    with torch.inference_mode(), autocast_for(model_device(model)):
        yield


class KLTask:
    """Calibration windows and the base model's reference; ``mean_kl(model)`` for as many pruned
    models as needed. ``prepare_reference`` must run (once) before ``mean_kl``."""

    metric = METRIC

    def __init__(self, tokens: torch.Tensor, *, seq_len: int = 128, max_tokens: int | None = None,
                 top_k: int | None = None, dataset: str = "text", split: str = "", tokenizer_name: str = "",
                 tokenizer_hash: str = "", text_hash: str = "", batch_size: int | None = None) -> None:
        if top_k is not None and top_k < 1:
            raise ValueError("top_k must be at least 1")
        self.seq_len = seq_len
        self.top_k = top_k
        self.batch_size = batch_size
        self.windows = cut_windows(tokens, seq_len, max_tokens, f"{dataset} {split}")
        self.dataset, self.split = dataset, split
        self.tokenizer_name, self.tokenizer_hash = tokenizer_name, tokenizer_hash
        self.text_hash = text_hash or hashlib.sha256(self.windows.numpy().tobytes()).hexdigest()
        self.ref_logp: torch.Tensor | None = None   # [windows, seq_len, vocab or k]
        self.ref_idx: torch.Tensor | None = None    # [windows, seq_len, k] with top_k
        self.reference_key: str | None = None

    @classmethod
    def from_text(cls, tokenizer: Any, text: str, *, dataset: str = "text", split: str = "", seq_len: int = 128,
                  max_tokens: int | None = None, top_k: int | None = None, batch_size: int | None = None,
                  cache_dir: str | Path | None = None) -> "KLTask":
        """Tokenize ``text`` once (with the tokenizer's special tokens, as ``PerplexityTask``)."""
        tokens = encode_text(tokenizer, text, cache_dir=cache_dir)
        return cls(tokens, seq_len=seq_len, max_tokens=max_tokens, top_k=top_k, dataset=dataset, split=split,
                   tokenizer_name=tokenizer_name(tokenizer), tokenizer_hash=tokenizer_hash(tokenizer),
                   text_hash=text_sha256(text), batch_size=batch_size)

    @classmethod
    def prepare(cls, tokenizer: Any, dataset: str = data.WIKITEXT2, split: str = "validation", *,
                data_dir: str | Path | None = None, seq_len: int = 128, max_tokens: int | None = None,
                top_k: int | None = None, batch_size: int | None = None,
                cache_dir: str | Path | None = None) -> "KLTask":
        """A calibration text of ``data.dataset_text`` (rows joined with ``"\\n\\n"``); never use
        the split that perplexities are reported on."""
        split = data.canonical_split(split)
        text = data.dataset_text(dataset, split, data_dir)
        return cls.from_text(tokenizer, text, dataset=dataset, split=split, seq_len=seq_len, max_tokens=max_tokens,
                             top_k=top_k, batch_size=batch_size, cache_dir=cache_dir)

    # ----- facts ----------------------------------------------------------------------------------
    @property
    def n_windows(self) -> int:
        return int(self.windows.shape[0])

    @property
    def tokens(self) -> int:
        """Tokens of all prepared windows (what the reference pass forwards)."""
        return self.n_windows * self.seq_len

    def tokens_of(self, windows: Sequence[int] | None = None) -> int:
        """Tokens forwarded by one ``mean_kl`` call over ``windows`` (default all)."""
        return (self.n_windows if windows is None else len(windows)) * self.seq_len

    def protocol(self, windows: Sequence[int] | None = None) -> Protocol:
        """The protocol of a value over ``windows`` (default all): the text, window, tokens, top-k,
        and which windows when not all of them."""
        extra: dict[str, Any] = {"reference": "base", "top_k": self.top_k, "text_sha256": self.text_hash}
        if windows is not None and list(windows) != list(range(self.n_windows)):
            extra["windows"] = hashlib.sha256(json.dumps([int(w) for w in windows]).encode()).hexdigest()[:16]
        return Protocol(dataset=self.dataset, split=self.split, joining=data.JOINING, tokenizer=self.tokenizer_name,
                        tokenizer_hash=self.tokenizer_hash, seq_len=self.seq_len, tokens=self.tokens_of(windows),
                        tool="archopt", tool_version=archopt.__version__, extra=extra)

    def key_for(self, base: BaseModel) -> str:
        """sha256 of (base config hash, weights fingerprint, tokenizer, text, tokens, seq_len, top-k)."""
        payload = {"v": KEY_VERSION, "config_hash": base.config_hash, "weights": base.weights_fingerprint(),
                   "tokenizer_hash": self.tokenizer_hash, "text_sha256": self.text_hash, "tokens": self.tokens,
                   "seq_len": self.seq_len, "top_k": self.top_k, "dtype": str(base.dtype)}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()

    # ----- the reference ----------------------------------------------------------------------------
    def prepare_reference(self, base: BaseModel, cache_dir: str | Path | None = None) -> bool:
        """Load the base model's reference from ``cache_dir/kl-<key>.npz`` or compute it (one
        forward pass over every window) and write it there. Returns True when it was computed."""
        key = self.key_for(base)
        self.reference_key = key
        file = Path(cache_dir) / f"kl-{key}.npz" if cache_dir is not None else None
        if file is not None and file.is_file():
            with np.load(file, allow_pickle=False) as stored:
                self.ref_logp = torch.from_numpy(stored["logp"].copy())
                self.ref_idx = torch.from_numpy(stored["idx"].astype(np.int64)) if "idx" in stored else None
            return False
        logp_parts, idx_parts = [], []
        with _no_grad(base.model):
            for logits in self._logits(base.model, range(self.n_windows)):
                lp = F.log_softmax(logits.float(), dim=-1).cpu()
                if self.top_k is not None:
                    values, idx = lp.topk(min(self.top_k, lp.shape[-1]), dim=-1)
                    logp_parts.append(values)
                    idx_parts.append(idx.to(torch.int32))
                else:
                    logp_parts.append(lp)
        self.ref_logp = torch.cat(logp_parts)
        self.ref_idx = torch.cat(idx_parts).long() if idx_parts else None
        if file is not None:
            file.parent.mkdir(parents=True, exist_ok=True)
            tmp = file.with_name(f"{file.stem}.{os.getpid()}.tmp.npz")
            arrays = {"logp": self.ref_logp.numpy()}
            if self.ref_idx is not None:
                arrays["idx"] = self.ref_idx.to(torch.int32).numpy()
            np.savez(tmp, **arrays)
            os.replace(tmp, file)
        return True

    # ----- measuring -----------------------------------------------------------------------------
    def _batch_size(self, model: torch.nn.Module, memory_budget: int | None = None) -> int:
        """Windows per batch: ``batch_size`` when set, else within ``LOGITS_BUDGET`` logits and, with
        ``memory_budget``, within that many bytes of activations (``perplexity.batch_tokens``)."""
        if self.batch_size:
            return self.batch_size
        vocab = int(getattr(getattr(model, "config", None), "vocab_size", 32000) or 32000)
        windows = min(MAX_BATCH_TOKENS // self.seq_len, LOGITS_BUDGET // (self.seq_len * vocab))
        if memory_budget:
            windows = min(windows, batch_tokens(model, self.seq_len, memory_budget) // self.seq_len)
        return max(1, windows)

    def _logits(self, model: torch.nn.Module, windows: Sequence[int],
                memory_budget: int | None = None) -> Iterator[torch.Tensor]:
        """Logits [batch, seq_len, vocab] of ``model`` on ``windows``, batch after batch, in order
        (callers hold ``_no_grad(model)`` around the loop)."""
        device = model_device(model)
        batch = self._batch_size(model, memory_budget)
        order = [int(w) for w in windows]
        for start in range(0, len(order), batch):
            ids = self.windows[order[start: start + batch]].to(device, non_blocking=True)
            yield model(input_ids=ids, use_cache=False).logits

    def mean_kl(self, model: torch.nn.Module, windows: Sequence[int] | None = None, *,
                memory_budget: int | None = None) -> float:
        """Mean KL(base || ``model``) per token over ``windows`` (indices; default all); inf when
        the model's outputs are not finite. ``memory_budget``: bytes of activations a batch may hold."""
        if self.ref_logp is None:
            raise RuntimeError("prepare_reference(base) must run before mean_kl")
        order = list(range(self.n_windows)) if windows is None else [int(w) for w in windows]
        if not order:
            raise ValueError("no window to measure")
        if min(order) < 0 or max(order) >= self.n_windows:
            raise ValueError(f"window index outside 0..{self.n_windows - 1}")
        total = 0.0
        batch = self._batch_size(model, memory_budget)
        with _no_grad(model):
            for n, logits in enumerate(self._logits(model, order, memory_budget)):
                rows = order[n * batch: (n + 1) * batch]
                ref = self.ref_logp[rows].to(logits.device)
                idx = self.ref_idx[rows].to(logits.device) if self.ref_idx is not None else None
                total += float(kl_from_logits(logits, ref, idx).double().sum())
        mean = total / (len(order) * self.seq_len)
        if not math.isfinite(mean):   # a diverged model (NaN or inf logits) is infinitely far
            return math.inf
        return max(0.0, mean)

    def evaluate(self, model: torch.nn.Module, windows: Sequence[int] | None = None) -> Measurement:
        """``mean_kl`` as a ``kl_base`` measurement under ``protocol(windows)``."""
        started = time.perf_counter()
        value = self.mean_kl(model, windows)
        return Measurement(metric=self.metric, value=value, protocol=self.protocol(windows),
                           device=device_label(model_device(model)), duration_s=time.perf_counter() - started)


class KLBaseTask:
    """``kl_base`` as an ``Evaluator`` task: a ``KLTask`` whose ``protocol`` is the run's (its
    precision included) and whose reference is the base model's, prepared once per base model
    (``prepare_reference``, from the unpruned base, before any architecture of it is pruned) and
    cached on disk under ``reference_dir`` by (base model, text, tokens, seq_len, top-k)."""

    metric = METRIC

    def __init__(self, task: KLTask, *, precision: str = DEFAULT_PRECISION,
                 reference_dir: str | Path | None = None) -> None:
        self.task = task
        self.reference_dir = reference_dir
        self.protocol = dataclasses.replace(task.protocol(), precision=precision)
        self.references_computed = 0    # references this task computed (0 when read from the cache)
        self._base: weakref.ref[BaseModel] | None = None   # the base model the reference belongs to

    @classmethod
    def prepare(cls, tokenizer: Any, *, text: str = DEFAULT_TEXT, data_dir: str | Path | None = None,
                seq_len: int = 128, max_tokens: int | None = None, top_k: int | None = DEFAULT_TOP_K,
                batch_size: int | None = None, cache_dir: str | Path | None = None,
                reference_dir: str | Path | None = None, precision: str = DEFAULT_PRECISION) -> "KLBaseTask":
        """The calibration text ``text`` (a name of ``KL_TEXTS``) tokenized once (``cache_dir``), its
        first ``max_tokens`` tokens (default ``DEFAULT_TOKENS``) in windows of ``seq_len``; ``top_k``
        None or 0: the whole distribution."""
        if text not in KL_TEXTS:
            raise ValueError(f"unknown KL calibration text {text!r}: use {', '.join(KL_TEXTS)}")
        dataset, split = KL_TEXTS[text]
        task = KLTask.prepare(tokenizer, dataset, split, data_dir=data_dir, seq_len=seq_len,
                              max_tokens=DEFAULT_TOKENS if max_tokens is None else max_tokens, top_k=top_k or None,
                              batch_size=batch_size, cache_dir=cache_dir)
        return cls(task, precision=precision, reference_dir=reference_dir)

    @property
    def forwarded_tokens(self) -> int:
        """Tokens one evaluation puts through the model (every window; the reference pass aside)."""
        return self.task.tokens

    def prepare_reference(self, base: BaseModel) -> bool:
        """Make ``base``'s reference ready: kept from the last call for the same base, else read from
        ``reference_dir`` or computed (and written there). Returns True when it was computed."""
        if self._base is not None and self._base() is base and self.task.ref_logp is not None:
            return False
        computed = self.task.prepare_reference(base, self.reference_dir)
        self._base = weakref.ref(base)
        self.references_computed += int(computed)
        return computed

    def evaluate(self, model: torch.nn.Module, memory_budget: int | None = None) -> Measurement:
        """Mean KL(base || ``model``) per token on every window; a model whose outputs are not
        finite gives a measurement whose ``failed`` says so."""
        if self.task.ref_logp is None:
            raise RuntimeError("kl_base needs the base model's reference: Evaluator.prepare(base) first")
        started = time.perf_counter()
        value = self.task.mean_kl(model, memory_budget=memory_budget)
        failed = None if math.isfinite(value) else "diverged: the model's next-token distributions are not finite"
        return Measurement(metric=self.metric, value=value, protocol=protocol_for(self.protocol, model),
                           device=device_label(model_device(model)), duration_s=time.perf_counter() - started,
                           failed=failed)
