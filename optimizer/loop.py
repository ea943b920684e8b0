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

Torch-free: measuring is the caller's ``measure`` callback.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from archopt.archdb import reads
from archopt.archdb.arch import Architecture, from_layer_dicts
from archopt.archdb.archive import Archive
from archopt.archdb.store import spec_of

from .predictors import metric_direction
from .query import QueryRequest, run_query

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


@dataclass
class LoopReport:
    model: str
    objective: str
    rounds: list[LoopRound] = field(default_factory=list)
    stopped: str = ""

    @property
    def verified(self) -> list[str]:
        return [a for r in self.rounds for a in r.verified]

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "objective": self.objective, "stopped": self.stopped,
                "rounds": [dataclasses.asdict(r) for r in self.rounds]}


def pick_to_verify(results: Sequence[dict[str, Any]], k: int, *, objective: str, explore: float = 0.0,
                   max_gap: float = 0.15, exclude: set[str] | frozenset[str] = frozenset()) -> list[dict[str, Any]]:
    """The ``k`` results of a query document worth measuring next (see the module doc).

    Skips results measured already (``measured[objective]`` not null) and ids in ``exclude``.
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
    return ranked[:k]


def verify_loop(archive: Archive, request: QueryRequest, *, verify: int, rounds: int,
                measure: Callable[[list[Architecture], list[dict[str, Any]], dict[str, Any]], Any], budget: int | None = None,
                explore: float = 0.0, pool: int | None = None,
                on_round: Callable[[LoopRound, dict[str, Any]], Any] | None = None) -> LoopReport:
    """Run up to ``rounds`` rounds of query -> verify ``verify`` -> retrain (see the module doc).

    ``measure(architectures, picks, doc)`` must prune, measure and store the architectures in
    ``archive`` under the predictors' protocols (``picks``: their rows of the query document
    ``doc``). ``budget`` caps the total number of architectures measured.
    ``pool``: how many query results to choose from (default ``max(4 * verify, request.top)``).
    Each round uses seed ``request.seed + round`` so the search explores anew.
    """
    if verify < 1 or rounds < 1:
        raise ValueError("verify and rounds must be at least 1")
    objective = request.objectives[0]
    report = LoopReport(request.model, objective)
    chosen: set[str] = set()
    spent = 0
    pool = max(4 * verify, request.top) if pool is None else max(pool, verify)
    spec = None
    for r in range(rounds):
        if budget is not None and spent >= budget:
            report.stopped = "budget"
            break
        k = verify if budget is None else min(verify, budget - spent)
        t = time.perf_counter()
        doc = run_query(archive, dataclasses.replace(request, top=min(200, pool), seed=request.seed + r))
        tq = time.perf_counter() - t
        picks = pick_to_verify(doc["results"], k, objective=objective, explore=explore, exclude=chosen)
        if not picks:
            report.stopped = "nothing new"
            break
        if spec is None:
            with archive.read() as session:
                spec = spec_of(reads.get_base_model(session, doc["model"]))
        archs = [from_layer_dicts(spec, p["layers"]) for p in picks]
        t = time.perf_counter()
        measure(archs, picks, doc)
        tm = time.perf_counter() - t
        ids = [p["arch_id"] for p in picks]
        chosen.update(ids)
        spent += len(ids)
        rnd = LoopRound(r + 1, doc.get("query_id"), dict(doc.get("predictor_versions", {})), ids,
                        {p["arch_id"]: float(p["predicted"][objective]) for p in picks}, round(tq, 3), round(tm, 3))
        report.rounds.append(rnd)
        if on_round is not None:
            on_round(rnd, doc)
    else:
        report.stopped = "rounds"
    return report
