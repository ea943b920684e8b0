"""Search quality at an equal budget of forwarded tokens: rules of thumb, FLAP-style allocation,
EvoPress- and Puzzle-style searches, random search, Optuna TPE, the seed paper's pipeline and archopt.

    python benchmarks/search_quality.py [--models ../shared/models/ptb-llama-24l,../shared/models/ptb-llama-8l]
        [--targets 60%,50%] [--budget 64] [--seeds 3] [--max-tokens 8192] [--methods ...] [--quick]

Every method measures with the same engine (``Campaign``: one loaded base model, Taylor importance,
archopt's pruning), the same protocols (WikiText-2 raw test and PTB validation, seq 128, the first
``--max-tokens`` tokens of each) and the same size window ``[target * (1 - tol), target]``, and pays
for every forward pass in tokens (budget.py): ``--budget`` full evaluations' worth. The searches
are in search_baselines.py, the measuring plumbing in search_measure.py; archopt runs through the
product's own code: ``Campaign.run`` into its own archive (``archopt evaluate``) and
``optimizer.loop.verify_loop`` (``archopt query --verify K --rounds R``).
See benchmarks/README.md ("Search quality").
"""

from __future__ import annotations

import argparse
import datetime as dt
import inspect
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import search_baselines as sb  # noqa: E402
from budget import BudgetSpent  # noqa: E402
from search_measure import METRICS, OBJECTIVE, Bench, MethodRun  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
DEFAULT_MODELS = (str(SHARED / "models" / "ptb-llama-24l"), str(SHARED / "models" / "ptb-llama-8l"))
DEFAULT_TARGETS = {"ptb-llama-24l": "60%,50%", "ptb-llama-8l": "80%,70%"}
METHODS = ("rules", "flap", "evopress", "puzzle", "random", "tpe", "paper", "archopt")
EXTRA_METHODS = ("nsga2", "archopt-screen", "archopt-exploit", "archopt-noprofile", "archopt-noproposals",
                 "archopt-refine", "archopt-klprofile", "archopt-kl", "archopt-kl-screen")
ARCHOPT_METHODS = ("archopt",) + tuple(m for m in EXTRA_METHODS if m.startswith("archopt"))
NO_SEARCH = ("rule-", "flap", "global-")   # name prefixes of the search-free methods ("never worse than")
QUICK_BUDGET = 24
HELDOUT = ("wikitext2_test_heldout", "wikitext2_valid_heldout")   # Bench.heldout's texts


# --- archopt: the product's own loop ---------------------------------------------------------------
def method_archopt(bench: Bench, target: int, lo: int, tol: float, seed: int, name: str, explore: float,
                   initial_share: float, verify: int | None, screen: int = 0,
                   profile_features: bool = True, proposals: bool = True, refine_share: float = 0.0,
                   kl_profile: bool = False) -> MethodRun:
    """``Campaign.run`` of random architectures (``archopt evaluate --samples``) into an archive of
    its own, then ``verify_loop`` (``archopt query --verify K --rounds R [--screen N]``, with the
    strong starts where the loop takes them) until the token budget is spent. Every architecture is
    measured through ``bench`` first (charged to this method), then recorded by the campaign (a
    cache hit), so the archive holds exactly what this method paid for. The sensitivity profile's
    values are stored too (the predictors then use them as features) unless ``profile_features``
    is off (``archopt-noprofile``: the profile only gives starts), and its next-best integer-program
    solutions are offered to every round (``verify_loop``'s ``proposals``, as ``archopt query``
    does) unless ``proposals`` is off (``archopt-noproposals``, and ``archopt-noprofile``).
    ``refine_share`` > 0: the rounds stop when that share of the full evaluations left after the
    random ones is still unspent, and channel-exchange steps (``archopt query --refine``,
    ``optimizer.exchange``) spend it, their cheap measurements charged at the cheap fidelity."""
    from archopt.archdb import reads
    from archopt.optimizer.loop import verify_loop
    from archopt.optimizer.query import QueryRequest
    t0 = time.perf_counter()
    run = bench.run(name, target, lo)
    n_evals = sb.evals_in_budget(bench, run)
    initial = max(5, round(initial_share * n_evals)) if initial_share > 0 else 0
    k = verify or max(2, n_evals // 8)
    campaign, archive = bench.bind_archive(bench.work / f"{name}-{target}-{seed}.sqlite")
    campaign.screener = bench.cheap if screen else None
    rounds: list[Any] = []
    scored: list[int] = []
    exchanged: list[Any] = []

    def record(archs: list[Any]) -> None:
        """Charge and measure through the bench (stops at the budget), then store in the archive."""
        paid = []
        try:
            for a in archs:
                bench.measure(run, [a], strict=True)
                if screen:   # Campaign.run measures the cheap fidelity of every full evaluation too
                    bench.measure_cheap(run, [a], strict=False)
                paid.append(a)
        finally:
            if paid:
                campaign.run([(a, "verify") for a in paid])

    try:
        if initial:
            record(sb.random_archs(bench, target, tol, n_evals, seed)[:initial])

        def measure(archs: list[Any], picks: list[dict[str, Any]], doc: dict[str, Any]) -> None:
            scored.append(int(doc.get("stats", {}).get("candidates_scored", 0)))
            record(archs)

        def measure_cheap(archs: list[Any], picks: list[dict[str, Any]], doc: dict[str, Any]) -> list[float | None]:
            values = bench.measure_cheap(run, archs)
            # cache hits: stores the cheap values in the archive, as Verifier.measure_cheap does
            campaign.cheap_values(archs, OBJECTIVE, bench.cheap, "screen")
            return values

        request = QueryRequest(model=campaign.name, params=target, tolerance=tol, seed=seed)
        kwargs: dict[str, Any] = {}
        if "starts" in inspect.signature(verify_loop).parameters:
            from archopt.optimizer.starts import strong_starts
            imp = campaign.importance
            kwargs["starts"] = strong_starts(bench.spec, target, imp.kv_group, imp.channel)
            profile = (kl_measured_profile(bench, run, seed) if kl_profile
                       else measured_profile(bench, run, campaign if profile_features else None))
            if profile is not None:
                from archopt.optimizer.profile import profile_solutions
                from archopt.optimizer.verify import PROPOSALS
                solutions = profile_solutions(profile, lo, target, PROPOSALS)
                kwargs["starts"] += [(f"profile-{i + 1}", a) for i, a in enumerate(solutions[:2])]
                if proposals:   # what Verifier.proposals offers each round
                    kwargs["proposals"] = solutions
            run.notes["starts"] = len(kwargs["starts"])
            if not initial:   # the starts are the first training rows (archopt evaluate --params --starts)
                record([a for _, a in kwargs.pop("starts")])
        left = sb.evals_in_budget(bench, run)
        if refine_share > 0:   # the exchange steps run until the bench's budget is spent
            left = max(k, round((1 - refine_share) * left))
            kwargs["refine"] = 10 ** 6
            kwargs["on_exchange"] = exchanged.append
        report = verify_loop(archive, request, verify=k, rounds=max(1, left), measure=measure,
                             budget=None if screen else left, explore=explore, screen=screen,
                             measure_cheap=measure_cheap if screen or refine_share > 0 else None,
                             on_round=lambda rnd, doc: rounds.append(rnd), **kwargs)
        run.notes["stopped"] = report.stopped
    except BudgetSpent:
        run.notes["stopped"] = "budget"
    finally:
        with archive.read() as session:
            base = reads.get_base_model(session, campaign.name)
            run.notes["archive_archs"] = len(reads.measured_keys(
                session, base, list(campaign.protocol_keys().values()))) // len(METRICS)
        archive.close()
    run.notes.update(rounds=len(rounds), explore=explore, initial=initial, verify=k, screen=screen,
                     profile_features=profile_features, proposals=proposals,
                     predictor_scored=sum(scored), refine_share=refine_share, exchange_steps=len(exchanged),
                     exchange_accepted=sum(s.accepted for s in exchanged))
    return sb._timed(run, t0)


class KLEvaluator:
    """``kl_base`` over the bench's KL pool (``windows`` of it) as a ``Campaign`` evaluator: every
    measurement goes through ``Bench.measure_kl``, so it is charged to ``run`` (the shared cache
    saves time, never tokens). ``values``: canonical JSON -> (architecture, value) of every
    measurement paid, kept as it is made (a batch cut short by the budget keeps what it paid for)."""

    def __init__(self, bench: Bench, run: MethodRun, windows: list[int]) -> None:
        from types import SimpleNamespace
        self.bench, self.run, self.windows = bench, run, windows
        self.tasks = {"kl_base": SimpleNamespace(protocol=bench.kl_task.protocol(windows))}
        self.metrics = ("kl_base",)
        self.forwarded_tokens = 0
        self.reference_tokens = 0   # the bench charges the base's reference itself (Bench.use_reference)
        self.values: dict[str, tuple[Any, float]] = {}

    def evaluate_architecture(self, base: Any, arch: Any, importance: Any) -> list[Any]:
        from archopt.archdb.protocol import Measurement
        value = self.bench.measure_kl(self.run, [arch], self.windows)[0]
        self.values[arch.canonical_json()] = (arch, value)
        self.forwarded_tokens = self.bench.kl_task.tokens_of(self.windows)
        return [Measurement("kl_base", value, self.tasks["kl_base"].protocol, device=self.bench.args.device)]


def method_archopt_kl(bench: Bench, target: int, lo: int, tol: float, seed: int, explore: float,
                      verify: int | None, profile_windows: int = 8, screen: int = 0) -> MethodRun:
    """archopt searching on ``kl_base`` and reporting perplexity: ``archopt query --objectives
    kl_base --verify K --rounds R`` on the bench's KL pool (WikiText-2 validation, every window:
    ``--kl-pool`` tokens a verification), its sensitivity profile on the first ``profile_windows``
    windows (stored, origin ``profile``: the predictors' damage features and the loop's starts and
    proposals, as ``Verifier.profile`` does for a perplexity or ``kl_base``), then one full evaluation of the
    architecture with the least measured KL in the window: the pick. The scored test text is read
    once, for the pick alone, as EvoPress-style does. ``screen`` > 0 (``archopt-kl-screen``,
    ``--screen N``): each round first measures that many candidates on the profile's few windows
    and verifies the best of them (EvoPress' multi-stage selection, through the product's loop)."""
    import copy
    import dataclasses

    from archopt.optimizer.loop import verify_loop
    from archopt.optimizer.profile import profile_solutions
    from archopt.optimizer.query import QueryRequest
    from archopt.optimizer.starts import strong_starts
    from archopt.optimizer.verify import PROPOSALS, measure_profile
    t0 = time.perf_counter()
    run = bench.run("archopt-kl-screen" if screen else "archopt-kl", target, lo)
    bench.use_reference(run)
    campaign, archive = bench.bind_archive(bench.work / f"{run.name}-{target}-{seed}.sqlite")
    pool = list(range(bench.kl_task.n_windows))
    kl_campaign = copy.copy(campaign)
    kl_campaign.evaluator = KLEvaluator(bench, run, pool)
    kl_campaign.settings = dataclasses.replace(campaign.settings, metrics=("kl_base",))
    cheap = KLEvaluator(bench, run, pool[:profile_windows])
    per_eval = bench.kl_task.tokens_of(pool)
    rounds: list[Any] = []
    measured = kl_campaign.evaluator.values   # every full-pool KL value paid for
    k = verify or max(2, int(bench.args.budget) // 8)

    def record(archs: list[Any]) -> None:
        kl_campaign.run([(a, "verify") for a in archs])

    run.ledger.limit -= bench.full_tokens   # kept for the pick's full evaluation
    try:
        imp = campaign.importance
        starts: list[Any] = list(strong_starts(bench.spec, target, imp.kv_group, imp.channel))
        kl_campaign.cheap_evaluator = lambda metric, tokens=None: cheap
        profile = measure_profile(kl_campaign, "kl_base")
        proposals: list[Any] = []
        if profile is not None:
            run.notes["profile_variants"] = sum(len(d) for d in (profile.attn, profile.mlp, profile.drop))
            proposals = profile_solutions(profile, lo, target, PROPOSALS)
            starts += [(f"profile-{i + 1}", a) for i, a in enumerate(proposals[:2])]
        run.notes["starts"] = len(starts)
        record([a for _, a in starts])
        left = run.ledger.left() // per_eval
        request = QueryRequest(model=campaign.name, params=target, tolerance=tol, seed=seed, objectives=("kl_base",))

        def measure(archs: list[Any], picks: list[dict[str, Any]], doc: dict[str, Any]) -> None:
            record(archs)

        def measure_cheap(archs: list[Any], picks: list[dict[str, Any]], doc: dict[str, Any]) -> list[float | None]:
            return kl_campaign.cheap_values(archs, "kl_base", cheap, "screen")

        if screen:   # the screens share the budget: the rounds stop when it is spent
            left = max(k, left // 3)
        if left > 0:
            report = verify_loop(archive, request, verify=k, rounds=max(1, left), measure=measure,
                                 budget=None if screen else left, explore=explore, proposals=proposals,
                                 screen=screen, measure_cheap=measure_cheap if screen else None,
                                 on_round=lambda rnd, doc: rounds.append(rnd))
            run.notes["stopped"] = report.stopped
    except BudgetSpent:
        run.notes["stopped"] = "budget"
    finally:
        archive.close()
        run.ledger.limit += bench.full_tokens
    inside = [(a, v) for a, v in measured.values() if lo <= a.params <= target]
    if inside:
        run.final = min(inside, key=lambda av: av[1])[0]
        bench.measure(run, [run.final])   # the pick's perplexities: the only read of the scored text
        run.notes["pick_kl"] = round(min(v for _, v in inside), 6)
    run.notes.update(rounds=len(rounds), explore=explore, verify=k,
                     kl_evaluations=len(measured), kl_tokens_each=per_eval, screen=screen)
    return sb._timed(run, t0)


def measured_profile(bench: Bench, run: MethodRun, campaign: Any = None) -> Any:
    """The product's sensitivity profile (``optimizer.profile``, what ``Verifier.profile``
    measures): every single-layer variant measured on the bench's cheap fidelity (charged to
    ``run``). With ``campaign``, the values are stored in its archive as ``Verifier.profile``
    stores them (origin ``profile``; cache hits), where the product's predictors find them."""
    from archopt.archdb.arch import full
    from archopt.optimizer.profile import Profile, profile_variants
    variants = profile_variants(bench.spec)
    values = bench.measure_cheap(run, [full(bench.spec)] + [v.architecture for v in variants], strict=False)
    if values[0] is None:
        return None
    if campaign is not None:
        campaign.cheap_values([full(bench.spec)] + [v.architecture for v in variants], OBJECTIVE, bench.cheap,
                              "profile")
    run.notes["profile_variants"] = sum(v is not None for v in values[1:])
    return Profile.from_values(bench.spec, variants, values[1:], values[0])


def kl_measured_profile(bench: Bench, run: MethodRun, seed: int, tokens: int = 1024) -> Any:
    """A sensitivity profile on KL(base || pruned) over ``tokens`` WikiText-2 validation tokens
    (the windows drawn with ``seed``), every single-layer variant but dropped layers: the damages
    Puzzle-style scores, for archopt's starts and proposals (``archopt-klprofile``; not stored,
    so the predictors get no damage features)."""
    from archopt.optimizer.profile import Profile, profile_variants
    rng = np.random.default_rng(seed)
    pool = bench.kl_task.n_windows
    wins = sorted(rng.choice(pool, size=max(1, min(pool, tokens // bench.kl_task.seq_len)), replace=False).tolist())
    variants = profile_variants(bench.spec, allow_drop=False)
    values = bench.measure_kl(run, [v.architecture for v in variants], wins)
    run.notes["profile_variants"] = len(values)
    return Profile.from_values(bench.spec, variants, values, 0.0, log_scale=False)


# --- predictor learning curve --------------------------------------------------------------------
def learning_curve(bench: Bench, target: int, sizes=(25, 50, 100, 200), seed: int = 0,
                   repeats: int = 5) -> dict[str, Any]:
    """Kendall tau / Spearman on held-out architectures within +-5% of ``target``, from every
    architecture measured on the full protocol in this work folder (any method), for the product's
    predictor, the same training restricted to tree ensembles and a params-only ranking; when the
    work folder holds the sensitivity profile (an archopt run measured it), also the product's
    predictor with the profile's damage features and the additive damage sum alone (no training).
    Each point is the mean over ``repeats`` random splits (a quarter held out, at least 20)."""
    from archopt.archdb.arch import from_layer_dicts
    from archopt.optimizer.encoding import encode
    from archopt.optimizer.features import Featurizer
    from archopt.optimizer.calibration import coverage
    from archopt.optimizer.predictors import kendall_tau, spearman, train_predictor
    rows = [(json.loads(a), p, v) for a, p, v in bench.full_rows() if abs(p / target - 1) <= 0.05 and OBJECTIVE in v]
    n = len(rows)
    out: dict[str, Any] = {"available": n, "repeats": repeats, "points": []}
    if n < 30:
        return out
    archs = [from_layer_dicts(bench.spec, r[0]) for r in rows]
    y = np.array([r[2][OBJECTIVE] for r in rows])
    fz = Featurizer.for_spec(bench.spec, "model")
    X = fz.transform(encode(archs, bench.spec))
    params = np.array([r[1] for r in rows], dtype=float)
    profile = cached_profile(bench)
    out["profile"] = profile is not None
    if profile is not None:
        fz_p = Featurizer.for_spec(bench.spec, "model", profile=profile)
        X_p = fz_p.transform(encode(archs, bench.spec))
        damage = X_p[:, fz_p.names.index("damage_sum")]
    n_test = max(20, n // 4)
    trees = ("gbdt", "random_forest", "extra_trees", "hist_gbdt")
    for size in sizes:
        if size > n - n_test:
            break
        got: dict[str, list[float]] = {"kendall_tau": [], "spearman": [], "coverage": [],
                                       "trees_only_kendall_tau": [], "params_only_kendall_tau": []}
        algos = []
        for rep in range(repeats):
            order = np.random.default_rng(seed + rep).permutation(n)
            test, tr = order[:n_test], order[n_test:n_test + size]
            pred = train_predictor(X[tr], y[tr], OBJECTIVE, seed=seed, featurizer=fz)
            mean, _ = pred.predict(X[test])
            tree = train_predictor(X[tr], y[tr], OBJECTIVE, seed=seed, featurizer=fz, candidates=trees)
            got["kendall_tau"].append(kendall_tau(mean, y[test]))
            got["spearman"].append(spearman(mean, y[test]))
            got["coverage"].append(coverage(pred, X[test], y[test]))  # share inside the stated 1-sigma band
            got["trees_only_kendall_tau"].append(kendall_tau(tree.predict(X[test])[0], y[test]))
            got["params_only_kendall_tau"].append(kendall_tau(-params[test], y[test]))
            if profile is not None:
                with_p = train_predictor(X_p[tr], y[tr], OBJECTIVE, seed=seed, featurizer=fz_p)
                got.setdefault("profile_kendall_tau", []).append(kendall_tau(with_p.predict(X_p[test])[0], y[test]))
                got.setdefault("damage_sum_kendall_tau", []).append(kendall_tau(damage[test], y[test]))
            algos.append(pred.algorithm)
        point: dict[str, Any] = {"train": size, "test": int(n_test), "algorithms": algos}
        for key, values in got.items():
            point[key] = round(float(np.mean(values)), 4)
            point[key + "_sd"] = round(float(np.std(values)), 4)
        out["points"].append(point)
    return out


def cached_profile(bench: Bench) -> Any:
    """The sensitivity profile from the work folder's cheap measurements (None unless the base and
    every variant are there): read, never measured or charged."""
    from archopt.archdb.arch import full
    from archopt.optimizer.profile import Profile, profile_variants
    variants = profile_variants(bench.spec)
    values = []
    for arch in [full(bench.spec)] + [v.architecture for v in variants]:
        found = bench.cheap.lookup(arch)
        if found is None:
            return None
        values.append(bench.values_of(found[0])[OBJECTIVE])
    return Profile.from_values(bench.spec, variants, values[1:], values[0])


def format_curve(curve: dict[str, Any]) -> str:
    points = curve.get("points", [])
    if not points:
        return f"{curve.get('available', 0)} architectures within +-5%: too few"

    def with_profile(p: dict[str, Any]) -> str:
        if "profile_kendall_tau" not in p:
            return ""
        return f"; with the profile's features {p['profile_kendall_tau']:.3f}, damage sum alone {p['damage_sum_kendall_tau']:.3f}"
    return f"{curve['available']} archs within +-5%, held-out Kendall tau (trees only / params only): " + ", ".join(
        f"{p['train']} pairs {p['kendall_tau']:.3f}±{p['kendall_tau_sd']:.3f} "
        f"({p['trees_only_kendall_tau']:.3f} / {p['params_only_kendall_tau']:.3f}){with_profile(p)}, "
        f"band coverage {100 * p['coverage']:.0f}% (nominal 68%)" for p in points)


# --- results ---------------------------------------------------------------------------------------
def summarize(run: MethodRun, base: dict[str, float], full_tokens: int, bench: Bench | None = None) -> dict[str, Any]:
    """One method's row: its pick (d = PPL / PPL(base) - 1), tokens by kind, full evaluations, time;
    with ``bench``, also the pick's held-out d (``Bench.heldout``: text no method searched on)."""
    best = run.best()
    out: dict[str, Any] = {"method": run.name, **run.ledger.to_dict(),
                           "full_evaluations": run.full_evaluations,
                           "evaluations_worth": round(run.ledger.tokens / full_tokens, 2),
                           "seconds": round(run.seconds, 1), "cpu_seconds": round(run.cpu_seconds, 1),
                           "seconds_uncached": round(run.seconds + run.saved_seconds, 1), **run.notes}
    if best is None and run.seen:   # a rule of thumb below the window: report it anyway
        best = next(iter(run.seen.values()))
    if best is not None:
        arch, v = best
        out.update(arch_id=arch.arch_id("bench")[:12], params=arch.params, fraction=round(arch.fraction(), 4),
                   in_window=bool(run.lo <= arch.params <= run.target),
                   ppl_wikitext2=round(v["ppl_wikitext2"], 3), ppl_ptb=round(v["ppl_ptb"], 3),
                   d_wikitext2=round(v["ppl_wikitext2"] / base["ppl_wikitext2"] - 1, 4),
                   d_ptb=round(v["ppl_ptb"] / base["ppl_ptb"] - 1, 4), compact=arch.compact(),
                   dropped_layers=sum(l.dropped for l in arch.layers))
        if bench is not None:
            held = bench.heldout(arch)
            for name, value in held.items():
                out[f"ppl_{name}"] = round(value, 3)
                out[f"d_{name}"] = round(value / bench.heldout_base[name] - 1, 4)
    return out


def _med(values: list[Any]) -> float | None:
    values = [v for v in values if v is not None]
    return round(statistics.median(values), 4) if values else None


def aggregate(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (model, target, method): medians over seeds of d, tokens, full evaluations and time."""
    out = []
    for model, target in dict.fromkeys((r["model"], r["target"]) for r in results):
        rows = [r for r in results if (r["model"], r["target"]) == (model, target)]
        for name in dict.fromkeys(r["method"] for r in rows):
            mine = [r for r in rows if r["method"] == name]
            wt = [r["d_wikitext2"] for r in mine if "d_wikitext2" in r]
            out.append({"model": model, "target": target, "method": name, "seeds": len(wt),
                        "d_wikitext2_median": _med(wt), "d_wikitext2_min": min(wt, default=None),
                        "d_wikitext2_max": max(wt, default=None),
                        "d_ptb_median": _med([r.get("d_ptb") for r in mine]),
                        **{f"d_{h}_median": _med([r.get(f"d_{h}") for r in mine]) for h in HELDOUT},
                        "ppl_wikitext2_median": _med([r.get("ppl_wikitext2") for r in mine]),
                        "tokens_median": _med([r["tokens"] for r in mine]),
                        "full_evaluations_median": _med([r["full_evaluations"] for r in mine]),
                        "seconds_median": _med([r["seconds"] for r in mine]),
                        "cpu_seconds_median": _med([r["cpu_seconds"] for r in mine]),
                        "seconds_uncached_median": _med([r["seconds_uncached"] for r in mine])})
    return out


def goals(results: list[dict[str, Any]], summary: list[dict[str, Any]], curves: dict[str, Any],
          archopt: str = "archopt") -> list[dict[str, Any]]:
    """Per (model, target): (1) archopt's median d <= 0.8 x the best other method's median d (at
    equal tokens); (2) in every seed archopt's d <= the best rule of thumb's or FLAP-style d;
    (3) the learning curve: held-out Kendall tau with at most 200 training pairs (>= 0.9)."""
    out = []
    for model, target in dict.fromkeys((e["model"], e["target"]) for e in summary):
        entries = {e["method"]: e for e in summary if (e["model"], e["target"]) == (model, target)}
        if archopt not in entries or entries[archopt]["d_wikitext2_median"] is None:
            continue
        mine = entries[archopt]["d_wikitext2_median"]
        others = {n: e["d_wikitext2_median"] for n, e in entries.items()
                  if not n.startswith("archopt") and e["d_wikitext2_median"] is not None}
        best_name = min(others, key=others.get) if others else None
        g: dict[str, Any] = {"model": model, "target": target, "archopt_d_median": mine,
                             "best_other": best_name, "best_other_d_median": others.get(best_name)}
        if best_name is not None:
            ratio = mine / others[best_name] if others[best_name] > 0 else math.inf
            g.update(ratio_to_best_other=round(ratio, 3), beats_best_other_by_20pct=bool(ratio <= 0.8))
        rows = [r for r in results if (r["model"], r["target"]) == (model, target)]
        per_seed = []
        for seed in sorted({r["seed"] for r in rows}):
            seeded = {r["method"]: r.get("d_wikitext2") for r in rows if r["seed"] == seed}
            floor = [v for n, v in seeded.items() if n.startswith(NO_SEARCH) and v is not None]
            if seeded.get(archopt) is None or not floor:
                continue
            per_seed.append({"seed": seed, "archopt": seeded[archopt], "best_no_search": min(floor),
                             "ok": bool(seeded[archopt] <= min(floor))})
        g["per_seed_vs_no_search"] = per_seed
        # the same comparison on held-out text (picks re-measured where no method searched)
        held_mine = entries[archopt].get(f"d_{HELDOUT[0]}_median")
        held = {n: e.get(f"d_{HELDOUT[0]}_median") for n, e in entries.items()
                if not n.startswith("archopt") and e.get(f"d_{HELDOUT[0]}_median") is not None}
        if held_mine is not None and held:
            h_name = min(held, key=held.get)
            g.update(heldout_best_other=h_name, heldout_best_other_d=held[h_name], heldout_archopt_d=held_mine,
                     heldout_ratio=round(held_mine / held[h_name], 3) if held[h_name] > 0 else None)
        g["never_worse_than_no_search"] = bool(per_seed) and all(p["ok"] for p in per_seed)
        points = curves.get(f"{model} {target}", {}).get("points", [])
        # the product's predictor as a query trains it: with the profile's features once it is measured
        taus = {p["train"]: p.get("profile_kendall_tau", p["kendall_tau"]) for p in points if p["train"] <= 200}
        g["kendall_tau"] = taus
        g["kendall_tau_ge_0.9"] = bool(taus) and max(taus.values()) >= 0.9
        out.append(g)
    return out


def print_table(summary: list[dict[str, Any]], goal_rows: list[dict[str, Any]], full_tokens: int) -> None:
    def pct(v: float | None) -> str:
        return f"{100 * v:+.2f}%" if v is not None else "-"

    print(f"{'model':<15}{'target':<7}{'method':<23}{'d wt2 med':>10}{'[min, max]':>20}{'d ptb med':>10}"
          f"{'held test':>10}{'held val':>9}{'tokens':>10}{'evals':>7}{'full':>6}{'wall s':>8}{'cpu s':>7}"
          f"{'uncached':>9}")
    for e in summary:
        rng = f"[{pct(e['d_wikitext2_min'])}, {pct(e['d_wikitext2_max'])}]"
        tokens = e["tokens_median"] or 0
        print(f"{e['model']:<15}{e['target']:<7}{e['method']:<23}{pct(e['d_wikitext2_median']):>10}{rng:>20}"
              f"{pct(e['d_ptb_median']):>10}{pct(e.get(f'd_{HELDOUT[0]}_median')):>10}"
              f"{pct(e.get(f'd_{HELDOUT[1]}_median')):>9}{tokens / 1e6:>9.3f}M{tokens / full_tokens:>7.1f}"
              f"{e['full_evaluations_median'] or 0:>6.0f}{e['seconds_median'] or 0:>8.0f}"
              f"{e['cpu_seconds_median'] or 0:>7.0f}"
              f"{e['seconds_uncached_median'] or 0:>9.0f}")
    for g in goal_rows:
        ratio = g.get("ratio_to_best_other")
        seeds = ", ".join(f"s{p['seed']} {pct(p['archopt'])}/{pct(p['best_no_search'])}"
                          for p in g["per_seed_vs_no_search"])
        def met(ok: bool) -> str:
            return "met" if ok else "NOT met"

        print(f"goals {g['model']} {g['target']}: archopt d {pct(g['archopt_d_median'])} vs best other "
              f"{g['best_other']} {pct(g['best_other_d_median'])} -> ratio {ratio if ratio is not None else '-'} "
              f"(<= 0.8: {met(bool(g.get('beats_best_other_by_20pct')))}); never worse than rules/FLAP in any "
              f"seed: {met(g['never_worse_than_no_search'])} ({seeds}); Kendall tau <= 200 pairs "
              f"{g['kendall_tau'] or '-'} (>= 0.9: {met(g['kendall_tau_ge_0.9'])}); held-out test text: archopt "
              f"{pct(g.get('heldout_archopt_d'))} vs best other {g.get('heldout_best_other')} "
              f"{pct(g.get('heldout_best_other_d'))} -> ratio {g.get('heldout_ratio', '-')}")


def machine() -> dict[str, Any]:
    import optuna
    import sklearn
    import torch
    info: dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version(),
                            "cpus": os.cpu_count(), "torch": torch.__version__, "scikit-learn": sklearn.__version__,
                            "optuna": optuna.__version__, "torch_threads": torch.get_num_threads()}
    try:
        info["loadavg"] = os.getloadavg()
    except OSError:
        pass
    return info


# --- driver ----------------------------------------------------------------------------------------
def parse_stages(text: str) -> tuple[tuple[int, int], ...]:
    """``"1024:2,8192:1"`` -> ((1024, 2), (8192, 1)): tokens and survivors of each selection stage."""
    out = []
    for part in text.split(","):
        tokens, survive = part.split(":")
        out.append((int(tokens), int(survive)))
    if not out or out[-1][1] != 1:
        raise SystemExit("--evo-stages: the last stage keeps one survivor (e.g. 1024:2,8192:1)")
    return tuple(out)


def run_methods(bench: Bench, args: argparse.Namespace, methods: list[str], target: int, lo: int, tol: float,
                seed: int) -> Iterator[MethodRun]:
    """Every method of ``methods`` at one target and seed, in order, each as it finishes."""
    for name in methods:
        runs: list[MethodRun] = []
        if name == "rules":
            runs += sb.method_rules(bench, target, lo)
        elif name == "flap":
            runs += sb.method_flap(bench, target, lo)
        elif name == "evopress":
            runs.append(sb.method_evopress(bench, target, lo, seed, args.evo_offspring, parse_stages(args.evo_stages),
                                           not args.no_drop, start_tokens=args.evo_start_tokens))
        elif name == "puzzle":
            runs.append(sb.method_puzzle(bench, target, lo, seed, args.puzzle_tokens, not args.no_drop,
                                         args.puzzle_solutions))
        elif name == "random":
            runs.append(sb.method_random(bench, target, lo, tol, seed))
        elif name in ("tpe", "nsga2"):
            runs.append(sb.method_optuna(bench, target, lo, seed, name))
        elif name == "paper":
            k = args.paper_k or max(2, round(18 * args.budget / 64))
            runs.append(sb.method_paper(bench, target, lo, tol, seed, k))
        elif name in ("archopt-kl", "archopt-kl-screen"):
            k = args.archopt_verify or max(2, int(args.budget) // 8)
            screen = (args.screen if args.screen is not None else 6 * k) if name == "archopt-kl-screen" else 0
            runs.append(method_archopt_kl(bench, target, lo, tol, seed, args.explore, args.archopt_verify,
                                          screen=screen))
        elif name in ARCHOPT_METHODS:
            screen = 0
            if name == "archopt-screen":
                k = args.archopt_verify or max(2, int(args.budget) // 8)
                screen = args.screen if args.screen is not None else 6 * k
            explore = 0.0 if name == "archopt-exploit" else args.explore
            runs.append(method_archopt(bench, target, lo, tol, seed, name, explore, args.archopt_initial,
                                       args.archopt_verify, screen, name not in ("archopt-noprofile", "archopt-klprofile"),
                                       name not in ("archopt-noprofile", "archopt-noproposals"),
                                       args.refine_share if name == "archopt-refine" else 0.0,
                                       name == "archopt-klprofile"))
        else:
            raise SystemExit(f"unknown method {name!r}: use {', '.join(METHODS + EXTRA_METHODS)}")
        yield from runs


def run_model(args: argparse.Namespace, model: str, targets: list[str], methods: list[str],
              date: str) -> dict[str, Any]:
    """Every target and seed of one base model; writes ``results/<model>-<date>[-quick].json``
    after each target and seed."""
    from archopt.archdb.sizes import parse_size, parse_tolerance
    from archopt.optimizer.space import size_window
    model_name = Path(model).name
    margs = argparse.Namespace(**vars(args))
    margs.model = model
    margs.work = args.work or str(ROOT / "benchmarks" / "results" / f"work-{model_name}")
    out_path = Path(args.out or ROOT / "benchmarks" / "results" /
                    f"{model_name}-{date}{'-quick' if args.quick else ''}.json")
    t_all = time.perf_counter()
    margs.loadavg_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    bench = Bench(margs)
    spec, base = bench.spec, bench.base_values
    print(f"{model_name}: {spec.total_params:,} params, {spec.num_layers} layers; base {base}; load "
          f"{bench.load_seconds:.1f}s; full evaluation = {bench.full_tokens:,} tokens, budget "
          f"{args.budget} x = {args.budget * bench.full_tokens:,} tokens", flush=True)
    tol = parse_tolerance(args.tolerance)
    results: list[dict[str, Any]] = []
    curves: dict[str, Any] = {}
    doc: dict[str, Any] = {}
    for target_text in targets:
        target = parse_size(target_text, spec.total_params)
        lo, _ = size_window(target, tol)
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            t0 = time.perf_counter()
            m0 = bench.cache.measured
            for run in run_methods(bench, margs, methods, target, lo, tol, seed):
                s = summarize(run, base, bench.full_tokens, bench)
                results.append({"model": model_name, "target": target_text, "target_params": target, "seed": seed, **s})
                print(f"  {target_text} s{seed} {s['method']:<22} wt2 {s.get('ppl_wikitext2', math.nan):8.2f} "
                      f"(d {100 * s.get('d_wikitext2', math.nan):+7.2f}%) ptb {s.get('ppl_ptb', math.nan):8.2f} "
                      f"(d {100 * s.get('d_ptb', math.nan):+7.2f}%) held-out d "
                      f"{100 * s.get('d_wikitext2_test_heldout', math.nan):+6.2f}% / "
                      f"{100 * s.get('d_wikitext2_valid_heldout', math.nan):+6.2f}% {s.get('fraction', 0):.3f} "
                      f"tokens {s['tokens']:>9,} ({s['evaluations_worth']:.1f} evals; full {s['full_evaluations']}) "
                      f"{s['seconds']:.0f}s (cpu {s['cpu_seconds']:.0f}s)", flush=True)
            print(f"  {target_text} seed {seed}: {bench.cache.measured - m0} new measurements, "
                  f"{time.perf_counter() - t0:.0f}s", flush=True)
            doc = document(args, model, bench, results, curves, time.perf_counter() - t_all, date)
            out_path.parent.mkdir(parents=True, exist_ok=True)
            out_path.write_text(json.dumps(doc, indent=2))
        if not args.no_curve:
            curves[f"{model_name} {target_text}"] = learning_curve(bench, target)
            print(f"  learning curve {target_text}: {format_curve(curves[f'{model_name} {target_text}'])}", flush=True)
    doc = document(args, model, bench, results, curves, time.perf_counter() - t_all, date)
    out_path.write_text(json.dumps(doc, indent=2))
    print_table(doc["summary"], doc["goals"], bench.full_tokens)
    for key, curve in curves.items():
        print(f"learning curve {key}: {format_curve(curve)}")
    print(f"wrote {out_path} ({doc['seconds']:.0f}s, process cpu {doc['cpu_seconds_process']:.0f}s, "
          f"{bench.cache.measured} new measurements, "
          f"{bench.cache.hits} cache hits)", flush=True)
    return doc


def document(args: argparse.Namespace, model: str, bench: Bench, results: list[dict[str, Any]],
             curves: dict[str, Any], seconds: float, date: str) -> dict[str, Any]:
    summary = aggregate(results)
    return {"schema": "archopt.bench.search_quality/2", "model": Path(model).name, "model_path": model, "date": date,
            "command": "python benchmarks/search_quality.py " + " ".join(sys.argv[1:]),
            "settings": {"budget_full_evaluations": args.budget, "budget_tokens": args.budget * bench.full_tokens,
                         "seeds": args.seeds, "first_seed": args.first_seed, "tolerance": args.tolerance,
                         "max_tokens": args.max_tokens, "seq_len": 128, "importance": "taylor",
                         "screen_tokens": bench.cheap_tokens, "evo_offspring": args.evo_offspring,
                         "evo_stages": args.evo_stages, "evo_start_tokens": args.evo_start_tokens,
                         "puzzle_tokens": args.puzzle_tokens, "layer_drop": not args.no_drop,
                         "explore": args.explore, "archopt_initial": args.archopt_initial, **bench.describe()},
            "base": bench.base_values, "params_base": bench.spec.total_params,
            "machine": {**machine(), "loadavg_start": getattr(bench.args, "loadavg_start", None)},
            "measurements": {"new": bench.cache.measured, "cache_hits": bench.cache.hits,
                             "measure_seconds": round(bench.cache.seconds, 1)},
            "results": results, "summary": summary, "goals": goals(results, summary, curves),
            "learning_curve": curves, "seconds": round(seconds, 1),
            "cpu_seconds_process": round(time.process_time(), 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=",".join(DEFAULT_MODELS), help="comma-separated model paths, run in turn")
    ap.add_argument("--model", default=None, help="one model (overrides --models)")
    ap.add_argument("--data-dir", default=str(SHARED / "data"))
    ap.add_argument("--targets", default=None, help="default: 60%%,50%% for ptb-llama-24l, 80%%,70%% otherwise")
    ap.add_argument("--budget", type=float, default=64, help="tokens of this many full evaluations per method")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--tolerance", default="2%")
    ap.add_argument("--max-tokens", type=int, default=8192, help="tokens of each full-protocol metric")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--methods", default=",".join(METHODS),
                    help=f"comma-separated, of {', '.join(METHODS + EXTRA_METHODS)}")
    ap.add_argument("--kl-text", choices=("wikitext2-valid", "ptb-train"), default="wikitext2-valid",
                    help="KL calibration text (never a test window)")
    ap.add_argument("--kl-pool", type=int, default=8192, help="calibration tokens with a base reference")
    ap.add_argument("--evo-offspring", type=int, default=16)
    ap.add_argument("--evo-stages", default="1024:2,8192:1", help="tokens:survivors of each selection stage")
    ap.add_argument("--evo-start-tokens", type=int, default=4096, help="KL tokens that pick EvoPress's start")
    ap.add_argument("--puzzle-tokens", type=int, default=None,
                    help="KL tokens scoring each Puzzle variant (default 1024; 512 with --quick)")
    ap.add_argument("--puzzle-solutions", type=int, default=None, help="MIP solutions verified (default: the budget)")
    ap.add_argument("--no-drop", action="store_true", help="no layer drop in EvoPress and Puzzle levels")
    ap.add_argument("--paper-k", type=int, default=None, help="verified by the paper pipeline (default 18*B/64)")
    ap.add_argument("--archopt-initial", type=float, default=0.15,
                    help="share of B in random architectures measured before the rounds (the strong starts follow); "
                         "0: none, the strong starts are measured first instead")
    ap.add_argument("--archopt-verify", type=int, default=None, help="K per round (default B/8)")
    ap.add_argument("--refine-share", type=float, default=0.45,
                    help="archopt-refine: share of the evaluations left after the random ones kept for channel "
                         "exchange (archopt query --refine)")
    ap.add_argument("--explore", type=float, default=1.0, help="archopt's active-learning weight (0 = off)")
    ap.add_argument("--screen", type=int, default=None, help="archopt-screen's cheap screens per round (default 6K)")
    ap.add_argument("--screen-tokens", type=int, default=1024, help="tokens of the cheap fidelity")
    ap.add_argument("--no-curve", action="store_true", help="skip the predictor learning curve")
    ap.add_argument("--heldout-tokens", type=int, default=32768,
                    help="held-out tokens of each text the picks are re-measured on (never charged)")
    ap.add_argument("--quick", action="store_true",
                    help=f"one model, its first target, one seed, B={QUICK_BUDGET}, Puzzle variants on 512 tokens")
    ap.add_argument("--work", default=None, help="folder for the cache and archives (default results/work-<model>/)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    models = [args.model] if args.model else [m for m in args.models.split(",") if m]
    if args.quick:
        models, args.seeds = models[:1], 1
        if args.budget == 64:
            args.budget = QUICK_BUDGET
    if args.puzzle_tokens is None:
        args.puzzle_tokens = 512 if args.quick else 1024
    if len(models) > 1 and (args.work or args.out):
        raise SystemExit("--work and --out name one model's files: give --model with them")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS + EXTRA_METHODS]
    if unknown:
        raise SystemExit(f"unknown method {unknown[0]!r}: use {', '.join(METHODS + EXTRA_METHODS)}")
    parse_stages(args.evo_stages)
    date = dt.date.today().isoformat()
    t = time.perf_counter()
    docs = []
    for model in models:
        targets = (args.targets or DEFAULT_TARGETS.get(Path(model).name, "80%,70%")).split(",")
        docs.append(run_model(args, model, targets[:1] if args.quick else targets, methods, date))
    if len(docs) > 1:
        print("\nall models:")
        for d in docs:
            print_table(d["summary"], d["goals"], int(d["settings"]["full_tokens"]))
    print(f"total {time.perf_counter() - t:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
