"""Readable answers: what the sketch digits mean, where rows that look alike differ, ``--explain`` in words.

The per-layer sketch (``Architecture.sketch``) shows each layer's kept share in tenths, so two
architectures can share a sketch (and their parameter count) while their MLP widths differ by a
few channels. ``annotate_lookalikes`` gives each such row of a query answer the rank of the first
row it looks like and where they differ; ``lookalike_groups`` says which rows a table may show as
one (same sketch, parameters and shown predictions).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

__all__ = ["SKETCH_LEGEND", "annotate_lookalikes", "explain_lines", "group_note", "layer_differences",
           "lookalike_groups"]

SKETCH_LEGEND = ("sketch: one character per layer, A = attention (KV groups kept), M = MLP channels kept: "
                 "F all, 9 = 90-99%, 8 = 80-89%, ... 0 = under 10%, x = layer dropped")


def layer_differences(layers: Sequence[Mapping[str, Any]], other: Sequence[Mapping[str, Any]],
                      other_rank: int, limit: int = 4) -> str:
    """Where two per-layer encodings differ, e.g. ``L3 MLP 344 (#2: 352), L5 KV 3 (#2: 2)``."""
    parts = []
    for a, b in zip(layers, other):
        if a.get("dropped") != b.get("dropped"):
            parts.append(f"L{a['layer']} {'dropped' if a.get('dropped') else 'kept'} (#{other_rank}: "
                         f"{'dropped' if b.get('dropped') else 'kept'})")
            continue
        if a.get("kv_heads") != b.get("kv_heads"):
            parts.append(f"L{a['layer']} KV {a['kv_heads']} (#{other_rank}: {b['kv_heads']})")
        if a.get("intermediate") != b.get("intermediate"):
            parts.append(f"L{a['layer']} MLP {a['intermediate']} (#{other_rank}: {b['intermediate']})")
    shown = ", ".join(parts[:limit])
    return shown + (f", +{len(parts) - limit} more" if len(parts) > limit else "")


def annotate_lookalikes(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Adds ``same_sketch_as`` (the rank of the first earlier row with the same sketch, or None)
    and ``sketch_note`` (where they differ) to each result row, in place; returns ``results``."""
    first: dict[str, dict[str, Any]] = {}
    for r in results:
        seen = first.setdefault(r.get("sketch", ""), r)
        if seen is r:
            r["same_sketch_as"], r["sketch_note"] = None, None
            continue
        r["same_sketch_as"] = seen["rank"]
        r["sketch_note"] = (f"same sketch as #{seen['rank']}; differs at "
                            f"{layer_differences(r['layers'], seen['layers'], seen['rank'])}")
    return results


def _shown(row: Mapping[str, Any], objectives: Sequence[str]) -> tuple[Any, ...]:
    """What a table shows of a row besides its id: parameters, sketch, predictions as printed."""
    def g(x: Any, digits: int) -> str:
        return "-" if x is None else f"{x:.{digits}g}"
    return (row["params"], row.get("sketch"),
            *(g(row["predicted"].get(o), 4) for o in objectives),
            *(g(row.get("uncertainty", {}).get(o), 2) for o in objectives),
            *(g(row.get("measured", {}).get(o), 4) for o in objectives))


def lookalike_groups(results: Sequence[Mapping[str, Any]], objectives: Sequence[str]) -> list[list[Mapping[str, Any]]]:
    """The rows in order, those a table would print identically (same parameters, sketch,
    predictions and measured values as shown) grouped under the first of them."""
    groups: dict[tuple[Any, ...], list[Mapping[str, Any]]] = {}
    for r in results:
        groups.setdefault(_shown(r, objectives), []).append(r)
    return list(groups.values())


def group_note(group: Sequence[Mapping[str, Any]]) -> str:
    """What rows printed as one share and where they differ: ``3 architectures alike here, differing
    only in the MLP widths of layers 0, 1, 7 (by up to 16 channels)``."""
    parts = []
    for key, what, unit in (("intermediate", "MLP widths", "channels"), ("kv_heads", "KV groups", "groups")):
        spread = {}
        for position in range(len(group[0]["layers"])):
            values = {g["layers"][position].get(key) for g in group}
            if len(values) > 1:
                spread[group[0]["layers"][position]["layer"]] = max(values) - min(values)
        if spread:
            parts.append(f"the {what} of layer{'s' if len(spread) > 1 else ''} {', '.join(map(str, spread))} "
                         f"(by up to {max(spread.values())} {unit})")
    return f"{len(group)} architectures alike here, differing only in " + (" and ".join(parts) or "nothing shown")


def explain_lines(explain: Mapping[str, Any], top: int = 6) -> list[str]:
    """``--explain`` in a few lines: the prunable layers, what the refinement kept free, narrowed or
    fixed, and the most important dimensions (the JSON is under ``--json``)."""
    layers = explain.get("layers") or []
    lines = [f"search space: {len(layers)} prunable layers"
             + (f" ({layers[0]}-{layers[-1]})" if layers else "")
             + f", MLP widths in multiples of {explain.get('multiple')}"
             + (", layers may be dropped" if explain.get("allow_drop") else "")]
    ref = explain.get("refinement") or {}
    dims = ref.get("dims") or []
    if not dims:
        lines.append(f"refinement: {ref.get('method', 'none')}")
        return lines
    covered = ref.get("importance_covered")
    lines.append(f"refinement by feature importance of {', '.join(ref.get('metrics', []))}: "
                 f"{ref.get('free', 0)} of {len(dims)} dimensions free"
                 + (f" (they carry {100 * covered:.0f}% of the importance)" if covered is not None else "")
                 + f", {ref.get('narrowed', 0)} narrowed, {ref.get('fixed', 0)} fixed; elite: "
                 f"{(ref.get('elite') or {}).get('source', 'none')} ({(ref.get('elite') or {}).get('size', 0)})")
    ranked = sorted(dims, key=lambda d: -float(d.get("importance") or 0.0))[:top]
    lines.append("most important: " + ", ".join(
        f"L{d['layer']} {d['kind']} {100 * float(d.get('importance') or 0):.0f}% ({d['status']}"
        + ("" if d["status"] == "free" or d.get("range_after") == d.get("range_before")
           else f" to {d['range_after'][0]}-{d['range_after'][1]}") + ")" for d in ranked))
    narrowed = [d for d in dims if d["status"] in ("narrowed", "fixed") and d.get("range_after") != d.get("range_before")]
    if narrowed:
        lines.append(f"narrowed or fixed where it matters little: {len(narrowed)} dimensions, e.g. "
                     + ", ".join(f"L{d['layer']} {d['kind']} {d['range_before'][0]}-{d['range_before'][1]} -> "
                                 f"{d['range_after'][0]}-{d['range_after'][1]}" for d in narrowed[:3]))
    return lines
