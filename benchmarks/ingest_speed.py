"""Ingest speed: 100,000 evaluation rows (25,000 architectures x 4 metrics of a 32-layer,
Llama-2-7B-shaped base model) from one JSONL file into a fresh SQLite archive.

    python benchmarks/ingest_speed.py [--archs 25000] [--repeat 3] [--db sqlite:///...]

Prints rows/s and writes benchmarks/results/ingest_speed.json. Each run ingests into a new,
empty archive (the migration is done before the clock starts), then re-ingests the same file
(every row already there: the idempotent path). The goal is >= 20,000 rows/s. Wall-clock
figures depend on what else the machine runs: the load average before each run and the rows
per CPU-second of this process are recorded beside them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

from archopt.archdb import Archive, ingest_file
from archopt.archdb.arch import BaseSpec

LLAMA2_7B = BaseSpec("llama", 32, 4096, 32, 32, 128, 11008, 32000)
PROTOCOLS = {
    "ppl_wikitext2": {"dataset": "wikitext2", "split": "test", "joining": "\n\n", "tokenizer": "llama-2",
                      "tokenizer_hash": "9e556a", "seq_len": 128, "tool": "archopt", "tool_version": "0.1.0"},
    "ppl_ptb": {"dataset": "ptb_text_only", "split": "validation", "joining": "\n\n", "tokenizer": "llama-2",
                "tokenizer_hash": "9e556a", "seq_len": 128, "tool": "archopt", "tool_version": "0.1.0"},
    "mmlu": {"dataset": "mmlu", "split": "test", "shots": 5, "questions": 14042, "tool": "archopt",
             "tool_version": "0.1.0"},
    "kl_dense": {"dataset": "wikitext2", "split": "test", "tokens": 4096, "seq_len": 128, "tool": "archopt",
                 "tool_version": "0.1.0"},
}


def write_file(path: Path, n_archs: int, seed: int) -> int:
    """Distinct random architectures (ratios 0.1-0.5 on layers 3-29, as in the paper), explicit sizes."""
    rng = random.Random(seed)
    spec = LLAMA2_7B
    seen: set[tuple] = set()
    rows = 0
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(json.dumps({"model": "llama-2-7b", "base_model": spec.to_dict()}) + "\n")
        while len(seen) < n_archs:
            layers = []
            for i in range(spec.num_layers):
                if 3 <= i <= 29:
                    kv = spec.num_kv_heads - rng.randint(3, 16)
                    inter = spec.intermediate_size - 8 * rng.randint(137, 688)
                    layers.append((kv, kv, inter))
                else:
                    layers.append((spec.num_heads, spec.num_kv_heads, spec.intermediate_size))
            key = tuple(layers)
            if key in seen:
                continue
            seen.add(key)
            evals = [{"metric": metric, "value": round(rng.uniform(5, 50) if metric.startswith("ppl")
                                                        else rng.uniform(0.2, 0.5), 6),
                      "protocol": protocol, "device": "cuda:0", "duration_s": round(rng.uniform(10, 90), 2)}
                     for metric, protocol in PROTOCOLS.items()]
            rows += len(evals)
            handle.write(json.dumps({"model": "llama-2-7b", "architecture": [list(l) for l in layers],
                                     "origin": "random", "evaluations": evals}) + "\n")
    return rows


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archs", type=int, default=25_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--db", default=None, help="Archive URL (default: a new SQLite file per run in a temp dir)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "ingest_speed.json"))
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="archopt-ingest-") as tmp:
        folder = Path(tmp)
        path = folder / "synthetic.jsonl"
        t = time.perf_counter()
        rows = write_file(path, args.archs, args.seed)
        gen_s = time.perf_counter() - t
        runs = []
        for r in range(args.repeat):
            url = args.db or f"sqlite:///{folder / f'run{r}.db'}"
            archive = Archive(url)  # migrated here, outside the timing
            load = os.getloadavg()[0]
            t, cpu = time.perf_counter(), time.process_time()
            first = ingest_file(archive, path)
            first_s, first_cpu = time.perf_counter() - t, time.process_time() - cpu
            t = time.perf_counter()
            again = ingest_file(archive, path)
            again_s = time.perf_counter() - t
            archive.close()
            assert first.evaluations_added == rows and again.evaluations_existing == rows
            runs.append({"seconds": round(first_s, 3), "rows_per_s": round(rows / first_s),
                         "cpu_seconds": round(first_cpu, 3), "rows_per_cpu_s": round(rows / first_cpu),
                         "reingest_seconds": round(again_s, 3), "reingest_rows_per_s": round(rows / again_s),
                         "load_average_before": round(load, 2)})
            print(f"run {r + 1}: {rows:,} rows in {first_s:.2f} s = {rows / first_s:,.0f} rows/s "
                  f"({rows / first_cpu:,.0f} rows per CPU-second, load average {load:.1f}); "
                  f"re-ingest (all already there) {again_s:.2f} s = {rows / again_s:,.0f} rows/s", flush=True)
            if args.db:
                break
        file_mb = path.stat().st_size / 1e6

    best = max(runs, key=lambda x: x["rows_per_s"])
    result = {
        "benchmark": "ingest_speed",
        "model": "Llama-2-7B shape, 32 layers",
        "archs": args.archs,
        "metrics_per_arch": len(PROTOCOLS),
        "rows": rows,
        "file_mb": round(file_mb, 1),
        "generate_seconds": round(gen_s, 2),
        "backend": "postgresql" if args.db and args.db.startswith("postgres") else "sqlite",
        "runs": runs,
        "best_rows_per_s": best["rows_per_s"],
        "median_rows_per_s": sorted(x["rows_per_s"] for x in runs)[len(runs) // 2],
        "best_rows_per_cpu_s": max(x["rows_per_cpu_s"] for x in runs),
        "goal_rows_per_s": 20_000,
        "machine": {"python": sys.version.split()[0], "platform": platform.platform(),
                    "cpus": os.cpu_count()},
    }
    print(f"best {result['best_rows_per_s']:,} rows/s, median {result['median_rows_per_s']:,} rows/s "
          f"(goal {result['goal_rows_per_s']:,})")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
