"""Load a Llama-family base model (local directory or Hugging Face hub id) for pruning and evaluation."""

from __future__ import annotations

import functools

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any

import torch

from archopt.archdb.arch import BaseSpec, config_hash

from . import hub

DEFAULT_CUDA_DTYPE = torch.bfloat16


@dataclass
class BaseModel:
    """A loaded base model: the network (eval mode), its tokenizer and the facts archopt records."""

    model: Any
    tokenizer: Any
    spec: BaseSpec
    config: dict[str, Any]
    config_hash: str
    location: str
    revision: str | None
    device: str
    dtype: torch.dtype

    @property
    def name(self) -> str:
        """Default registry name: the hub id, or the directory's basename."""
        path = self.location.rstrip("/\\")
        return os.path.basename(path) if os.path.isdir(path) else path

    def weights_fingerprint(self) -> str:
        """A cheap sha256 over a few values of every parameter: tells two checkpoints of one config apart."""
        digest = hashlib.sha256()
        for name, param in sorted(self.model.named_parameters(), key=lambda kv: kv[0]):
            flat = param.detach().reshape(-1)
            step = max(1, flat.numel() // 16)
            sample = torch.cat([flat[:16], flat[::step][:16]]).to("cpu", torch.float32)
            digest.update(f"{name}:{tuple(param.shape)}:".encode())
            digest.update(sample.numpy().tobytes())
        return digest.hexdigest()


def resolve_dtype(device: str, dtype: torch.dtype | str | None) -> torch.dtype:
    """float32 on CPU, bfloat16 on CUDA, unless ``dtype`` says otherwise (``"bfloat16"`` or a torch dtype)."""
    if dtype is None:
        return DEFAULT_CUDA_DTYPE if str(device).startswith("cuda") else torch.float32
    if isinstance(dtype, str):
        value = getattr(torch, dtype.replace("torch.", ""), None)
        if not isinstance(value, torch.dtype):
            raise ValueError(f"unknown dtype {dtype!r}: use float32, bfloat16 or float16")
        return value
    return dtype


def read_config_json(path_or_hub_id: str, revision: str | None = None) -> dict[str, Any]:
    """The model's ``config.json`` as written (a local directory or a hub repository)."""
    local = os.path.join(path_or_hub_id, "config.json")
    if os.path.isdir(path_or_hub_id):
        if not os.path.isfile(local):
            raise FileNotFoundError(f"{path_or_hub_id} has no config.json: not a Hugging Face model directory")
        file = local
    else:
        from transformers.utils import cached_file

        hub.check_model_source(path_or_hub_id, f"model {path_or_hub_id}")
        file = cached_file(path_or_hub_id, "config.json", revision=revision, local_files_only=_cache_only(path_or_hub_id))
    with open(file, encoding="utf-8") as fh:
        return json.load(fh)


def load_base_model(path_or_hub_id: str, *, device: str = "cpu", dtype: torch.dtype | str | None = None,
                    revision: str | None = None, attn_implementation: str | None = None) -> BaseModel:
    """Load a Llama, Mistral or Qwen2 causal LM and its tokenizer, in eval mode on ``device``.

    Other model types raise ``ArchitectureError`` (one line) before any weights are read. A path
    that does not exist, or a hub id this machine cannot get (offline, hub unreachable, nothing
    cached), raises ``hub.SourceError`` at once; a cached hub model loads without the network when
    the hub cannot be reached.
    """
    location = str(path_or_hub_id)
    hub.check_model_source(location, f"model {location}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = read_config_json(location, revision)
    spec = BaseSpec.from_hf_config(config)
    torch_dtype = resolve_dtype(device, dtype)
    kwargs: dict[str, Any] = {"dtype": torch_dtype, "revision": revision}
    if _cache_only(location):
        kwargs["local_files_only"] = True
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if str(device) != "cpu":
        kwargs["device_map"] = str(device)  # one device: weights load straight onto it (no accelerate needed)
    model = AutoModelForCausalLM.from_pretrained(location, **kwargs)
    model.to(device)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(location, revision=revision,
                                              **({"local_files_only": True} if _cache_only(location) else {}))
    return BaseModel(model=model, tokenizer=tokenizer, spec=spec, config=config,
                     config_hash=config_hash(config), location=location, revision=revision,
                     device=str(device), dtype=torch_dtype)


def _cache_only(location: str) -> bool:
    """A hub id to read from the hub cache alone (offline, or the hub cannot be reached)."""
    return not os.path.isdir(location) and (hub.hub_offline() or not hub.hub_reachable())


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of a model's first parameter (CPU for a model without parameters)."""
    for param in model.parameters():
        return param.device
    return torch.device("cpu")


# ----- memory: what a pass may hold beside the weights -----------------------------------------

MIN_ACTIVATION_BUDGET = 64 * 2 ** 20
_UNITS = {"": 1, "B": 1, "K": 10 ** 3, "KB": 10 ** 3, "KIB": 2 ** 10, "M": 10 ** 6, "MB": 10 ** 6, "MIB": 2 ** 20,
          "G": 10 ** 9, "GB": 10 ** 9, "GIB": 2 ** 30, "T": 10 ** 12, "TB": 10 ** 12, "TIB": 2 ** 40}


def parse_memory(text: str | int | None) -> int | None:
    """``6GB``, ``6GiB``, ``512M``, ``6e9`` or a number of bytes -> bytes (None stays None)."""
    if text is None or isinstance(text, int):
        return text
    import re
    found = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
    unit = found[2].upper() if found else ""
    if found is None or unit not in _UNITS or float(found[1]) <= 0:
        raise ValueError(f"memory size {text!r}: write it like 6GB, 6GiB, 512MB or a number of bytes")
    return int(float(found[1]) * _UNITS[unit])


def param_bytes(model: torch.nn.Module) -> int:
    """Bytes of a model's parameters and buffers (a tied tensor counted once)."""
    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def free_device_memory(device: torch.device | str) -> int | None:
    """Free bytes on a CUDA device (``torch.cuda.mem_get_info``); None elsewhere."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return int(free)


def activation_budget(model: torch.nn.Module, max_memory: int | None = None,
                      weights: int | None = None) -> int:
    """Bytes of activations a pass over ``model`` may hold at once.

    With ``max_memory`` (what the whole process may use): half of what the weights leave. Without
    it: a sixteenth of the weights on CPU (so a pass stays within a few percent of them), on CUDA
    up to a quarter of the free device memory. At least 64 MiB. ``weights``: the weights' bytes
    when known (a pruned model's base).
    """
    weights = param_bytes(model) if weights is None else weights
    if max_memory is not None:
        return max(MIN_ACTIVATION_BUDGET, (max_memory - weights) // 2)
    budget = weights // 16
    free = free_device_memory(model_device(model))
    if free is not None:
        budget = max(budget, min(free // 4, 8 * 2 ** 30))
    return max(MIN_ACTIVATION_BUDGET, budget)


def release_memory() -> None:
    """Give freed heap memory back to the system (glibc ``malloc_trim``; nothing elsewhere)."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


@functools.lru_cache(maxsize=1)
def _libc() -> Any:
    """The C library (loaded once), or None where there is none to load."""
    import ctypes
    import ctypes.util
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None
