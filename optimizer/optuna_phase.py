"""The Optuna phase of the search: a TPE study over the free dimensions of a refined space,
warm-started from the pool's elite and the archive, asked and told in batches under the size
constraints (see ``search``'s module doc, phase B)."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from .encoding import LayerBatch
from .pareto import to_minimization
from .scoring import CandidatePool, Scorer, score_into, select_best
from .space import SearchSpace


def optuna_phase(space: SearchSpace, scorer: Scorer, pool: CandidatePool, *, directions, lo: int, hi: int,
                  target: int, seed: int, trials: int, batch: int, warm: LayerBatch | None,
                  storage: Any, study_name: str | None) -> dict[str, Any]:
    import optuna
    from optuna.distributions import FloatDistribution, IntDistribution

    s = space.spec
    idx = space.idx
    I = s.intermediate_size
    free_a = np.flatnonzero(space.optuna_attn())
    free_m = np.flatnonzero(space.optuna_mlp())
    dists: dict[str, Any] = {}
    for p in free_a:
        dists[f"attn_{idx[p]}"] = IntDistribution(int(space.kv_lo[p]), int(space.kv_hi[p]))
    for p in free_m:
        dists[f"mlp_{idx[p]}"] = FloatDistribution(float(space.mlp_lo[p]) / I, float(space.mlp_hi[p]) / I)
    info: dict[str, Any] = {"dims": len(dists), "asked": 0, "warm_trials": 0, "study_trials": 0}
    if not dists or trials <= 0:
        return info
    center_kv = space.kv_hi if space.center_kv is None else space.center_kv
    center_mlp = (space.mlp_lo + space.mlp_hi) / 2.0 if space.center_mlp is None else space.center_mlp

    def to_params(kv_row: np.ndarray, inter_row: np.ndarray) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for p in free_a:
            d = dists[f"attn_{idx[p]}"]
            out[f"attn_{idx[p]}"] = int(np.clip(kv_row[idx[p]], d.low, d.high))
        for p in free_m:
            d = dists[f"mlp_{idx[p]}"]
            out[f"mlp_{idx[p]}"] = float(np.clip(inter_row[idx[p]] / I, d.low, d.high))
        return out

    def decode(param_list: list[dict[str, Any]]) -> LayerBatch:
        n = len(param_list)
        kv, inter = space.full_arrays(n)
        kv[:, idx] = center_kv
        inter[:, idx] = space.round_mlp(np.broadcast_to(center_mlp, (n, space.P)))
        for i, prm in enumerate(param_list):
            for p in free_a:
                kv[i, idx[p]] = prm[f"attn_{idx[p]}"]
            for p in free_m:
                inter[i, idx[p]] = prm[f"mlp_{idx[p]}"] * I
        return space.project(LayerBatch(s, kv, inter))

    def constraints(params: int) -> dict[str, float]:
        return {"over_target": (params - hi) / target, "under_window": (lo - params) / target}

    def frozen(kv_row, inter_row, values, params) -> Any:
        return optuna.trial.create_trial(params=to_params(kv_row, inter_row), distributions=dists,
                                         values=[float(v) for v in values], constraints=constraints(int(params)))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        sampler = optuna.samplers.TPESampler(multivariate=True, seed=seed, n_startup_trials=10)
    study = optuna.create_study(storage=storage, study_name=study_name, directions=list(directions),
                                sampler=sampler)
    kv_all, inter_all, F_all, p_all, _ = pool.arrays()
    feas = pool.feasible()
    Fmin = to_minimization(F_all[feas], directions)
    elite = feas[select_best(Fmin, 24)]
    warm_trials = [frozen(kv_all[i], inter_all[i], F_all[i], p_all[i]) for i in elite]
    if warm is not None and len(warm):
        Fw = scorer.means(warm)
        warm_trials += [frozen(warm.kv[i], warm.inter[i], Fw[i], warm.params[i]) for i in range(len(warm))]
    study.add_trials(warm_trials)
    info["warm_trials"] = len(warm_trials)

    asked = 0
    while asked < trials:
        nb = min(batch, trials - asked)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            tr = [study.ask(dists) for _ in range(nb)]
        raw = decode([t.params for t in tr])
        F_raw = scorer.means(raw)
        p_raw = raw.params
        for t, f, p in zip(tr, F_raw, p_raw):
            for key, value in constraints(int(p)).items():
                t.set_constraint(key, value)
            study.tell(t, [float(v) for v in f])
        asked += nb
        rows = pool.new_rows(raw)
        if len(rows):
            pool.add(raw.take(rows), F_raw[rows], "optuna")
        rep, ok = space.repair(raw, lo, hi)
        added = score_into(pool, scorer, rep.take(np.flatnonzero(ok)), "optuna")
        if len(added):
            F_add = pool.arrays()[2][-len(added):]
            study.add_trials([frozen(added.kv[i], added.inter[i], F_add[i], added.params[i])
                              for i in range(len(added))])
    info["asked"] = asked
    info["study_trials"] = len(study.trials)
    info["study_name"] = study.study_name
    return info
