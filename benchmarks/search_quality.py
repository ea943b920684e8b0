"""Search quality at equal budget: uniform, random search, Optuna (TPE, NSGA-II), the seed paper's
pipeline, and archopt (evaluate + query --verify K --rounds R), each allowed B full evaluations.

    python benchmarks/search_quality.py [--model ../shared/models/ptb-llama-8l] [--data-dir ../shared/data]
        [--targets 80%,70%] [--budget 64] [--seeds 3] [--max-tokens 8192] [--quick]

Every method measures with the same engine (``Campaign``: one loaded base model, Taylor importance,
the same pruning), the same protocols (WikiText-2 raw test and PTB validation, seq 128, the first
``--max-tokens`` tokens) and the same size window ``[target * (1 - tol), target]``. A measurement is
made once per run: a SQLite cache keyed by (base config hash, architecture, protocol keys) serves
every later request from any method (it still counts once in that method's budget). archopt runs
through the product's own code: ``Campaign.run`` into its own archive (what ``archopt evaluate``
does) and ``optimizer.loop.verify_loop`` (what ``archopt query --verify K --rounds R`` does).
See benchmarks/README.md ("Search quality").
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import hashlib
import json
import math
import os
import pickle
import platform
import sqlite3
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
METRICS = ("ppl_wikitext2", "ppl_ptb")


# --- the shared measurement cache -----------------------------------------------------------------
class CachedEvaluator:
    """Wraps an ``Evaluator``: a measurement already in the cache is returned, not measured again."""

    def __init__(self, inner: Any, path: Path, base_key: str) -> None:
        self.inner = inner
        self.tasks = inner.tasks
        self.metrics = inner.metrics
        self.db = sqlite3.connect(str(path))
        self.db.execute("CREATE TABLE IF NOT EXISTS cache (key TEXT PRIMARY KEY, arch TEXT, params INTEGER, "
                        "measurements BLOB, seconds REAL)")
        self.base_key = base_key
        self.protocols = ",".join(f"{m}={t.protocol.key()}" for m, t in sorted(inner.tasks.items()))
        self.hits = 0
        self.measured = 0
        self.seconds = 0.0

    def key(self, arch: Any) -> str:
        return hashlib.sha256(f"{self.base_key}|{arch.canonical_json()}|{self.protocols}".encode()).hexdigest()

    def lookup(self, arch: Any) -> list[Any] | None:
        row = self.db.execute("SELECT measurements FROM cache WHERE key = ?", (self.key(arch),)).fetchone()
        return pickle.loads(row[0]) if row else None

    def evaluate_architecture(self, base: Any, arch: Any, importance: Any) -> list[Any]:
        found = self.lookup(arch)
        if found is not None:
            self.hits += 1
            return found
        t = time.perf_counter()
        out = self.inner.evaluate_architecture(base, arch, importance)
        sec = time.perf_counter() - t
        self.measured += 1
        self.seconds += sec
        self.db.execute("INSERT OR REPLACE INTO cache VALUES (?, ?, ?, ?, ?)",
                        (self.key(arch), arch.canonical_json(), arch.params, pickle.dumps(out), sec))
        self.db.commit()
        return out

    def all_rows(self) -> list[tuple[str, int, dict[str, float]]]:
        """(architecture, params, metric -> value) of every cached measurement under these protocols."""
        keys = {m: t.protocol.key() for m, t in self.tasks.items()}
        out = []
        for arch, params, blob in self.db.execute("SELECT arch, params, measurements FROM cache"):
            values = {m.metric: m.value for m in pickle.loads(blob) if keys.get(m.metric) == m.protocol.key()}
            if values:
                out.append((arch, int(params), values))
        return out


@dataclass
class MethodRun:
    """One method's view: what it asked for (its budget) and the values it saw."""

    name: str
    target: int
    lo: int
    budget: int
    seen: dict[str, tuple[Any, dict[str, float]]] = field(default_factory=dict)
    cheap: int = 0
    seconds: float = 0.0
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def used(self) -> int:
        return len(self.seen)

    def left(self) -> int:
        return self.budget - self.used

    def best(self) -> tuple[Any, dict[str, float]] | None:
        inside = [(a, v) for a, v in self.seen.values() if self.lo <= a.params <= self.target]
        return min(inside, key=lambda av: av[1]["ppl_wikitext2"]) if inside else None


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        from archopt.archdb.archive import Archive
        from archopt.optimizer.campaign import Campaign, EvalSettings
        self.args = args
        self.work = Path(args.work)
        self.work.mkdir(parents=True, exist_ok=True)
        self.archive = Archive(f"sqlite:///{self.work / 'shared.sqlite'}")
        settings = EvalSettings(metrics=METRICS, data_dir=args.data_dir, seq_len=128, max_tokens=args.max_tokens,
                                importance="taylor", device="cpu")
        t = time.perf_counter()
        self.campaign = Campaign(self.archive, args.model, settings)
        self.load_seconds = time.perf_counter() - t
        self.spec = self.campaign.base.spec
        self.cache = CachedEvaluator(self.campaign.evaluator, self.work / "cache.sqlite",
                                     self.campaign.base.config_hash)
        self.campaign.evaluator = self.cache
        # the cheap fidelity of archopt's screening (query --screen): WikiText-2 on an eighth of the tokens
        self.campaign.enable_screening("ppl_wikitext2", args.screen_tokens)
        self.screener = CachedEvaluator(self.campaign.screener, self.work / "cache-screen.sqlite",
                                        self.campaign.base.config_hash)
        self.campaign.screener = None
        self.base_values = self.measure_one(self._full())

    def _full(self) -> Any:
        from archopt.archdb.arch import full
        return full(self.spec)

    def measure_one(self, arch: Any) -> dict[str, float]:
        ms = self.cache.evaluate_architecture(self.campaign.base, arch, self.campaign.importance)
        return {m.metric: float(m.value) for m in ms if m.metric in METRICS}

    def measure(self, run: MethodRun, archs: list[Any]) -> list[dict[str, float] | None]:
        """Values of ``archs``; new ones count in ``run``'s budget (None once it is spent)."""
        out: list[dict[str, float] | None] = []
        for a in archs:
            key = a.canonical_json()
            if key in run.seen:
                out.append(run.seen[key][1])
                continue
            if run.left() <= 0:
                out.append(None)
                continue
            values = self.measure_one(a)
            run.seen[key] = (a, values)
            out.append(values)
        return out

    def bind_archive(self, path: Path) -> Any:
        """A Campaign on a fresh archive of its own, sharing the loaded model and the cache."""
        from archopt.archdb.archive import Archive
        if path.exists():
            path.unlink()
        archive = Archive(f"sqlite:///{path}")
        return self.campaign.bind(archive), archive


# --- methods ------------------------------------------------------------------------------------
def method_uniform(bench: Bench, target: int, lo: int, seed: int) -> list[MethodRun]:
    from archopt.archdb.arch import uniform_at_size
    spec = bench.spec
    L = spec.num_layers
    first = max(1, round(4 * L / 32))
    last = max(1, round(2 * L / 32))
    variants = {
        "uniform": dict(layers=None, attention=True),
        "uniform-llmpruner-layers": dict(layers=list(range(first, L - last)), attention=True),
        "uniform-mlp-only": dict(layers=None, attention=False),
    }
    runs = []
    for name, kw in variants.items():
        run = MethodRun(name, target, 0, 1)   # uniform-at-size is at most the target; may lie below lo
        t = time.perf_counter()
        try:
            ratio, arch = uniform_at_size(spec, target, **kw)
        except Exception as exc:  # noqa: BLE001 - e.g. MLP-only cannot reach 70%
            run.notes["error"] = str(exc)
            runs.append(run)
            continue
        run.notes["ratio"] = round(ratio, 4)
        run.notes["in_window"] = bool(lo <= arch.params <= target)
        bench.measure(run, [arch])
        run.seconds = time.perf_counter() - t
        runs.append(run)
    return runs


def random_archs(bench: Bench, target: int, tol: float, n: int, seed: int) -> list[Any]:
    from archopt.optimizer.samplers import sample_architectures
    return sample_architectures(bench.spec, n, "random", seed=seed, target_params=target, tolerance=tol)


def method_random(bench: Bench, target: int, lo: int, tol: float, seed: int) -> MethodRun:
    run = MethodRun("random", target, lo, bench.args.budget)
    t = time.perf_counter()
    bench.measure(run, random_archs(bench, target, tol, run.budget, seed))
    run.seconds = time.perf_counter() - t
    return run


def method_optuna(bench: Bench, target: int, lo: int, seed: int, sampler_name: str) -> MethodRun:
    import optuna
    from archopt.optimizer.encoding import LayerBatch
    from archopt.optimizer.space import build_space
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    run = MethodRun(f"optuna-{sampler_name}", target, lo, bench.args.budget)
    spec = bench.spec
    space = build_space(spec)
    grids = [space.mlp_grid(p) for p in range(space.P)]
    if sampler_name == "tpe":
        sampler = optuna.samplers.TPESampler(multivariate=True, seed=seed)
    else:
        sampler = optuna.samplers.NSGAIISampler(seed=seed, population_size=max(8, run.budget // 4))
    study = optuna.create_study(direction="minimize", sampler=sampler)
    t = time.perf_counter()
    trials = 0
    while run.left() > 0 and trials < 6 * run.budget:
        trials += 1
        trial = study.ask()
        kv, inter = space.full_arrays(1)
        for p, l in enumerate(space.layers):
            kv[0, l] = trial.suggest_int(f"kv{l}", int(space.kv_lo[p]), int(space.kv_hi[p]))
            inter[0, l] = grids[p][trial.suggest_int(f"mlp{l}", 0, len(grids[p]) - 1)]
        batch, ok = space.repair(LayerBatch(spec, kv, inter), lo, target)   # same size window as all
        if not ok[0]:
            study.tell(trial, 1e9)
            continue
        values = bench.measure(run, [batch.architecture(0)])[0]
        if values is None:
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            break
        study.tell(trial, math.log(values["ppl_wikitext2"]))
    run.notes["trials"] = trials
    run.seconds = time.perf_counter() - t
    return run


def method_paper(bench: Bench, target: int, lo: int, tol: float, seed: int, k: int) -> MethodRun:
    """B-k random pairs -> GBDT on per-layer ratios -> space narrowed by feature importance ->
    10,000 random samples in the narrowed space ranked by the GBDT -> the top k verified."""
    from sklearn.ensemble import GradientBoostingRegressor
    from archopt.optimizer.encoding import LayerBatch, encode
    from archopt.optimizer.space import build_space
    import dataclasses
    run = MethodRun("paper", target, lo, bench.args.budget)
    spec = bench.spec
    t = time.perf_counter()
    archs = random_archs(bench, target, tol, run.budget, seed)[:run.budget - k]
    vals = bench.measure(run, archs)
    batch = encode(archs, spec)
    X = np.c_[batch.attn_frac, batch.mlp_frac]
    y = np.log([v["ppl_wikitext2"] for v in vals])
    gbdt = GradientBoostingRegressor(random_state=seed).fit(X, y)
    imp = gbdt.feature_importances_
    L = spec.num_layers
    space = build_space(spec)
    kv_lo, kv_hi, mlp_lo, mlp_hi = (space.kv_lo.copy(), space.kv_hi.copy(), space.mlp_lo.copy(),
                                    space.mlp_hi.copy())
    good = np.argsort(y)[:max(3, len(y) // 4)]          # the best quarter of the measured pairs
    median = np.median(imp)
    for p, l in enumerate(space.layers):
        if imp[l] < median:                               # unimportant attention dim: narrow
            kv_lo[p], kv_hi[p] = batch.kv[good, l].min(), batch.kv[good, l].max()
        if imp[L + l] < median:
            mlp_lo[p], mlp_hi[p] = batch.inter[good, l].min(), batch.inter[good, l].max()
    narrowed = dataclasses.replace(space, kv_lo=kv_lo, kv_hi=kv_hi, mlp_lo=mlp_lo, mlp_hi=mlp_hi)
    rng = np.random.default_rng(seed + 1000)
    cand, ok = narrowed.repair(narrowed.sample(10000, rng), lo, target)
    cand = cand.take(np.flatnonzero(ok))
    run.notes["predictor_scored"] = len(cand)
    pred = gbdt.predict(np.c_[cand.attn_frac, cand.mlp_frac])
    order = np.argsort(pred)
    picked = []
    for i in order:
        a = cand.architecture(int(i))
        if a.canonical_json() not in run.seen and all(a != b for b in picked):
            picked.append(a)
        if len(picked) >= run.left():
            break
    bench.measure(run, picked)
    run.notes["narrowed_dims"] = int((imp < median).sum())
    run.seconds = time.perf_counter() - t
    return run


def method_archopt(bench: Bench, target: int, lo: int, tol: float, seed: int, name: str, explore: float,
                   initial: int, verify: int, screen: int = 0) -> MethodRun:
    """archopt's own loop: Campaign.run (archopt evaluate) then verify_loop (query --verify K
    --rounds R [--screen N]), through the same Campaign methods the CLI calls."""
    from archopt.archdb import reads
    from archopt.optimizer.loop import verify_loop
    from archopt.optimizer.query import QueryRequest
    run = MethodRun(name, target, lo, bench.args.budget)
    t = time.perf_counter()
    campaign, archive = bench.bind_archive(bench.work / f"{name}-{target}-{seed}.sqlite")
    campaign.screener = bench.screener if screen else None
    screened: set[str] = set()
    try:
        first = random_archs(bench, target, tol, bench.args.budget, seed)[:initial]
        campaign.run([(a, "random") for a in first])   # also measures the cheap fidelity when screening
        bench.measure(run, first)   # served from the cache: records the values for this method's view
        scored = []

        def measure(archs: list[Any], picks: list[dict[str, Any]], doc: dict[str, Any]) -> None:
            scored.append(int(doc.get("stats", {}).get("candidates_scored", 0)))
            campaign.run([(a, "verify") for a in archs])
            bench.measure(run, archs)

        def measure_cheap(archs: list[Any], picks: list[dict[str, Any]], doc: dict[str, Any]) -> list[float | None]:
            screened.update(a.canonical_json() for a in archs)
            return campaign.screen_values(archs, "ppl_wikitext2")

        request = QueryRequest(model=campaign.name, params=target, tolerance=tol, seed=seed)
        left = run.left()
        report = verify_loop(archive, request, verify=verify, rounds=left, measure=measure, budget=left,
                             explore=explore, screen=screen, measure_cheap=measure_cheap if screen else None)
        if screen:
            screened.update(key for key in run.seen)   # each full evaluation also measured the cheap one
        run.cheap = len(screened)
        run.notes.update(rounds=len(report.rounds), stopped=report.stopped, explore=explore, initial=initial,
                         verify=verify, screen=screen, predictor_scored=sum(scored))
        with archive.read() as session:   # the archive holds exactly what this method measured
            base = reads.get_base_model(session, campaign.name)
            run.notes["archive_archs"] = len(reads.measured_keys(
                session, base, list(campaign.protocol_keys().values()))) // len(METRICS)
    finally:
        archive.close()
    run.seconds = time.perf_counter() - t
    return run


# --- predictor learning curve --------------------------------------------------------------------
def learning_curve(bench: Bench, target: int, sizes=(25, 50, 100, 200), seed: int = 0, repeats: int = 5) -> dict[str, Any]:
    """Kendall tau / Spearman on held-out architectures within +-5% of ``target``, from every
    architecture this run measured (any method), for the product's predictor, the same training
    restricted to tree ensembles (without the Gaussian process) and a params-only baseline (more
    parameters = lower perplexity). Each point is the mean over ``repeats`` random splits (a
    quarter held out, at least 20)."""
    from archopt.archdb.arch import from_layer_dicts
    from archopt.optimizer.encoding import encode
    from archopt.optimizer.features import Featurizer
    from archopt.optimizer.predictors import kendall_tau, spearman, train_predictor
    rows = [(json.loads(a), p, v) for a, p, v in bench.cache.all_rows()
            if abs(p / target - 1) <= 0.05 and "ppl_wikitext2" in v]
    n = len(rows)
    out: dict[str, Any] = {"available": n, "repeats": repeats, "points": []}
    if n < 30:
        return out
    archs = [from_layer_dicts(bench.spec, r[0]) for r in rows]
    y = np.array([r[2]["ppl_wikitext2"] for r in rows])
    fz = Featurizer.for_spec(bench.spec, "model")
    X = fz.transform(encode(archs, bench.spec))
    params = np.array([r[1] for r in rows], dtype=float)
    n_test = max(20, n // 4)
    trees = ("gbdt", "random_forest", "extra_trees", "hist_gbdt")
    for size in sizes:
        if size > n - n_test:
            break
        got: dict[str, list[float]] = {"kendall_tau": [], "spearman": [], "trees_only_kendall_tau": [],
                                       "params_only_kendall_tau": []}
        algos = []
        for rep in range(repeats):
            order = np.random.default_rng(seed + rep).permutation(n)
            test, tr = order[:n_test], order[n_test:n_test + size]
            pred = train_predictor(X[tr], y[tr], "ppl_wikitext2", seed=seed, featurizer=fz)
            mean, _ = pred.predict(X[test])
            tree = train_predictor(X[tr], y[tr], "ppl_wikitext2", seed=seed, featurizer=fz, candidates=trees)
            got["kendall_tau"].append(kendall_tau(mean, y[test]))
            got["spearman"].append(spearman(mean, y[test]))
            got["trees_only_kendall_tau"].append(kendall_tau(tree.predict(X[test])[0], y[test]))
            got["params_only_kendall_tau"].append(kendall_tau(-params[test], y[test]))
            algos.append(pred.algorithm)
        point = {"train": size, "test": int(n_test), "algorithms": algos}
        for key, values in got.items():
            point[key] = round(float(np.mean(values)), 4)
            point[key + "_sd"] = round(float(np.std(values)), 4)
        out["points"].append(point)
    return out


# --- driver ---------------------------------------------------------------------------------------
def summarize(run: MethodRun, base: dict[str, float]) -> dict[str, Any]:
    best = run.best()
    out: dict[str, Any] = {"method": run.name, "full_evaluations": run.used, "budget": run.budget,
                           "cheap_evaluations": run.cheap, "seconds": round(run.seconds, 1), **run.notes}
    if best is not None:
        arch, v = best
        out.update(arch_id=arch.arch_id("bench")[:12], params=arch.params, fraction=round(arch.fraction(), 4),
                   ppl_wikitext2=round(v["ppl_wikitext2"], 3), ppl_ptb=round(v["ppl_ptb"], 3),
                   d_wikitext2=round(v["ppl_wikitext2"] / base["ppl_wikitext2"] - 1, 4),
                   d_ptb=round(v["ppl_ptb"] / base["ppl_ptb"] - 1, 4), compact=arch.compact())
    elif run.seen:   # uniform below the window: report it anyway
        arch, v = next(iter(run.seen.values()))
        out.update(params=arch.params, fraction=round(arch.fraction(), 4), ppl_wikitext2=round(v["ppl_wikitext2"], 3),
                   ppl_ptb=round(v["ppl_ptb"], 3), d_wikitext2=round(v["ppl_wikitext2"] / base["ppl_wikitext2"] - 1, 4),
                   d_ptb=round(v["ppl_ptb"] / base["ppl_ptb"] - 1, 4), compact=arch.compact())
    return out


def machine() -> dict[str, Any]:
    import torch
    import sklearn
    import optuna
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
            "torch": torch.__version__, "scikit-learn": sklearn.__version__, "optuna": optuna.__version__,
            "torch_threads": torch.get_num_threads()}
    try:
        info["loadavg"] = os.getloadavg()
    except OSError:
        pass
    return info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(ROOT.parent / "shared" / "models" / "ptb-llama-8l"))
    ap.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--targets", default="80%,70%")
    ap.add_argument("--budget", type=int, default=64)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--tolerance", default="2%")
    ap.add_argument("--max-tokens", type=int, default=8192)
    ap.add_argument("--paper-k", type=int, default=None, help="verified by the paper pipeline (default 18*B/64)")
    ap.add_argument("--archopt-initial", type=float, default=0.5, help="share of B measured before the rounds")
    ap.add_argument("--archopt-verify", type=int, default=None, help="K per round (default B/8)")
    ap.add_argument("--explore", type=float, default=1.0, help="archopt's active-learning weight (0 = off)")
    ap.add_argument("--screen", type=int, default=None, help="archopt-screen's cheap screens per round (default 6K)")
    ap.add_argument("--screen-tokens", type=int, default=None, help="tokens of the cheap fidelity (default 1/8)")
    ap.add_argument("--methods", default="uniform,random,tpe,nsga2,paper,archopt",
                    help="comma-separated; also archopt-screen (archopt with --screen) and archopt-exploit")
    ap.add_argument("--quick", action="store_true", help="B=24, the first target, one seed")
    ap.add_argument("--work", default=None, help="folder for the cache and archives (default under results/)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.quick:
        args.budget, args.seeds, args.targets = 24, 1, args.targets.split(",")[0]
    model_name = Path(args.model).name
    date = dt.date.today().isoformat()
    args.work = args.work or str(ROOT / "benchmarks" / "results" / f"work-{model_name}")
    out_path = Path(args.out or ROOT / "benchmarks" / "results" /
                    f"{model_name}-{date}{'-quick' if args.quick else ''}.json")
    from archopt.archdb.sizes import parse_size, parse_tolerance
    from archopt.optimizer.space import size_window
    t_all = time.perf_counter()
    bench = Bench(args)
    spec, base = bench.spec, bench.base_values
    print(f"{model_name}: {spec.total_params:,} params; base {base}; load {bench.load_seconds:.1f}s", flush=True)
    tol = parse_tolerance(args.tolerance)
    B = args.budget
    k_paper = args.paper_k or max(2, round(18 * B / 64))
    initial = max(5, round(args.archopt_initial * B))
    verify = args.archopt_verify or max(2, B // 8)
    screen = args.screen if args.screen is not None else 6 * verify
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    results: list[dict[str, Any]] = []
    curves: dict[str, Any] = {}
    for target_text in args.targets.split(","):
        target = parse_size(target_text, spec.total_params)
        lo, _ = size_window(target, tol)
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            t0 = time.perf_counter()
            m0 = bench.cache.measured
            runs: list[MethodRun] = []
            for name in methods:
                if name == "uniform":
                    runs += method_uniform(bench, target, lo, seed)
                elif name == "random":
                    runs.append(method_random(bench, target, lo, tol, seed))
                elif name in ("tpe", "nsga2"):
                    runs.append(method_optuna(bench, target, lo, seed, name))
                elif name == "paper":
                    runs.append(method_paper(bench, target, lo, tol, seed, k_paper))
                elif name == "archopt":
                    runs.append(method_archopt(bench, target, lo, tol, seed, name, args.explore, initial, verify))
                elif name == "archopt-screen":
                    runs.append(method_archopt(bench, target, lo, tol, seed, name, args.explore, initial, verify,
                                               screen))
                elif name == "archopt-exploit":
                    runs.append(method_archopt(bench, target, lo, tol, seed, name, 0.0, initial, verify))
                else:
                    raise SystemExit(f"unknown method {name!r}")
                s = summarize(runs[-1], base)
                print(f"  {target_text} seed {seed} {s['method']:<26} wt2 {s.get('ppl_wikitext2', float('nan')):8.2f} "
                      f"(d {100 * s.get('d_wikitext2', float('nan')):6.2f}%)  ptb {s.get('ppl_ptb', float('nan')):8.2f} "
                      f"(d {100 * s.get('d_ptb', float('nan')):6.2f}%)  params {s.get('params', 0):,}  "
                      f"full {s['full_evaluations']}/{s['budget']}  cheap {s['cheap_evaluations']}  {s['seconds']}s",
                      flush=True)
            for r in runs:
                results.append({"target": target_text, "target_params": target, "seed": seed, **summarize(r, base)})
            print(f"  {target_text} seed {seed}: {bench.cache.measured - m0} new measurements, "
                  f"{time.perf_counter() - t0:.0f}s", flush=True)
        curves[target_text] = learning_curve(bench, target)
        print(f"  learning curve {target_text}: {format_curve(curves[target_text])}", flush=True)
    summary = aggregate(results, methods)
    doc = {"schema": "archopt.bench.search_quality/1", "model": model_name, "model_path": args.model,
           "date": date, "command": "python benchmarks/search_quality.py " + " ".join(argv or sys.argv[1:]),
           "settings": {"budget": B, "seeds": args.seeds, "targets": args.targets, "tolerance": tol,
                        "max_tokens": args.max_tokens, "seq_len": 128, "importance": "taylor",
                        "paper_k": k_paper, "archopt_initial": initial, "archopt_verify": verify,
                        "explore": args.explore, "archopt_screen": screen,
                        "screen_tokens": bench.screener.tasks["ppl_wikitext2"].protocol.tokens},
           "base": base, "params_base": spec.total_params, "machine": machine(),
           "measurements": {"measured": bench.cache.measured, "cache_hits": bench.cache.hits,
                            "measure_seconds": round(bench.cache.seconds, 1)},
           "results": results, "summary": summary, "learning_curve": curves,
           "seconds": round(time.perf_counter() - t_all, 1)}
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(doc, indent=2))
    print_table(summary)
    for target_text, curve in curves.items():
        print(f"learning curve {target_text}: {format_curve(curve)}")
    print(f"wrote {out_path} ({doc['seconds']:.0f}s, {bench.cache.measured} measurements, "
          f"{bench.cache.hits} cache hits)")
    return 0


def aggregate(results: list[dict[str, Any]], methods: list[str]) -> list[dict[str, Any]]:
    out = []
    for target in dict.fromkeys(r["target"] for r in results):
        rows = [r for r in results if r["target"] == target]
        names = list(dict.fromkeys(r["method"] for r in rows))
        by = {n: [r for r in rows if r["method"] == n and "d_wikitext2" in r] for n in names}
        seeds = sorted({r["seed"] for r in rows})

        def per_seed(name: str, key: str) -> dict[int, float]:
            return {r["seed"]: r[key] for r in by.get(name, [])}

        others = [n for n in names if not n.startswith("archopt")]
        for n in names:
            wt = [r["d_wikitext2"] for r in by[n]]
            pt = [r["d_ptb"] for r in by[n]]
            entry = {"target": target, "method": n, "seeds": len(wt),
                     "d_wikitext2_median": _med(wt), "d_wikitext2_min": min(wt, default=None),
                     "d_wikitext2_max": max(wt, default=None), "d_ptb_median": _med(pt),
                     "ppl_wikitext2_median": _med([r["ppl_wikitext2"] for r in by[n]]),
                     "ppl_ptb_median": _med([r["ppl_ptb"] for r in by[n]]),
                     "full_evaluations": _med([r["full_evaluations"] for r in by[n]]),
                     "cheap_evaluations": _med([r["cheap_evaluations"] for r in by[n]]),
                     "seconds_median": _med([r["seconds"] for r in by[n]])}
            if n.startswith("archopt"):
                mine = per_seed(n, "d_wikitext2")
                uni = per_seed("uniform", "d_wikitext2")
                ratios_u, ratios_o = [], []
                for s in seeds:
                    if s in mine and s in uni and uni[s] > 0:
                        ratios_u.append(mine[s] / uni[s])
                    best_other = min((per_seed(o, "d_wikitext2").get(s, math.inf) for o in others), default=math.inf)
                    if s in mine and math.isfinite(best_other) and best_other > 0:
                        ratios_o.append(mine[s] / best_other)
                entry.update(d_ratio_vs_uniform_median=_med(ratios_u), d_ratio_vs_uniform=ratios_u,
                             d_ratio_vs_best_other_median=_med(ratios_o), d_ratio_vs_best_other=ratios_o)
            out.append(entry)
    return out


def format_curve(curve: dict[str, Any]) -> str:
    points = curve.get("points", [])
    if not points:
        return f"{curve.get('available', 0)} architectures within +-5%: too few"
    return f"{curve['available']} archs within +-5%, held-out Kendall tau (trees only / params only): " + ", ".join(
        f"{p['train']} pairs {p['kendall_tau']:.3f}±{p['kendall_tau_sd']:.3f} "
        f"({p['trees_only_kendall_tau']:.3f} / {p['params_only_kendall_tau']:.3f})" for p in points)


def _med(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return round(statistics.median(values), 4) if values else None


def print_table(summary: list[dict[str, Any]]) -> None:
    print(f"{'target':<7}{'method':<26}{'d wt2 med':>10}{'[min,max]':>18}{'d ptb med':>10}{'full':>6}"
          f"{'cheap':>8}{'vs unif':>9}{'vs best':>9}")
    for e in summary:
        def pct(v):
            return f"{100 * v:.2f}%" if v is not None else "-"
        rng = f"[{pct(e['d_wikitext2_min'])},{pct(e['d_wikitext2_max'])}]"
        vu = e.get("d_ratio_vs_uniform_median")
        vb = e.get("d_ratio_vs_best_other_median")
        print(f"{e['target']:<7}{e['method']:<26}{pct(e['d_wikitext2_median']):>10}{rng:>18}"
              f"{pct(e['d_ptb_median']):>10}{e['full_evaluations'] or 0:>6.0f}{e['cheap_evaluations'] or 0:>8.0f}"
              f"{(f'{vu:.2f}' if vu is not None else '-'):>9}{(f'{vb:.2f}' if vb is not None else '-'):>9}")


if __name__ == "__main__":
    sys.exit(main())
