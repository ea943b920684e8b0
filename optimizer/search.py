"""Multi-objective search over predictors under a size budget.

Phases (all deterministic for a seed):

A. Seed batch (numpy): the warm-start architectures, uniform-at-size baselines and random draws
   from the space (attention biased toward kept, see ``space``), all repaired into the size window
   ``[target * (1 - tol), target]`` and scored in one vectorised call per predictor.
R. Refinement (the seed paper's step): predictor feature importances pick the free dimensions;
   the others are fixed / narrowed to what the best phase-A candidates favour (``refine_space``).
B. Optuna: an in-memory (or caller-given storage) multi-objective study over the free dimensions,
   ``TPESampler(multivariate=True)``, warm-started with ``add_trials`` from the archive and the
   phase-A elite (NSGA-II would ignore added trials). Trials are asked and told in batches; each
   carries the size budget as two ``trial.set_constraint`` values (``params - target`` and
   ``target * (1 - tol) - params``, relative to the target; <= 0 is feasible). Each proposal's
   repaired twin is scored too and added to the study as a feasible trial. Optuna costs ~20-40 ms
   per trial here, so it gets a few dozen trials, not thousands.
C. Vectorised evolution (numpy), the bulk: NSGA-II-style selection (non-dominated rank, crowding)
   of parents from everything scored so far, uniform per-layer crossover, mutation of KV groups
   (+-1) and MLP widths (Gaussian, annealed), repair into the window, de-duplication, one
   prediction call per batch, until ``n_candidates`` distinct candidates have been scored.

The answer is the non-dominated set of the feasible candidates (every one within the window, none
dominated by another returned one), capped to ``max_results`` by crowding distance, plus
``ranked``: the best ``n_top`` by (front, first objective) for callers that verify several.
"""

from __future__ import annotations

import contextvars
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from archopt.archdb.arch import Architecture, ArchitectureError, BaseSpec, uniform_at_size

from .encoding import LayerBatch, encode
from .pareto import _mask_min, crowding_distance, to_minimization
from .predictors import metric_direction
from .optuna_phase import optuna_phase
from .scoring import ORIGINS, CandidatePool, Scorer, SearchError, score_into, select_best
from .space import SearchSpace, build_space, refine_space, size_window, trust_bounds

# A search's study is a private, throw-away one: Optuna's "A new study created ..." INFO line is noise
# there, and only there. Rather than toggling Optuna's process-wide verbosity around each search
# (which raced with searches and studies in other threads), a filter is attached once to the
# loggers that say it, and drops their INFO records only in a context that runs a search.
_IN_SEARCH: contextvars.ContextVar[bool] = contextvars.ContextVar("archopt_in_search", default=False)
_STUDY_LOGGERS = ("optuna.storages._in_memory", "optuna.storages._rdb.storage", "optuna.storages.journal._storage")


class _SearchStudyFilter(logging.Filter):
    """Drops INFO-and-below records logged while the current context runs ``search``."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno > logging.INFO or not _IN_SEARCH.get()


def _quiet_search_studies() -> None:
    """Attach the filter to Optuna's study-creation loggers; idempotent (done once, at import)."""
    for name in _STUDY_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _SearchStudyFilter) for f in logger.filters):
            logger.addFilter(_SearchStudyFilter())


_quiet_search_studies()

__all__ = ["Candidate", "SearchError", "SearchResult", "neighbours", "search"]

@dataclass
class Candidate:
    """One returned architecture with its predictions (original metric scale)."""

    architecture: Architecture
    params: int
    fraction: float
    predicted: dict[str, float]
    uncertainty: dict[str, float]
    origin: str

    def to_dict(self) -> dict[str, Any]:
        return {"params": self.params, "fraction": round(self.fraction, 6), "predicted": self.predicted,
                "uncertainty": self.uncertainty, "origin": self.origin,
                "sketch": self.architecture.sketch(), "layers": self.architecture.layer_dicts()}


@dataclass
class SearchResult:
    front: list[Candidate]
    ranked: list[Candidate]
    objectives: tuple[str, ...]
    directions: tuple[str, ...]
    target_params: int
    window: tuple[int, int]
    stats: dict[str, Any]
    space: SearchSpace = field(repr=False)

    @property
    def best(self) -> Candidate | None:
        """Best candidate on the first objective (``None`` when nothing feasible was found)."""
        return self.front[0] if self.front else None

    @property
    def explain(self) -> dict[str, Any]:
        """JSON-ready description of the search space and its refinement (``--explain``)."""
        return self.space.to_dict()

    def to_dict(self) -> dict[str, Any]:
        return {"objectives": list(self.objectives), "directions": list(self.directions),
                "target_params": self.target_params, "window": list(self.window),
                "front": [c.to_dict() for c in self.front], "ranked": [c.to_dict() for c in self.ranked],
                "stats": self.stats}


def _baselines(space: SearchSpace, target: int) -> list[Architecture]:
    out = []
    for attention in (True, False):
        try:
            out.append(uniform_at_size(space.spec, target, list(space.layers), space.multiple, attention)[1])
        except ArchitectureError:
            pass
    return out


def _offspring(space: SearchSpace, rng: np.random.Generator, parents_kv: np.ndarray, parents_inter: np.ndarray,
               n: int, progress: float) -> LayerBatch:
    s = space.spec
    idx = space.idx
    P = space.P
    npar = len(parents_kv)
    a = rng.integers(0, npar, size=n)
    kv = parents_kv[a][:, idx].copy()
    inter = parents_inter[a][:, idx].astype(float)
    # uniform per-layer crossover for half of the children
    cross = rng.random(n) < 0.5
    b = rng.integers(0, npar, size=n)
    swap = (rng.random((n, P)) < 0.5) & cross[:, None]
    kv = np.where(swap, parents_kv[b][:, idx], kv)
    inter = np.where(swap, parents_inter[b][:, idx], inter)
    mov_a, mov_m = space.movable_attn(), space.movable_mlp()
    movable = np.r_[mov_a, mov_m]
    D = max(1, int(movable.sum()))
    rate = (2.5 - 1.5 * progress) / D
    mut = (rng.random((n, 2 * P)) < rate) & movable[None, :]
    none = ~mut.any(1)
    if none.any() and movable.any():
        choices = np.flatnonzero(movable)
        mut[np.flatnonzero(none), choices[rng.integers(0, len(choices), size=int(none.sum()))]] = True
    ma, mm = mut[:, :P], mut[:, P:]
    step = rng.choice(np.array([-2, -1, 1, 2]), size=(n, P), p=[0.1, 0.4, 0.4, 0.1])
    kv = np.where(ma & (kv > 0), kv + step, kv)
    lo_kv = np.maximum(space.kv_lo, 1)
    kv = np.where(kv > 0, np.clip(kv, lo_kv, space.kv_hi), kv)
    if space.allow_drop:
        toggle = ma & (rng.random((n, P)) < 0.1) & (space.kv_lo == 0)[None, :]
        kv = np.where(toggle & (kv > 0), 0, np.where(toggle & (kv == 0), space.kv_hi[None, :], kv))
        inter = np.where((kv > 0) & (inter == 0), space.mlp_hi[None, :], inter)
    sigma = (0.15 - 0.11 * progress) * s.intermediate_size
    inter = np.where(mm, inter + rng.normal(0.0, sigma, size=(n, P)), inter)
    # budget-neutral transfers of MLP channels between two layers (equalise marginal costs)
    mov = np.flatnonzero(mov_m)
    if len(mov) >= 2:
        rows = np.flatnonzero(rng.random(n) < 0.5)
        src = mov[rng.integers(0, len(mov), size=len(rows))]
        dst = mov[(np.searchsorted(mov, src) + rng.integers(1, len(mov), size=len(rows))) % len(mov)]
        delta = np.abs(rng.normal(0.0, sigma * 0.5, size=len(rows)))
        delta = np.minimum(delta, np.maximum(0.0, inter[rows, src] - space.mlp_lo[src]))
        delta = np.minimum(delta, np.maximum(0.0, space.mlp_hi[dst] - inter[rows, dst]))
        inter[rows, src] -= delta
        inter[rows, dst] += delta
    full_kv, full_inter = space.full_arrays(n)
    full_kv[:, idx] = kv
    full_inter[:, idx] = np.where(kv > 0, space.round_mlp(inter), 0)
    return space.project(LayerBatch(s, full_kv, full_inter))


def neighbours(spec: BaseSpec, predictors: Mapping[str, Any], parents: Sequence[Architecture], *,
               target_params: int, tolerance: float = 0.02, objectives: Sequence[str] = ("ppl_wikitext2",),
               n: int = 32, children: int = 2000, seed: int = 0, step: float = 0.8,
               exclude: Sequence[Architecture] = ()) -> list[Candidate]:
    """The ``n`` most promising close variants of ``parents`` (e.g. the best measured architectures),
    by predicted first objective: children by crossover and small mutations (``step`` in [0, 1]:
    1 = the search's finest steps), repaired into the size window, ``exclude`` left out.

    A predictor is most trustworthy next to what was measured, so rounds that verify here move in
    small, safe steps from the incumbents (a trust region), where the global search may chase an
    extrapolation.
    """
    if not parents:
        return []
    target = int(target_params)
    lo, hi = size_window(target, tolerance)
    space = build_space(spec)
    rng = np.random.default_rng(seed)
    par = space.project(encode(list(parents), spec))
    kids = _offspring(space, rng, par.kv, par.inter, max(1, children), float(np.clip(step, 0.0, 1.0)))
    kids, ok = space.repair(kids, lo, hi)
    kids = kids.take(np.flatnonzero(ok))
    if not len(kids):
        return []
    keys = np.c_[kids.kv, kids.inter]
    _, first = np.unique(keys, axis=0, return_index=True)
    kids = kids.take(np.sort(first))
    skip = {a.canonical_json() for a in list(parents) + list(exclude)}
    archs = [a for a in kids.architectures() if a.canonical_json() not in skip]
    if not archs:
        return []
    batch = encode(archs, spec)
    scorer = Scorer(predictors, objectives)
    means, stds = scorer.full(batch)
    first_obj = objectives[0]
    sign = 1.0 if metric_direction(first_obj) == "minimize" else -1.0
    order = np.argsort(sign * means[first_obj], kind="stable")[:max(0, n)]
    return [Candidate(architecture=archs[i], params=int(batch.params[i]), fraction=float(batch.params[i] / spec.total_params),
                      predicted={m: float(v[i]) for m, v in means.items()},
                      uncertainty={m: float(v[i]) for m, v in stds.items()}, origin="neighbour") for i in order]


# -- entry point ------------------------------------------------------------------------------
def search(spec: BaseSpec, predictors: Mapping[str, Any], *, target_params: int, tolerance: float = 0.02,
           objectives: Sequence[str] = ("ppl_wikitext2",), seed: int = 0,
           warm_start: Sequence[Architecture] = (), n_candidates: int = 20000,
           layers: Sequence[int] | str | None = None, space: SearchSpace | None = None,
           refine: bool | None = None, optuna_trials: int = 24, optuna_batch: int = 12,
           batch_size: int = 2000, generation_size: int = 500, max_results: int = 50, n_top: int = 10,
           storage: Any = None, study_name: str | None = None, extrapolate: bool = False,
           trust_margin: float = 0.05, size_objective: bool = False, allow_drop: bool = False) -> SearchResult:
    """Best architectures of ``spec`` within ``[target * (1 - tolerance), target]`` parameters.

    ``size_objective``: the returned front is non-dominated in (parameters, objectives), so a
    smaller architecture with slightly worse predictions is a trade-off, not a loser.

    ``predictors`` maps metric names to trained predictors (each with a ``featurizer``); every name
    in ``objectives`` must be there (``ppl*``/``kl*`` minimised, others maximised); the others are
    only reported. ``warm_start``: archived architectures of ``spec`` (projected into the space).
    ``space``: a prepared space (default: ``build_space(spec, layers)``); ``refine`` (default: on
    when the space is built here) narrows it after phase A. ``storage``/``study_name``: an Optuna
    storage to keep the study in (default in memory). See the module doc for the phases.

    Trust region: a space built here does not go narrower than the predictors' training data
    (``space.trust_bounds``; MLP ``trust_margin`` below the narrowest width seen, attention not below
    the fewest KV groups seen), because tree predictors extrapolate flat and the search would
    exploit it. ``extrapolate=True`` searches the whole default space. ``allow_drop``: a space
    built here may drop whole layers (``query --allow-drop``).
    """
    t0 = time.perf_counter()
    objectives = tuple(objectives)
    if not objectives:
        raise SearchError("at least one objective is needed")
    missing = [o for o in objectives if o not in predictors]
    if missing:
        raise SearchError(f"no predictor for objective {missing[0]!r} (have: {', '.join(predictors) or 'none'})")
    directions = tuple(getattr(predictors[o], "direction", None) or metric_direction(o) for o in objectives)
    target = int(target_params)
    lo, hi = size_window(target, tolerance)
    trust = None
    if space is None:
        kw: dict[str, Any] = {}
        trust = None if extrapolate else trust_bounds([predictors[o] for o in objectives])
        if trust:
            if "mlp" in trust:
                kw["mlp_min_frac"] = min(1.0, max(0.1, trust["mlp"] - trust_margin))
            if "attn" in trust:
                kw["attn_min_groups"] = max(1, int(math.floor(trust["attn"] * spec.num_kv_heads + 1e-6)))
        space = build_space(spec, layers, allow_drop=allow_drop, **kw)
        refine = True if refine is None else refine
    elif space.spec != spec:
        raise SearchError("the search space belongs to another base model")
    refine = bool(refine)
    p_min, p_max = space.smallest_params(), space.bounds_params()[1]
    if p_min > hi:
        raise SearchError(f"target {target:,} is below the smallest architecture the search can make "
                          f"({p_min:,} parameters, {100 * p_min / spec.total_params:.1f}% of the base)"
                          + ("" if space.allow_drop else ": allow layer drop (query --allow-drop) to go lower"))
    if p_max < lo:
        raise SearchError(f"the largest architecture of the search space ({p_max:,} parameters) is below "
                         f"the size window [{lo:,}, {hi:,}]")
    n_candidates = max(1, int(n_candidates))
    rng = np.random.default_rng(seed)
    scorer = Scorer(predictors, objectives)
    pool = CandidatePool(spec, lo, hi, len(objectives))
    timings: dict[str, float] = {}

    # phase A ------------------------------------------------------------------------------
    t = time.perf_counter()
    warm = space.project(encode(warm_start, spec)) if len(warm_start) else None
    if warm is not None:
        score_into(pool, scorer, warm, "warm")
        rep, _ = space.repair(warm, lo, hi)
        score_into(pool, scorer, rep, "warm")
    base = _baselines(space, target)
    if base:
        b = space.project(encode(base, spec))
        rep, _ = space.repair(b, lo, hi)
        score_into(pool, scorer, LayerBatch.concat([b, rep]), "uniform")
    n_a = min(n_candidates, max(min(256, n_candidates), int(0.2 * n_candidates)))
    for _ in range(4):
        room = n_a - pool.size
        if room <= 0:
            break
        raw = space.sample(min(batch_size, room + room // 4 + 8), rng)
        rep, _ = space.repair(raw, lo, hi)
        score_into(pool, scorer, rep, "random", limit=n_a - pool.size)
    timings["seed"] = time.perf_counter() - t

    # refinement ---------------------------------------------------------------------------
    t = time.perf_counter()
    feas = pool.feasible()
    if refine and len(feas):
        kv_all, inter_all, F_all, _, _ = pool.arrays()
        k_el = max(16, len(feas) // 20)
        el = feas[select_best(to_minimization(F_all[feas], directions), k_el)]
        space = refine_space(space, predictors, elite=LayerBatch(spec, kv_all[el], inter_all[el]),
                             elite_source=f"top {len(el)} of {len(feas)} seed candidates by predicted objectives")
    timings["refine"] = time.perf_counter() - t

    # phase B: Optuna ----------------------------------------------------------------------
    t = time.perf_counter()
    token = _IN_SEARCH.set(True)   # this context only (see _SearchStudyFilter)
    try:
        opt_info = optuna_phase(space, scorer, pool, directions=directions, lo=lo, hi=hi, target=target,
                                 seed=seed, trials=min(optuna_trials, max(0, n_candidates - pool.size)),
                                 batch=max(1, optuna_batch), warm=warm, storage=storage,
                                 study_name=study_name) if len(pool.feasible()) else {"asked": 0}
    finally:
        _IN_SEARCH.reset(token)
    timings["optuna"] = time.perf_counter() - t

    # phase C: vectorised evolution --------------------------------------------------------
    t = time.perf_counter()
    generations, stall = 0, 0
    n_par = 64
    start_size = pool.size
    while pool.size < n_candidates and stall < 3:
        feas = pool.feasible()
        if not len(feas):
            raw = space.sample(batch_size, rng)
            rep, _ = space.repair(raw, lo, hi)
            added = score_into(pool, scorer, rep, "random", limit=n_candidates - pool.size)
        else:
            kv_all, inter_all, F_all, _, _ = pool.arrays()
            par = feas[select_best(to_minimization(F_all[feas], directions), n_par)]
            progress = (pool.size - start_size) / max(1, n_candidates - start_size)
            kids = _offspring(space, rng, kv_all[par], inter_all[par],
                              min(generation_size, n_candidates - pool.size + 64), progress)
            rep, _ = space.repair(kids, lo, hi)
            added = score_into(pool, scorer, rep, "evolution", limit=n_candidates - pool.size)
        generations += 1
        stall = stall + 1 if len(added) == 0 else 0
    timings["evolution"] = time.perf_counter() - t

    # answer -------------------------------------------------------------------------------
    t = time.perf_counter()
    kv_all, inter_all, F_all, p_all, o_all = pool.arrays()
    feas = pool.feasible()
    Fmin = to_minimization(F_all[feas], directions)
    M = len(directions)
    if size_objective and len(feas):   # trade-offs of size too: smaller with worse metrics stays
        front_all = feas[_mask_min(np.c_[p_all[feas].astype(float), Fmin])]
    else:
        front_all = feas[_mask_min(Fmin)] if len(feas) else np.zeros(0, np.int64)
    if len(front_all) > 512:   # many ties or a dense front: keep a spread subset before predicting std
        cd = crowding_distance(to_minimization(F_all[front_all], directions), ["minimize"] * M)
        front_all = front_all[np.sort(np.argsort(-cd, kind="stable")[:512])]
    near = feas[select_best(Fmin, max(4 * n_top, 16))] if len(feas) else np.zeros(0, np.int64)
    show = np.unique(np.r_[front_all, near])
    cands: dict[int, Candidate] = {}
    risk = np.zeros(0)
    if len(show):
        batch = LayerBatch(spec, kv_all[show], inter_all[show])
        means, stds = scorer.full(batch)
        # tie-break: the sum over objectives of std relative to the mean (less uncertain first)
        risk = sum(stds[o] / np.maximum(np.abs(means[o]), 1e-12) for o in objectives if o in stds)
        risk = np.broadcast_to(np.asarray(risk, dtype=float), (len(show),))
        for j, i in enumerate(show):
            cands[int(i)] = Candidate(
                architecture=batch.architecture(j), params=int(p_all[i]),
                fraction=float(p_all[i] / spec.total_params),
                predicted={m: float(v[j]) for m, v in means.items()},
                uncertainty={m: float(v[j]) for m, v in stds.items()},
                origin=ORIGINS[int(o_all[i])])
    risk_of = {int(i): float(r) for i, r in zip(show, risk)}
    front_idx = front_all
    if len(front_idx) > max_results:
        if M == 1:   # all tied on the objective: the least uncertain
            order = np.argsort([risk_of[int(i)] for i in front_idx], kind="stable")
        else:
            cd = crowding_distance(to_minimization(F_all[front_idx], directions), ["minimize"] * M)
            order = np.argsort(-cd, kind="stable")
        front_idx = front_idx[order[:max_results]]
    if len(front_idx):
        Ff = to_minimization(F_all[front_idx], directions)
        rk = np.array([risk_of[int(i)] for i in front_idx])
        front_idx = front_idx[np.lexsort((rk,) + tuple(Ff.T[::-1]))]
    ranked_idx = near
    if len(ranked_idx):
        # front first, then by the first objective, then the least uncertain
        Fr = to_minimization(F_all[ranked_idx], directions)
        on_front = np.isin(ranked_idx, front_all)
        rk = np.array([risk_of[int(i)] for i in ranked_idx])
        ranked_idx = ranked_idx[np.lexsort((rk, Fr[:, 0], ~on_front))][:n_top]
    timings["answer"] = time.perf_counter() - t
    origins = {o: int((o_all == k).sum()) for k, o in enumerate(ORIGINS)}
    stats = {
        "candidates_scored": int(pool.size), "feasible": int(len(feas)),
        "feasible_share": round(len(feas) / max(1, pool.size), 4), "by_origin": origins,
        "generations": generations, "optuna": opt_info, "front_size": int(len(front_idx)),
        "seconds": round(time.perf_counter() - t0, 4), "predict_seconds": round(scorer.seconds, 4),
        "phase_seconds": {k: round(v, 4) for k, v in timings.items()}, "seed": seed,
        "refined": bool(space.refinement is not None),
        "space_params": [p_min, p_max],
        "trust_region": None if trust is None else {k: round(v, 4) for k, v in trust.items()},
    }
    if not len(feas):
        stats["message"] = (f"no candidate landed in [{lo:,}, {hi:,}] parameters: widen the tolerance "
                            f"(one MLP channel multiple is {space.multiple * (3 * spec.hidden_size):,} parameters)")
    return SearchResult(front=[cands[int(i)] for i in front_idx], ranked=[cands[int(i)] for i in ranked_idx],
                        objectives=objectives, directions=directions, target_params=target, window=(lo, hi),
                        stats=stats, space=space)
