"""Which damage a one-window sensitivity profile should record: the perplexity's rise or KL to the
base, on the same first tokens of the reported text (or KL on PTB train, calibration text).

    python benchmarks/profile_metric.py [--runs ptb-llama-24l:60%,50%,40% ptb-llama-8l:80%,70%]
        [--cheap-tokens 128] [--max-tokens 4096] [--heldout-tokens 16384] [--solutions 2] [--out FILE]

For each base model, in a fresh SQLite archive under ``--work``, through the product's engine
(``optimizer.campaign.Campaign``, ``optimizer.profile``; Taylor importance, seq 128, CPU):

1. three profiles of the single-layer variants without dropped layers (``profile_variants``), each
   variant measured on ``--cheap-tokens`` tokens: ``ppl`` (the log-perplexity rise on WikiText-2
   test's first tokens: what the one-round ``query --verify K`` records), ``kl-same-text``
   (``kl_base`` on those very tokens: tried in the product at 3eb9a0a, reverted) and ``kl-ptb-train`` (``kl_base`` on
   PTB train's first tokens, ``--kl-text``'s default calibration text); and, measuring nothing
   more, the mean of the first two's damages (both are nats per token);
2. at each size, each profile's ``--solutions`` least-damage architectures in ``[0.98, 1] x size``
   (``profile_solutions``), the four rules of thumb and the two global allocations
   (``starts.strong_starts``), all measured on the reported text (WikiText-2 test, first
   ``--max-tokens``) and, off the archive, on held-out text: the ``--heldout-tokens`` WikiText-2
   test tokens after the reported ones and the first ``--heldout-tokens`` of WikiText-2 validation
   (``wiki.valid.tokens``).

Prints one line per architecture (d over the base on each text) and writes
``benchmarks/results/profile_metric-<tag>.json``. The ptb-llama models were trained on PTB train,
so ``kl-ptb-train`` reads text the model has seen.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
SHARED = ROOT.parent.parent / "shared"
PROFILES = {"ppl": ("ppl_wikitext2", "wikitext2-test"), "kl-same-text": ("kl_base", "wikitext2-test"),
            "kl-ptb-train": ("kl_base", "ptb-train")}


def run_model(args: argparse.Namespace, model: str, sizes: list[str]) -> list[dict]:
    import dataclasses
    from archopt.archdb import Archive
    from archopt.archdb.arch import full
    from archopt.optimizer.campaign import Campaign, EvalSettings
    from archopt.optimizer.profile import Profile, damage_scale, profile_solutions, profile_variants
    from archopt.optimizer.starts import strong_starts
    sys.path.insert(0, str(ROOT))
    from search_measure import heldout_tasks, pruned

    db_path = Path(args.work) / f"{args.tag}-{model}.sqlite"
    db_path.unlink(missing_ok=True)
    archive = Archive(f"sqlite:///{db_path}")
    settings = EvalSettings(metrics=("ppl_wikitext2",), data_dir=args.data_dir, max_tokens=args.max_tokens)
    campaign = Campaign(archive, str(Path(args.models_dir) / model), settings, name=model)
    spec, base_arch = campaign.base.spec, full(campaign.base.spec)
    held = heldout_tasks(campaign.base.tokenizer, args.data_dir, args.heldout_tokens, test_skip=args.max_tokens)
    held_cache: dict[str, dict[str, float]] = {}

    def heldout(arch) -> dict[str, float]:
        key = arch.canonical_json()
        if key not in held_cache:
            with pruned(campaign.base, arch, campaign.importance) as pruned_model:
                held_cache[key] = {}
                for name, task in held.items():
                    nll, count = task.total_nll(pruned_model)
                    held_cache[key][name] = math.exp(nll / count)
        return held_cache[key]

    reported = lambda archs: campaign.cheap_values(archs, "ppl_wikitext2", campaign.evaluator, "verify")
    base = {"reported": reported([base_arch])[0], **heldout(base_arch)}
    variants = profile_variants(spec, allow_drop=False)
    profiles = {}
    for name, (metric, text) in PROFILES.items():
        t = time.perf_counter()
        other = campaign.measuring(dataclasses.replace(settings, metrics=(metric,), kl_text=text,
                                                       metric_tokens=((metric, args.max_tokens),)))
        cheap = other.cheap_evaluator(metric, args.cheap_tokens)
        values = other.cheap_values([base_arch] + [v.architecture for v in variants], metric, cheap, "profile")
        profiles[name] = Profile.from_values(spec, variants, values[1:], values[0],
                                             log_scale=damage_scale(metric) == "log")
        print(f"{model}: profile {name}: {len(variants)} variants x {args.cheap_tokens} tokens, "
              f"{time.perf_counter() - t:.0f} s", flush=True)
    ppl, kl = profiles["ppl"], profiles["kl-same-text"]   # both in nats per token: their mean, no new pass
    profiles["mean(ppl, kl-same-text)"] = Profile(spec, *({k: (a[k] + b[k]) / 2 for k in a.keys() & b.keys()}
                                                          for a, b in ((ppl.attn, kl.attn), (ppl.mlp, kl.mlp),
                                                                       (ppl.drop, kl.drop))))
    rows = []
    for size in sizes:
        target = int(float(size.rstrip("%")) / 100 * spec.total_params)
        lo = int(target * 0.98)
        kv, ch = campaign.importance.kv_group, campaign.importance.channel
        candidates = [(name, arch) for name, arch in strong_starts(spec, target, kv, ch)]
        for name, profile in profiles.items():
            candidates += [(f"{name} #{i + 1}", arch)
                           for i, arch in enumerate(profile_solutions(profile, lo, target, args.solutions))]
        campaign.run([(arch, "verify") for _, arch in candidates])
        for (name, arch), value in zip(candidates, reported([arch for _, arch in candidates])):
            held_values = heldout(arch)
            row = {"model": model, "size": size, "architecture": name, "params": arch.params,
                   "d_reported": round(value / base["reported"] - 1, 5),
                   **{f"d_{k}": round(v / base[k] - 1, 5) for k, v in held_values.items()}}
            rows.append(row)
            print(f"{model} {size:>4} {name:24} reported {100 * row['d_reported']:+7.2f}%  held-out test "
                  f"{100 * row['d_test_heldout']:+7.2f}%  valid {100 * row['d_valid_heldout']:+7.2f}%", flush=True)
    archive.close()
    return rows


def add_run_options(ap: argparse.ArgumentParser) -> None:
    """The options this benchmark shares with ``first_row_flow.py``: runs, models, data, tokens."""
    ap.add_argument("--runs", nargs="+", default=["ptb-llama-24l:60%,50%,40%", "ptb-llama-8l:80%,70%"],
                    help="MODEL:SIZE,SIZE... (models under --models-dir)")
    ap.add_argument("--models-dir", default=str(SHARED / "models"))
    ap.add_argument("--data-dir", default=str(SHARED / "data"))
    ap.add_argument("--max-tokens", type=int, default=4096, help="the reported text's tokens")
    ap.add_argument("--heldout-tokens", type=int, default=16384,
                    help="held-out tokens of each text (search_measure.heldout_tasks; first_row_flow.py: 0 skips them)")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_options(ap)
    ap.add_argument("--cheap-tokens", type=int, default=128)
    ap.add_argument("--solutions", type=int, default=2)
    ap.add_argument("--work", default=str(ROOT / "results" / "work-profile-metric"))
    ap.add_argument("--tag", default="current")
    ap.add_argument("--out", default=None, help="results JSON (default results/profile_metric-<tag>.json)")
    args = ap.parse_args(argv)
    Path(args.work).mkdir(parents=True, exist_ok=True)
    rows = []
    for run in args.runs:
        model, sizes = run.split(":")
        rows += run_model(args, model, sizes.split(","))
    doc = {"benchmark": "profile_metric", "tag": args.tag, "cheap_tokens": args.cheap_tokens,
           "max_tokens": args.max_tokens, "heldout_tokens": args.heldout_tokens, "profiles": PROFILES, "rows": rows}
    out = Path(args.out) if args.out else ROOT / "results" / f"profile_metric-{args.tag}.json"
    out.write_text(json.dumps(doc, indent=2))
    print(f"wrote {out}")
    return doc


if __name__ == "__main__":
    main()
