"""What the sensitivity profile's integer program gives alone: the least-damage architectures at a
size, measured on the full protocol, for MLP grids of the profile, with and without dropped layers.

    python benchmarks/profile_starts.py [--model ../shared/models/ptb-llama-24l] [--params 0.6]
        [--db sqlite:///benchmarks/results/work-profile-starts/archive.sqlite] [--solutions 2]
        [--cheap-tokens 1024] [--max-tokens 8192] [--out FILE]

The profile's single-layer variants are measured on WikiText-2's first ``--cheap-tokens`` tokens
(1,024: the benchmark's cheap fidelity), the solutions on the first ``--max-tokens`` (8,192), seq
128, Taylor importance, through ``optimizer.campaign.Campaign`` into the archive ``--db`` (a rerun
reads what is there). Prints a line per (grid, drop) and writes
``benchmarks/results/profile_starts-<model>-<params>.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
GRIDS = {"4 levels (the product's)": (0.75, 0.5, 0.25, 0.125),
         "8 levels": (0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125, 0.0625)}


def main(argv: list[str] | None = None) -> dict:
    from archopt.archdb import Archive
    from archopt.archdb.arch import full
    from archopt.optimizer.campaign import Campaign, EvalSettings
    from archopt.optimizer.profile import Profile, profile_solutions, profile_variants
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(ROOT.parent.parent / "shared" / "models" / "ptb-llama-24l"))
    ap.add_argument("--data-dir", default=str(ROOT.parent.parent / "shared" / "data"))
    ap.add_argument("--params", type=float, default=0.6, help="target as a share of the base's parameters")
    ap.add_argument("--tolerance", type=float, default=0.02)
    ap.add_argument("--db", default=None, help="archive (default results/work-profile-starts/archive.sqlite)")
    ap.add_argument("--cheap-tokens", type=int, default=1024)
    ap.add_argument("--max-tokens", type=int, default=8192)
    ap.add_argument("--solutions", type=int, default=2)
    ap.add_argument("--out", default=None, help="results JSON (default results/profile_starts-<model>-<pct>pct.json)")
    args = ap.parse_args(argv)
    if args.db is None:
        work = ROOT / "results" / "work-profile-starts"
        work.mkdir(parents=True, exist_ok=True)
        args.db = f"sqlite:///{work / 'archive.sqlite'}"
    archive = Archive(args.db)
    settings = EvalSettings(metrics=("ppl_wikitext2",), data_dir=args.data_dir, max_tokens=args.max_tokens)
    campaign = Campaign(archive, args.model, settings, name=Path(args.model).name)
    spec = campaign.base.spec
    cheap = campaign.cheap_evaluator("ppl_wikitext2", args.cheap_tokens)
    target = int(args.params * spec.total_params)
    lo = int(target * (1 - args.tolerance))
    base = campaign.cheap_values([full(spec)], "ppl_wikitext2", campaign.evaluator, "base")[0]
    rows = []
    for grid, fractions in GRIDS.items():
        variants = profile_variants(spec, fractions=fractions)
        t = time.perf_counter()
        values = campaign.cheap_values([full(spec)] + [v.architecture for v in variants], "ppl_wikitext2", cheap,
                                       "profile")
        profile = Profile.from_values(spec, variants, values[1:], values[0])
        for allow_drop in (True, False):
            solutions = profile_solutions(profile, lo, target, args.solutions, allow_drop)
            campaign.run([(a, "verify") for a in solutions])
            measured = campaign.cheap_values(solutions, "ppl_wikitext2", campaign.evaluator, "verify")
            row = {"grid": grid, "variants": len(variants), "allow_drop": allow_drop,
                   "ppl_wikitext2": [round(v, 3) for v in measured],
                   "d": [round(v / base - 1, 5) for v in measured],
                   "dropped_layers": [sum(l.dropped for l in a.layers) for a in solutions],
                   "attention_pruned_layers": [sum(not l.dropped and l.kv_heads < spec.num_kv_heads for l in a.layers)
                                               for a in solutions],
                   "seconds": round(time.perf_counter() - t, 1)}
            rows.append(row)
            print(f"{grid:26} drop {'on ' if allow_drop else 'off'}: PPL {row['ppl_wikitext2']} "
                  f"(d {[f'{100 * d:+.2f}%' for d in row['d']]}), dropped {row['dropped_layers']}", flush=True)
    doc = {"model": Path(args.model).name, "target_share": args.params, "window": [lo, target], "base_ppl": base,
           "cheap_tokens": args.cheap_tokens, "max_tokens": args.max_tokens, "rows": rows}
    out = Path(args.out) if args.out else ROOT / "results" / f"profile_starts-{doc['model']}-{round(100 * args.params)}pct.json"
    out.write_text(json.dumps(doc, indent=2))
    archive.close()
    return doc


if __name__ == "__main__":
    main()
