"""How well a selection signal ranks the best architectures on text it never saw.

Takes the ``--limit`` architectures with the lowest measured WikiText-2 perplexity within a size
window from a search benchmark's cache (``search_quality.py --work DIR``: every method's full
measurements), measures each, without charge, on the benchmark's held-out text (``Bench.heldout``)
and by KL(base || pruned) over the whole KL pool (``Bench.measure_kl``), and reports, for each
signal, Kendall tau against the held-out d and the held-out d of the architecture it would pick:

- ``measured d``: the full protocol's WikiText-2 d (the text every method picks on);
- ``kl``: KL on the KL pool (WikiText-2 validation by default), what ``archopt-kl`` picks on;
- ``d_ptb``: the protocol's PTB d.

    python benchmarks/selection_noise.py --work benchmarks/results/work-ptb-llama-24l --target 60% [--limit 44]

Writes ``results/selection_noise-<model>-<target>.json``. Values come from the work folder's cache
where it holds them (a rerun measures nothing new).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from search_measure import Bench  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"


def main(argv: list[str] | None = None) -> int:
    from scipy.stats import kendalltau

    from archopt.archdb.arch import parse_architecture
    from archopt.archdb.sizes import parse_size
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(SHARED / "models" / "ptb-llama-24l"))
    ap.add_argument("--work", required=True, help="a search_quality.py work folder (its cache)")
    ap.add_argument("--target", default="60%")
    ap.add_argument("--tolerance", type=float, default=0.02)
    ap.add_argument("--limit", type=int, default=44, help="the best measured architectures to study")
    ap.add_argument("--data-dir", default=str(SHARED / "data"))
    ap.add_argument("--max-tokens", type=int, default=8192)
    ap.add_argument("--kl-pool", type=int, default=8192)
    ap.add_argument("--heldout-tokens", type=int, default=32768)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    bench = Bench(argparse.Namespace(model=args.model, work=args.work, data_dir=args.data_dir,
                                     max_tokens=args.max_tokens, device="cpu", screen_tokens=1024,
                                     kl_text="wikitext2-valid", kl_pool=args.kl_pool,
                                     heldout_tokens=args.heldout_tokens, budget=10 ** 9))
    target = parse_size(args.target, bench.spec.total_params)
    lo = int(target * (1 - args.tolerance))
    rows = sorted((r for r in bench.full_rows() if lo <= r[1] <= target), key=lambda r: r[2]["ppl_wikitext2"])
    rows = rows[:args.limit]
    if not rows:
        raise SystemExit(f"no cached full measurement in [{lo:,}, {target:,}] in {args.work}")
    run = bench.run("selection-noise", target, lo, full_evaluations=10 ** 9)
    windows = list(range(bench.kl_task.n_windows))
    base = bench.base_values
    out = []
    t0 = time.perf_counter()
    for i, (text, params, values) in enumerate(rows):
        arch = parse_architecture(bench.spec, json.loads(text))
        held = bench.heldout(arch)
        out.append({"arch": text, "params": params, "d": values["ppl_wikitext2"] / base["ppl_wikitext2"] - 1,
                    "d_ptb": values["ppl_ptb"] / base["ppl_ptb"] - 1,
                    "kl": bench.measure_kl(run, [arch], windows)[0],
                    **{k: held[k] / bench.heldout_base[k] - 1 for k in held}})
        print(f"{i + 1}/{len(rows)} d {100 * out[-1]['d']:+.2f}% kl {out[-1]['kl']:.4f} held-out "
              f"{100 * out[-1]['wikitext2_test_heldout']:+.2f}% / {100 * out[-1]['wikitext2_valid_heldout']:+.2f}% "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
    held_test = np.array([r["wikitext2_test_heldout"] for r in out])
    held_valid = np.array([r["wikitext2_valid_heldout"] for r in out])
    signals = {}
    for name in ("d", "kl", "d_ptb"):
        s = np.array([r[name] for r in out])
        pick = int(np.argmin(s))
        signals[name] = {"tau_heldout_test": round(float(kendalltau(s, held_test)[0]), 3),
                         "tau_heldout_valid": round(float(kendalltau(s, held_valid)[0]), 3),
                         "pick_heldout_test": round(float(held_test[pick]), 4),
                         "pick_heldout_valid": round(float(held_valid[pick]), 4)}
        print(f"{name:6s} Kendall tau against held-out test {signals[name]['tau_heldout_test']:+.3f}, "
              f"validation {signals[name]['tau_heldout_valid']:+.3f}; its pick: held-out "
              f"{100 * held_test[pick]:+.2f}% / {100 * held_valid[pick]:+.2f}%")
    print(f"best held-out among them: {100 * held_test.min():+.2f}% / {100 * held_valid.min():+.2f}%")
    doc = {"benchmark": "selection_noise", "model": Path(args.model).name, "target": args.target,
           "target_params": target, "window": [lo, target], "rows": len(out), "signals": signals,
           "best_heldout_test": round(float(held_test.min()), 4), "best_heldout_valid": round(float(held_valid.min()), 4),
           "settings": {"max_tokens": args.max_tokens, "kl_pool": args.kl_pool, "heldout_tokens": args.heldout_tokens},
           "architectures": out}
    path = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / \
        f"selection_noise-{Path(args.model).name}-{args.target.rstrip('%')}pct.json"
    path.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
