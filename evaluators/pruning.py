"""Build a pruned model from a loaded base model without reloading or copying its untouched weights.

The pruned model is a structural copy of the base (new module objects, new config) whose untouched
parameters are the base's own tensors; only sliced projections get new, smaller tensors. So the base
stays intact for the next architecture, and a full architecture costs almost nothing.

With ``lazy=True`` even the sliced projections take no memory of their own: each is a
``SlicedLinear`` that holds the base's full tensors and the kept indices and forms its kept rows or
columns on every call, for that call only. A model pruned so holds at most one projection's slice
beside the base at any time (its forward pass, ``save_pruned``'s streaming writer); its
``parameters()`` leave the sliced projections out (``param_count`` counts them).

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


class SlicedLinear(nn.Module):
    """Rows (``dim=0``: outputs, with the bias) or columns (``dim=1``: inputs) ``index`` of a base
    ``nn.Linear``, formed on each call from the base's tensors (which it shares, never copies)."""

    def __init__(self, lin: nn.Linear, index: torch.Tensor, dim: int) -> None:
        super().__init__()
        weight, bias = lin.weight, lin.bias
        # a tuple, so the base's Parameters are not registered as this module's own
        self._source = (weight, bias, index.to(weight.device), dim)
        self.in_features = weight.shape[1] if dim == 0 else len(index)
        self.out_features = len(index) if dim == 0 else weight.shape[0]

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The kept weight and bias, formed now (new tensors, dropped by the caller)."""
        weight, bias, index, dim = self._source
        w = weight.detach().index_select(dim, index)
        if bias is None:
            return w, None
        return w, bias.detach().index_select(0, index) if dim == 0 else bias.detach()

    @property
    def weight(self) -> torch.Tensor:
        return self.tensors()[0]

    @property
    def bias(self) -> torch.Tensor | None:
        return self.tensors()[1] if self._source[1] is not None else None

    @property
    def kept_numel(self) -> int:
        bias = self._source[1]
        return self.in_features * self.out_features + (0 if bias is None else
                                                       (self.out_features if self._source[3] == 0 else bias.numel()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.tensors()
        return nn.functional.linear(x, weight, bias)

    def _save_to_state_dict(self, destination: Any, prefix: str, keep_vars: bool) -> None:
        from .saving import DeferredTensor, deferring
        if deferring():  # save_pruned: each formed when it is written
            destination[prefix + "weight"] = DeferredTensor(self, "weight")
            if self._source[1] is not None:
                destination[prefix + "bias"] = DeferredTensor(self, "bias")
            return
        weight, bias = self.tensors()
        destination[prefix + "weight"] = weight
        if bias is not None:
            destination[prefix + "bias"] = bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, sliced from the base"


def param_count(model: nn.Module) -> int:
    """Parameters of a pruned model, the ``SlicedLinear`` projections of a lazy one included."""
    return (sum(p.numel() for p in model.parameters())
            + sum(m.kept_numel for m in model.modules() if isinstance(m, SlicedLinear)))


def is_lazy(model: nn.Module) -> bool:
    return any(isinstance(m, SlicedLinear) for m in model.modules())


def sliced_bytes(base: BaseModel, arch: Architecture) -> int:
    """Bytes of the new, sliced tensors an eager ``prune_model`` of ``arch`` allocates beside the base."""
    spec, full = base.spec, base.spec.full_layer()
    h, d = spec.hidden_size, spec.head_dim
    element = next(base.model.parameters()).element_size()
    total = 0
    for layer, module in zip(arch.layers, decoder_layers(base.model)):
        if layer.dropped or layer == full:
            continue
        attn, mlp = module.self_attn, module.mlp
        if layer.kv_heads != spec.num_kv_heads:
            q, kv = layer.q_heads * d, layer.kv_heads * d
            total += 2 * h * q + 2 * h * kv
            total += sum(n for lin, n in ((attn.q_proj, q), (attn.k_proj, kv), (attn.v_proj, kv))
                         if lin.bias is not None)
        if layer.intermediate != spec.intermediate_size:
            total += 3 * h * layer.intermediate
            total += sum(layer.intermediate for lin in (mlp.gate_proj, mlp.up_proj) if lin.bias is not None)
    return total * element


def _slice(owner: nn.Module, name: str, index: torch.Tensor, dim: int, lazy: bool = False) -> None:
    """Keep rows (``dim=0``) or columns (``dim=1``) ``index`` of ``owner.<name>``: a sliced copy, or
    with ``lazy`` a ``SlicedLinear`` over the base's tensors."""
    lin = getattr(owner, name)
    if lazy:
        setattr(owner, name, SlicedLinear(lin, index, dim))
    else:
        _slice_linear(lin, index, dim)


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


def prune_attention(attn: nn.Module, spec: BaseSpec, groups: Sequence[int], lazy: bool = False) -> None:
    """Keep KV groups ``groups`` (sorted) with all their query heads: q/k/v rows, o_proj columns."""
    g = spec.group_size
    q_heads = [grp * g + j for grp in groups for j in range(g)]
    q_rows, kv_rows = head_rows(q_heads, spec.head_dim), head_rows(groups, spec.head_dim)
    _slice(attn, "q_proj", q_rows, 0, lazy)
    _slice(attn, "k_proj", kv_rows, 0, lazy)
    _slice(attn, "v_proj", kv_rows, 0, lazy)
    _slice(attn, "o_proj", q_rows, 1, lazy)
    # transformers 5.24 reshapes with -1 heads and reads only this per-module head attribute.
    attn.num_key_value_groups = len(q_heads) // len(groups)
    for name, value in (("num_heads", len(q_heads)), ("num_key_value_heads", len(groups))):
        if hasattr(attn, name):  # older transformers versions keep these per module
            setattr(attn, name, value)


def prune_mlp(mlp: nn.Module, channels: Sequence[int], lazy: bool = False) -> None:
    """Keep intermediate channels ``channels`` (sorted): gate/up rows, down_proj columns."""
    idx = torch.as_tensor(list(channels), dtype=torch.long)
    _slice(mlp, "gate_proj", idx, 0, lazy)
    _slice(mlp, "up_proj", idx, 0, lazy)
    _slice(mlp, "down_proj", idx, 1, lazy)
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


def prune_model(base: BaseModel, arch: Architecture, importance: Importance | None, *,
                lazy: bool = False) -> nn.Module:
    """A new model with ``arch``'s shapes, keeping the units ``importance`` ranks highest.

    ``importance`` may be ``None`` only when no layer is narrowed (full or layer-dropping architectures).
    The result has exactly ``arch.params`` parameters (``param_count``); the base model is left
    unchanged and shares every tensor it can. ``lazy``: sliced projections are formed per call
    (``SlicedLinear``), so the pruned model allocates nothing that lasts.
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
            prune_attention(layer.self_attn, spec, importance.kept_kv_groups(i, layer_spec.kv_heads).tolist(), lazy)
        if layer_spec.intermediate != spec.intermediate_size:
            prune_mlp(layer.mlp, importance.kept_channels(i, layer_spec.intermediate).tolist(), lazy)
    keep = [i for i, l in enumerate(arch.layers) if not l.dropped]
    if len(keep) != spec.num_layers:
        drop_layers(model, keep)
    model.config.archopt_layers = kept_layer_shapes(arch)
    model.eval()
    count = param_count(model)
    if count != arch.params:
        raise RuntimeError(f"pruned model has {count} parameters, architecture says {arch.params}")
    return model


def layer_spec_of(layer: nn.Module, head_dim: int) -> LayerSpec:
    """The kept shape of a (possibly pruned) decoder layer, read from its tensors."""
    attn, mlp = layer.self_attn, layer.mlp
    q = attn.q_proj.weight.shape[0] // head_dim
    kv = attn.k_proj.weight.shape[0] // head_dim
    return LayerSpec(q, kv, mlp.gate_proj.weight.shape[0], False)
