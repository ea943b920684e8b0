"""Cold and repeated ``archopt query`` latency through the product's own code path (``run_query``).

A SQLite archive of a 32-layer Llama-2-7B-shaped base model holds 300 synthetic measured
architectures (two metrics); predictors are trained once (not timed: "with trained predictors").
Then cold queries (new size targets: search over the predictors, store the answer) and repeated
identical queries (served from the store) are timed.

    python benchmarks/query_latency.py [--rows 300] [--repeats 5]

Goals (issue 4): a cold query scores >= 20,000 candidates and answers within 3 s on the 2-core
machine; a repeated one within 0.3 s.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from archopt.archdb import Archive  # noqa: E402
from archopt.archdb.arch import BaseSpec  # noqa: E402
from archopt.archdb.protocol import Protocol  # noqa: E402
from archopt.archdb.records import ArchRecord, BaseModelInfo, ValueRecord  # noqa: E402
from archopt.archdb.store import ingest_records  # noqa: E402
from archopt.optimizer.query import QueryRequest, run_query  # noqa: E402
from archopt.optimizer.training import ensure_predictors  # noqa: E402
from helpers.synthetic import SyntheticTruth, random_archive  # noqa: E402  (tests/helpers)

SPEC = BaseSpec(family="llama", num_layers=32, hidden_size=4096, num_heads=32, num_kv_heads=32, head_dim=128,
                intermediate_size=11008, vocab_size=32000)
PPL = Protocol(dataset="wikitext-2-raw-v1", split="test", joining="\n\n", tokenizer="llama", seq_len=128)
MMLU = Protocol(dataset="mmlu", split="test", tokenizer="llama", shots=5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "query_latency.json")
    args = parser.parse_args()
    folder = tempfile.mkdtemp(prefix="archopt-qlat-")
    archive = Archive(f"sqlite:///{folder}/archive.db")
    truth = SyntheticTruth(noise=0.01, seed=0)
    batch = random_archive(SPEC, args.rows, seed=0, layers=range(3, 30))
    info = BaseModelInfo("llama-2-7b-shape", SPEC, "synthetic")
    records = [ArchRecord(model=info.name, base=info, architecture=a.layer_dicts(), origin="random",
                          values=(ValueRecord("ppl_wikitext2", float(p), PPL), ValueRecord("mmlu", float(q), MMLU)))
               for a, p, q in zip(batch.architectures(), truth.ppl(batch, True), truth.mmlu(batch, True))]
    with archive.write() as session:
        ingest_records(session, records)
    t = time.perf_counter()
    ensure_predictors(archive, info.name, ["ppl_wikitext2", "mmlu"])
    train_s = time.perf_counter() - t

    cold, repeated, scored = [], [], []
    for i, target in enumerate(["5B", "5.2B", "4.8B", "5.5B", "4.5B"][:args.repeats]):
        request = QueryRequest(model=info.name, params=target, objectives=("ppl_wikitext2", "mmlu"), top=10)
        t = time.perf_counter()
        doc = run_query(archive, request)
        cold.append(time.perf_counter() - t)
        assert not doc["served_from_store"]
        scored.append(doc["stats"].get("candidates_scored", 0))
        t = time.perf_counter()
        again = run_query(archive, request)
        repeated.append(time.perf_counter() - t)
        assert again["served_from_store"]
        print(f"target {target}: cold {cold[-1]:.2f} s ({scored[-1]:,} candidates), repeated {1000 * repeated[-1]:.0f} ms")
    archive.close()
    result = {
        "benchmark": "query_latency", "rows": args.rows, "train_seconds": round(train_s, 3),
        "cold_seconds": [round(x, 3) for x in cold], "cold_median_s": round(statistics.median(cold), 3),
        "repeated_ms": [round(1000 * x, 1) for x in repeated],
        "repeated_median_ms": round(1000 * statistics.median(repeated), 1),
        "candidates_scored": scored, "goals": {"cold_s": 3.0, "repeated_s": 0.3, "candidates": 20000},
        "load_average": os.getloadavg(), "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                                                     "platform": platform.platform()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"cold median {result['cold_median_s']} s, repeated median {result['repeated_median_ms']} ms "
          f"(train {train_s:.1f} s, load {os.getloadavg()[0]:.1f}); wrote {args.out}")


if __name__ == "__main__":
    main()
