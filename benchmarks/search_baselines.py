"""The yardsticks of the search-quality benchmark, all measuring through ``search_measure.Bench``.

- ``method_rules``: the rules of thumb of ``optimizer.starts`` solved to the size (one full
  evaluation each): uniform on every layer, LLM-Pruner's layer range, MLP only, MLP only on that range.
- ``method_flap``: FLAP-style global allocation (``optimizer.starts.global_allocation``) on the
  campaign's Taylor importance, attention and MLP of every layer, with FLAP's standardised scores
  (``flap``) and with the raw scores (``global-raw``); no search, one full evaluation each.
- ``method_evopress``: EvoPress-style (1 + lambda) evolution over per-layer levels with
  size-keeping mutations and KL fitness under multi-stage selection (see ``Levels`` and
  ``method_evopress``); its pick is measured on the full protocol.
- ``method_puzzle``: Puzzle-style: every (layer, level) variant scored alone by KL, assembled by a
  mixed-integer program at the size (``scipy.optimize.milp``); the best solutions verified in turn.
- ``method_random``, ``method_optuna`` (TPE, NSGA-II on real evaluations), ``method_paper`` (the seed
  paper's pipeline).

Every method gets a ``MethodRun`` whose ledger holds its token budget; see budget.py for what is charged.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from budget import BudgetSpent
from search_measure import OBJECTIVE, Bench, MethodRun

RULE_NAMES = {"uniform": "rule-uniform", "llm_pruner_range": "rule-llm-pruner-range", "mlp_only": "rule-mlp-only",
              "mlp_only_range": "rule-mlp-only-range"}


def _timed(run: MethodRun, t0: float) -> MethodRun:
    """Record the wall time since ``t0`` and the process CPU time since ``run`` began."""
    run.seconds = time.perf_counter() - t0
    run.cpu_seconds = time.process_time() - run.cpu_started
    return run


# --- rules of thumb and FLAP-style allocation (no search) -------------------------------------------
def method_rules(bench: Bench, target: int, lo: int) -> list[MethodRun]:
    """Each rule of thumb solved to the size, one full evaluation each (``None``: cannot reach it)."""
    from archopt.optimizer.starts import RULES, rule_of_thumb
    return [_one_shot(bench, RULE_NAMES[rule], target, lo, rule_of_thumb(bench.spec, rule, target)) for rule in RULES]


def _one_shot(bench: Bench, name: str, target: int, lo: int, arch: Any) -> MethodRun:
    """A search-free method: its one architecture (``None``: cannot reach the size), measured once."""
    t0 = time.perf_counter()
    run = bench.run(name, target, lo, 1)
    if arch is None:
        run.notes["error"] = "cannot reach the size"
    else:
        run.final = arch
        run.notes["in_window"] = bool(lo <= arch.params <= target)
        bench.measure(run, [arch])
    return _timed(run, t0)


def flap_starts(bench: Bench, target: int) -> dict[str, Any]:
    """Global allocations at ``target`` (name -> architecture or None), the two that
    ``optimizer.starts.strong_starts`` gives the product's loop: ``flap`` (FLAP's scores standardised
    per layer and kind) and ``global-raw`` (the raw Taylor scores ranked as they are), attention and
    MLP over every layer."""
    from archopt.optimizer.starts import global_allocation
    imp = bench.campaign.importance
    spec = bench.spec
    return {"flap": global_allocation(spec, imp.kv_group, imp.channel, target),
            "global-raw": global_allocation(spec, imp.kv_group, imp.channel, target, normalize="none")}


def method_flap(bench: Bench, target: int, lo: int) -> list[MethodRun]:
    return [_one_shot(bench, name, target, lo, arch) for name, arch in flap_starts(bench, target).items()]


# --- per-layer levels (EvoPress's database, Puzzle's block library) ------------------------------------
@dataclass(frozen=True)
class Levels:
    """Per-layer compression levels: attention keeps ``1..kv`` KV groups, the MLP keeps
    ``I - k * step`` channels for ``k = 0..K`` (one fixed step, so a level swap between two layers
    keeps the size exactly, as in EvoPress), and with ``allow_drop`` a layer may be dropped
    (``kv == 0``). A state is two int arrays ``[L]``: KV groups kept and MLP level."""

    spec: Any
    step: int
    K: int
    allow_drop: bool = True

    @classmethod
    def for_spec(cls, spec: Any, mlp_levels: int = 16, min_frac: float = 0.1, allow_drop: bool = True,
                 multiple: int = 8) -> "Levels":
        full = spec.intermediate_size
        m = min(multiple, full)
        step = max(m, int(round(full / mlp_levels / m)) * m)
        K = max(0, (full - max(m, math.ceil(min_frac * full))) // step)
        return cls(spec, step, int(K), allow_drop)

    def widths(self, k: np.ndarray) -> np.ndarray:
        return self.spec.intermediate_size - np.asarray(k, dtype=np.int64) * self.step

    def params(self, kv: np.ndarray, k: np.ndarray) -> int:
        from archopt.optimizer.encoding import batch_params
        kv = np.asarray(kv, dtype=np.int64)
        return int(batch_params(self.spec, kv, np.where(kv > 0, self.widths(k), 0)))

    def arch(self, kv: np.ndarray, k: np.ndarray) -> Any:
        from archopt.optimizer.encoding import LayerBatch
        kv = np.asarray(kv, dtype=np.int64)
        return LayerBatch(self.spec, kv[None], np.where(kv > 0, self.widths(k), 0)[None]).architecture(0)

    def snap(self, arch: Any) -> tuple[np.ndarray, np.ndarray]:
        """The level state at or below ``arch`` in every layer (MLP widths rounded down to a level)."""
        full = self.spec.intermediate_size
        kv = np.array([0 if l.dropped else l.kv_heads for l in arch.layers], dtype=np.int64)
        k = np.array([self.K if l.dropped else -(-(full - l.intermediate) // self.step) for l in arch.layers])
        return kv, np.clip(k, 0, self.K).astype(np.int64)

    # one unit move of one layer: (kind, layer, +1 raise / -1 lower)
    def moves(self, kv: np.ndarray, k: np.ndarray, up: bool, kind: str) -> np.ndarray:
        KV = self.spec.num_kv_heads
        kept = kv > 0
        if kind == "attn":
            ok = kept & (kv < KV) if up else kept & (kv > 1)
        elif kind == "mlp":
            ok = kept & (k > 0) if up else kept & (k < self.K)
        else:   # depth: undrop (at the lowest level) or drop
            ok = ~kept if up else (kept if self.allow_drop and kept.sum() > 1 else np.zeros_like(kept))
        return np.flatnonzero(ok)

    def apply(self, kv: np.ndarray, k: np.ndarray, kind: str, layer: int, up: bool) -> None:
        if kind == "attn":
            kv[layer] += 1 if up else -1
        elif kind == "mlp":
            k[layer] += -1 if up else 1
        elif up:
            kv[layer], k[layer] = 1, self.K
        else:
            kv[layer] = 0


def fill_to_window(levels: Levels, kv: np.ndarray, k: np.ndarray, lo: int, target: int,
                   rng: np.random.Generator) -> bool:
    """Lower random units until at most ``target``, then raise random units that still fit until
    at least ``lo``; in place. True when the state ends in ``[lo, target]``."""
    for _ in range(10_000):
        p = levels.params(kv, k)
        if p <= target:
            break
        kinds = [x for x in ("attn", "mlp") if len(levels.moves(kv, k, False, x))]
        if not kinds:
            return False
        kind = kinds[rng.integers(len(kinds))]
        cand = levels.moves(kv, k, False, kind)
        levels.apply(kv, k, kind, int(rng.choice(cand)), False)
    for _ in range(10_000):
        p = levels.params(kv, k)
        if p >= lo:
            break
        options = []
        for kind in ("mlp", "attn"):
            for layer in levels.moves(kv, k, True, kind):
                kv2, k2 = kv.copy(), k.copy()
                levels.apply(kv2, k2, kind, int(layer), True)
                if levels.params(kv2, k2) <= target:
                    options.append((kind, int(layer)))
        if not options:
            break
        kind, layer = options[rng.integers(len(options))]
        levels.apply(kv, k, kind, layer, True)
    return lo <= levels.params(kv, k) <= target


# --- EvoPress-style evolution -------------------------------------------------------------------------
def evo_mutate(levels: Levels, kv: np.ndarray, k: np.ndarray, lo: int, target: int,
               rng: np.random.Generator, depth_prob: float) -> tuple[np.ndarray, np.ndarray] | None:
    """One offspring, EvoPress's mutation across layers of different sizes: raise ``min(U(1,3),
    U(1,3))`` random units (a KV group, an MLP level), then lower random units until the size is at
    most the target; rejected when it took more than 10 level changes or the parameters added are
    under 0.8 of those removed. With ``depth_prob`` the raise is instead a layer dropped (or a dropped
    one restored at the lowest level), the rest refilled into the window. None when no valid child."""
    for _ in range(50):
        kv2, k2 = kv.copy(), k.copy()
        p0 = levels.params(kv2, k2)
        depth = levels.allow_drop and rng.random() < depth_prob
        if depth:
            up = bool((kv2 == 0).any()) and rng.random() < 0.5
            cand = levels.moves(kv2, k2, up, "depth")
            if not len(cand):
                continue
            levels.apply(kv2, k2, "depth", int(rng.choice(cand)), up)
            if fill_to_window(levels, kv2, k2, lo, target, rng):
                return kv2, k2
            continue
        flips = int(min(rng.integers(1, 4), rng.integers(1, 4)))
        changes = flips
        for _ in range(flips):
            kinds = [x for x in ("attn", "mlp") if len(levels.moves(kv2, k2, True, x))]
            if not kinds:
                break
            kind = kinds[rng.integers(len(kinds))]
            levels.apply(kv2, k2, kind, int(rng.choice(levels.moves(kv2, k2, True, kind))), True)
        added = levels.params(kv2, k2) - p0
        while levels.params(kv2, k2) > target:
            kinds = [x for x in ("attn", "mlp") if len(levels.moves(kv2, k2, False, x))]
            if not kinds:
                break
            kind = kinds[rng.integers(len(kinds))]
            levels.apply(kv2, k2, kind, int(rng.choice(levels.moves(kv2, k2, False, kind))), False)
            changes += 1
        p = levels.params(kv2, k2)
        removed = levels.params(kv, k) + added - p
        if changes > 10 or added / max(1, removed) < 0.8 or not lo <= p <= target:
            continue
        if np.array_equal(kv2, kv) and np.array_equal(k2, k):
            continue
        return kv2, k2
    return None


def generation_tokens(offspring: int, stages: tuple[tuple[int, int], ...]) -> int:
    """KL tokens of one generation at most: every stage's candidates times its tokens (the parent
    joins the last stage)."""
    n, total = offspring, 0
    for i, (tokens, survive) in enumerate(stages):
        n += 1 if i == len(stages) - 1 else 0
        total += n * tokens
        n = survive
    return total


def method_evopress(bench: Bench, target: int, lo: int, seed: int, offspring: int = 16,
                    stages: tuple[tuple[int, int], ...] = ((1024, 2), (8192, 1)), allow_drop: bool = True,
                    depth_prob: float = 0.2, start_tokens: int = 4096) -> MethodRun:
    """(1 + lambda) evolution (EvoPress, IST-DASLab): each generation mutates the parent into
    ``offspring`` distinct children, keeps the best ``survivors`` of each stage by KL on ``tokens``
    calibration tokens (fresh random windows of the KL pool each stage and generation; the parent
    joins the last stage: elitist), and the winner becomes the parent. The start is the best, by KL
    on ``start_tokens``, of the rules of thumb and FLAP-style allocations snapped to the levels
    (EvoPress's "initially generated" candidates). Generations run while one more and the final
    full evaluation fit the budget; the last parent is measured on the full protocol."""
    from archopt.optimizer.starts import rules_of_thumb
    t0 = time.perf_counter()
    run = bench.run("evopress", target, lo)
    rng = np.random.default_rng(seed)
    levels = Levels.for_spec(bench.spec, allow_drop=allow_drop)
    pool = bench.kl_task.n_windows
    seq = bench.kl_task.seq_len

    def windows(tokens: int) -> list[int]:
        n = max(1, min(pool, tokens // seq))
        return sorted(rng.choice(pool, size=n, replace=False).tolist()) if n < pool else list(range(pool))

    starts = list(rules_of_thumb(bench.spec, target).values()) + [a for a in flap_starts(bench, target).values() if a]
    states: list[tuple[np.ndarray, np.ndarray]] = []
    for a in starts:
        kv, k = levels.snap(a)
        if fill_to_window(levels, kv, k, lo, target, rng) and not any(
                np.array_equal(kv, s[0]) and np.array_equal(k, s[1]) for s in states):
            states.append((kv, k))
    if not states:   # no start fits the window: fill down from the base model
        kv, k = np.full(bench.spec.num_layers, bench.spec.num_kv_heads), np.zeros(bench.spec.num_layers, dtype=np.int64)
        if fill_to_window(levels, kv, k, lo, target, rng):
            states.append((kv, k))
    if not states:
        run.notes["error"] = "no level state in the size window"
        return _timed(run, t0)
    gens = 0
    per_gen = generation_tokens(offspring, stages)
    try:
        bench.use_reference(run)
        fits = bench.measure_kl(run, [levels.arch(*s) for s in states], windows(start_tokens))
        parent = states[int(np.argmin(fits))]
        run.notes["start_kl"] = round(float(min(fits)), 5)
        while run.ledger.can(per_gen + bench.full_tokens):
            kids: list[tuple[np.ndarray, np.ndarray]] = []
            seen = {(parent[0].tobytes(), parent[1].tobytes())}
            for _ in range(20 * offspring):
                if len(kids) >= offspring:
                    break
                child = evo_mutate(levels, parent[0], parent[1], lo, target, rng, depth_prob)
                if child is not None and (child[0].tobytes(), child[1].tobytes()) not in seen:
                    seen.add((child[0].tobytes(), child[1].tobytes()))
                    kids.append(child)
            if not kids:
                break
            cands = kids
            for i, (tokens, survive) in enumerate(stages):
                if i == len(stages) - 1 and not any(c is parent for c in cands):
                    cands = cands + [parent]
                f = bench.measure_kl(run, [levels.arch(*c) for c in cands], windows(tokens))
                order = np.argsort(f, kind="stable")[:survive]
                cands = [cands[j] for j in order]
                if i == len(stages) - 1:
                    run.notes["last_kl"] = round(float(f[order[0]]), 5)
            parent = cands[0]
            gens += 1
    except BudgetSpent:
        pass
    run.notes.update(generations=gens, offspring=offspring, stages=[list(s) for s in stages], starts=len(states),
                     mlp_step=levels.step, mlp_levels=levels.K + 1, allow_drop=allow_drop,
                     dropped_layers=int((parent[0] == 0).sum()))
    run.final = levels.arch(*parent)
    bench.measure(run, [run.final])
    return _timed(run, t0)


# --- Puzzle-style: variants scored alone, assembled by a MIP --------------------------------------------
def puzzle_solve(levels: Levels, s_attn: np.ndarray, s_mlp: np.ndarray, s_drop: np.ndarray | None, lo: int,
                 target: int, exclude: list[list[int]]) -> tuple[list[int], list[tuple[int, int, int]]] | None:
    """Choose one (KV groups, MLP level) combination or "dropped" per layer minimising the summed
    scores within ``[lo, target]`` parameters (``scipy.optimize.milp``); ``exclude``: earlier
    solutions (as chosen column indices) forbidden by no-good cuts. Returns the chosen column
    indices and the columns, ``(layer, kv, k)`` with ``kv == 0`` for a dropped layer; None when
    infeasible."""
    from scipy.optimize import Bounds, LinearConstraint, milp
    from archopt.optimizer.encoding import layer_param_coefficients
    spec = levels.spec
    L, KV = spec.num_layers, spec.num_kv_heads
    per_kv, per_ch, const = layer_param_coefficients(spec)
    cols: list[tuple[int, int, int]] = []   # (layer, kv, k); kv == 0: dropped
    cost, score = [], []
    for l in range(L):
        for kv in range(1, KV + 1):
            for k in range(levels.K + 1):
                cols.append((l, kv, k))
                cost.append(per_kv * kv + per_ch * int(levels.widths(k)) + const)
                score.append(s_attn[l, kv] + s_mlp[l, k])
        if s_drop is not None:
            cols.append((l, 0, levels.K))
            cost.append(0)
            score.append(s_drop[l])
    n = len(cols)
    layer_of = np.array([c[0] for c in cols])
    rows = [LinearConstraint((layer_of[None, :] == np.arange(L)[:, None]).astype(float), 1, 1)]
    emb = spec.embedding_params()
    rows.append(LinearConstraint(np.array(cost, dtype=float)[None, :], lo - emb, target - emb))
    if s_drop is not None:
        rows.append(LinearConstraint(np.array([c[1] == 0 for c in cols], dtype=float)[None, :], 0, L - 1))
    for sol in exclude:
        a = np.zeros(n)
        a[sol] = 1
        rows.append(LinearConstraint(a[None, :], 0, L - 1))
    res = milp(np.array(score), constraints=rows, integrality=np.ones(n), bounds=Bounds(0, 1))
    if res.x is None:
        return None
    return np.flatnonzero(res.x > 0.5).tolist(), cols


def method_puzzle(bench: Bench, target: int, lo: int, seed: int, tokens: int = 1024, allow_drop: bool = True,
                  max_solutions: int | None = None) -> MethodRun:
    """Puzzle-style (NVIDIA Puzzle): a library of per-layer variants, each the base model with one
    layer's attention at ``kv`` groups, or its MLP at one level, or the layer dropped, scored alone
    by KL on ``tokens`` calibration tokens (windows drawn with ``seed``); scores assumed additive;
    the architecture assembled by a mixed-integer program in the size window and verified on the
    full protocol. The rest of the budget verifies the next-best MIP solutions (no-good cuts), up
    to ``max_solutions``; the pick is the best measured."""
    t0 = time.perf_counter()
    run = bench.run("puzzle", target, lo)
    rng = np.random.default_rng(seed)
    spec = bench.spec
    levels = Levels.for_spec(spec, allow_drop=allow_drop)
    L, KV = spec.num_layers, spec.num_kv_heads
    pool = bench.kl_task.n_windows
    n_win = max(1, min(pool, tokens // bench.kl_task.seq_len))
    wins = sorted(rng.choice(pool, size=n_win, replace=False).tolist())
    full_kv, full_k = np.full(L, KV, dtype=np.int64), np.zeros(L, dtype=np.int64)
    variants: list[tuple[str, int, int, Any]] = []
    for l in range(L):
        for kv in range(1, KV):
            a, b = full_kv.copy(), full_k.copy()
            a[l] = kv
            variants.append(("attn", l, kv, levels.arch(a, b)))
        for k in range(1, levels.K + 1):
            a, b = full_kv.copy(), full_k.copy()
            b[l] = k
            variants.append(("mlp", l, k, levels.arch(a, b)))
        if allow_drop:
            a = full_kv.copy()
            a[l] = 0
            variants.append(("drop", l, 0, levels.arch(a, full_k)))
    s_attn = np.zeros((L, KV + 1))
    s_mlp = np.zeros((L, levels.K + 1))
    s_drop = np.zeros(L) if allow_drop else None
    solutions = 0
    try:
        values = bench.measure_kl(run, [v[3] for v in variants], wins)
        for (kind, l, lev, _), v in zip(variants, values):
            if kind == "attn":
                s_attn[l, lev] = v
            elif kind == "mlp":
                s_mlp[l, lev] = v
            else:
                s_drop[l] = v   # type: ignore[index]
        exclude: list[list[int]] = []
        while run.ledger.can(bench.full_tokens) and (max_solutions is None or solutions < max_solutions):
            got = puzzle_solve(levels, s_attn, s_mlp, s_drop, lo, target, exclude)
            if got is None:
                break
            chosen, cols = got
            exclude.append(chosen)
            kv = np.zeros(L, dtype=np.int64)
            k = np.zeros(L, dtype=np.int64)
            for c in chosen:
                l, kvv, kk = cols[c]
                kv[l], k[l] = kvv, kk
            bench.measure(run, [levels.arch(kv, k)], strict=True)
            solutions += 1
    except BudgetSpent:
        pass
    run.notes.update(variants=len(variants), variant_tokens=n_win * bench.kl_task.seq_len, solutions=solutions,
                     mlp_step=levels.step, mlp_levels=levels.K + 1, allow_drop=allow_drop)
    return _timed(run, t0)


# --- random search, Optuna, the seed paper ---------------------------------------------------------------
def random_archs(bench: Bench, target: int, tol: float, n: int, seed: int) -> list[Any]:
    from archopt.optimizer.samplers import sample_architectures
    return sample_architectures(bench.spec, n, "random", seed=seed, target_params=target, tolerance=tol)


def evals_in_budget(bench: Bench, run: MethodRun) -> int:
    return run.ledger.left() // bench.full_tokens


def method_random(bench: Bench, target: int, lo: int, tol: float, seed: int) -> MethodRun:
    t0 = time.perf_counter()
    run = bench.run("random", target, lo)
    bench.measure(run, random_archs(bench, target, tol, evals_in_budget(bench, run), seed))
    return _timed(run, t0)


def method_optuna(bench: Bench, target: int, lo: int, seed: int, sampler_name: str) -> MethodRun:
    """Optuna on real evaluations of log PPL: one KV-group count and one MLP-grid index per layer,
    each proposal repaired into the window (archopt's repair); distinct architectures until the budget."""
    import optuna
    from archopt.optimizer.encoding import LayerBatch
    from archopt.optimizer.space import build_space
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    t0 = time.perf_counter()
    run = bench.run(f"optuna-{sampler_name}", target, lo)
    n_evals = evals_in_budget(bench, run)
    spec = bench.spec
    space = build_space(spec)
    grids = [space.mlp_grid(p) for p in range(space.P)]
    if sampler_name == "tpe":
        sampler = optuna.samplers.TPESampler(multivariate=True, seed=seed)
    else:
        sampler = optuna.samplers.NSGAIISampler(seed=seed, population_size=max(8, n_evals // 4))
    study = optuna.create_study(direction="minimize", sampler=sampler)
    trials = 0
    while run.ledger.can(bench.full_tokens) and trials < 6 * n_evals:
        trials += 1
        trial = study.ask()
        kv, inter = space.full_arrays(1)
        for p, l in enumerate(space.layers):
            kv[0, l] = trial.suggest_int(f"kv{l}", int(space.kv_lo[p]), int(space.kv_hi[p]))
            inter[0, l] = grids[p][trial.suggest_int(f"mlp{l}", 0, len(grids[p]) - 1)]
        batch, ok = space.repair(LayerBatch(spec, kv, inter), lo, target)
        if not ok[0]:
            study.tell(trial, 1e9)
            continue
        values = bench.measure(run, [batch.architecture(0)])[0]
        if values is None:
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            break
        study.tell(trial, math.log(values[OBJECTIVE]))
    run.notes["trials"] = trials
    return _timed(run, t0)


def method_paper(bench: Bench, target: int, lo: int, tol: float, seed: int, k: int) -> MethodRun:
    """B - k random pairs -> GBDT on per-layer ratios -> the space narrowed by feature importance ->
    10,000 random samples of the narrowed space ranked by the GBDT -> the top k verified."""
    from sklearn.ensemble import GradientBoostingRegressor
    from archopt.optimizer.encoding import encode
    from archopt.optimizer.space import build_space
    t0 = time.perf_counter()
    run = bench.run("paper", target, lo)
    spec = bench.spec
    n_evals = evals_in_budget(bench, run)
    archs = random_archs(bench, target, tol, n_evals, seed)[:max(2, n_evals - k)]
    vals = bench.measure(run, archs)
    pairs = [(a, v) for a, v in zip(archs, vals) if v is not None]
    archs = [a for a, _ in pairs]
    batch = encode(archs, spec)
    X = np.c_[batch.attn_frac, batch.mlp_frac]
    y = np.log([v[OBJECTIVE] for _, v in pairs])
    gbdt = GradientBoostingRegressor(random_state=seed).fit(X, y)
    imp = gbdt.feature_importances_
    L = spec.num_layers
    space = build_space(spec)
    kv_lo, kv_hi, mlp_lo, mlp_hi = (space.kv_lo.copy(), space.kv_hi.copy(), space.mlp_lo.copy(),
                                    space.mlp_hi.copy())
    good = np.argsort(y)[:max(3, len(y) // 4)]
    median = np.median(imp)
    for p, l in enumerate(space.layers):
        if imp[l] < median:
            kv_lo[p], kv_hi[p] = batch.kv[good, l].min(), batch.kv[good, l].max()
        if imp[L + l] < median:
            mlp_lo[p], mlp_hi[p] = batch.inter[good, l].min(), batch.inter[good, l].max()
    narrowed = dataclasses.replace(space, kv_lo=kv_lo, kv_hi=kv_hi, mlp_lo=mlp_lo, mlp_hi=mlp_hi)
    cand, ok = narrowed.repair(narrowed.sample(10000, np.random.default_rng(seed + 1000)), lo, target)
    cand = cand.take(np.flatnonzero(ok))
    run.notes["predictor_scored"] = len(cand)
    order = np.argsort(gbdt.predict(np.c_[cand.attn_frac, cand.mlp_frac]))
    picked: list[Any] = []
    left = evals_in_budget(bench, run)
    for i in order:
        if len(picked) >= left:
            break
        a = cand.architecture(int(i))
        if a.canonical_json() not in run.seen and all(a != b for b in picked):
            picked.append(a)
    bench.measure(run, picked)
    run.notes["narrowed_dims"] = int((imp < median).sum())
    return _timed(run, t0)
