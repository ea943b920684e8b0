"""Query speed: train two predictors on 300 synthetic rows of a Llama-2-7B-shaped model, then
time the search for a 5B-parameter architecture (two objectives, 20,000 candidates).

    python benchmarks/query_speed.py [--candidates 20000] [--repeat 3] [--seed 0]

Prints a summary and writes benchmarks/results/query_speed.json. The ground truth is the
synthetic one of ``tests/helpers/synthetic.py`` (no model is run), so the figures measure the
optimizer only: feature building, predictor training, Optuna and the vectorised search.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the synthetic truths are test helpers

from archopt.archdb.arch import BaseSpec, uniform_at_size  # noqa: E402
from archopt.optimizer import Featurizer, encode, search, train_predictor  # noqa: E402
from helpers.synthetic import SyntheticTruth, random_archive  # noqa: E402  (tests/helpers)

LLAMA2_7B = BaseSpec("llama", 32, 4096, 32, 32, 128, 11008, 32000)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--candidates", type=int, default=20000)
    ap.add_argument("--rows", type=int, default=300)
    ap.add_argument("--target", type=float, default=5.0e9)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "query_speed.json"))
    args = ap.parse_args(argv)

    spec = LLAMA2_7B
    truth = SyntheticTruth(noise=0.01, seed=args.seed)
    archive = random_archive(spec, args.rows, seed=args.seed, layers=range(3, 30))
    fz = Featurizer.for_spec(spec, "model")
    X = fz.transform(archive)
    t = time.perf_counter()
    preds = {
        "ppl_wikitext2": train_predictor(X, truth.ppl(archive, noisy=True), "ppl_wikitext2", seed=args.seed,
                                         featurizer=fz),
        "mmlu": train_predictor(X, truth.mmlu(archive, noisy=True), "mmlu", seed=args.seed, featurizer=fz),
    }
    train_s = time.perf_counter() - t
    target = int(args.target)
    warm = [archive.architecture(i) for i in range(0, args.rows, 10)]

    runs = []
    for r in range(args.repeat):
        t = time.perf_counter()
        res = search(spec, preds, target_params=target, tolerance=0.02, objectives=("ppl_wikitext2", "mmlu"),
                     seed=args.seed, warm_start=warm, n_candidates=args.candidates, layers="3-29")
        wall = time.perf_counter() - t
        runs.append({"seconds": round(wall, 3), "candidates_scored": res.stats["candidates_scored"],
                     "feasible": res.stats["feasible"], "front_size": len(res.front),
                     "phase_seconds": res.stats["phase_seconds"], "predict_seconds": res.stats["predict_seconds"],
                     "optuna_trials_asked": res.stats["optuna"].get("asked", 0)})
    # quality against the uniform baseline at the same size (true synthetic PPL)
    _, uni = uniform_at_size(spec, target, list(range(3, 30)))
    best = min(res.front, key=lambda c: c.predicted["ppl_wikitext2"])
    true_best = float(truth.ppl(encode([best.architecture]))[0])
    true_uni = float(truth.ppl(encode([uni]))[0])
    out = {
        "benchmark": "query_speed", "model": "Llama-2-7B shape (synthetic truth)", "target_params": target,
        "tolerance": 0.02, "objectives": ["ppl_wikitext2", "mmlu"], "n_candidates": args.candidates,
        "train_rows": args.rows, "train_seconds_two_predictors": round(train_s, 3),
        "predictors": {k: {"algorithm": p.algorithm, "kendall_tau": p.cv["kendall_tau"], "r2": p.cv["r2"]}
                       for k, p in preds.items()},
        "runs": runs, "median_seconds": float(np.median([r["seconds"] for r in runs])),
        "true_ppl_best_vs_uniform": {"best": round(true_best, 3), "uniform": round(true_uni, 3),
                                     "ratio": round(true_best / true_uni, 4)},
        "machine": {"python": sys.version.split()[0], "platform": platform.platform(),
                    "cpus": os.cpu_count()},
    }
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"trained 2 predictors on {args.rows} rows in {train_s:.2f} s "
          f"({', '.join(k + ': ' + v.algorithm + ' tau=' + format(v.cv['kendall_tau'], '.3f') for k, v in preds.items())})")
    for r in runs:
        print(f"search: {r['candidates_scored']} candidates scored ({r['feasible']} feasible) in {r['seconds']:.2f} s; "
              f"front {r['front_size']}; phases {r['phase_seconds']}")
    print(f"true PPL of the best front member {true_best:.3f} vs uniform {true_uni:.3f} "
          f"({100 * (true_best / true_uni - 1):+.1f}%)")
    print(f"wrote {path}")
    return out


if __name__ == "__main__":
    main()
