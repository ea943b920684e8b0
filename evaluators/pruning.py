"""Build a pruned model from a loaded base model without reloading or copying its untouched weights.

The pruned model is a structural copy of the base (new module objects, new config) whose untouched
parameters are the base's own tensors; only sliced projections get new, smaller tensors. So the base
stays intact for the next architecture, and a full architecture costs almost nothing.

Kept units are the top-scoring KV groups (with all their query heads) and MLP channels of each
layer, in their original order, so keeping everything reproduces the base logits exactly. Dropped
layers leave the ModuleList; the kept layers' attention ``layer_idx`` is renumbered so the KV cache
works, and ``config.num_hidden_layers`` (and ``config.layer_types`` where present) follow.
"""

from __future__ import annotations

import copy
from typing import Any, Sequence

import torch
from torch import nn

from archopt.archdb.arch import Architecture, BaseSpec, LayerSpec

from .importance import Importance, decoder_layers
from .loading import BaseModel


def shallow_model_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with new modules and config that shares every parameter and buffer tensor."""
    memo: dict[int, Any] = {}
    for tensor in list(model.parameters()) + list(model.buffers()):
        memo[id(tensor)] = tensor
    return copy.deepcopy(model, memo)


def _slice_linear(lin: nn.Linear, index: torch.Tensor, dim: int) -> None:
    """Keep rows (``dim=0``: outputs, with the bias) or columns (``dim=1``: inputs) ``index`` of ``lin``."""
    weight = lin.weight
    new_weight = weight.detach().index_select(dim, index.to(weight.device)).contiguous()
    lin.weight = nn.Parameter(new_weight, requires_grad=weight.requires_grad)
    if dim == 0:
        if lin.bias is not None:
            bias = lin.bias
            lin.bias = nn.Parameter(bias.detach().index_select(0, index.to(bias.device)).contiguous(),
                                    requires_grad=bias.requires_grad)
        lin.out_features = new_weight.shape[0]
    else:
        lin.in_features = new_weight.shape[1]


def head_rows(heads: Sequence[int], head_dim: int) -> torch.Tensor:
    """Row indices of the given heads in a projection laid out head by head."""
    idx = torch.as_tensor(list(heads), dtype=torch.long)
    return (idx[:, None] * head_dim + torch.arange(head_dim)[None, :]).reshape(-1)


def prune_attention(attn: nn.Module, spec: BaseSpec, groups: Sequence[int]) -> None:
    """Keep KV groups ``groups`` (sorted) with all their query heads: q/k/v rows, o_proj columns."""
    g = spec.group_size
    q_heads = [grp * g + j for grp in groups for j in range(g)]
    q_rows, kv_rows = head_rows(q_heads, spec.head_dim), head_rows(groups, spec.head_dim)
    _slice_linear(attn.q_proj, q_rows, 0)
    _slice_linear(attn.k_proj, kv_rows, 0)
    _slice_linear(attn.v_proj, kv_rows, 0)
    _slice_linear(attn.o_proj, q_rows, 1)
    # transformers 5.24 reshapes with -1 heads and reads only this per-module head attribute.
    attn.num_key_value_groups = len(q_heads) // len(groups)
    for name, value in (("num_heads", len(q_heads)), ("num_key_value_heads", len(groups))):
        if hasattr(attn, name):  # older transformers versions keep these per module
            setattr(attn, name, value)


def prune_mlp(mlp: nn.Module, channels: Sequence[int]) -> None:
    """Keep intermediate channels ``channels`` (sorted): gate/up rows, down_proj columns."""
    idx = torch.as_tensor(list(channels), dtype=torch.long)
    _slice_linear(mlp.gate_proj, idx, 0)
    _slice_linear(mlp.up_proj, idx, 0)
    _slice_linear(mlp.down_proj, idx, 1)
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = len(idx)


def kept_layer_shapes(arch: Architecture) -> list[dict[str, int]]:
    """Per kept layer (in the pruned model's order): its base index and kept shape."""
    return [{"layer": n, "base_layer": i, "q_heads": l.q_heads, "kv_heads": l.kv_heads,
             "intermediate": l.intermediate}
            for n, (i, l) in enumerate((i, l) for i, l in enumerate(arch.layers) if not l.dropped)]


def drop_layers(model: nn.Module, keep: Sequence[int]) -> None:
    """Keep decoder layers ``keep`` (base indices, ascending), renumber their ``layer_idx``, fix the config."""
    inner = getattr(model, "model", model)
    layers = decoder_layers(model)
    inner.layers = nn.ModuleList([layers[i] for i in keep])
    for new_idx, layer in enumerate(inner.layers):
        layer.self_attn.layer_idx = new_idx
        if hasattr(layer, "layer_idx"):
            layer.layer_idx = new_idx
    config = model.config
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        config.layer_types = [layer_types[i] for i in keep]
        if hasattr(inner, "has_sliding_layers"):
            inner.has_sliding_layers = "sliding_attention" in config.layer_types
    config.num_hidden_layers = len(keep)


def prune_model(base: BaseModel, arch: Architecture, importance: Importance | None) -> nn.Module:
    """A new model with ``arch``'s shapes, keeping the units ``importance`` ranks highest.

    ``importance`` may be ``None`` only when no layer is narrowed (full or layer-dropping architectures).
    The result has exactly ``arch.params`` parameters; the base model is left unchanged.
    """
    spec = base.spec
    if arch.spec != spec:
        raise ValueError("architecture belongs to another base model")
    full = spec.full_layer()
    if importance is not None:
        importance.check_spec(spec)
    elif any(not l.dropped and l != full for l in arch.layers):
        raise ValueError("an architecture that narrows layers needs importance scores")
    model = shallow_model_copy(base.model)
    layers = decoder_layers(model)
    for i, layer_spec in enumerate(arch.layers):
        if layer_spec.dropped or layer_spec == full:
            continue
        assert importance is not None
        layer = layers[i]
        if layer_spec.kv_heads != spec.num_kv_heads:
            prune_attention(layer.self_attn, spec, importance.kept_kv_groups(i, layer_spec.kv_heads).tolist())
        if layer_spec.intermediate != spec.intermediate_size:
            prune_mlp(layer.mlp, importance.kept_channels(i, layer_spec.intermediate).tolist())
    keep = [i for i, l in enumerate(arch.layers) if not l.dropped]
    if len(keep) != spec.num_layers:
        drop_layers(model, keep)
    model.config.archopt_layers = kept_layer_shapes(arch)
    model.eval()
    count = sum(p.numel() for p in model.parameters())
    if count != arch.params:
        raise RuntimeError(f"pruned model has {count} parameters, architecture says {arch.params}")
    return model


def layer_spec_of(layer: nn.Module, head_dim: int) -> LayerSpec:
    """The kept shape of a (possibly pruned) decoder layer, read from its tensors."""
    attn, mlp = layer.self_attn, layer.mlp
    q = attn.q_proj.weight.shape[0] // head_dim
    kv = attn.k_proj.weight.shape[0] // head_dim
    return LayerSpec(q, kv, mlp.gate_proj.weight.shape[0], False)
