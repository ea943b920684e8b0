"""Perplexity the LLM-Pruner way: the joined text tokenized once, cut into non-overlapping windows.

PPL = exp(mean token NLL over all predicted tokens): in each window of ``seq_len`` tokens the model
predicts tokens 2..seq_len from the ones before (no context carried across windows). The tail that
does not fill a window is left out; ``max_tokens`` keeps the first whole windows within that many
tokens. The protocol's ``tokens`` is the number of tokens fed (windows x seq_len), its ``precision``
the dtype the model computed in (``precision_of``). A model whose mean NLL is not finite or overflows
exp() (>= ``MAX_MEAN_NLL``) diverged: its measurement is a failure with the reason, not a value.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import archopt
from archopt.archdb.protocol import DEFAULT_PRECISION, Measurement, Protocol

from . import data
from .loading import model_device
from .tokenization import encode_text, tokenizer_hash, tokenizer_name

METRIC_DATASETS = {"ppl_wikitext2": (data.WIKITEXT2, "test"), "ppl_ptb": (data.PTB, "validation")}
LOGITS_BUDGET = 2 ** 26  # float elements of logits per batch (256 MiB in float32)
MAX_BATCH_TOKENS = 4096
MAX_CUDA_BATCH_TOKENS = 16384
CE_CHUNK_ROWS = 1024  # cross-entropy in row chunks: cache-friendly, ~2x faster on CPU than one call
MAX_MEAN_NLL = 700.0  # exp(709.8) overflows a float64


def _summed_nll(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Sum of token NLLs (float32 math) over rows whose target is not -100; ``logits`` is [rows, vocab]."""
    total = 0.0
    for start in range(0, logits.shape[0], CE_CHUNK_ROWS):
        chunk = logits[start: start + CE_CHUNK_ROWS]
        if chunk.dtype != torch.float32:
            chunk = chunk.float()
        total += float(F.cross_entropy(chunk, targets[start: start + CE_CHUNK_ROWS], reduction="sum",
                                       ignore_index=-100))
    return total


def inference_bytes_per_token(model: torch.nn.Module, seq_len: int) -> int:
    """Bytes of activations one token of a batch holds at once in a no-grad forward pass (one decoder
    layer's hidden- and intermediate-wide tensors, its attention weights, and a row of logits in
    the chunks ``total_nll`` forms them in), in the dtype the model computes in."""
    config = getattr(model, "config", None)
    hidden = int(getattr(config, "hidden_size", 4096) or 4096)
    inter = int(getattr(config, "intermediate_size", 4 * hidden) or 4 * hidden)
    heads = int(getattr(config, "num_attention_heads", 32) or 32)
    device = model_device(model)
    dtype = autocast_dtype(device) or next((p.dtype for p in model.parameters() if p.is_floating_point()),
                                           torch.float32)
    element = torch.empty((), dtype=dtype).element_size()
    return element * (8 * hidden + 3 * inter + 2 * heads * seq_len) + 4 * hidden


def batch_tokens(model: torch.nn.Module, seq_len: int, memory_budget: int | None) -> int:
    """Tokens per batch so that a batch's activations fit ``memory_budget`` bytes (default:
    ``loading.activation_budget(model)``), at most ``MAX_BATCH_TOKENS`` (16,384 on CUDA)."""
    from .loading import activation_budget
    budget = memory_budget or activation_budget(model)
    cap = MAX_CUDA_BATCH_TOKENS if model_device(model).type == "cuda" else MAX_BATCH_TOKENS
    return max(seq_len, min(cap, budget // inference_bytes_per_token(model, seq_len)))


def hidden_and_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module] | None:
    """(decoder body, lm_head) of a Llama-layout causal LM, so that logits can be formed a few
    rows at a time; None for another layout (then the whole logits tensor is formed)."""
    inner, head = getattr(model, "model", None), getattr(model, "lm_head", None)
    if isinstance(inner, torch.nn.Module) and isinstance(head, torch.nn.Module):
        return inner, head
    return None


def device_label(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return device.type


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The autocast dtype evaluation uses on ``device``: bfloat16 on CUDA, none elsewhere."""
    return torch.bfloat16 if device.type == "cuda" else None


def autocast_for(device: torch.device) -> contextlib.AbstractContextManager:
    """bfloat16 autocast on CUDA, nothing elsewhere (``autocast_dtype``)."""
    dtype = autocast_dtype(device)
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def precision_for(device: torch.device | str, weights: torch.dtype) -> str:
    """The precision a model with ``weights`` of that dtype computes in when evaluated here on
    ``device`` (a protocol's ``precision``): the autocast dtype on CUDA, else the weights' dtype."""
    dtype = autocast_dtype(torch.device(device)) or weights
    return str(dtype).removeprefix("torch.")


def precision_of(model: torch.nn.Module) -> str:
    """``precision_for`` the device and floating-point weights of ``model``."""
    weights = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    return precision_for(model_device(model), weights)


def protocol_for(protocol: Protocol, model: torch.nn.Module) -> Protocol:
    """``protocol`` with the precision ``model`` actually runs in (the prepared one when they agree)."""
    precision = precision_of(model)
    return protocol if precision == protocol.precision else dataclasses.replace(protocol, precision=precision)


def cut_windows(tokens: torch.Tensor, seq_len: int, max_tokens: int | None, what: str) -> torch.Tensor:
    """The first ``max_tokens`` tokens (all by default) as non-overlapping windows ``[n, seq_len]``."""
    if seq_len < 2:
        raise ValueError("seq_len must be at least 2")
    usable = tokens.numel() if max_tokens is None else min(tokens.numel(), int(max_tokens))
    n_windows = usable // seq_len
    if n_windows < 1:
        raise ValueError(f"{what} gives {usable} tokens: not one window of {seq_len}")
    return tokens[: n_windows * seq_len].reshape(n_windows, seq_len).clone()


class PerplexityTask:
    """A tokenized evaluation text, prepared once; ``evaluate(model)`` for as many models as needed."""

    def __init__(self, tokens: torch.Tensor, *, metric: str, dataset: str, split: str, tokenizer_name: str,
                 tokenizer_hash: str, seq_len: int = 128, max_tokens: int | None = None,
                 batch_size: int | None = None, precision: str = DEFAULT_PRECISION) -> None:
        self.metric = metric
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.memory_budget: int | None = None   # during ``evaluate``: bytes of activations a batch may hold
        self.windows = cut_windows(tokens, seq_len, max_tokens, f"{dataset} {split}")
        n_windows = len(self.windows)
        # next-token targets per position; the last position of a window predicts nothing
        self.targets = torch.full_like(self.windows, -100)
        self.targets[:, :-1] = self.windows[:, 1:]
        self.protocol = Protocol(dataset=dataset, split=split, joining=data.JOINING, tokenizer=tokenizer_name,
                                 tokenizer_hash=tokenizer_hash, seq_len=seq_len, tokens=n_windows * seq_len,
                                 tool="archopt", tool_version=archopt.__version__, precision=precision)

    @classmethod
    def from_text(cls, tokenizer: Any, text: str, *, metric: str, dataset: str, split: str, seq_len: int = 128,
                  max_tokens: int | None = None, batch_size: int | None = None,
                  cache_dir: str | Path | None = None, precision: str = DEFAULT_PRECISION) -> "PerplexityTask":
        """Tokenize ``text`` once (with the tokenizer's special tokens, e.g. a leading BOS)."""
        tokens = encode_text(tokenizer, text, cache_dir=cache_dir)
        return cls(tokens, metric=metric, dataset=dataset, split=split, tokenizer_name=tokenizer_name(tokenizer),
                   tokenizer_hash=tokenizer_hash(tokenizer), seq_len=seq_len, max_tokens=max_tokens,
                   batch_size=batch_size, precision=precision)

    @classmethod
    def prepare(cls, tokenizer: Any, metric: str = "ppl_wikitext2", *, data_dir: str | Path | None = None,
                split: str | None = None, seq_len: int = 128, max_tokens: int | None = None,
                batch_size: int | None = None, cache_dir: str | Path | None = None,
                precision: str = DEFAULT_PRECISION) -> "PerplexityTask":
        """``ppl_wikitext2`` (WikiText-2 raw test) or ``ppl_ptb`` (PTB validation; ``split="test"`` option).
        ``precision``: the one the models will run in (``precision_of``), so ``protocol`` is known up front."""
        if metric not in METRIC_DATASETS:
            raise ValueError(f"unknown perplexity metric {metric!r}: use {', '.join(METRIC_DATASETS)}")
        dataset, default_split = METRIC_DATASETS[metric]
        split = data.canonical_split(split or default_split)
        text = data.dataset_text(dataset, split, data_dir)
        return cls.from_text(tokenizer, text, metric=metric, dataset=dataset, split=split, seq_len=seq_len,
                             max_tokens=max_tokens, batch_size=batch_size, cache_dir=cache_dir, precision=precision)

    @property
    def predicted_tokens(self) -> int:
        return self.windows.shape[0] * (self.seq_len - 1)

    def _batch_size(self, model: torch.nn.Module, memory_budget: int | None = None) -> int:
        """Windows per batch: ``batch_size`` when set, else as many as ``memory_budget`` bytes of
        activations hold (``batch_tokens``); a model without the Llama layout also keeps its whole
        logits tensor within ``LOGITS_BUDGET``."""
        if self.batch_size:
            return self.batch_size
        windows = max(1, batch_tokens(model, self.seq_len, memory_budget) // self.seq_len)
        if hidden_and_head(model) is None:
            vocab = int(getattr(getattr(model, "config", None), "vocab_size", 32000) or 32000)
            windows = min(windows, max(1, LOGITS_BUDGET // (self.seq_len * vocab)))
        return windows

    def total_nll(self, model: torch.nn.Module, memory_budget: int | None = None) -> tuple[float, int]:
        """Sum of token NLLs (nats) over all predicted tokens, and their count. Batches hold at most
        ``memory_budget`` bytes of activations (``_batch_size``); logits are formed
        ``CE_CHUNK_ROWS`` rows at a time, never for a whole batch."""
        device = model_device(model)
        batch = self._batch_size(model, memory_budget or self.memory_budget)
        parts = hidden_and_head(model)
        total = 0.0
        with torch.inference_mode(), autocast_for(device):
            for start in range(0, self.windows.shape[0], batch):
                ids = self.windows[start: start + batch].to(device, non_blocking=True)
                targets = self.targets[start: start + batch].to(device, non_blocking=True).reshape(-1)
                if parts is None:
                    logits = model(input_ids=ids, use_cache=False).logits
                    total += _summed_nll(logits.reshape(-1, logits.shape[-1]), targets)
                    continue
                inner, head = parts
                hidden = inner(input_ids=ids, use_cache=False).last_hidden_state
                hidden = hidden.reshape(-1, hidden.shape[-1])
                for row in range(0, hidden.shape[0], CE_CHUNK_ROWS):
                    total += _summed_nll(head(hidden[row: row + CE_CHUNK_ROWS]), targets[row: row + CE_CHUNK_ROWS])
        return total, self.predicted_tokens

    @property
    def forwarded_tokens(self) -> int:
        """Tokens one evaluation puts through the model (every window)."""
        return int(self.windows.numel())

    def evaluate(self, model: torch.nn.Module, memory_budget: int | None = None) -> Measurement:
        """Perplexity of ``model`` (eval mode expected) on the prepared windows; a diverged model
        gives a measurement whose ``failed`` says why (its value is inf or NaN). ``memory_budget``:
        bytes of activations a batch may hold (``_batch_size``)."""
        started = time.perf_counter()
        self.memory_budget = memory_budget   # read by total_nll (whose signature stays (model))
        try:
            total, count = self.total_nll(model)
        finally:
            self.memory_budget = None
        mean = total / count
        failed = None
        if not math.isfinite(mean):
            value, failed = math.nan, f"diverged: the mean token NLL is {mean} over {count:,} tokens"
        elif mean >= MAX_MEAN_NLL:
            value, failed = math.inf, (f"diverged: the mean token NLL is {mean:.4g} nats over {count:,} tokens "
                                       "(perplexity overflows)")
        else:
            value = math.exp(mean)
        return Measurement(metric=self.metric, value=value, protocol=protocol_for(self.protocol, model),
                           device=device_label(model_device(model)),
                           duration_s=time.perf_counter() - started, failed=failed)
