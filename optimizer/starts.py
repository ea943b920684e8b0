"""Strong starting points for a size target: rules of thumb and a FLAP-style global allocation.

A search (or a round of ``query --verify``) should begin where the cheap, search-free baselines
end, never below them. Every function here is deterministic, numpy only (no torch, no database)
and returns architectures whose parameter count is at most the target.

Rules of thumb (``RULES``), each solved to the size by bisection on its one ratio ``r``:

- ``uniform``: ratio ``r`` on every layer, attention and MLP alike (CONVENTIONS "--uniform r":
  KV groups kept ``round((1 - r) * kv)``, at least 1; channels kept ``round((1 - r) * I)`` on the
  channel multiple).
- ``llm_pruner_range``: the same, only on ``prunable_range(spec)`` (LLM-Pruner's block-wise
  setting; the first and last layers stay whole).
- ``mlp_only``: MLP channels only, every layer; every KV group kept.
- ``mlp_only_range``: MLP channels only, on ``prunable_range(spec)``.

For the rules that touch attention, ``r`` is one ratio for the whole layer: the bisection solves
the parameter count of attention and MLP together, so attention lands on whatever whole number of
KV groups ``round((1 - r) * kv)`` gives (with 2 or 3 KV groups that is usually "one group
removed in every pruned layer" once ``r`` passes ``1 / (2 kv)``). ``summary`` says where it landed.
After the bisection, the rounding remainder is filled: one channel multiple more on the pruned
layers in order while the size stays at most the target, so widths differ by at most one
multiple between layers and the result lies within one channel multiple of one layer under the
target (unless every pruned MLP is full again).

Global allocation (FLAP, An et al., AAAI 2024): every unit's score is normalised within its
(layer, kind) -- by default standardised, ``(s - mean) / std``, as FLAP does -- then all units of
all layers are ranked together and removed lowest first until the size is at most the target; no
search. Units are KV groups (never below one per layer) and MLP channels counted in the channel
multiple (the lowest-scoring channels of a layer leave together, one multiple at a time, scored by
their mean). Scores are ``Importance.kv_group`` [L, kv] and ``Importance.channel`` [L, I] arrays
(higher = more important); the caller passes the arrays.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from archopt.archdb.arch import (DEFAULT_CHANNEL_MULTIPLE, Architecture, ArchitectureError, BaseSpec, LayerSpec,
                                 uniform_at_size)

from .encoding import layer_param_coefficients

__all__ = ["RULES", "NORMALIZATIONS", "prunable_range", "rule_of_thumb", "rules_of_thumb", "global_allocation",
           "start_origin", "strong_starts", "summary"]

RULES: tuple[str, ...] = ("uniform", "llm_pruner_range", "mlp_only", "mlp_only_range")
NORMALIZATIONS: tuple[str, ...] = ("standardize", "mean", "none")


def prunable_range(spec: BaseSpec) -> list[int]:
    """LLM-Pruner's layer range scaled to depth: the first ``max(1, L // 8)`` and the last
    ``max(1, ceil(L / 16))`` layers stay whole.

    32 layers: 4-29 (LLM-Pruner's Llama setting, ``--block_attention_layer_start 4 --end 30`` with its
    exclusive end; the seed paper's 3-29 differs by one layer); 30 layers: 3-27; 24: 3-21; 8: 1-6.
    Every layer when fewer than three would be left.
    """
    n = spec.num_layers
    first, last = max(1, n // 8), max(1, -(-n // 16))
    if n - first - last < 1:
        return list(range(n))
    return list(range(first, n - last))


def _rule_layers_attention(spec: BaseSpec, rule: str) -> tuple[list[int], bool]:
    if rule not in RULES:
        import difflib
        close = difflib.get_close_matches(rule, RULES, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else f" (known: {', '.join(RULES)})"
        raise ValueError(f"unknown rule of thumb {rule!r}{hint}")
    layers = prunable_range(spec) if rule.endswith("_range") else list(range(spec.num_layers))
    return layers, not rule.startswith("mlp_only")


def rule_of_thumb(spec: BaseSpec, rule: str, target_params: int,
                  multiple: int = DEFAULT_CHANNEL_MULTIPLE) -> Architecture | None:
    """The architecture of ``rule`` (see ``RULES`` and the module doc) at most ``target_params``
    and as close to it as the rule allows; ``None`` when the rule cannot get that small."""
    layers, attention = _rule_layers_attention(spec, rule)
    target = int(target_params)
    try:
        _, arch = uniform_at_size(spec, target, layers, multiple, attention)
    except ArchitectureError:
        return None
    return _fill_mlp(arch, layers, target, multiple)


def _fill_mlp(arch: Architecture, layers: Sequence[int], target: int, multiple: int) -> Architecture:
    """Add one channel multiple at a time to ``layers`` (in order, round robin) while the size
    stays at most ``target``: fills the rounding remainder of a bisection."""
    spec = arch.spec
    _, per_ch, _ = layer_param_coefficients(spec)
    full = spec.intermediate_size
    out = list(arch.layers)
    room = target - arch.params
    grew = True
    while grew:
        grew = False
        for i in layers:
            l = out[i]
            if l.dropped or l.intermediate >= full:
                continue
            width = min(full, (l.intermediate // multiple + 1) * multiple)
            cost = (width - l.intermediate) * per_ch
            if cost <= room:
                out[i] = LayerSpec(l.q_heads, l.kv_heads, width, False)
                room -= cost
                grew = True
    return Architecture(spec, tuple(out))


def rules_of_thumb(spec: BaseSpec, target_params: int,
                   multiple: int = DEFAULT_CHANNEL_MULTIPLE) -> dict[str, Architecture]:
    """Every rule of ``RULES`` that reaches ``target_params``, by name, in ``RULES`` order."""
    out = {}
    for rule in RULES:
        arch = rule_of_thumb(spec, rule, target_params, multiple)
        if arch is not None:
            out[rule] = arch
    return out


def _normalise(scores: np.ndarray, how: str) -> np.ndarray:
    """Per row (one layer's units of one kind): standardised, divided by the mean, or as given."""
    s = np.asarray(scores, dtype=float)
    if how == "none":
        return s
    mean = s.mean(axis=1, keepdims=True)
    if how == "mean":
        return np.divide(s, mean, out=np.zeros_like(s), where=np.abs(mean) > 0)
    if s.shape[1] < 2:
        return np.zeros_like(s)
    std = s.std(axis=1, ddof=1, keepdims=True)  # torch.std's default, as FLAP's standarlization
    return np.divide(s - mean, std, out=np.zeros_like(s), where=std > 0)


def _channel_steps(spec: BaseSpec, multiple: int) -> list[int]:
    """Channels removed at each successive step of one layer: widths go ``I`` -> largest multiple
    below ``I`` -> ... -> one multiple (``round_channels``' grid)."""
    full = spec.intermediate_size
    m = min(multiple, full)
    widths = [full] + list(range(((full - 1) // m) * m, m - 1, -m))
    return [a - b for a, b in zip(widths, widths[1:]) if a > b]


def global_allocation(spec: BaseSpec, kv_group_scores: np.ndarray, channel_scores: np.ndarray,
                      target_params: int, layers: Sequence[int] | None = None, *, attention: bool = True,
                      normalize: str = "standardize", per_param: bool = False,
                      multiple: int = DEFAULT_CHANNEL_MULTIPLE) -> Architecture | None:
    """FLAP-style allocation (see the module doc) of ``layers`` (default all; others stay whole).

    ``attention=False`` keeps every KV group (a global allocation of MLP channels alone).
    ``normalize``: ``"standardize"`` (FLAP), ``"mean"`` (divide by the (layer, kind) mean) or
    ``"none"`` (raw scores, comparable only when the criterion is, e.g. Taylor sums).
    ``per_param``: rank by score per parameter removed (a KV group's score over its parameters,
    a channel's over its own), the greedy knapsack order; meant for raw scores.
    Units leave lowest first until the size is at most ``target_params``; then the channel steps
    removed last come back while they fit, so the result sits close under the target. ``None``
    when removing every removable unit still leaves more than the target.
    """
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize must be one of {', '.join(NORMALIZATIONS)}, got {normalize!r}")
    L, K, I = spec.num_layers, spec.num_kv_heads, spec.intermediate_size
    kv_s = np.asarray(kv_group_scores, dtype=float)
    ch_s = np.asarray(channel_scores, dtype=float)
    if kv_s.shape != (L, K) or ch_s.shape != (L, I):
        raise ValueError(f"scores must be [{L}, {K}] (KV groups) and [{L}, {I}] (channels), "
                         f"got {list(kv_s.shape)} and {list(ch_s.shape)}")
    idx = sorted(set(range(L) if layers is None else (int(i) for i in layers)))
    if not idx or idx[0] < 0 or idx[-1] >= L:
        raise ValueError(f"layers must be a non-empty subset of 0..{L - 1}")
    per_kv, per_ch, _ = layer_param_coefficients(spec)
    kv_z, ch_z = _normalise(kv_s, normalize), _normalise(ch_s, normalize)
    if per_param:
        kv_z, ch_z = kv_z / per_kv, ch_z / per_ch

    # every removable step: (score, order, layer, kind, amount); per layer and kind in removal order
    steps: list[tuple[float, int, int, str, int]] = []
    ch_steps = _channel_steps(spec, multiple)
    for l in idx:
        if attention:
            for z in np.sort(kv_z[l])[:K - 1]:
                steps.append((float(z), len(steps), l, "attn", 1))
        zs = np.sort(ch_z[l])
        start = 0
        for n in ch_steps:
            steps.append((float(zs[start:start + n].mean()), len(steps), l, "mlp", n))
            start += n
    steps.sort(key=lambda t: (t[0], t[1]))

    kv = np.full(L, K, dtype=np.int64)
    inter = np.full(L, I, dtype=np.int64)
    params = _arch(spec, kv, inter).params
    target = int(target_params)
    taken: list[tuple[int, str, int]] = []
    for _, _, l, kind, n in steps:
        if params <= target:
            break
        if kind == "attn":
            kv[l] -= 1
            params -= per_kv
        else:
            inter[l] -= n
            params -= n * per_ch
        taken.append((l, kind, n))
    if params > target:
        return None
    blocked: set[int] = set()
    for l, kind, n in reversed(taken):  # give back the last channel steps of each layer that still fit
        if kind != "mlp" or l in blocked:
            continue
        if params + n * per_ch <= target:
            inter[l] += n
            params += n * per_ch
        else:
            blocked.add(l)  # an earlier step back alone would leave the width off the multiple
    return _arch(spec, kv, inter)


def _arch(spec: BaseSpec, kv: np.ndarray, inter: np.ndarray) -> Architecture:
    g = spec.group_size
    return Architecture(spec, tuple(LayerSpec(int(k) * g, int(k), int(m), False) for k, m in zip(kv, inter)))


def strong_starts(spec: BaseSpec, target_params: int, kv_group_scores: np.ndarray | None = None,
                  channel_scores: np.ndarray | None = None,
                  multiple: int = DEFAULT_CHANNEL_MULTIPLE) -> list[tuple[str, Architecture]]:
    """``(name, architecture)`` of every search-free start at ``target_params``, distinct.

    The rules of thumb (``RULES``), then, given importance scores (``Importance.kv_group`` and
    ``.channel``), two global allocations of attention and MLP over every layer: ``flap`` (FLAP's
    standardised scores) and ``global_raw`` (the raw scores ranked as they are: a Taylor score
    estimates the loss a unit's removal costs, so raw scores compare across layers and kinds; a
    KV group sums over many more weights than a channel, so attention goes last). On
    ptb-llama-24l (2 KV groups) standardising removes one of the two groups of every layer
    (the lower one always scores -0.71) and measured worst; ``global_raw`` measured best at 60%
    and 50% with Taylor and L2 scores alike. An architecture two starts share is listed once,
    under the first name.
    """
    found: list[tuple[str, Architecture | None]] = list(rules_of_thumb(spec, target_params, multiple).items())
    if kv_group_scores is not None and channel_scores is not None:
        found.append(("flap", global_allocation(spec, kv_group_scores, channel_scores, target_params,
                                                multiple=multiple)))
        found.append(("global_raw", global_allocation(spec, kv_group_scores, channel_scores, target_params,
                                                      normalize="none", multiple=multiple)))
    out: list[tuple[str, Architecture]] = []
    seen: set[str] = set()
    for name, arch in found:
        if arch is not None and arch.canonical_json() not in seen:
            seen.add(arch.canonical_json())
            out.append((name, arch))
    return out


def start_origin(name: str) -> str:
    """The archive origin of a strong start named ``name``: ``uniform``, ``rule`` for the other
    search-free starts (rules of thumb, global allocations), ``search`` for the sensitivity
    profile's integer-program solutions (``profile-1``, ...), which are searched, not ruled: an
    answer's standing against the best rule of thumb leaves them out."""
    if name == "uniform":
        return "uniform"
    return "search" if name.startswith("profile") else "rule"


def summary(arch: Architecture) -> str:
    """One line: size, pruned layers, KV groups and MLP widths kept there (for reports)."""
    s = arch.spec
    full = s.full_layer()
    pruned = [i for i, l in enumerate(arch.layers) if l != full]
    if not pruned:
        return f"{arch.fraction():.1%}: nothing pruned"
    kv = sorted({arch.layers[i].kv_heads for i in pruned})
    mlp = [arch.layers[i].intermediate for i in pruned]
    span = f"{pruned[0]}-{pruned[-1]}" if pruned == list(range(pruned[0], pruned[-1] + 1)) else f"{len(pruned)} layers"
    kvs = "/".join(map(str, kv))
    return (f"{arch.fraction():.1%}: layers {span} pruned, KV groups {kvs} of {s.num_kv_heads}, "
            f"MLP {min(mlp)}-{max(mlp)} of {s.intermediate_size}")
