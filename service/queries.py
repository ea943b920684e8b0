"""Queries in the service: validate the request, check the predictors, answer from the store or search.

The answer is ``run_query``'s ``archopt.query/1`` document, always with ``retrain=False``:

1. ``plan`` (a few small reads): resolve the model and the size, and for each objective find the
   newest predictor version and whether the archive has data it has not seen (stale).
2. A metric with no usable predictor at all is trained in the background and the request gets
   ``NotReady`` (HTTP 503 with Retry-After); stale metrics are queued for a background retrain
   and the answer says ``predictors_stale``.
3. An identical query (same inputs and predictor versions: ``run_query``'s key) is answered from
   memory, else from the archive's stored answer of that key (``optimizer.query.stored_answer``,
   which loads no predictor), else searched by ``run_query``, in a worker process when the
   service has a ``SearchPool``. Concurrent identical cold queries share one computation: the
   first starts it, the others wait for its result.

A plan is reused for ``state_ttl`` seconds (default 1 s; forgotten at once when this process stores a
new predictor version): new data, wherever it was written, marks answers stale within that second.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Any

from archopt.archdb.archive import Archive
from archopt.archdb.errors import ArchoptError

from .documents import RequestError
from .trainer import Trainer

QUERY_FIELDS = ("model", "params", "tolerance", "objectives", "top", "seed", "explain", "allow_drop")
MAX_TOP = 200


class NotReady(ArchoptError):
    """A predictor is being trained for the first time: ask again after ``retry_after`` seconds."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def _field_error(name: str, want: str, got: Any) -> RequestError:
    shown = repr(got) if not isinstance(got, str) else repr(got[:60])
    return RequestError(f"field {name!r} must be {want}, got {shown}")


def parse_query_body(body: Any) -> Any:
    """A ``QueryRequest`` from the JSON body of ``POST /v1/query`` (the options of ``archopt query``)."""
    from archopt.optimizer.query import QueryRequest
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object such as "
                           '{"model": "llama-2-7b", "params": "5B"}')
    unknown = [k for k in body if k not in QUERY_FIELDS]
    if unknown:
        import difflib
        close = difflib.get_close_matches(str(unknown[0]), QUERY_FIELDS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else f" (known: {', '.join(QUERY_FIELDS)})"
        raise RequestError(f"unknown field {str(unknown[0])[:40]!r}{hint}")
    for name in ("model", "params"):
        if name not in body:
            raise RequestError(f"field {name!r} is required")
    model = body["model"]
    if not isinstance(model, str) or not model.strip():
        raise _field_error("model", "a model name", model)
    params = body["params"]
    if isinstance(params, bool) or not isinstance(params, (str, int)):
        raise _field_error("params", "a size such as \"5B\", \"550M\", \"80%\" or an integer", params)
    tolerance = body.get("tolerance", "2%")
    if isinstance(tolerance, bool) or not isinstance(tolerance, (str, int, float)):
        raise _field_error("tolerance", "a tolerance such as \"2%\" or 0.02", tolerance)
    objectives = body.get("objectives", ["ppl_wikitext2"])
    if isinstance(objectives, str):
        objectives = [x.strip() for x in objectives.split(",") if x.strip()]
    if not isinstance(objectives, list) or not objectives or not all(isinstance(x, str) for x in objectives):
        raise _field_error("objectives", "a non-empty list of metric names", objectives)
    top = body.get("top", 10)
    if isinstance(top, bool) or not isinstance(top, int) or not 1 <= top <= MAX_TOP:
        raise _field_error("top", f"an integer from 1 to {MAX_TOP}", top)
    seed = body.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise _field_error("seed", "an integer", seed)
    explain = body.get("explain", False)
    if not isinstance(explain, bool):
        raise _field_error("explain", "true or false", explain)
    allow_drop = body.get("allow_drop", False)
    if not isinstance(allow_drop, bool):
        raise _field_error("allow_drop", "true or false", allow_drop)
    return QueryRequest(model=model.strip(), params=params, tolerance=tolerance,
                        objectives=tuple(x.strip() for x in objectives), top=top, seed=seed, explain=explain,
                        retrain=False, allow_drop=allow_drop)


@dataclass(frozen=True)
class QueryPlan:
    """A validated query with its size resolved and the predictor each objective would use."""

    request: Any  # QueryRequest, with the model's registered name and retrain=False
    target: int
    tolerance: float
    predictors: tuple[Any, ...]  # optimizer.plan.PredictorChoice, one per objective

    @property
    def key(self) -> tuple[Any, ...]:
        r = self.request
        return (r.model, self.target, round(self.tolerance, 9), r.objectives, r.top, r.seed, r.explain,
                r.candidates, r.allow_drop, tuple(p.row_id for p in self.predictors))

    @property
    def missing(self) -> list[str]:
        return [p.metric for p in self.predictors if p.needs_training(retrain=False)]

    @property
    def stale(self) -> list[str]:
        return [p.metric for p in self.predictors if not p.needs_training(retrain=False) and p.stale]


def plan_query(archive: Archive, request: Any) -> QueryPlan:
    """Resolve model and size and choose the predictors (``optimizer.plan``, as ``archopt query``
    does), without loading or training any."""
    from archopt.archdb import reads
    from archopt.optimizer.plan import plan_predictors
    from archopt.optimizer.query import check_objectives, resolve_target
    objectives = check_objectives(request.objectives)
    with archive.read() as session:
        base = reads.get_base_model(session, request.model)
        target, tolerance = resolve_target(base, request)
        choices = plan_predictors(session, base, objectives)
        name = base.name
    return QueryPlan(replace(request, model=name, objectives=objectives, retrain=False), target, tolerance,
                     tuple(choices[o].check() for o in objectives))


class QueryService:
    """Answers queries for one archive: plan, background training, memory of answers, coalescing."""

    def __init__(self, archive: Archive, trainer: Trainer, *, retry_after: int = 5, cache_size: int = 512,
                 state_ttl: float = 1.0, pool: Any = None) -> None:
        self.archive = archive
        self.trainer = trainer
        self.pool = pool  # a worker.SearchPool, or None: search in a thread of this process
        self.retry_after = retry_after
        self.cache_size = cache_size
        self.state_ttl = state_ttl
        self._cache: OrderedDict[tuple[Any, ...], dict[str, Any]] = OrderedDict()
        self._plans: OrderedDict[Any, tuple[float, QueryPlan]] = OrderedDict()
        self._generation = 0
        self._lock = threading.Lock()
        self._inflight: dict[tuple[Any, ...], asyncio.Future] = {}  # touched by the event loop only
        self.stats = {"computed": 0, "from_memory": 0, "from_store": 0, "shared": 0, "not_ready": 0}

    async def answer(self, request: Any) -> dict[str, Any]:
        """The ``archopt.query/1`` document of ``request`` (a ``QueryRequest``)."""
        from starlette.concurrency import run_in_threadpool
        started = time.perf_counter()
        plan = self._recent_plan(request)
        if plan is None:
            generation = self._generation
            plan = await run_in_threadpool(plan_query, self.archive, request)
            self._keep_plan(request, plan, generation)
        if plan.missing:
            for metric in plan.missing:
                self.trainer.submit(plan.request.model, metric)
            self._count("not_ready")
            raise NotReady(f"no predictor for {', '.join(plan.missing)} of {plan.request.model} yet: training it "
                           f"in the background; ask again in {self.retry_after} s", self.retry_after)
        for metric in plan.stale:
            if not self.trainer.pending(plan.request.model, metric):
                self.trainer.submit(plan.request.model, metric, debounce=True)
        with self._lock:
            hit = self._cache.get(plan.key)
            if hit is not None:
                self._cache.move_to_end(plan.key)
        if hit is not None:
            self._count("from_memory")
        else:
            hit = await run_in_threadpool(self._stored, plan)
        if hit is not None:
            doc = {**hit, "served_from_store": True, "elapsed_ms": round((time.perf_counter() - started) * 1000, 2)}
            return self._with_current_staleness(doc, plan)
        task = self._inflight.get(plan.key)
        if task is None:
            task = asyncio.ensure_future(self._compute(plan))
            self._inflight[plan.key] = task
            task.add_done_callback(lambda t, key=plan.key: self._done(key, t))
        else:
            self._count("shared")
        doc = await asyncio.shield(task)
        return self._with_current_staleness(dict(doc), plan)

    def forget_state(self) -> None:
        """A new predictor version was stored here: plan queries afresh."""
        with self._lock:
            self._generation += 1
            self._plans.clear()

    def _recent_plan(self, request: Any) -> QueryPlan | None:
        with self._lock:
            found = self._plans.get(request)
            if found is None or time.monotonic() - found[0] > self.state_ttl:
                return None
            return found[1]

    def _keep_plan(self, request: Any, plan: QueryPlan, generation: int) -> None:
        with self._lock:
            if generation != self._generation:
                return  # planned before a change that this process made: do not keep it
            self._plans[request] = (time.monotonic(), plan)
            self._plans.move_to_end(request)
            while len(self._plans) > 4 * self.cache_size:
                self._plans.popitem(last=False)

    def _stored(self, plan: QueryPlan) -> dict[str, Any] | None:
        """The archive's stored answer of this plan (no predictor is loaded), kept in memory too."""
        from archopt.optimizer.query import stored_answer
        rows = {p.metric: p.row_id for p in plan.predictors if p.row_id is not None}
        doc = stored_answer(self.archive, plan.request, plan.target, plan.tolerance, rows)
        if doc is not None:
            self._count("from_store")
            self._remember(plan, doc)
        return doc

    def _remember(self, plan: QueryPlan, doc: dict[str, Any]) -> None:
        with self._lock:
            self._cache[plan.key] = doc
            self._cache.move_to_end(plan.key)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)

    def _done(self, key: tuple[Any, ...], task: asyncio.Future) -> None:
        self._inflight.pop(key, None)
        if not task.cancelled():
            task.exception()  # retrieved here, so an error nobody waited for is not logged as lost

    async def _compute(self, plan: QueryPlan) -> dict[str, Any]:
        from concurrent.futures.process import BrokenProcessPool

        from starlette.concurrency import run_in_threadpool

        from .worker import compute_query
        doc = None
        if self.pool is not None:
            try:
                doc = await asyncio.wrap_future(self.pool.submit(plan.request))
            except BrokenProcessPool:  # the worker died under this query: answer it here
                doc = None
        if doc is None:
            doc = await run_in_threadpool(compute_query, self.archive, plan.request)
        if not doc.get("served_from_store"):
            self._count("computed")
        versions = {p.metric: p.version for p in plan.predictors}
        if doc.get("predictor_versions") == versions:
            self._remember(plan, doc)
        return doc

    @staticmethod
    def _with_current_staleness(doc: dict[str, Any], plan: QueryPlan) -> dict[str, Any]:
        """A stored answer says how stale its predictors were then; say how stale they are now."""
        stale = dict(doc.get("predictors_stale") or {})
        for p in plan.predictors:
            if doc.get("predictor_versions", {}).get(p.metric) == p.version:
                stale[p.metric] = p.stale
        doc["predictors_stale"] = stale
        return doc

    def _count(self, name: str) -> None:
        with self._lock:
            self.stats[name] += 1
