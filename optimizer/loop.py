"""Rounds of query -> verify -> retrain: ``archopt query --verify K --rounds R``.

One round asks ``run_query`` for a generous list of candidates (its predictors are retrained first
when the archive holds evaluations they have not seen, i.e. the previous round's), picks the ``K``
best ones not yet measured under the predictors' protocols, and hands them to ``measure`` (which
prunes, measures and writes them to the archive: ``Campaign.run`` in the CLI and the benchmarks).
The next round's query learns from them. The loop stops after ``rounds`` rounds, when ``budget``
measurements have been spent, or when the search proposes nothing new.

Which candidates a round verifies (``explore``): candidates are ranked by a lower confidence bound,
``predicted - explore * uncertainty`` for a minimised objective (``+`` for a maximised one), on the
first objective: ``explore=0`` verifies the predicted best (pure exploitation); a positive value
prefers candidates that are both predicted good and uncertain, where a measurement teaches the
predictor most (active learning). Candidates whose predicted value is much worse than the round's
best (beyond ``max_gap`` relative) are never picked, whatever their uncertainty.

Trust region (``local``): a share of each round's candidates comes not from the global search but
from close variants of the best measured architectures (``search.neighbours``: crossover and small
mutations of the top 8, ranked by the predictors), where the predictors are most trustworthy; the
rest from the query. The global search alone tends to chase one extrapolated optimum (on
ptb-llama-8l it pushed single MLPs to their narrowest width), the neighbourhood keeps improving on
what was measured.

Screening (``screen``, ``archopt query --verify K --screen N``): each round first measures ``N``
fresh candidates (ranked as above) under a cheap fidelity of the objective's protocol (the same
text on an eighth of the tokens: a tenth of the cost), then verifies the ``K`` with the best cheap
values among everything screened and not yet verified. On ptb-llama-8l, 1,024-token WikiText-2
perplexity ranks architectures near the optimum with Kendall tau 0.81 against the 8,192-token
value, where the predictors reach about 0.6 there (benchmarks/README.md). The cheap values are
stored as evaluations under their own protocol; predictors of the full protocol learn from them
too (``training``: mapped onto the full scale by a fit on architectures measured both ways).

Strong starts (``starts``): architectures that search-free methods give for the target
(``optimizer.starts.strong_starts``: rules of thumb such as "MLP only, LLM-Pruner's layer range",
and a FLAP-style global allocation). The first round measures those not yet measured under the
predictors' protocols before anything else (one ``measure`` call, counted in ``budget``), then asks
the query again, so its own picks come from predictors that have seen them and from their
neighbourhood (they are incumbents now). The loop's best measured architecture is therefore never
worse than the best start: the loop begins where the rules of thumb end.

Proposals (``proposals``): architectures offered to every round beside the neighbourhood of the
trust region, ranked with it by the predictors: e.g. the sensitivity profile's next-best
solutions of its integer program (``Verifier.proposals``). Puzzle-style search verifies those in
the program's order, trusting the additive damages; here the predictors, which learn from every
measured architecture what the additive model misses, choose among them.

Channel exchange (``refine``, ``archopt query --refine N``, off by default): after the rounds,
up to ``N`` steps of ``optimizer.exchange`` around the best measured architecture: each layer's MLP
channels priced on the cheap fidelity at the incumbent, the cheapest moved to where they gain most
at an unchanged size, the best such exchange verified in full. On ptb-llama-24l at 60% they took
the rounds' best from +1.99% to +1.75% over the base on the measured text (8,192 WikiText-2 test
tokens) but not on held-out text (+3.52% -> +3.49% on later test tokens, +2.81% -> +2.87% on
validation): with a short protocol they fit its text, which is why they are not a default.

Torch-free: measuring is the caller's ``measure`` (and ``measure_cheap``) callback.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from archopt.archdb import reads
from archopt.archdb.arch import Architecture, from_layer_dicts
from archopt.archdb.archive import Archive
from archopt.archdb.store import spec_of

from .encoding import encode
from .exchange import ExchangeStep, exchange
from .predictors import metric_direction
from .query import QueryRequest, run_query
from .search import neighbours
from .training import ensure_predictors

INCUMBENTS = 8

__all__ = ["LoopRound", "LoopReport", "pick_to_verify", "verify_loop"]


@dataclass
class LoopRound:
    round: int
    query_id: int | None
    predictor_versions: dict[str, int]
    verified: list[str]                 # arch ids handed to ``measure`` this round
    predicted: dict[str, float]         # arch id -> predicted first objective
    seconds_query: float
    seconds_measure: float
    screened: int = 0                   # architectures measured at the cheap fidelity this round
    seconds_screen: float = 0.0
    starts: list[str] = field(default_factory=list)   # of ``verified``: the strong starts measured first
    start_names: dict[str, str] = field(default_factory=dict)   # start arch id -> its name ("profile-1", ...)


@dataclass
class LoopReport:
    model: str
    objective: str
    rounds: list[LoopRound] = field(default_factory=list)
    stopped: str = ""
    exchange: list[ExchangeStep] = field(default_factory=list)

    @property
    def verified(self) -> list[str]:
        return [a for r in self.rounds for a in r.verified]

    @property
    def screened(self) -> int:
        return sum(r.screened for r in self.rounds)

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "objective": self.objective, "stopped": self.stopped,
                "rounds": [dataclasses.asdict(r) for r in self.rounds],
                "exchange": [dataclasses.asdict(s) for s in self.exchange]}


def layer_distance(a: dict[str, Any], b: dict[str, Any], spec: Any) -> float:
    """Mean over layers of the change in kept attention and MLP fractions between two result rows."""
    fa, fb = _fractions(a, spec), _fractions(b, spec)
    return float(np.abs(fa - fb).mean()) if fa.shape == fb.shape else math.inf


def _fractions(row: dict[str, Any], spec: Any) -> np.ndarray:
    out = []
    for layer in row["layers"]:
        if layer.get("dropped"):
            out += [0.0, 0.0]
        else:
            out += [layer["kv_heads"] / spec.num_kv_heads, layer["intermediate"] / spec.intermediate_size]
    return np.array(out)


def pick_to_verify(results: Sequence[dict[str, Any]], k: int, *, objective: str, explore: float = 0.0,
                   max_gap: float = 0.15, exclude: set[str] | frozenset[str] = frozenset(),
                   spec: Any = None, min_distance: float = 0.0,
                   taken: Sequence[dict[str, Any]] = ()) -> list[dict[str, Any]]:
    """The ``k`` results of a query document worth measuring next (see the module doc).

    Skips results measured already (``measured[objective]`` not null) and ids in ``exclude``.
    With ``spec`` and ``min_distance`` > 0, a result closer than that (``layer_distance``) to one
    picked before it or to a row of ``taken`` waits until no farther one is left: near-duplicates
    from one converged search teach little.
    """
    sign = 1.0 if metric_direction(objective) == "minimize" else -1.0
    fresh = [r for r in results if r["arch_id"] not in exclude and r.get("measured", {}).get(objective) is None
             and objective in r.get("predicted", {})]
    if not fresh:
        return []
    best = min(sign * r["predicted"][objective] for r in fresh)

    def score(r: dict[str, Any]) -> float:
        return sign * r["predicted"][objective] - explore * float(r.get("uncertainty", {}).get(objective, 0.0))

    gap = abs(best) * max_gap
    eligible = [r for r in fresh if sign * r["predicted"][objective] <= best + gap]
    # stable: equal scores keep the query's own order (its rank)
    ranked = sorted(eligible, key=score)
    if spec is None or min_distance <= 0:
        return ranked[:k]
    picked: list[dict[str, Any]] = []
    later: list[dict[str, Any]] = []
    for r in ranked:
        if len(picked) >= k:
            break
        if all(layer_distance(r, p, spec) >= min_distance for p in [*taken, *picked]):
            picked.append(r)
        else:
            later.append(r)
    return picked + later[:k - len(picked)]


def verify_loop(archive: Archive, request: QueryRequest, *, verify: int, rounds: int,
                measure: Callable[[list[Architecture], list[dict[str, Any]], dict[str, Any]], Any], budget: int | None = None,
                explore: float = 0.0, pool: int | None = None,
                on_round: Callable[[LoopRound, dict[str, Any]], Any] | None = None, screen: int = 0,
                measure_cheap: Callable[[list[Architecture], list[dict[str, Any]], dict[str, Any]],
                                        Sequence[float | None]] | None = None, local: float = 0.5,
                min_distance: float = 0.01,
                starts: Sequence[Architecture | tuple[str, Architecture]]
                | Callable[[dict[str, Any]], Sequence[Architecture | tuple[str, Architecture]]] = (),
                proposals: Sequence[Architecture] | Callable[[dict[str, Any]], Sequence[Architecture]] = (),
                max_starts: int | None = None, lead_starts: Sequence[str] = (), refine: int = 0,
                on_exchange: Callable[[ExchangeStep], Any] | None = None) -> LoopReport:
    """Run up to ``rounds`` rounds of query -> verify ``verify`` -> retrain (see the module doc).

    ``measure(architectures, picks, doc)`` must prune, measure and store the architectures in
    ``archive`` under the predictors' protocols (``picks``: their rows of the query document
    ``doc``). ``budget`` caps the total number of architectures measured.
    ``pool``: how many query results to choose from (default ``max(4 * verify, 2 * screen, request.top)``).
    Each round uses seed ``request.seed + round`` so the search explores anew.
    ``screen`` > 0: measure that many fresh candidates per round with ``measure_cheap(architectures,
    picks, doc)`` (their cheap values, None where unmeasured) and verify the best screened ones.
    ``local`` in [0, 1]: the share of each round's screened (or verified) candidates drawn from the
    neighbourhood of the best measured architectures (see the module doc). ``min_distance``: the
    mean per-layer change in kept fractions that candidates of one round keep between them
    (``pick_to_verify``; half of it among the screened ones verified).
    ``starts``: architectures (or ``(name, architecture)`` pairs) the first round measures before
    anything else where they lack a value under the predictors' protocols (see the module doc);
    their rows in ``picks`` have ``origin`` ``"start"`` and ``start`` the name. A callable gets the
    first query document (``doc["target_params"]``) and returns them: e.g. ``lambda doc:
    strong_starts(spec, doc["target_params"], imp.kv_group, imp.channel)``, loading the model
    only once a round needs it.
    ``max_starts``: measure at most this many starts (those the predictors rank best; also when
    ``budget`` leaves fewer), those named in ``lead_starts`` ahead of the ranking. ``proposals``:
    architectures (or a callable of the round's query document returning them) that join each
    round's neighbourhood candidates, origin ``"proposal"`` (see the module doc).
    ``refine``: channel-exchange steps after the rounds (needs ``measure_cheap``; each measures one
    architecture in full, not counted in ``budget``), each reported to ``on_exchange``.
    """
    if not 0.0 <= local <= 1.0:
        raise ValueError("local must lie in [0, 1]")
    if verify < 1 or rounds < 1:
        raise ValueError("verify and rounds must be at least 1")
    if screen < 0 or (screen and measure_cheap is None):
        raise ValueError("screening needs a positive screen count and a measure_cheap callback")
    if refine < 0 or (refine and measure_cheap is None):
        raise ValueError("channel exchange needs a positive step count and a measure_cheap callback")
    objective = request.objectives[0]
    report = LoopReport(request.model, objective)
    chosen: set[str] = set()
    spent = 0
    pool = max(4 * verify, 2 * screen, request.top) if pool is None else max(pool, verify, screen)
    sign = 1.0 if metric_direction(objective) == "minimize" else -1.0
    screened: dict[str, tuple[float, dict[str, Any]]] = {}   # arch id -> (cheap value, its pick)
    spec = None
    for r in range(rounds):
        if budget is not None and spent >= budget:
            report.stopped = "budget"
            break
        k = verify if budget is None else min(verify, budget - spent)
        t = time.perf_counter()
        doc = run_query(archive, dataclasses.replace(request, top=min(200, pool), seed=request.seed + r, fill=True))
        tq = time.perf_counter() - t
        if spec is None:
            with archive.read() as session:
                spec = spec_of(reads.get_base_model(session, doc["model"]))
        start_ids: list[str] = []
        start_names: dict[str, str] = {}
        start_pred: dict[str, float] = {}
        tm = 0.0
        if r == 0 and starts:
            rows = _start_rows(archive, doc, spec, starts(doc) if callable(starts) else starts)
            cap = min(x for x in (max_starts, None if budget is None else budget - spent, len(rows)) if x is not None)
            if cap < len(rows):   # the most promising ones, by the predictors
                def promise(p: dict[str, Any]) -> tuple[bool, float]:
                    v = p["predicted"].get(objective)
                    return p["start"] not in lead_starts, sign * v if v is not None and math.isfinite(v) else math.inf
                rows = sorted(rows, key=promise)[:cap]
            if rows:
                t = time.perf_counter()
                measure([from_layer_dicts(spec, p["layers"]) for p in rows], rows, doc)
                tm = time.perf_counter() - t
                start_ids = [p["arch_id"] for p in rows]
                start_names = {p["arch_id"]: p["start"] for p in rows}
                start_pred = {p["arch_id"]: float(p["predicted"].get(objective, math.nan)) for p in rows}
                chosen.update(start_ids)
                spent += len(start_ids)
                k = verify if budget is None else min(verify, budget - spent)
                t = time.perf_counter()
                if k > 0:   # ask again: predictors and incumbents now include the starts
                    doc = run_query(archive, dataclasses.replace(request, top=min(200, pool), seed=request.seed + r,
                                                                 fill=True))
                tq += time.perf_counter() - t
        if k <= 0:
            report.rounds.append(LoopRound(r + 1, doc.get("query_id"), dict(doc.get("predictor_versions", {})),
                                           start_ids, start_pred, round(tq, 3), round(tm, 3), starts=start_ids,
                                           start_names=start_names))
            report.stopped = "budget"
            break
        near = _neighbour_rows(archive, doc, spec, objective, pool, request.seed + 7919 * (r + 1)) if local else []
        if proposals and local:
            offered = proposals(doc) if callable(proposals) else proposals
            taken = chosen | {row["arch_id"] for row in near}
            near += [{**{k: v for k, v in row.items() if k != "start"}, "origin": "proposal"}
                     for row in _start_rows(archive, doc, spec, list(offered)) if row["arch_id"] not in taken]

        def candidates(n: int, skip: set[str]) -> list[dict[str, Any]]:
            """``n`` fresh, mutually distinct candidates: ``local`` of them from the neighbourhood,
            the rest from the query."""
            kw = dict(objective=objective, explore=explore, spec=spec, min_distance=min_distance)
            mine = pick_to_verify(near, round(n * local), exclude=skip, **kw)
            skip = skip | {p["arch_id"] for p in mine}
            return mine + pick_to_verify(doc["results"], n - len(mine), exclude=skip, taken=mine, **kw)

        n_screened, ts = 0, 0.0
        if screen:
            fresh = candidates(screen, chosen | set(screened))
            t = time.perf_counter()
            if fresh:
                values = measure_cheap([from_layer_dicts(spec, p["layers"]) for p in fresh], fresh, doc)
                for p, v in zip(fresh, values):
                    if v is not None:
                        screened[p["arch_id"]] = (float(v), p)
                n_screened = len(fresh)
            ts = time.perf_counter() - t
            waiting = sorted((a for a in screened if a not in chosen), key=lambda a: sign * screened[a][0])
            picks = _distinct([screened[a][1] for a in waiting], k, spec, min_distance / 2)
        else:
            picks = candidates(k, set(chosen))
        if not picks:
            if start_ids:
                report.rounds.append(LoopRound(r + 1, doc.get("query_id"), dict(doc.get("predictor_versions", {})),
                                               start_ids, start_pred, round(tq, 3), round(tm, 3), n_screened,
                                               round(ts, 3), starts=start_ids, start_names=start_names))
            report.stopped = "nothing new"
            break
        archs = [from_layer_dicts(spec, p["layers"]) for p in picks]
        t = time.perf_counter()
        measure(archs, picks, doc)
        tm += time.perf_counter() - t
        ids = [p["arch_id"] for p in picks]
        chosen.update(ids)
        spent += len(ids)
        rnd = LoopRound(r + 1, doc.get("query_id"), dict(doc.get("predictor_versions", {})), start_ids + ids,
                        {**start_pred, **{p["arch_id"]: float(p["predicted"][objective]) for p in picks}},
                        round(tq, 3), round(tm, 3), n_screened, round(ts, 3), starts=start_ids, start_names=start_names)
        report.rounds.append(rnd)
        if on_round is not None:
            on_round(rnd, doc)
    else:
        report.stopped = "rounds"
    if refine and spec is not None:   # the last round's query: its window and predictors' protocols
        report.exchange = exchange(archive, doc, steps=refine, measure=measure, measure_cheap=measure_cheap,
                                   on_step=on_exchange)
    return report


def _start_rows(archive: Archive, doc: dict[str, Any], spec: Any,
                starts: Sequence[Architecture | tuple[str, Architecture]]) -> list[dict[str, Any]]:
    """Result rows (with predictions) of the distinct ``starts`` that lack a value of some objective
    under the predictors' protocols."""
    named = [s if isinstance(s, tuple) else ("start", s) for s in starts]
    objectives = list(doc["objectives"])
    with archive.read() as session:
        base = reads.get_base_model(session, doc["model"])
        done: set[str] | None = None
        for obj in objectives:
            pid = doc.get("predictor_protocols", {}).get(obj)
            pairs = reads.training_pairs(session, base, obj, pid) if pid is not None else []
            have = {a.arch_hash for a, _, _ in pairs}
            done = have if done is None else done & have
    done = done or set()
    todo: dict[str, tuple[str, Architecture]] = {}
    for name, arch in named:
        arch_id = arch.arch_id(doc["model"])
        if arch_id not in done:
            todo.setdefault(arch_id, (name, arch))
    if not todo:
        return []
    archs = [a for _, a in todo.values()]
    means: dict[str, np.ndarray] = {}
    stds: dict[str, np.ndarray] = {}
    trained = ensure_predictors(archive, doc["model"], objectives, retrain=False)
    batch = encode(archs, spec)
    for obj, t in trained.items():
        try:
            means[obj], stds[obj] = t.predictor.predict_architectures(batch)
        except ValueError:   # no featurizer: shown without a prediction
            means[obj] = stds[obj] = np.full(len(archs), math.nan)
    rows = []
    for i, (arch_id, (name, arch)) in enumerate(todo.items()):
        rows.append({"rank": None, "arch_id": arch_id, "params": arch.params, "fraction": round(arch.fraction(), 6),
                     "predicted": {o: float(v[i]) for o, v in means.items()},
                     "uncertainty": {o: float(v[i]) for o, v in stds.items()}, "measured": {},
                     "sketch": arch.sketch(), "origin": "start", "start": name, "on_front": False,
                     "layers": arch.layer_dicts()})
    return rows


def _distinct(rows: list[dict[str, Any]], k: int, spec: Any, min_distance: float) -> list[dict[str, Any]]:
    """The first ``k`` rows, skipping rows closer than ``min_distance`` to one already taken
    (taken after all when too few distinct rows are left)."""
    picked: list[dict[str, Any]] = []
    later: list[dict[str, Any]] = []
    for r in rows:
        if len(picked) >= k:
            break
        (picked if all(layer_distance(r, p, spec) >= min_distance for p in picked) else later).append(r)
    return picked + later[:k - len(picked)]


def _neighbour_rows(archive: Archive, doc: dict[str, Any], spec: Any, objective: str, n: int,
                    seed: int) -> list[dict[str, Any]]:
    """Close variants of the best measured architectures in the query's window, as result rows."""
    pid = doc.get("predictor_protocols", {}).get(objective)
    if pid is None:
        return []
    lo, hi = doc["window"]
    sign = 1.0 if metric_direction(objective) == "minimize" else -1.0
    with archive.read() as session:
        base = reads.get_base_model(session, doc["model"])
        pairs = reads.training_pairs(session, base, objective, pid)
        measured = {a.arch_hash for a, _, _ in pairs}
        inside = sorted(((sign * v, a) for a, v, _ in pairs if lo <= a.params <= hi), key=lambda t: t[0])
        parents = [reads.architecture_of(a, base) for _, a in inside[:INCUMBENTS]]
    if not parents:
        return []
    trained = ensure_predictors(archive, doc["model"], list(doc["objectives"]), retrain=False)
    found = neighbours(spec, {k: t.predictor for k, t in trained.items()}, parents,
                       target_params=doc["target_params"], tolerance=doc["tolerance"],
                       objectives=list(doc["objectives"]), n=4 * n, seed=seed)
    rows = []
    for c in found:
        arch_id = c.architecture.arch_id(doc["model"])
        if arch_id in measured:
            continue
        rows.append({"rank": None, "arch_id": arch_id, "params": c.params, "fraction": round(c.fraction, 6),
                     "predicted": c.predicted, "uncertainty": c.uncertainty, "measured": {},
                     "sketch": c.architecture.sketch(), "origin": c.origin, "on_front": False,
                     "layers": c.architecture.layer_dicts()})
    return rows
