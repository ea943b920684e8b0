"""Run a GGUF (``archopt prune --format gguf``) in llama.cpp, through llama-cpp-python: logits and perplexity.

Perplexity here is archopt's protocol computed from llama.cpp's own logits: the same text, tokenizer
(the base model's, from transformers), windows and NLL as :class:`.perplexity.PerplexityTask`; only
the forward pass is llama.cpp's (``logits_all``: every position's logits kept, one window per
context, nothing carried across windows, the KV cache in float32). Its protocol says so: ``runtime="llama.cpp"`` and
``precision`` is the GGUF's out type (``float32``, ``float16``, ``bfloat16`` or ``q8_0``).

llama-cpp-python is an optional dependency (``pip install llama-cpp-python``; the test set-up
builds it from source); importing this module does not need it.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

RUNTIME = "llama.cpp"
F32_TYPE = 0  # GGML_TYPE_F32
# GGUF out type -> the protocol's precision
OUTTYPE_PRECISION = {"f32": "float32", "f16": "float16", "bf16": "bfloat16", "q8_0": "q8_0"}


class LlamaCppError(RuntimeError):
    """llama.cpp is missing or could not load the file (one line)."""


def llama_cpp_module() -> Any:
    try:
        import llama_cpp
    except ImportError:
        raise LlamaCppError("--runtime llama.cpp needs llama-cpp-python: pip install llama-cpp-python "
                            "(make test builds it from source)") from None
    return llama_cpp


def runtime_version() -> str:
    """``llama-cpp-python <version>`` (its bundled llama.cpp is fixed by that version)."""
    return f"llama-cpp-python {llama_cpp_module().__version__}"


def default_threads() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


def load_gguf(path: str | Path, n_ctx: int, n_threads: int | None = None, logits_all: bool = True,
              kv_f32: bool = True) -> Any:
    """A ``llama_cpp.Llama`` on the CPU with a context of ``n_ctx`` tokens (one batch), quiet.

    ``kv_f32``: keep the KV cache in float32 (llama.cpp's default is float16, which alone moves
    logits by ~1e-2): measurements then depend on the file's tensor type only.
    """
    llama_cpp = llama_cpp_module()
    path = Path(path)
    if not path.is_file():
        raise LlamaCppError(f"{path}: no such GGUF file")
    threads = n_threads or default_threads()
    try:
        return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx,
                               n_threads=threads, n_threads_batch=threads, logits_all=logits_all,
                               n_gpu_layers=0, verbose=False,
                               **({"type_k": F32_TYPE, "type_v": F32_TYPE} if kv_f32 else {}))
    except (ValueError, RuntimeError) as exc:
        raise LlamaCppError(f"llama.cpp could not load {path}: {exc}") from None


def window_logits(llm: Any, tokens: list[int] | np.ndarray) -> np.ndarray:
    """Logits ``[len(tokens), vocab]`` (float32) of one sequence evaluated from an empty context."""
    ids = [int(t) for t in tokens]
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32, copy=True)


def gguf_logits(path: str | Path, tokens: list[int] | np.ndarray, n_threads: int | None = None) -> np.ndarray:
    """Logits of ``tokens`` (one sequence) in llama.cpp."""
    llm = load_gguf(path, n_ctx=max(8, len(tokens)), n_threads=n_threads)
    try:
        return window_logits(llm, tokens)
    finally:
        llm.close()


def summed_nll(logits: np.ndarray, targets: np.ndarray) -> float:
    """Sum of next-token NLLs (float64 log-softmax); ``logits[i]`` predicts ``targets[i]``."""
    x = logits.astype(np.float64)
    top = x.max(axis=1, keepdims=True)
    logz = top[:, 0] + np.log(np.exp(x - top).sum(axis=1))
    return float((logz - x[np.arange(len(targets)), targets]).sum())


def outtype_of(path: str | Path) -> str:
    """The out type recorded in an archopt GGUF (``archopt.outtype``), else from its file type."""
    from .gguf_export import read_gguf_provenance
    try:
        return str(read_gguf_provenance(path).get("outtype") or "")
    except Exception:  # noqa: BLE001 - a GGUF not written by archopt: read general.file_type
        import gguf
        reader = gguf.GGUFReader(str(path))
        fld = reader.fields.get("general.file_type")
        ftype = int(fld.contents()) if fld is not None else -1
        names = {int(gguf.LlamaFileType.ALL_F32): "f32", int(gguf.LlamaFileType.MOSTLY_F16): "f16",
                 int(gguf.LlamaFileType.MOSTLY_BF16): "bf16", int(gguf.LlamaFileType.MOSTLY_Q8_0): "q8_0"}
        if ftype not in names:
            raise LlamaCppError(f"{path}: file type {ftype} is not one archopt records (f32, f16, bf16, q8_0)") from None
        return names[ftype]


def perplexity(task: Any, path: str | Path, n_threads: int | None = None) -> Any:
    """``task`` (a prepared :class:`.perplexity.PerplexityTask`) measured on the GGUF at ``path``.

    Returns a :class:`archopt.archdb.protocol.Measurement` whose protocol is ``task.protocol`` with
    ``runtime="llama.cpp"``, the file's precision and ``extra["runtime_version"]`` (llama-cpp-python's).
    """
    from archopt.archdb.protocol import Measurement

    outtype = outtype_of(path)
    started = time.perf_counter()
    llm = load_gguf(path, n_ctx=task.seq_len, n_threads=n_threads)
    total, count = 0.0, 0
    try:
        windows = task.windows.numpy()
        for window in windows:
            logits = window_logits(llm, window)
            total += summed_nll(logits[:-1], window[1:])
            count += len(window) - 1
    finally:
        llm.close()
    mean = total / count
    failed = None
    if not math.isfinite(mean):
        value, failed = math.nan, f"diverged: the mean token NLL is {mean} over {count:,} tokens"
    else:
        value = math.exp(min(mean, 700.0))
    protocol = dataclasses.replace(task.protocol, runtime=RUNTIME, precision=OUTTYPE_PRECISION[outtype],
                                   extra={**task.protocol.extra, "runtime_version": runtime_version()})
    return Measurement(metric=task.metric, value=value, protocol=protocol, device="cpu",
                       duration_s=time.perf_counter() - started, failed=failed)
