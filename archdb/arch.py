"""Base-model shapes and the canonical per-layer architecture encoding (no database, no torch).

An architecture of a base model says, for every decoder layer, how many query heads, KV heads and
MLP intermediate channels it keeps, or that the layer is dropped. Attention is kept in whole KV
groups with all their query heads, so ``q_heads == kv_heads * (num_heads // num_kv_heads)``.
Parameter counts are exact and computed from the base shape alone: they equal
``sum(p.numel() for p in model.parameters())`` of the pruned model, tied embeddings counted once.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from itertools import chain, starmap
from typing import Any

from .errors import ArchoptError

DEFAULT_CHANNEL_MULTIPLE = 8
SUPPORTED_FAMILIES = ("llama", "mistral", "qwen2")


class ArchitectureError(ArchoptError, ValueError):
    """An architecture that is impossible for its base model, or unreadable."""


@dataclass(frozen=True)
class BaseSpec:
    """The shape facts of a Llama-layout decoder that pruning and parameter counts depend on."""

    family: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False

    def __post_init__(self) -> None:
        for name in ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "head_dim",
                     "intermediate_size", "vocab_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ArchitectureError(f"base model field {name!r} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ArchitectureError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")

    def __getstate__(self) -> dict[str, Any]:
        """Pickle the shape only, not the caches kept beside it (``Architecture.params``)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @property
    def group_size(self) -> int:
        """Query heads per KV head."""
        return self.num_heads // self.num_kv_heads

    @classmethod
    def from_hf_config(cls, config: Any) -> "BaseSpec":
        """Read a transformers config (object or dict) of the Llama, Mistral or Qwen2 family."""
        get = config.get if isinstance(config, Mapping) else (lambda k, d=None: getattr(config, k, d))
        family = str(get("model_type", "llama"))
        if family not in SUPPORTED_FAMILIES:
            raise ArchitectureError(
                f"model_type {family!r} is not a Llama-layout decoder archopt prunes "
                f"(supported: {', '.join(SUPPORTED_FAMILIES)})")
        heads = int(get("num_attention_heads"))
        hidden = int(get("hidden_size"))
        kv = get("num_key_value_heads") or heads
        head_dim = get("head_dim") or hidden // heads
        qkv_bias = family == "qwen2" or bool(get("attention_bias", False))
        return cls(
            family=family,
            num_layers=int(get("num_hidden_layers")),
            hidden_size=hidden,
            num_heads=heads,
            num_kv_heads=int(kv),
            head_dim=int(head_dim),
            intermediate_size=int(get("intermediate_size")),
            vocab_size=int(get("vocab_size")),
            tie_embeddings=bool(get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            o_bias=family != "qwen2" and bool(get("attention_bias", False)),
            mlp_bias=bool(get("mlp_bias", False)),
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "BaseSpec":
        known = {f.name for f in fields(cls)}
        missing = [f.name for f in fields(cls) if f.name not in data and f.default is not False]
        if missing:
            raise ArchitectureError(f"base model description lacks {', '.join(missing)}")
        unknown = sorted(set(data) - known)
        if unknown:
            raise ArchitectureError(f"unknown base model field {unknown[0]!r}")
        return cls(**{k: data[k] for k in known if k in data})

    def full_layer(self) -> "LayerSpec":
        return LayerSpec(self.num_heads, self.num_kv_heads, self.intermediate_size, False)

    def layer_params(self, layer: "LayerSpec") -> int:
        """Exact parameter count of one decoder layer (0 when dropped)."""
        if layer.dropped:
            return 0
        h, d = self.hidden_size, self.head_dim
        q, kv, m = layer.q_heads * d, layer.kv_heads * d, layer.intermediate
        attn = h * q + 2 * h * kv + q * h
        if self.qkv_bias:
            attn += q + 2 * kv
        if self.o_bias:
            attn += h
        mlp = 3 * h * m
        if self.mlp_bias:
            mlp += 2 * m + h
        return attn + mlp + 2 * h  # two RMSNorm weights

    def embedding_params(self) -> int:
        """Embeddings, final norm and lm_head (shared with the embeddings when tied)."""
        emb = self.vocab_size * self.hidden_size
        return emb + self.hidden_size + (0 if self.tie_embeddings else emb)

    @property
    def total_params(self) -> int:
        return self.embedding_params() + self.num_layers * self.layer_params(self.full_layer())


@dataclass(frozen=True, order=True)
class LayerSpec:
    """What one decoder layer keeps. A dropped layer is ``LayerSpec(0, 0, 0, True)``."""

    q_heads: int
    kv_heads: int
    intermediate: int
    dropped: bool = False

    def to_dict(self, index: int) -> dict[str, Any]:
        return {"layer": index, "q_heads": self.q_heads, "kv_heads": self.kv_heads,
                "intermediate": self.intermediate, "dropped": self.dropped}


DROPPED = LayerSpec(0, 0, 0, True)


@dataclass(frozen=True)
class Architecture:
    """A validated, canonical architecture of one base model."""

    spec: BaseSpec
    layers: tuple[LayerSpec, ...]

    def __post_init__(self) -> None:
        validate_layers(self.spec, self.layers)

    @property
    def params(self) -> int:
        spec = self.spec
        memo = spec.__dict__.get("_layer_params_memo")  # per base shape: layer -> spec.layer_params(layer)
        if memo is None:
            memo = {}
            object.__setattr__(spec, "_layer_params_memo", memo)
        total = spec.embedding_params()
        for layer in self.layers:
            n = memo.get(layer)
            if n is None:
                n = spec.layer_params(layer)
                if len(memo) < 50_000:
                    memo[layer] = n
            total += n
        return total

    def fraction(self) -> float:
        return self.params / self.spec.total_params

    def canonical_json(self) -> str:
        """The encoding hashed for identity: compact JSON of [q, kv, intermediate] or null (dropped)."""
        cached = self.__dict__.get("_canonical")  # computed once per (immutable) instance
        if cached is None:
            rows = [None if l.dropped else [l.q_heads, l.kv_heads, l.intermediate] for l in self.layers]
            cached = json.dumps(rows, separators=(",", ":"))
            object.__setattr__(self, "_canonical", cached)
        return cached

    def layer_dicts(self) -> list[dict[str, Any]]:
        return [l.to_dict(i) for i, l in enumerate(self.layers)]

    def arch_id(self, base_key: str) -> str:
        """Hex sha256 of (base model key, canonical encoding)."""
        return hashlib.sha256(f"{base_key}\n{self.canonical_json()}".encode()).hexdigest()

    def is_full(self) -> bool:
        return all(l == self.spec.full_layer() for l in self.layers)

    def compact(self) -> str:
        """One-line form ``q/kv/inter`` per layer, ``-`` for a dropped layer, comma separated."""
        return ",".join("-" if l.dropped else f"{l.q_heads}/{l.kv_heads}/{l.intermediate}" for l in self.layers)

    def sketch(self) -> str:
        """A compact per-layer picture: attention then MLP kept fraction as 0-9 digits, x = dropped."""
        s = self.spec
        attn = "".join("x" if l.dropped else _digit(l.kv_heads / s.num_kv_heads) for l in self.layers)
        mlp = "".join("x" if l.dropped else _digit(l.intermediate / s.intermediate_size) for l in self.layers)
        return f"A:{attn} M:{mlp}"


def _digit(frac: float) -> str:
    return "F" if frac >= 0.999 else str(min(9, int(frac * 10)))


def validate_layers(spec: BaseSpec, layers: Sequence[LayerSpec]) -> None:
    if len(layers) != spec.num_layers:
        raise ArchitectureError(
            f"architecture has {len(layers)} layers but the base model has {spec.num_layers}")
    if all(l.dropped for l in layers):
        raise ArchitectureError("architecture drops every layer")
    top_kv, top_inter, group = spec.num_kv_heads, spec.intermediate_size, spec.group_size
    for i, l in enumerate(layers):
        # fast path (ingesting 100,000 rows): plain ints within range, whole KV groups; anything
        # else goes through the checks below, which also word the error
        q, kv, inter = l.q_heads, l.kv_heads, l.intermediate
        if (not l.dropped and type(q) is int and type(kv) is int and type(inter) is int
                and 1 <= kv <= top_kv and 1 <= inter <= top_inter and q == kv * group):
            continue
        if l.dropped:
            if (l.q_heads, l.kv_heads, l.intermediate) != (0, 0, 0):
                raise ArchitectureError(f"layer {i}: a dropped layer keeps nothing")
            continue
        for name, value, top in (("kv_heads", l.kv_heads, spec.num_kv_heads),
                                 ("q_heads", l.q_heads, spec.num_heads),
                                 ("intermediate", l.intermediate, spec.intermediate_size)):
            if not isinstance(value, int) or isinstance(value, bool):
                raise ArchitectureError(f"layer {i}: {name} must be an integer, got {value!r}")
            if value < 1 or value > top:
                raise ArchitectureError(f"layer {i}: {name}={value} outside 1..{top} of the base model")
        if l.q_heads != l.kv_heads * spec.group_size:
            raise ArchitectureError(
                f"layer {i}: q_heads={l.q_heads} must be kv_heads={l.kv_heads} x {spec.group_size} "
                f"(attention is kept in whole KV groups)")


def round_channels(spec: BaseSpec, kept: float, multiple: int = DEFAULT_CHANNEL_MULTIPLE) -> int:
    """Round an intermediate width to ``multiple`` (at least one multiple, at most the full width)."""
    full = spec.intermediate_size
    if kept >= full:
        return full
    value = int(math.floor(kept / multiple + 0.5)) * multiple
    return max(min(multiple, full), min(full, value))


def layer_from_ratios(spec: BaseSpec, attn_ratio: float, mlp_ratio: float,
                      multiple: int = DEFAULT_CHANNEL_MULTIPLE) -> LayerSpec:
    """The paper's encoding: a pruning ratio for attention (in KV groups) and MLP (in channels)."""
    for name, r in (("attention", attn_ratio), ("mlp", mlp_ratio)):
        if not (isinstance(r, (int, float)) and math.isfinite(r) and 0.0 <= r < 1.0):
            raise ArchitectureError(f"{name} pruning ratio must lie in [0, 1), got {r!r}")
    kv = max(1, int(math.floor((1.0 - attn_ratio) * spec.num_kv_heads + 0.5)))
    inter = round_channels(spec, (1.0 - mlp_ratio) * spec.intermediate_size, multiple)
    return LayerSpec(kv * spec.group_size, kv, inter, False)


def parse_layer_range(text: str | None, num_layers: int) -> list[int]:
    """``3-29`` (inclusive at both ends), ``5``, ``0-3,28-31``; ``None`` means every layer."""
    if text is None or str(text).strip() in ("", "all"):
        return list(range(num_layers))
    out: set[int] = set()
    for part in str(text).split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not m:
            raise ArchitectureError(f"cannot read layer range {text!r}: write it as 3-29 (inclusive)")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if lo > hi or hi >= num_layers:
            raise ArchitectureError(f"layer range {part.strip()!r} outside 0-{num_layers - 1}")
        out.update(range(lo, hi + 1))
    return sorted(out)


def from_ratios(spec: BaseSpec, attn: Sequence[float] | float, mlp: Sequence[float] | float,
                layers: Sequence[int] | None = None,
                multiple: int = DEFAULT_CHANNEL_MULTIPLE) -> Architecture:
    """Per-layer pruning ratios over ``layers`` (default all); other layers stay whole.

    ``attn`` and ``mlp`` are one ratio each or one per listed layer.
    """
    idx = list(range(spec.num_layers)) if layers is None else list(layers)
    attn_list = [float(attn)] * len(idx) if isinstance(attn, (int, float)) else list(attn)
    mlp_list = [float(mlp)] * len(idx) if isinstance(mlp, (int, float)) else list(mlp)
    if len(attn_list) != len(idx) or len(mlp_list) != len(idx):
        raise ArchitectureError(
            f"{len(idx)} pruned layers need {len(idx)} attention and MLP ratios, "
            f"got {len(attn_list)} and {len(mlp_list)}")
    out = [spec.full_layer()] * spec.num_layers
    for i, a, m in zip(idx, attn_list, mlp_list):
        out[i] = layer_from_ratios(spec, a, m, multiple)
    return Architecture(spec, tuple(out))


def full(spec: BaseSpec) -> Architecture:
    return Architecture(spec, tuple(spec.full_layer() for _ in range(spec.num_layers)))


def uniform(spec: BaseSpec, ratio: float, layers: Sequence[int] | None = None,
            multiple: int = DEFAULT_CHANNEL_MULTIPLE, attention: bool = True) -> Architecture:
    """LLM-Pruner's baseline: one ratio on every prunable layer (``attention=False``: MLP only)."""
    return from_ratios(spec, ratio if attention else 0.0, ratio, layers, multiple)


def uniform_at_size(spec: BaseSpec, target_params: int, layers: Sequence[int] | None = None,
                    multiple: int = DEFAULT_CHANNEL_MULTIPLE, attention: bool = True) -> tuple[float, Architecture]:
    """The smallest uniform ratio (by bisection) whose architecture is at most ``target_params``."""
    lo, hi = 0.0, 0.999
    if uniform(spec, lo, layers, multiple, attention).params <= target_params:
        return lo, uniform(spec, lo, layers, multiple, attention)
    if uniform(spec, hi, layers, multiple, attention).params > target_params:
        raise ArchitectureError("no uniform ratio reaches that size: prune more layers or drop some")
    for _ in range(60):
        mid = (lo + hi) / 2
        if uniform(spec, mid, layers, multiple, attention).params <= target_params:
            hi = mid
        else:
            lo = mid
    return hi, uniform(spec, hi, layers, multiple, attention)


@functools.lru_cache(maxsize=50_000)
def _kept_layer(q: int, kv: int, inter: int) -> LayerSpec:
    """The (immutable, shared) spec of a kept layer: archives repeat a few hundred shapes."""
    return LayerSpec(q, kv, inter, False)


def _plain_rows(rows: Any) -> list[LayerSpec] | None:
    """Fast path for a list of ``[q, kv, inter]`` lists of plain ints (no dropped layer), checked
    with C-level iteration: the layers, or None when ``rows`` is anything else."""
    if type(rows) is not list or not rows:
        return None
    try:
        if not (set(map(type, rows)) <= {list, tuple} and set(map(len, rows)) == {3}
                and set(map(type, chain.from_iterable(rows))) == {int}):
            return None
    except TypeError:
        return None
    return list(starmap(_kept_layer, rows))


def from_layer_dicts(spec: BaseSpec, rows: Iterable[Any]) -> Architecture:
    """Read the JSON encoding: a list of per-layer objects or ``[q, kv, inter]`` / ``null`` rows."""
    plain = _plain_rows(rows)
    if plain is not None:
        return Architecture(spec, tuple(plain))
    layers: list[LayerSpec] = []
    for i, row in enumerate(rows):
        if (type(row) is list or type(row) is tuple) and len(row) == 3:  # fast path: [q, kv, inter]
            q, kv, inter = row
            if type(q) is int and type(kv) is int and type(inter) is int:
                layers.append(_kept_layer(q, kv, inter))
                continue
        if row is None or row == "-" or (isinstance(row, Mapping) and row.get("dropped") is True):
            layers.append(DROPPED)
            continue
        if isinstance(row, Mapping):
            unknown = set(row) - {"layer", "q_heads", "kv_heads", "intermediate", "dropped"}
            if unknown:
                raise ArchitectureError(f"layer {i}: unknown field {sorted(unknown)[0]!r}")
            if "layer" in row and row["layer"] != i:
                raise ArchitectureError(f"layer {i}: entries must be in layer order (got layer {row['layer']!r})")
            try:
                kv = row["kv_heads"]
                inter = row["intermediate"]
            except KeyError as exc:
                raise ArchitectureError(f"layer {i}: missing field {exc.args[0]!r}") from None
            q = row.get("q_heads", kv * spec.group_size if isinstance(kv, int) else kv)
        elif isinstance(row, (list, tuple)) and len(row) == 3:
            q, kv, inter = row
        else:
            raise ArchitectureError(f"layer {i}: expected an object, [q, kv, intermediate] or null")
        for name, value in (("q_heads", q), ("kv_heads", kv), ("intermediate", inter)):
            if not isinstance(value, int) or isinstance(value, bool):
                raise ArchitectureError(f"layer {i}: {name} must be an integer, got {value!r}"[:120])
        layers.append(LayerSpec(q, kv, inter, False))
    return Architecture(spec, tuple(layers))


def parse_architecture(spec: BaseSpec, value: Any, multiple: int = DEFAULT_CHANNEL_MULTIPLE) -> Architecture:
    """Any accepted written form of an architecture of ``spec``.

    - a list of per-layer entries (see ``from_layer_dicts``), or ``{"layers": [...]}``;
    - ratios: ``{"attn": [..] or r, "mlp": [..] or r, "layers": "3-29"}`` (the paper's encoding),
      or ``{"uniform": r, "layers": "3-29", "attention": true}``;
    - the compact string ``q/kv/inter,-,...`` or a JSON string of any of the above;
    - ``"full"`` (the base model) or ``"uniform:0.2"``.
    """
    if isinstance(value, str):
        text = value.strip()
        if text in ("full", "base"):
            return full(spec)
        if text.startswith("uniform:"):
            try:
                return uniform(spec, float(text.split(":", 1)[1]), multiple=multiple)
            except ValueError:
                raise ArchitectureError(f"cannot read {text[:40]!r}: write uniform:0.2") from None
        if text[:1] in "[{":
            try:
                value = json.loads(text)
            except json.JSONDecodeError as exc:
                raise ArchitectureError(f"architecture JSON is invalid: {exc.msg} at column {exc.colno}") from None
            except (RecursionError, ValueError):  # absurd nesting; an integer of more than 4300 digits
                raise ArchitectureError("architecture JSON is invalid: nested too deeply or a number too long") from None
        else:
            return _parse_compact(spec, text)
    if isinstance(value, Mapping):
        if "layers" in value and isinstance(value["layers"], list):
            return from_layer_dicts(spec, value["layers"])
        rng = parse_layer_range(value.get("layers"), spec.num_layers) if "layers" in value else None
        if "uniform" in value:
            r = value["uniform"]
            if not isinstance(r, (int, float)) or isinstance(r, bool):
                raise ArchitectureError("field 'uniform' must be a number")
            return uniform(spec, float(r), rng, multiple, bool(value.get("attention", True)))
        if "attn" in value or "mlp" in value:
            for key in ("attn", "mlp"):
                v = value.get(key, 0.0)
                vals = v if isinstance(v, list) else [v]
                if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in vals):
                    raise ArchitectureError(f"field {key!r} must hold numbers")
            return from_ratios(spec, value.get("attn", 0.0), value.get("mlp", 0.0), rng, multiple)
        raise ArchitectureError("architecture object needs 'layers', 'attn'/'mlp' ratios or 'uniform'")
    if isinstance(value, (list, tuple)):
        return from_layer_dicts(spec, value)
    raise ArchitectureError(f"cannot read an architecture from {type(value).__name__}")


def _parse_compact(spec: BaseSpec, text: str) -> Architecture:
    rows: list[Any] = []
    for i, part in enumerate(text.split(",")):
        part = part.strip()
        if part in ("-", "x", "drop"):
            rows.append(None)
            continue
        m = re.fullmatch(r"(\d+)/(\d+)/(\d+)", part)
        if not m:
            raise ArchitectureError(
                f"layer {i}: cannot read {part[:30]!r}: write q_heads/kv_heads/intermediate or - (dropped)")
        rows.append([int(m.group(1)), int(m.group(2)), int(m.group(3))])
    return from_layer_dicts(spec, rows)


_VOLATILE_CONFIG_KEYS = {"transformers_version", "_name_or_path", "torch_dtype", "dtype", "architectures",
                         "use_cache", "_commit_hash", "_attn_implementation_autoset", "output_attentions",
                         "output_hidden_states", "return_dict"}


def config_hash(config: Mapping[str, Any]) -> str:
    """Hex sha256 of a model's config.json without the keys that do not change the network."""
    clean = {k: v for k, v in config.items() if k not in _VOLATILE_CONFIG_KEYS}
    return hashlib.sha256(json.dumps(clean, sort_keys=True, default=str).encode()).hexdigest()
