"""Batches of architectures as integer matrices, and their exact parameter counts (numpy only).

The search scores tens of thousands of candidates, so it never builds ``Architecture`` objects
until it answers. A candidate batch is two ``[N, L]`` integer matrices over *all* decoder layers
of the base model: KV groups kept and MLP intermediate channels kept. A dropped layer is encoded
as ``kv == 0`` and ``inter == 0`` (a kept layer keeps at least one KV group, so the code is
unambiguous); query heads are always ``kv * spec.group_size`` (attention is kept in whole KV
groups with all their query heads).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

from archopt.archdb.arch import DROPPED, Architecture, BaseSpec, LayerSpec

__all__ = ["LayerBatch", "encode", "batch_params", "layer_param_coefficients"]


def layer_param_coefficients(spec: BaseSpec) -> tuple[int, int, int]:
    """``(per_kv_group, per_channel, per_kept_layer)``: a kept layer's parameters are
    ``per_kept_layer + per_kv_group * kv + per_channel * inter`` (exact, from ``BaseSpec.layer_params``)."""
    h, d, g = spec.hidden_size, spec.head_dim, spec.group_size
    per_kv = 2 * h * d * g + 2 * h * d          # q and o rows/columns of g heads; k and v of one head
    if spec.qkv_bias:
        per_kv += g * d + 2 * d
    per_ch = 3 * h + (2 if spec.mlp_bias else 0)
    const = 2 * h + (h if spec.o_bias else 0) + (h if spec.mlp_bias else 0)
    return per_kv, per_ch, const


def batch_params(spec: BaseSpec, kv: np.ndarray, inter: np.ndarray) -> np.ndarray:
    """Exact parameter counts (int64) of a batch: ``kv`` and ``inter`` are ``[N, L]`` (or ``[L]``)."""
    kv = np.asarray(kv, dtype=np.int64)
    inter = np.asarray(inter, dtype=np.int64)
    per_kv, per_ch, const = layer_param_coefficients(spec)
    kept = kv > 0
    layer = per_kv * kv + per_ch * inter + const * kept
    return spec.embedding_params() + layer.sum(axis=-1)


@dataclass(frozen=True)
class LayerBatch:
    """``N`` architectures of one base model as ``[N, L]`` int matrices (``kv == 0``: dropped)."""

    spec: BaseSpec
    kv: np.ndarray
    inter: np.ndarray

    def __post_init__(self) -> None:
        kv = np.atleast_2d(np.asarray(self.kv, dtype=np.int64))
        inter = np.atleast_2d(np.asarray(self.inter, dtype=np.int64))
        if kv.shape != inter.shape or kv.shape[1] != self.spec.num_layers:
            raise ValueError(f"batch shapes {kv.shape} and {inter.shape} do not match "
                             f"{self.spec.num_layers} layers")
        object.__setattr__(self, "kv", kv)
        object.__setattr__(self, "inter", inter)

    def __len__(self) -> int:
        return self.kv.shape[0]

    @property
    def dropped(self) -> np.ndarray:
        return self.kv == 0

    @property
    def attn_frac(self) -> np.ndarray:
        """Kept fraction of KV groups (0 for a dropped layer)."""
        return self.kv / float(self.spec.num_kv_heads)

    @property
    def mlp_frac(self) -> np.ndarray:
        """Kept fraction of MLP intermediate channels (0 for a dropped layer)."""
        return self.inter / float(self.spec.intermediate_size)

    @property
    def params(self) -> np.ndarray:
        return batch_params(self.spec, self.kv, self.inter)

    def take(self, index) -> "LayerBatch":
        return LayerBatch(self.spec, self.kv[index], self.inter[index])

    def architecture(self, i: int) -> Architecture:
        g = self.spec.group_size
        layers = tuple(DROPPED if k == 0 else LayerSpec(int(k) * g, int(k), int(m), False)
                       for k, m in zip(self.kv[i], self.inter[i]))
        return Architecture(self.spec, layers)

    def architectures(self) -> list[Architecture]:
        return [self.architecture(i) for i in range(len(self))]

    @classmethod
    def concat(cls, batches: Sequence["LayerBatch"]) -> "LayerBatch":
        return cls(batches[0].spec, np.concatenate([b.kv for b in batches]),
                   np.concatenate([b.inter for b in batches]))


def encode(archs: Iterable[Architecture], spec: BaseSpec | None = None) -> LayerBatch:
    """Architectures (all of one base model) as a ``LayerBatch``."""
    archs = list(archs)
    if spec is None:
        if not archs:
            raise ValueError("cannot encode an empty list without a base spec")
        spec = archs[0].spec
    for a in archs:
        if a.spec != spec:
            raise ValueError("all architectures of a batch must share one base model")
    kv = np.array([[0 if l.dropped else l.kv_heads for l in a.layers] for a in archs],
                  dtype=np.int64).reshape(len(archs), spec.num_layers)
    inter = np.array([[0 if l.dropped else l.intermediate for l in a.layers] for a in archs],
                     dtype=np.int64).reshape(len(archs), spec.num_layers)
    return LayerBatch(spec, kv, inter)
