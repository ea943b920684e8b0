"""Save a pruned model (safetensors + config with per-layer shapes + modeling code + archopt.json +
tokenizer) and load it back.

``config.json`` is the base config with ``num_hidden_layers`` (and ``layer_types``) of the pruned
model and these additions:

- ``archopt_layers``: per kept layer ``{"layer", "base_layer", "q_heads", "kv_heads", "intermediate"}``;
  ``archopt_dropped_layers``: the dropped base layer indices; ``archopt_base_model_type``: the family.
- ``model_type`` ``archopt_<family>`` (``archopt_llama``, ``archopt_mistral``, ``archopt_qwen2``) and an
  ``auto_map`` pointing at ``modeling_archopt.py``, a copy of :mod:`.modeling_archopt` written beside the
  weights. So ``AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`` loads the model
  without archopt, with the family's own transformers classes narrowed layer by layer. The model type
  is not ``llama``: with it, a load *without* ``trust_remote_code`` would pick the stock class and stop
  at a size mismatch; with ``archopt_llama`` transformers says plainly that the directory needs
  ``trust_remote_code=True``.

``load_pruned`` (archopt's own loader) reads the same directory into the family's stock class: it
builds the model on the meta device, resizes each layer to its recorded shape and loads the weights
strictly. Both loaders give identical logits.
"""

from __future__ import annotations

import contextvars
import json
import os
import shutil
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

import archopt
from archopt.archdb.arch import Architecture

from .importance import Importance, decoder_layers
from .loading import BaseModel, resolve_dtype
from .pruning import kept_layer_shapes

SCHEMA = "archopt.pruned/1"
WEIGHTS_FILE = "model.safetensors"
INFO_FILE = "archopt.json"
MODELING_FILE = "modeling_archopt.py"
MODELING_SOURCE = Path(__file__).with_name(MODELING_FILE)
MODEL_TYPE_PREFIX = "archopt_"
# family -> class names in modeling_archopt.py (config, base model, causal LM)
REMOTE_CLASSES = {
    "llama": ("ArchoptLlamaConfig", "ArchoptLlamaModel", "ArchoptLlamaForCausalLM"),
    "mistral": ("ArchoptMistralConfig", "ArchoptMistralModel", "ArchoptMistralForCausalLM"),
    "qwen2": ("ArchoptQwen2Config", "ArchoptQwen2Model", "ArchoptQwen2ForCausalLM"),
}


def _importance_dict(importance_info: Importance | Mapping[str, Any] | None) -> dict[str, Any] | None:
    if importance_info is None:
        return None
    if isinstance(importance_info, Importance):
        return importance_info.info()
    return dict(importance_info)


def _dedup_state_dict(model: nn.Module, dtype: torch.dtype | None) -> tuple[dict[str, Any], dict[str, str]]:
    """State dict with shared tensors (tied embeddings) stored once; returns (tensors, aliases).

    Nothing is copied: values are the model's own tensors, or ``DeferredTensor``s for the projections
    of a lazily pruned model; ``write_safetensors`` converts (``dtype``) and moves each to the CPU
    when it writes it."""
    tensors: dict[str, Any] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple[int, tuple[int, ...]], str] = {}
    with deferred_state():
        state = model.state_dict(keep_vars=False)
    for name, tensor in state.items():
        if isinstance(tensor, torch.Tensor):
            ident = (tensor.data_ptr(), tuple(tensor.shape))
            if ident in seen and tensor.numel() > 0:
                aliases[name] = seen[ident]
                continue
            seen[ident] = name
            tensor = tensor.detach()
        tensors[name] = tensor
    return tensors, aliases


_SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                       torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                       torch.uint8: "U8", torch.bool: "BOOL"}


def write_safetensors(path: str | Path, tensors: Mapping[str, Any], dtype: torch.dtype | None = None,
                      metadata: Mapping[str, str] | None = None) -> None:
    """Write a safetensors file one tensor at a time (never a second copy of the model in memory).

    Values are tensors or ``DeferredTensor``s (formed when written); floating-point ones are
    converted to ``dtype`` when given. The file is written beside ``path`` and renamed into place."""
    import struct

    def out_dtype(t: Any) -> torch.dtype:
        return dtype if dtype is not None and t.dtype.is_floating_point else t.dtype

    header: dict[str, Any] = {}
    offset = 0
    for name, t in tensors.items():
        dt = out_dtype(t)
        if dt not in _SAFETENSORS_DTYPES:
            raise ValueError(f"{name}: dtype {dt} cannot be written to safetensors")
        size = int(torch.Size(t.shape).numel()) * torch.empty((), dtype=dt).element_size()
        header[name] = {"dtype": _SAFETENSORS_DTYPES[dt], "shape": list(t.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    if metadata:
        header["__metadata__"] = dict(metadata)
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(struct.pack("<Q", len(raw)))
            fh.write(raw)
            for name, t in tensors.items():
                value = t.materialize() if isinstance(t, DeferredTensor) else t
                value = value.detach().to("cpu", out_dtype(t)).contiguous()
                if value.numel():
                    fh.write(value.reshape(-1).view(torch.uint8).numpy())
                del value
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class DeferredTensor:
    """A state-dict entry formed only when written: the kept rows or columns of a lazily pruned
    projection (``pruning.SlicedLinear``)."""

    def __init__(self, module: nn.Module, which: str) -> None:
        self.module, self.which = module, which
        weight, bias, index, dim = module._source
        if which == "weight":
            shape = list(weight.shape)
            shape[dim] = len(index)
            self.shape, self.dtype = torch.Size(shape), weight.dtype
        else:
            self.shape = torch.Size([len(index)] if dim == 0 else list(bias.shape))
            self.dtype = bias.dtype

    def materialize(self) -> torch.Tensor:
        weight, bias = self.module.tensors()
        return weight if self.which == "weight" else bias


_DEFERRING: contextvars.ContextVar[bool] = contextvars.ContextVar("archopt_deferred_state", default=False)


class deferred_state:
    """Within the block, ``state_dict()`` of a lazily pruned model holds ``DeferredTensor``s for its
    sliced projections instead of forming them all at once (this thread or task only)."""

    def __enter__(self) -> None:
        self._token = _DEFERRING.set(True)

    def __exit__(self, *exc: Any) -> None:
        _DEFERRING.reset(self._token)


def deferring() -> bool:
    return _DEFERRING.get()


def save_pruned(model: nn.Module, base: BaseModel, arch: Architecture,
                importance_info: Importance | Mapping[str, Any] | None, out_dir: str | Path,
                dtype: torch.dtype | str | None = None, base_name: str | None = None) -> Path:
    """Write ``model`` (pruned from ``base`` to ``arch``) to ``out_dir``; returns the directory.

    ``dtype`` converts the saved floating-point weights (default: as they are in memory). The
    in-memory model is not modified. The weights are written one tensor at a time: a lazily pruned
    model (``prune_model(..., lazy=True)``) is saved with at most one sliced projection in memory.
    ``base_name`` is the base model's registered name (default: ``base.name``), recorded in
    ``archopt.json``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_dtype = resolve_dtype("cpu", dtype) if dtype is not None else None
    tensors, aliases = _dedup_state_dict(model, save_dtype)
    write_safetensors(out / WEIGHTS_FILE, tensors, save_dtype, metadata={"format": "pt"})

    import copy

    config = copy.deepcopy(model.config)
    config.archopt_layers = kept_layer_shapes(arch)
    first = next(iter(tensors.values()))
    weight_dtype = save_dtype if save_dtype is not None and first.dtype.is_floating_point else first.dtype
    config.dtype = weight_dtype
    config.save_pretrained(str(out))
    _make_remote_code_config(out, base.spec.family, arch)
    shutil.copyfile(MODELING_SOURCE, out / MODELING_FILE)
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None:
        generation_config.save_pretrained(str(out))
    if base.tokenizer is not None:
        base.tokenizer.save_pretrained(str(out))
        _record_tokenizer_class(out, base.tokenizer)

    name = base_name or base.name
    info = {
        "schema": SCHEMA,
        "base": {"name": name, "location": base.location, "revision": base.revision,
                 "config_hash": base.config_hash, "spec": base.spec.to_dict()},
        "arch_id": arch.arch_id(name),
        "architecture": arch.layer_dicts(),
        "canonical": arch.canonical_json(),
        "compact": arch.compact(),
        "params": arch.params,
        "fraction": arch.fraction(),
        "importance": _importance_dict(importance_info),
        "dtype": str(weight_dtype).replace("torch.", ""),
        "tied": aliases,
        "model_type": f"{MODEL_TYPE_PREFIX}{base.spec.family}",
        "tool": "archopt",
        "tool_version": archopt.__version__,
    }
    tmp = out / f"{INFO_FILE}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, out / INFO_FILE)
    return out


# keys that transformers writes from how the base tokenizer was loaded, not from what it is
_LOAD_TIME_KEYS = ("is_local", "local_files_only")


def _record_tokenizer_class(out: Path, tokenizer: Any) -> None:
    """``tokenizer_config.json`` names the tokenizer's own (stock) class, so no remote code is
    needed for it, and keeps no load-time flags of the base (``local_files_only``)."""
    path = out / "tokenizer_config.json"
    if not path.is_file():
        return
    config = json.loads(path.read_text(encoding="utf-8"))
    config.setdefault("tokenizer_class", type(tokenizer).__name__)
    for key in _LOAD_TIME_KEYS:
        config.pop(key, None)
    _write_json(path, config)


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _make_remote_code_config(out: Path, family: str, arch: Architecture) -> None:
    """Turn the saved family config into one that ``trust_remote_code`` loads with modeling_archopt.py."""
    if family not in REMOTE_CLASSES:
        raise ValueError(f"no remote-code classes for model family {family!r}")
    config_cls, model_cls, lm_cls = REMOTE_CLASSES[family]
    module = MODELING_FILE.removesuffix(".py")
    path = out / "config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config["model_type"] = f"{MODEL_TYPE_PREFIX}{family}"
    config["architectures"] = [lm_cls]
    config["auto_map"] = {"AutoConfig": f"{module}.{config_cls}", "AutoModel": f"{module}.{model_cls}",
                          "AutoModelForCausalLM": f"{module}.{lm_cls}"}
    config["archopt_base_model_type"] = family
    config["archopt_layers"] = kept_layer_shapes(arch)
    config["archopt_dropped_layers"] = [i for i, layer in enumerate(arch.layers) if layer.dropped]
    _write_json(path, config)


def read_pruned_info(path: str | Path) -> dict[str, Any]:
    """The ``archopt.json`` of a saved pruned model."""
    return json.loads((Path(path) / INFO_FILE).read_text(encoding="utf-8"))


def _resized_linear(old: nn.Linear, in_features: int, out_features: int) -> nn.Linear:
    return nn.Linear(in_features, out_features, bias=old.bias is not None,
                     device=old.weight.device, dtype=old.weight.dtype)


def resize_layers(model: nn.Module, layers: list[Mapping[str, int]]) -> None:
    """Give each decoder layer the recorded shape (``archopt_layers`` entries, pruned-model order)."""
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    hidden = config.hidden_size
    modules = decoder_layers(model)
    if len(layers) != len(modules):
        raise ValueError(f"config records {len(layers)} layer shapes for {len(modules)} layers")
    for layer, shape in zip(modules, layers):
        attn, mlp = layer.self_attn, layer.mlp
        q, kv, inter = shape["q_heads"] * head_dim, shape["kv_heads"] * head_dim, shape["intermediate"]
        attn.q_proj = _resized_linear(attn.q_proj, hidden, q)
        attn.k_proj = _resized_linear(attn.k_proj, hidden, kv)
        attn.v_proj = _resized_linear(attn.v_proj, hidden, kv)
        attn.o_proj = _resized_linear(attn.o_proj, q, hidden)
        attn.num_key_value_groups = shape["q_heads"] // shape["kv_heads"]
        mlp.gate_proj = _resized_linear(mlp.gate_proj, hidden, inter)
        mlp.up_proj = _resized_linear(mlp.up_proj, hidden, inter)
        mlp.down_proj = _resized_linear(mlp.down_proj, inter, hidden)
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = inter


def _set_param(model: nn.Module, name: str, param: nn.Parameter) -> None:
    owner, _, attr = name.rpartition(".")
    setattr(model.get_submodule(owner) if owner else model, attr, param)


def _rebuild_meta_buffers(model: nn.Module, device: torch.device) -> None:
    """Non-persistent buffers (rotary ``inv_freq``) are not in the checkpoint: recompute their modules."""
    for name, module in list(model.named_modules()):
        if any(b.is_meta for b in module.buffers(recurse=False)):
            if not hasattr(module, "inv_freq") or not hasattr(module, "config"):
                raise RuntimeError(f"cannot rebuild buffers of {name or type(module).__name__}")
            with torch.device(device):
                fresh = type(module)(config=module.config)
            owner, _, attr = name.rpartition(".")
            setattr(model.get_submodule(owner) if owner else model, attr, fresh)


def _family_config(path: Path) -> Any:
    """The saved config as the base family's stock config class (``archopt_llama`` -> ``LlamaConfig``).

    Reads the remote-code fields (``auto_map``, ``architectures``) out, so the model archopt builds is
    the stock class; directories written before the remote-code format (``model_type: llama``) load too.
    """
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    data = json.loads((path / "config.json").read_text(encoding="utf-8"))
    model_type = str(data.get("model_type", ""))
    family = data.get("archopt_base_model_type") or model_type.removeprefix(MODEL_TYPE_PREFIX)
    if family not in REMOTE_CLASSES:
        raise ValueError(f"{path}/config.json: model_type {model_type!r} is not a pruned "
                         f"{'/'.join(REMOTE_CLASSES)} model")
    data.pop("auto_map", None)
    data["model_type"] = family
    lm_name = REMOTE_CLASSES[family][2].removeprefix("Archopt")
    data["architectures"] = [lm_name]
    return CONFIG_MAPPING[family].from_dict(data)


def load_pruned(path: str | Path, device: str = "cpu", dtype: torch.dtype | str | None = None,
                attn_implementation: str | None = None) -> nn.Module:
    """Load a model written by ``save_pruned``: same shapes, same weights, eval mode on ``device``."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    path = Path(path)
    info = read_pruned_info(path)
    config = _family_config(path)
    layers = getattr(config, "archopt_layers", None)
    if not layers:
        raise ValueError(f"{path}/config.json has no archopt_layers: not a model saved by archopt")
    state = load_file(str(path / WEIGHTS_FILE), device="cpu")
    file_dtype = next(iter(state.values())).dtype
    kwargs: dict[str, Any] = {"attn_implementation": attn_implementation} if attn_implementation else {}
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=file_dtype, **kwargs)
    resize_layers(model, layers)
    aliases: dict[str, str] = info.get("tied", {})
    result = model.load_state_dict(state, strict=False, assign=True)
    missing = set(result.missing_keys) - set(aliases)
    if missing or result.unexpected_keys:
        raise RuntimeError(f"checkpoint does not fit its config: missing {sorted(missing)[:3]}, "
                           f"unexpected {sorted(result.unexpected_keys)[:3]}")
    params = dict(model.named_parameters(remove_duplicate=False))
    for alias, target in aliases.items():
        _set_param(model, alias, params[target])
    torch_device = torch.device(device)
    _rebuild_meta_buffers(model, torch.device("cpu"))
    still_meta = [n for n, p in model.named_parameters() if p.is_meta]
    if still_meta:
        raise RuntimeError(f"checkpoint lacks {still_meta[0]}")
    if dtype is not None:
        model.to(resolve_dtype(device, dtype))
    model.to(torch_device)
    model.eval()
    return model
