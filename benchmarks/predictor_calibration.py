"""Predictor calibration: Kendall tau and the coverage of the stated band on held-out architectures.

    python benchmarks/predictor_calibration.py --db sqlite:////tmp/cal8.db --model ptb-llama-8l \
        [--metric ppl_wikitext2] [--train 25,50,100,200] [--splits 10] [--test-share 0.25] \
        [--cache benchmarks/results/work-ptb-llama-24l/measure-cache.sqlite] [--out FILE]

For each training size (at most 200 rows, and at most what the archive leaves after the held-out
share) and each of ``--splits`` random splits of the measured architectures of one (metric,
protocol) of the archive (the default protocol: the one with most evaluations): the product's
predictor (``train_predictor`` on the ``model`` features, as ``archopt query`` trains it) on the
training rows, then on the held-out ones its Kendall tau against the measured values and the
share of measured values inside ``predicted ± uncertainty`` (``optimizer.calibration.coverage``),
beside the same band before calibration and the cross-validated estimate stored with the
predictor. The nominal share is one Gaussian sigma, 68.3%; the goal is within 7 points, pooled
over the splits.

``--profile``: the predictor also gets the sensitivity profile the archive holds (the single-layer
variants ``archopt evaluate --params P --starts`` or ``query --rounds`` measure on a cheap
fidelity): its ``damage_*`` features and the ``profile_trees`` candidate, as ``archopt query``
trains it then.

``--cache`` reads measured architectures from a benchmark work folder's measurement cache instead
(``benchmarks/search_measure.py``'s ``measure-cache.sqlite``, entries of kind ``full``); the
archive then only supplies the base model's shape.

Prints a table and writes ``benchmarks/results/predictor_calibration-<model>.json``.
"""

from __future__ import annotations

import argparse
import json
import pickle
import platform
import sqlite3
import time
from pathlib import Path
from typing import Any

import numpy as np

from archopt.archdb import Archive, reads
from archopt.archdb.arch import from_layer_dicts
from archopt.archdb.store import spec_of
from archopt.optimizer.calibration import LEVEL, coverage
from archopt.optimizer.encoding import encode
from archopt.optimizer.features import Featurizer
from archopt.optimizer.predictors import kendall_tau, train_predictor

GOAL_POINTS = 7.0


def archive_rows(db: str, model: str, metric: str) -> tuple[Any, list[Any], np.ndarray, dict[str, Any]]:
    """(spec, architectures, values, source) of every live value of ``metric`` under its default
    protocol in the archive ``db``."""
    archive = Archive(db)
    try:
        with archive.read() as session:
            base = reads.get_base_model(session, model)
            pid = reads.default_protocol(session, base, metric)
            if pid is None:
                raise SystemExit(f"{model} has no {metric} evaluations in {db}")
            pairs = reads.training_pairs(session, base, metric, pid)
            archs = [reads.architecture_of(a, base) for a, _, _ in pairs]
            spec = spec_of(base)
            protocol = reads.protocol_dict(session, pid)
    finally:
        archive.close()
    return spec, archs, np.array([v for _, v, _ in pairs]), {"db": db, "protocol_id": pid, "protocol": protocol}


def cache_rows(path: str, spec: Any, metric: str) -> tuple[list[Any], np.ndarray, dict[str, Any]]:
    """Architectures and values of ``metric`` from a search benchmark's measurement cache."""
    archs, values = [], []
    with sqlite3.connect(path) as con:
        for arch, blob in con.execute("SELECT arch, value FROM cache WHERE kind = 'full'"):
            for m in pickle.loads(blob):   # our own benchmark's cache, written by search_measure.py
                if getattr(m, "metric", None) == metric:
                    archs.append(from_layer_dicts(spec, json.loads(arch)))
                    values.append(float(m.value))
    return archs, np.array(values), {"cache": path}


def stored_profile_of(db: str, model: str, metric: str) -> tuple[Any, dict[str, Any]]:
    """The archive's sensitivity profile of ``model`` for ``metric`` (``optimizer.training``)."""
    from archopt.optimizer.training import stored_profile
    archive = Archive(db)
    try:
        with archive.read() as session:
            base = reads.get_base_model(session, model)
            found = stored_profile(session, base, metric, reads.default_protocol(session, base, metric))
            if found is None:
                raise SystemExit(f"{db} holds no sensitivity profile of {model} for {metric}")
            return found[0], {"protocol": reads.protocol_dict(session, found[1]), "variants": found[2]}
    finally:
        archive.close()


def run(archs: list[Any], y: np.ndarray, spec: Any, metric: str, sizes: list[int], splits: int,
        test_share: float, seed: int, profile: Any = None) -> list[dict[str, Any]]:
    """One point per training size: tau and coverage over ``splits`` random splits."""
    fz = Featurizer.for_spec(spec, "model", profile=profile)
    X = fz.transform(encode(archs, spec))
    n = len(y)
    n_test = max(10, int(round(n * test_share)))
    points = []
    for size in sizes:
        size = min(size, 200, n - n_test)
        if size < 5 or any(p["train"] == size for p in points):
            continue
        taus, inside, raw_inside, tested, cv_cov, algos, secs = [], 0, 0, 0, [], [], []
        for rep in range(splits):
            order = np.random.default_rng(seed + rep).permutation(n)
            test, tr = order[:n_test], order[n_test:n_test + size]
            t = time.perf_counter()
            pred = train_predictor(X[tr], y[tr], metric, seed=seed, featurizer=fz)
            secs.append(time.perf_counter() - t)
            mean, std = pred.predict(X[test])
            taus.append(kendall_tau(mean, y[test]))
            inside += int(round(coverage(pred, X[test], y[test]) * len(test)))
            raw = std / pred.uncertainty_scale if pred.uncertainty_scale > 0 else std
            raw_inside += int(np.sum(np.abs(y[test] - mean) <= raw))
            tested += len(test)
            cv_cov.append(pred.cv.get("coverage"))
            algos.append(pred.algorithm)
        cov = inside / tested
        points.append({
            "train": size, "test": n_test, "splits": splits,
            "kendall_tau": float(np.nanmean(taus)), "kendall_tau_min": float(np.nanmin(taus)),
            "coverage": cov, "coverage_uncalibrated": raw_inside / tested,
            "coverage_cv_estimate": float(np.mean([c for c in cv_cov if c is not None])) if any(
                c is not None for c in cv_cov) else None,
            "within_goal": abs(cov - LEVEL) * 100 <= GOAL_POINTS,
            "algorithms": {a: algos.count(a) for a in sorted(set(algos))},
            "train_seconds": float(np.mean(secs))})
    return points


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--db", required=True, help="Archive URL (sqlite:///FILE or postgresql://...).")
    ap.add_argument("--model", required=True)
    ap.add_argument("--metric", default="ppl_wikitext2")
    ap.add_argument("--train", default="25,50,100,200", help="Training sizes (each at most 200).")
    ap.add_argument("--splits", type=int, default=10)
    ap.add_argument("--test-share", type=float, default=0.25)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache", default=None, help="A search benchmark's measure-cache.sqlite instead of the archive.")
    ap.add_argument("--profile", action="store_true", help="Use the archive's sensitivity profile as features.")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    spec, archs, y, source = archive_rows(args.db, args.model, args.metric)
    if args.cache:
        archs, y, source = (*cache_rows(args.cache, spec, args.metric),)
    if len(y) < 20:
        raise SystemExit(f"only {len(y)} measured architectures: at least 20 are needed")
    profile = None
    if args.profile:
        profile, source["profile"] = stored_profile_of(args.db, args.model, args.metric)
    started = time.perf_counter()
    points = run(archs, y, spec, args.metric, [int(s) for s in args.train.split(",")], args.splits,
                 args.test_share, args.seed, profile)
    doc = {"model": args.model, "metric": args.metric, "architectures": len(y), "source": source,
           "nominal_coverage": LEVEL, "goal_points": GOAL_POINTS, "points": points,
           "seconds": round(time.perf_counter() - started, 1),
           "machine": {"python": platform.python_version(), "platform": platform.platform()}}
    print(f"{args.model} {args.metric}: {len(y)} measured architectures; nominal coverage {100 * LEVEL:.1f}%")
    print(f"{'train':>5} {'test':>4} {'tau':>6} {'tau min':>7} {'coverage':>8} {'uncal.':>6} {'cv est.':>7}  goal")
    for p in points:
        est = f"{100 * p['coverage_cv_estimate']:6.1f}%" if p["coverage_cv_estimate"] is not None else "      -"
        print(f"{p['train']:>5} {p['test']:>4} {p['kendall_tau']:6.3f} {p['kendall_tau_min']:7.3f} "
              f"{100 * p['coverage']:7.1f}% {100 * p['coverage_uncalibrated']:5.1f}% {est}  "
              f"{'met' if p['within_goal'] else 'MISSED'}")
    out = Path(args.out) if args.out else Path(__file__).parent / "results" / f"predictor_calibration-{args.model}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2))
    return doc


if __name__ == "__main__":
    main()
