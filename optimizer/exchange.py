"""Channel exchange: refine the best measured architecture by moving MLP channels between layers.

The verification rounds end near a good architecture, but their predictors, trained on a few dozen
full evaluations, cannot resolve the last few tenths of a percent of perplexity. An exchange step
measures them instead, on the cheap fidelity (``measure_cheap``: the objective's own text on fewer
tokens), around the incumbent, i.e. the best architecture measured in the query's window under the
predictor's protocol:

1. every kept layer with ``delta`` MLP channels fewer, and with ``delta`` more: the local cost of
   each layer's channels (``down``) and the local gain of more (``up``), on the predictor's scale
   (log for perplexities);
2. size-neutral exchanges: the ``m`` layers whose channels cost least give ``delta`` each to the
   ``m`` other layers that gain most, for ``m`` in ``SWAPS`` (only where the predicted gain is
   positive); the parameter count is unchanged, so each stays in the window;
3. the exchange with the best cheap value, if it beats the incumbent's, is measured in full
   (``measure``) and becomes the incumbent when its full value is better; otherwise ``delta`` is
   halved (down to the channel multiple).

It is the coordinate-wise finite-difference step of a local search under the size constraint, the
sensitivity profile's idea (single-layer damages, taken as additive) applied at the incumbent
instead of at the unpruned base, where the profile's damages no longer hold. A step costs about
``2 * layers + len(SWAPS) + 1`` cheap measurements and one full evaluation; the full evaluation,
not the cheap fidelity, decides. Attention (whole KV groups) is left as the rounds chose it.

Caveat, measured (benchmarks/README.md): the differences it resolves are a few tenths of a
percent of perplexity, the size of a short protocol's own noise, and both fidelities read the
same text. On ptb-llama-24l at 60% with an 8,192-token protocol it improved the measured value
(+1.99% -> +1.75% over the base) but not held-out text (+3.52% -> +3.49%, +2.81% -> +2.87%). Use
it with a protocol long enough for its gains to be real; ``archopt query`` runs it only on
request (``--refine N``).

Torch-free: measuring is the caller's (``verify_loop``'s callbacks).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from archopt.archdb import reads
from archopt.archdb.arch import DEFAULT_CHANNEL_MULTIPLE, Architecture, LayerSpec, round_channels
from archopt.archdb.archive import Archive

from .predictors import metric_direction

SWAPS = (1, 2, 3, 4, 6, 8)     # numbers of layer pairs exchanging channels, each tried on the cheap fidelity
DELTA_SHARE = 1 / 16           # the first step moves this share of the MLP width per layer

__all__ = ["DELTA_SHARE", "SWAPS", "ExchangeStep", "exchange", "exchanges", "first_delta", "single_moves"]

Measure = Callable[[list[Architecture], list[dict[str, Any]], dict[str, Any]], Any]
MeasureCheap = Callable[[list[Architecture], list[dict[str, Any]], dict[str, Any]], Sequence[float | None]]


@dataclass
class ExchangeStep:
    """One exchange step: the incumbent it started from, the channels moved per layer, how many
    cheap measurements it made, and the architecture it verified (None when no exchange looked
    better on the cheap fidelity) with its full value and whether it became the incumbent."""

    step: int
    delta: int
    incumbent: str
    screened: int
    verified: str | None = None
    value: float | None = None
    accepted: bool = False


def first_delta(spec: Any) -> int:
    """The channels the first step moves per layer: ``DELTA_SHARE`` of the MLP width, rounded."""
    return round_channels(spec, spec.intermediate_size * DELTA_SHARE)


def _with_widths(arch: Architecture, widths: Sequence[int]) -> Architecture:
    layers = tuple(l if l.dropped else LayerSpec(l.q_heads, l.kv_heads, int(w), False)
                   for l, w in zip(arch.layers, widths))
    return Architecture(arch.spec, layers)


def single_moves(arch: Architecture, delta: int) -> list[tuple[int, int, Architecture]]:
    """``(layer, sign, architecture)``: ``arch`` with one kept layer's MLP ``delta`` channels
    narrower (sign -1, where at least ``DEFAULT_CHANNEL_MULTIPLE`` remain) or wider (+1, up to the
    full width)."""
    full = arch.spec.intermediate_size
    widths = [0 if l.dropped else l.intermediate for l in arch.layers]
    out = []
    for i, l in enumerate(arch.layers):
        if l.dropped:
            continue
        for sign in (-1, 1):
            w = l.intermediate + sign * delta
            if min(DEFAULT_CHANNEL_MULTIPLE, full) <= w <= full:
                moved = list(widths)
                moved[i] = w
                out.append((i, sign, _with_widths(arch, moved)))
    return out


def exchanges(arch: Architecture, down: dict[int, float], up: dict[int, float], delta: int,
              sizes: Sequence[int] = SWAPS) -> list[tuple[int, float, Architecture]]:
    """``(m, predicted gain, architecture)``: the ``m`` layers of least ``down`` (the rise of the
    metric when they lose ``delta`` channels) each give ``delta`` channels to one of the ``m``
    other layers of most ``up`` (its fall when it gains them), for each ``m`` in ``sizes`` whose
    predicted gain, ``sum(up) - sum(down)``, is positive. The parameter count is unchanged."""
    givers = sorted(down, key=lambda i: down[i])
    out = []
    for m in sizes:
        give = givers[:m]
        take = [i for i in sorted(up, key=lambda i: -up[i]) if i not in give][:m]
        if len(give) < m or len(take) < m:
            break
        gain = sum(up[i] for i in take) - sum(down[i] for i in give)
        if gain <= 0:
            continue
        widths = [0 if l.dropped else l.intermediate for l in arch.layers]
        for i in give:
            widths[i] -= delta
        for i in take:
            widths[i] += delta
        out.append((m, float(gain), _with_widths(arch, widths)))
    return out


def _scale(objective: str) -> Callable[[float], float]:
    """The predictor's scale of a metric, oriented so that lower is better."""
    sign = 1.0 if metric_direction(objective) == "minimize" else -1.0
    if objective.startswith("ppl"):
        return lambda v: sign * math.log(v) if v > 0 else math.inf
    return lambda v: sign * v


def incumbent(archive: Archive, doc: dict[str, Any], objective: str) -> tuple[Architecture, float] | None:
    """The best architecture measured in the query's window under the predictor's protocol of
    ``objective`` and its value; None when the window holds none."""
    pid = doc.get("predictor_protocols", {}).get(objective)
    if pid is None:
        return None
    lo, hi = doc["window"]
    better = _scale(objective)
    with archive.read() as session:
        base = reads.get_base_model(session, doc["model"])
        inside = [(better(float(v)), float(v), a) for a, v, _ in reads.training_pairs(session, base, objective, pid)
                  if lo <= a.params <= hi and v is not None and math.isfinite(float(v))]
        if not inside:
            return None
        _, value, row = min(inside, key=lambda t: t[0])
        return reads.architecture_of(row, base), value


def _rows(archs: Sequence[Architecture], model: str) -> list[dict[str, Any]]:
    return [{"rank": None, "arch_id": a.arch_id(model), "params": a.params, "fraction": round(a.fraction(), 6),
             "predicted": {}, "uncertainty": {}, "measured": {}, "sketch": a.sketch(), "origin": "exchange",
             "on_front": False, "layers": a.layer_dicts()} for a in archs]


def exchange(archive: Archive, doc: dict[str, Any], *, steps: int, measure: Measure, measure_cheap: MeasureCheap,
             delta: int | None = None, on_step: Callable[[ExchangeStep], Any] | None = None) -> list[ExchangeStep]:
    """Up to ``steps`` exchange steps around the incumbent of ``doc``'s window on its first
    objective (see the module doc); stops early when ``delta`` falls below the channel multiple
    or nothing is measured in the window. ``measure``/``measure_cheap`` are ``verify_loop``'s."""
    objective = doc["objectives"][0]
    better = _scale(objective)
    found = incumbent(archive, doc, objective)
    if found is None:
        return []
    arch, value = found
    delta = first_delta(arch.spec) if delta is None else int(delta)
    done: list[ExchangeStep] = []
    while len(done) < steps and delta >= DEFAULT_CHANNEL_MULTIPLE:
        moves = single_moves(arch, delta)
        cheap = measure_cheap([arch] + [a for _, _, a in moves], _rows([arch] + [a for _, _, a in moves], doc["model"]),
                              doc)
        step = ExchangeStep(len(done) + 1, delta, arch.arch_id(doc["model"]), len(moves) + 1)
        done.append(step)
        if cheap[0] is None or not math.isfinite(better(float(cheap[0]))):
            break
        c0 = better(float(cheap[0]))
        down: dict[int, float] = {}
        up: dict[int, float] = {}
        for (layer, sign, _), v in zip(moves, cheap[1:]):
            if v is None or not math.isfinite(better(float(v))):
                continue
            if sign < 0:
                down[layer] = better(float(v)) - c0
            else:
                up[layer] = c0 - better(float(v))
        offers = exchanges(arch, down, up, delta)
        values = measure_cheap([a for _, _, a in offers], _rows([a for _, _, a in offers], doc["model"]), doc) \
            if offers else []
        step.screened += len(offers)
        scored = [(better(float(v)), a) for (_, _, a), v in zip(offers, values) if v is not None]
        best = min(scored, key=lambda t: t[0], default=None)
        if best is None or not best[0] < c0:
            delta //= 2
        else:
            candidate = best[1]
            measure([candidate], _rows([candidate], doc["model"]), doc)
            step.verified = candidate.arch_id(doc["model"])
            got = _value_of(archive, doc, objective, step.verified)
            step.value = got
            if got is not None and better(got) < better(value):
                arch, value, step.accepted = candidate, got, True
            else:
                delta //= 2
        if on_step is not None:
            on_step(step)
    return done


def _value_of(archive: Archive, doc: dict[str, Any], objective: str, arch_id: str) -> float | None:
    pid = doc.get("predictor_protocols", {}).get(objective)
    with archive.read() as session:
        base = reads.get_base_model(session, doc["model"])
        got = reads.values_under(session, base, [arch_id], objective, _protocol_key(session, pid))
    value = got.get(arch_id)
    return None if value is None else float(value)


def _protocol_key(session: Any, protocol_id: int) -> str:
    from archopt.archdb import models as m
    return session.get(m.Protocol, protocol_id).key
