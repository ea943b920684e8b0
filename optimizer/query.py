"""``archopt query``: Pareto-optimal architectures of a base model for a size target.

Predictors are brought up to date (unless ``retrain=False``), the search runs over them, and the
answer (the ``archopt.query/1`` document) is stored: an identical later query (same inputs and
predictor versions) is served from the store. Measured values from the archive are shown beside
the predictions, under the predictor's protocol. Every answer carries what its predictors are
worth and the warnings that follow (``optimizer.quality``), the base model's measured values, and
where rows that share a sketch differ (``optimizer.readable``).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Sequence

from sqlalchemy import select

from archopt.archdb import models as m
from archopt.archdb import reads
from archopt.archdb.archive import Archive
from archopt.archdb.metrics import EVALUATED, UnknownMetric, metric_info
from archopt.archdb.sizes import parse_size, parse_tolerance
from archopt.archdb.store import spec_of

from .plan import PredictorError, plan_predictors
from .quality import answer_quality
from .readable import annotate_lookalikes

if TYPE_CHECKING:  # training and search load scikit-learn: only a query that must search imports them
    from .training import Trained

SCHEMA = "archopt.query/1"


@dataclass(frozen=True)
class QueryRequest:
    """The inputs of a query, as ``archopt query`` and ``POST /v1/query`` take them."""

    model: str
    params: str | int
    tolerance: str | float = "2%"
    objectives: tuple[str, ...] = ("ppl_wikitext2",)
    top: int = 10
    seed: int = 0
    explain: bool = False
    retrain: bool = True
    candidates: int = 20000
    fill: bool = False      # after the Pareto front, the next best candidates up to ``top`` (rounds)
    allow_drop: bool = False  # the search may drop whole decoder layers


def check_objectives(objectives: Sequence[str]) -> tuple[str, ...]:
    """The distinct objectives, each a metric the registry knows (``archdb.metrics``); a near miss
    of an evaluated metric (``ppl_wikitxt2``) is refused with the close match."""
    out = tuple(dict.fromkeys(objectives))
    if not out:
        raise PredictorError("at least one objective is needed")
    for name in out:
        if name in EVALUATED:
            continue
        close = difflib.get_close_matches(name, EVALUATED, n=1, cutoff=0.8)
        if close:
            raise PredictorError(f"unknown objective {name!r} (did you mean {close[0]!r}?)")
        try:
            metric_info(name)
        except UnknownMetric as exc:
            raise PredictorError(f"unknown objective: {exc}") from None
    return out


def resolve_target(base: m.BaseModel, request: QueryRequest) -> tuple[int, float]:
    """(target parameters, tolerance) of ``request`` for ``base``; a target above the base is refused."""
    target = parse_size(request.params, base.total_params)
    tolerance = parse_tolerance(request.tolerance)
    if target > base.total_params:
        raise PredictorError(f"target {target:,} is larger than {base.name} itself ({base.total_params:,} parameters)")
    return target, tolerance


def _query_key(request: QueryRequest, model: str, target: int, tolerance: float,
               trained: dict[str, Trained]) -> str:
    return query_key(request, model, target, tolerance, {k: v.row_id for k, v in trained.items()})


def query_key(request: QueryRequest, model: str, target: int, tolerance: float,
              predictor_rows: dict[str, int]) -> str:
    """The stored query's key: the inputs and the predictor versions (metric -> row id) used."""
    payload = {"model": model, "target": target, "tolerance": round(tolerance, 9),
               "objectives": list(request.objectives), "top": request.top, "seed": request.seed,
               "explain": request.explain, "candidates": request.candidates,
               "predictors": dict(sorted(predictor_rows.items()))}
    if request.fill:
        payload["fill"] = True
    if request.allow_drop:
        payload["allow_drop"] = True
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def stored_answer(archive: Archive, request: QueryRequest, target: int, tolerance: float,
                  predictor_rows: dict[str, int]) -> dict[str, Any] | None:
    """The stored answer that ``run_query`` would serve for these predictor rows, or None.

    ``request.model`` is the registered name. Nothing is loaded or trained: the service answers
    repeated queries with it without unpickling the predictors.
    """
    key = query_key(request, request.model, target, tolerance, predictor_rows)
    with archive.read() as session:
        stored = session.scalar(select(m.StoredQuery).where(m.StoredQuery.query_key == key))
        if stored is None:
            return None
        return {**stored.result, "served_from_store": True, "query_id": stored.id}


def usable_rows(archive: Archive, model: str, metrics: Sequence[str], *, retrain: bool = True) -> dict[str, int] | None:
    """Metric -> row id of the predictor versions a query would use without training, decided from
    the database alone (``plan.plan_predictors``: nothing unpickled, scikit-learn not imported);
    None when any metric needs a new version."""
    with archive.read() as session:
        plan = plan_predictors(session, reads.get_base_model(session, model), metrics)
    if any(c.check().needs_training(retrain) for c in plan.values()):
        return None
    return {metric: c.row_id for metric, c in plan.items()}


def run_query(archive: Archive, request: QueryRequest) -> dict[str, Any]:
    """Answer ``request``; returns the ``archopt.query/1`` document. A repeated query is answered
    from the store without importing scikit-learn, SciPy or the search."""
    start = time.perf_counter()
    objectives = check_objectives(request.objectives)
    if request.top < 1:
        raise PredictorError("top must be at least 1")
    with archive.read() as session:
        base = reads.get_base_model(session, request.model)
        spec, name, total = spec_of(base), base.name, base.total_params
        target, tolerance = resolve_target(base, request)
    rows = usable_rows(archive, name, objectives, retrain=request.retrain)
    if rows is not None:  # a repeated query: answered from the store without unpickling predictors
        hit = stored_answer(archive, replace(request, model=name), target, tolerance, rows)
        if hit is not None:
            return {**hit, "elapsed_ms": round((time.perf_counter() - start) * 1000, 2)}
    from .search import search
    from .training import ensure_predictors

    trained = ensure_predictors(archive, name, objectives, retrain=request.retrain)
    key = _query_key(request, name, target, tolerance, trained)
    with archive.read() as session:
        stored = session.scalar(select(m.StoredQuery).where(m.StoredQuery.query_key == key))
        if stored is not None:
            doc = dict(stored.result)
            doc.update(served_from_store=True, query_id=stored.id,
                       elapsed_ms=round((time.perf_counter() - start) * 1000, 2))
            return doc
        base = reads.get_base_model(session, name)
        warm = _warm_start(session, base, target, tolerance)
    result = search(spec, {k: v.predictor for k, v in trained.items()}, target_params=target,
                    tolerance=tolerance, objectives=objectives, seed=request.seed, warm_start=warm,
                    n_candidates=request.candidates, n_top=request.top, size_objective=True,
                    allow_drop=request.allow_drop)
    front_ids = {id(c) for c in result.front}
    candidates = result.front[:request.top]
    if request.fill and len(candidates) < request.top:
        seen = {c.architecture.canonical_json() for c in candidates}
        candidates += [c for c in result.ranked if c.architecture.canonical_json() not in seen][:request.top - len(candidates)]
    results = []
    with archive.read() as session:
        base = reads.get_base_model(session, name)
        measured = _measured(session, base, [c.architecture.arch_id(name) for c in candidates], trained)
    for rank, cand in enumerate(candidates, start=1):
        arch_id = cand.architecture.arch_id(name)
        values = measured.get(arch_id, {})
        results.append({
            "rank": rank, "arch_id": arch_id, "params": cand.params, "fraction": round(cand.params / total, 6),
            "predicted": {k: float(v) for k, v in cand.predicted.items()},
            "uncertainty": {k: float(v) for k, v in cand.uncertainty.items()},
            "measured": {k: values.get(k) for k in objectives},
            "measured_protocol": {k: (trained[k].protocol_id if values.get(k) is not None else None)
                                  for k in objectives},
            "sketch": cand.architecture.sketch(), "origin": cand.origin, "on_front": id(cand) in front_ids,
            "layers": cand.architecture.layer_dicts()})
    annotate_lookalikes(results)
    with archive.read() as session:
        quality = answer_quality(session, reads.get_base_model(session, name), target, result.window, trained, results)
    doc: dict[str, Any] = {
        "schema": SCHEMA, "query_id": None, "model": name, "target_params": target,
        "tolerance": tolerance, "window": list(result.window), "objectives": list(objectives),
        "served_from_store": False,
        "predictor_versions": {k: v.version for k, v in trained.items()},
        "predictor_protocols": {k: v.protocol_id for k, v in trained.items()},
        "predictors_stale": {k: v.stale for k, v in trained.items()},
        "predictors_retrained": [k for k, v in trained.items() if v.retrained],
        "predictors_borrowed_from": {k: list(v.borrowed_from) for k, v in trained.items() if v.borrowed_from},
        "results": results,
        "stats": {k: v for k, v in result.stats.items() if isinstance(v, (int, float, str))},
        **quality,   # predictor_quality, base_measured, warnings (optimizer/quality.py)
    }
    if request.explain:
        doc["explain"] = result.explain
    doc["elapsed_ms"] = round((time.perf_counter() - start) * 1000, 2)
    with archive.write() as session:
        base = reads.get_base_model(session, name)
        existing = session.scalar(select(m.StoredQuery).where(m.StoredQuery.query_key == key))
        if existing is None:
            row = m.StoredQuery(query_key=key, base_model_id=base.id, target_params=target,
                                request={"model": name, "params": str(request.params), "tolerance": tolerance,
                                         "objectives": list(objectives), "top": request.top,
                                         "seed": request.seed, "explain": request.explain,
                                         **({"allow_drop": True} if request.allow_drop else {})},
                                result=doc, elapsed_ms=doc["elapsed_ms"], created_at=m.utcnow())
            session.add(row)
            session.flush()
            row.result = {**doc, "query_id": row.id}
            doc["query_id"] = row.id
        else:
            doc["query_id"] = existing.id
    return doc


def get_query(archive: Archive, query_id: int) -> dict[str, Any]:
    with archive.read() as session:
        row = session.get(m.StoredQuery, query_id)
        if row is None:
            raise reads.NotFound(f"no query with id {query_id}")
        return {**row.result, "query_id": row.id, "served_from_store": True}


def _warm_start(session: Any, base: m.BaseModel, target: int, tolerance: float, limit: int = 64) -> list[Any]:
    """The archive's architectures near the size window (measured ones first), to seed the search."""
    lo = int(target * (1 - max(tolerance, 0.05) * 2))
    rows = list(session.scalars(select(m.Architecture).where(
        m.Architecture.base_model_id == base.id, m.Architecture.params <= target * 1.05,
        m.Architecture.params >= lo).order_by(m.Architecture.id.desc()).limit(limit)))
    return [reads.architecture_of(r, base) for r in rows]


def _measured(session: Any, base: m.BaseModel, arch_hashes: list[str],
              trained: dict[str, Trained]) -> dict[str, dict[str, float]]:
    if not arch_hashes:
        return {}
    rows = list(session.scalars(select(m.Architecture).where(
        m.Architecture.base_model_id == base.id, m.Architecture.arch_hash.in_(arch_hashes))))
    values = reads.live_metrics(session, [r.id for r in rows])
    out: dict[str, dict[str, float]] = {}
    for row in rows:
        for metric, t in trained.items():
            hit = [v for v in values.get(row.id, {}).get(metric, []) if v.protocol_id == t.protocol_id]
            if hit:
                out.setdefault(row.arch_hash, {})[metric] = hit[-1].value
    return out
