"""Structurally pruned Llama / Mistral / Qwen2 models, as written by ``archopt prune``.

``archopt prune`` copies this file, unchanged, into every model directory it writes, and points the
``auto_map`` of that directory's ``config.json`` at the classes below, so that

    AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)

loads the pruned model with transformers and torch only (archopt need not be installed). The classes
are the stock transformers classes of the base model's family; the only change is the shape of each
decoder layer, read from ``config.archopt_layers`` (one entry per kept layer, in order):
``{"layer", "base_layer", "q_heads", "kv_heads", "intermediate"}``. ``num_hidden_layers`` (and
``layer_types``) already count kept layers only, so decoder layer ``i`` has ``layer_idx == i`` and
the KV cache works with dropped layers. ``archopt_dropped_layers`` lists the dropped base layers.

The config keeps the base model's global shape fields (``num_attention_heads``, ``head_dim``, ...);
every kept layer uses the base ``head_dim`` and a whole number of query heads per KV head.
"""

from __future__ import annotations

from torch import nn
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    LlamaModel,
    MistralConfig,
    MistralForCausalLM,
    MistralModel,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2Model,
)

ARCHOPT_FORMAT = "archopt.pruned-model/1"


def _resized_linear(old: nn.Linear, in_features: int, out_features: int) -> nn.Linear:
    if (old.in_features, old.out_features) == (in_features, out_features):
        return old
    return nn.Linear(in_features, out_features, bias=old.bias is not None,
                     device=old.weight.device, dtype=old.weight.dtype)


def apply_layer_shapes(model: nn.Module, config) -> None:  # noqa: ANN001
    """Give every decoder layer of ``model`` (a base model or a causal LM) its recorded shape."""
    shapes = getattr(config, "archopt_layers", None)
    if not shapes:
        raise ValueError("config has no archopt_layers: not a model written by archopt prune")
    inner = getattr(model, "model", model)
    layers = inner.layers
    if len(shapes) != len(layers):
        raise ValueError(f"config records {len(shapes)} layer shapes for {len(layers)} decoder layers")
    hidden = config.hidden_size
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    for idx, (layer, shape) in enumerate(zip(layers, shapes)):
        q_heads, kv_heads, inter = int(shape["q_heads"]), int(shape["kv_heads"]), int(shape["intermediate"])
        if kv_heads < 1 or q_heads % kv_heads:
            raise ValueError(f"layer {idx}: {q_heads} query heads do not split into {kv_heads} KV heads")
        attn, mlp = layer.self_attn, layer.mlp
        q, kv = q_heads * head_dim, kv_heads * head_dim
        attn.q_proj = _resized_linear(attn.q_proj, hidden, q)
        attn.k_proj = _resized_linear(attn.k_proj, hidden, kv)
        attn.v_proj = _resized_linear(attn.v_proj, hidden, kv)
        attn.o_proj = _resized_linear(attn.o_proj, q, hidden)
        # Attention reshapes with -1 heads and the global head_dim; only the group count is per module.
        attn.num_key_value_groups = q_heads // kv_heads
        for name, value in (("num_heads", q_heads), ("num_key_value_heads", kv_heads)):
            if hasattr(attn, name):  # older transformers versions keep these per module
                setattr(attn, name, value)
        mlp.gate_proj = _resized_linear(mlp.gate_proj, hidden, inter)
        mlp.up_proj = _resized_linear(mlp.up_proj, hidden, inter)
        mlp.down_proj = _resized_linear(mlp.down_proj, inter, hidden)
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = inter
        if getattr(attn, "layer_idx", idx) != idx:
            raise ValueError(f"decoder layer {idx} has layer_idx {attn.layer_idx}")


class _PrunedMixin:
    """Build the stock module tree, then narrow each decoder layer (on the meta device while loading)."""

    def __init__(self, config, *args, **kwargs):  # noqa: ANN001
        super().__init__(config, *args, **kwargs)
        apply_layer_shapes(self, config)
        self.post_init()  # (re)initialise and tie weights over the new, narrower projections


# --- Llama ---------------------------------------------------------------------------------------
class ArchoptLlamaConfig(LlamaConfig):
    model_type = "archopt_llama"


class ArchoptLlamaModel(_PrunedMixin, LlamaModel):
    config_class = ArchoptLlamaConfig


class ArchoptLlamaForCausalLM(_PrunedMixin, LlamaForCausalLM):
    config_class = ArchoptLlamaConfig


# --- Mistral -------------------------------------------------------------------------------------
class ArchoptMistralConfig(MistralConfig):
    model_type = "archopt_mistral"


class ArchoptMistralModel(_PrunedMixin, MistralModel):
    config_class = ArchoptMistralConfig


class ArchoptMistralForCausalLM(_PrunedMixin, MistralForCausalLM):
    config_class = ArchoptMistralConfig


# --- Qwen2 ---------------------------------------------------------------------------------------
class ArchoptQwen2Config(Qwen2Config):
    model_type = "archopt_qwen2"


class ArchoptQwen2Model(_PrunedMixin, Qwen2Model):
    config_class = ArchoptQwen2Config


class ArchoptQwen2ForCausalLM(_PrunedMixin, Qwen2ForCausalLM):
    config_class = ArchoptQwen2Config


# base model_type -> (config class, base model class, causal LM class)
FAMILIES = {
    "llama": (ArchoptLlamaConfig, ArchoptLlamaModel, ArchoptLlamaForCausalLM),
    "mistral": (ArchoptMistralConfig, ArchoptMistralModel, ArchoptMistralForCausalLM),
    "qwen2": (ArchoptQwen2Config, ArchoptQwen2Model, ArchoptQwen2ForCausalLM),
}
