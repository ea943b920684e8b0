"""Tokenizer identity (name and hash, for protocols and cache keys) and cached tokenization of long texts."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def tokenizer_name(tokenizer: Any) -> str:
    """The hub id, or the basename of a local tokenizer directory (a path is not an identity)."""
    name = str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)
    path = name.rstrip("/\\")
    return os.path.basename(path) if os.path.isdir(path) else name


def tokenizer_hash(tokenizer: Any) -> str:
    """sha256 of the tokenizer's serialized ``tokenizer.json`` (fast tokenizers), else of its vocabulary.

    Also folds in the special-token settings that change how a text is encoded.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        body = backend.to_str()
    else:
        body = json.dumps(sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]))
    extra = json.dumps({"bos": getattr(tokenizer, "bos_token", None),
                        "eos": getattr(tokenizer, "eos_token", None),
                        "add_bos": getattr(tokenizer, "add_bos_token", None),
                        "add_eos": getattr(tokenizer, "add_eos_token", None)}, sort_keys=True, default=str)
    return hashlib.sha256((body + "\n" + extra).encode("utf-8")).hexdigest()


def encode_text(tokenizer: Any, text: str, *, add_special_tokens: bool = True,
                cache_dir: str | Path | None = None) -> torch.Tensor:
    """Token ids (1-D int64 tensor) of the whole ``text``, encoded once.

    With ``cache_dir`` the ids are kept as ``tokens-<tokenizer hash>-<text hash>.npy`` and read back on
    the next call, so a long evaluation text is tokenized once per tokenizer.
    """
    cache_file = None
    if cache_dir is not None:
        tag = f"{tokenizer_hash(tokenizer)[:20]}-{text_sha256(text)[:20]}-{int(add_special_tokens)}"
        cache_file = Path(cache_dir) / f"tokens-{tag}.npy"
        if cache_file.is_file():
            return torch.from_numpy(np.load(cache_file).astype(np.int64))
    ids = tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]
    tokens = torch.tensor(ids, dtype=torch.int64)
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(f".{os.getpid()}.tmp.npy")
        np.save(tmp, tokens.numpy().astype(np.int32))  # vocabularies stay far below 2**31
        os.replace(tmp, cache_file)
    return tokens
