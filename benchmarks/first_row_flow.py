"""The issue-19 table's first-row flow, as a user runs it, against the rules of thumb at the size.

    python benchmarks/first_row_flow.py [--runs ptb-llama-24l:60%,50%,40% ptb-llama-8l:80%,70%]
        [--src DIR] [--tag NAME] [--heldout-tokens 16384]

For each base model and size, in a fresh SQLite archive under ``--work``:

1. ``archopt evaluate --samples 24 --uniform 0.1,0.15,0.2,0.25,0.3,0.35`` (random architectures of
   every size, the uniform ladder and the base: 31 evaluations);
2. ``archopt query --params SIZE --verify 8`` (one round: the product's strong starts and picks);
3. off the flow's books: the four rules of thumb at the size (``optimizer.starts.rules_of_thumb``),
   measured by the same engine and protocol; then the flow's best and the rules on held-out text
   (``--heldout-tokens`` of WikiText-2 test after the reported tokens and of WikiText-2
   validation, as ``benchmarks/profile_metric.py``).

WikiText-2 test, the first ``--max-tokens`` (4,096) tokens, seq 128, Taylor importance, on the CPU.
Prints, per run, the flow's forwarded tokens, its best PPL in the window and the best rule's, and
writes ``benchmarks/results/first_row_flow-<tag>.json``. ``--src`` runs the CLI of another archopt
checkout (e.g. a ``git worktree`` of an older commit) for a with/without comparison; the rules
are always measured by this checkout's engine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
SHARED = ROOT.parent.parent / "shared"
CLI = "import sys; from archopt.cli import main; sys.argv[0] = 'archopt'; sys.exit(main())"


def archopt(src: Path | None, db: str, *args: str) -> subprocess.CompletedProcess:
    """Run ``archopt --db DB ARGS`` (from the checkout ``src`` when given)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    if src is not None:   # a checkout named archopt on the path, ahead of the installed one
        link = Path(tempfile.mkdtemp(prefix="archopt-src-")) / "archopt"
        link.symlink_to(src.resolve())
        env["PYTHONPATH"] = str(link.parent)
    proc = subprocess.run([sys.executable, "-c", CLI, "--db", db, *args], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"archopt {' '.join(args[:2])} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return proc


def rules_at(db: str, model_dir: str, name: str, share: float, data_dir: str, max_tokens: int,
             heldout_tokens: int = 0, best_id: str | None = None) -> tuple[dict[str, float], dict[str, dict]]:
    """PPL of each rule of thumb at ``share`` of the base, measured into ``db`` (this checkout's
    engine), and, with ``heldout_tokens``, the held-out d (``search_measure.heldout_tasks``: the
    WikiText-2 test tokens after the reported ones, WikiText-2 validation) of each rule and of the
    architecture ``best_id`` (the flow's best)."""
    import math
    from sqlalchemy import select
    from archopt.archdb import Archive, models as m
    from archopt.archdb.arch import full, parse_architecture
    from archopt.optimizer.campaign import Campaign, EvalSettings
    from archopt.optimizer.starts import rules_of_thumb
    sys.path.insert(0, str(ROOT))
    from search_measure import heldout_tasks, pruned
    archive = Archive(db)
    try:
        settings = EvalSettings(metrics=("ppl_wikitext2",), data_dir=data_dir, max_tokens=max_tokens, device="cpu")
        campaign = Campaign(archive, model_dir, settings, name=name)
        spec = campaign.base.spec
        rules = {k: a for k, a in rules_of_thumb(spec, int(share * spec.total_params)).items() if a is not None}
        campaign.run([(a, "rule") for a in rules.values()])
        values = campaign.cheap_values(list(rules.values()), "ppl_wikitext2", campaign.evaluator, "rule")
        found = {k: round(v, 3) for k, v in zip(rules, values) if v is not None}
        if not heldout_tokens:
            return found, {}
        tasks = heldout_tasks(campaign.base.tokenizer, data_dir, heldout_tokens, test_skip=max_tokens)

        def heldout(arch) -> dict[str, float]:
            with pruned(campaign.base, arch, campaign.importance) as model:
                return {n: math.exp(nll / count) for n, t in tasks.items() for nll, count in [t.total_nll(model)]}

        base = heldout(full(spec))
        archs = dict(rules)
        if best_id:
            with archive.read() as session:
                row = session.scalar(select(m.Architecture).where(m.Architecture.arch_hash == best_id))
                archs["flow_best"] = parse_architecture(spec, json.loads(row.encoding))
        held = {k: {n: round(v / base[n] - 1, 5) for n, v in heldout(a).items()} for k, a in archs.items()}
        return found, held
    finally:
        archive.close()


def run_one(args: argparse.Namespace, model: str, target: str) -> dict:
    model_dir = str(Path(args.models_dir) / model)
    db_path = Path(args.work) / f"{args.tag}-{model}-{target.rstrip('%')}.sqlite"
    db_path.unlink(missing_ok=True)
    db = f"sqlite:///{db_path}"
    common = ["--data-dir", args.data_dir, "--max-tokens", str(args.max_tokens), "--metrics", "ppl_wikitext2",
              "--device", "cpu"]
    t = time.perf_counter()
    archopt(args.src, db, "evaluate", "--model", model_dir, *common, "--samples", str(args.samples),
            "--uniform", args.uniform)
    t_eval = time.perf_counter() - t
    t = time.perf_counter()
    doc = json.loads(archopt(args.src, db, "query", "--model", model, "--params", target, "--objectives",
                             "ppl_wikitext2", "--verify", str(args.verify), "--weights", model_dir, *common,
                             "--json").stdout)
    t_query = time.perf_counter() - t
    evaluated = 1 + args.samples + len(args.uniform.split(","))   # the base, the samples, the ladder
    tokens = evaluated * args.max_tokens + int(doc["verification"]["forwarded_tokens"])
    standing = doc["verification"]["standing"] or {}
    best = (standing.get("best") or {}).get("value")
    rules, held = rules_at(db, model_dir, model, float(target.rstrip("%")) / 100, args.data_dir, args.max_tokens,
                           args.heldout_tokens, (standing.get("best") or {}).get("arch_id"))
    best_rule = min(rules.values()) if rules else None
    row = {"model": model, "target": target, "forwarded_tokens": tokens,
           "tokens_without_verification": evaluated * args.max_tokens,
           "best_ppl": best, "best_origin": (standing.get("best") or {}).get("origin"),
           "rules": rules, "best_rule_ppl": best_rule, "heldout_d": held,
           "ratio_to_best_rule": round(best / best_rule, 4) if best and best_rule else None,
           "starts": doc["rounds"]["rounds"][0]["starts"] if doc.get("rounds") else [],
           "seconds_evaluate": round(t_eval, 1), "seconds_query": round(t_query, 1)}
    print(f"{model} {target}: {tokens:,} forwarded tokens, best PPL {best} ({row['best_origin']}), "
          f"best rule {best_rule} -> {row['ratio_to_best_rule']}x", flush=True)
    if held.get("flow_best"):
        best_rule_name = min(rules, key=rules.get)
        print("  held-out d (WikiText-2 test after the reported tokens / validation): flow's best "
              + " / ".join(f"{100 * v:+.2f}%" for v in held["flow_best"].values()) + f"; best rule ({best_rule_name}) "
              + " / ".join(f"{100 * v:+.2f}%" for v in held[best_rule_name].values()), flush=True)
    return row


def main(argv: list[str] | None = None) -> dict:
    sys.path.insert(0, str(ROOT))
    from profile_metric import add_run_options
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_options(ap)
    ap.add_argument("--samples", type=int, default=24)
    ap.add_argument("--uniform", default="0.1,0.15,0.2,0.25,0.3,0.35")
    ap.add_argument("--verify", type=int, default=8)
    ap.add_argument("--src", type=Path, default=None, help="an archopt checkout whose CLI runs the flow")
    ap.add_argument("--work", default=str(ROOT / "results" / "work-first-row"))
    ap.add_argument("--tag", default="current")
    args = ap.parse_args(argv)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    Path(args.work).mkdir(parents=True, exist_ok=True)
    rows = [run_one(args, model, target) for spec in args.runs
            for model, sizes in [spec.split(":", 1)] for target in sizes.split(",")]
    doc = {"benchmark": "first_row_flow", "tag": args.tag, "src": str(args.src) if args.src else None,
           "protocol": {"dataset": "wikitext2", "split": "test", "tokens": args.max_tokens, "seq_len": 128,
                        "importance": "taylor"},
           "flow": {"samples": args.samples, "uniform": args.uniform, "verify": args.verify}, "runs": rows}
    out = ROOT / "results" / f"first_row_flow-{args.tag}.json"
    out.write_text(json.dumps(doc, indent=2))
    print(f"wrote {out}")
    return doc


if __name__ == "__main__":
    main()
