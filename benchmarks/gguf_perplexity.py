"""Perplexity of a pruned GGUF in llama.cpp against archopt's own measurement of that architecture.

    python benchmarks/gguf_perplexity.py [--model ../shared/models/ptb-llama-8l] [--data-dir ../shared/data]

Ingests examples/ptb-llama-8l.jsonl (archopt's transformers measurements) into a scratch archive,
takes the best-measured architecture at 78-80% of the base (WikiText-2, first 8,192 tokens, windows
of 128), writes it with ``archopt prune --format gguf`` as f32, f16 and q8_0, and measures each with
``archopt evaluate --runtime llama.cpp`` (llama.cpp's own logits, all positions kept, archopt's
windows). It also runs ``archopt evaluate`` on the architecture in transformers, which measures it
only where the archive lacks that value (``transformers_ppl_now`` is then the archived value,
itself measured by ``archopt evaluate``). Writes ``benchmarks/results/gguf_perplexity.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ARCHOPT = [sys.executable, "-c", "from archopt.cli import main; main()"]


def cli(db: Path, *args: str) -> str:
    done = subprocess.run([*ARCHOPT, "--db", str(db), *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    if done.returncode:
        raise SystemExit(f"archopt {' '.join(map(str, args))} failed: {done.stderr.strip()[-2000:]}")
    return done.stdout


def wikitext_values(db: Path, arch_id: str) -> dict[str, float]:
    """runtime/precision -> ppl_wikitext2 of ``arch_id`` (8,192-token protocol) in the archive."""
    out: dict[str, float] = {}
    for line in cli(db, "export", "--format", "jsonl").splitlines():
        rec = json.loads(line)
        if not str(rec.get("arch_id", "")).startswith(arch_id):
            continue
        for ev in rec.get("evaluations", []):
            p = ev["protocol"]
            if ev["metric"] == "ppl_wikitext2" and p.get("tokens") == 8192:
                key = f"{p.get('runtime', 'transformers')}/{p.get('precision', 'float32')}"
                out.setdefault(key, ev["value"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(REPO.parent / "shared/models/ptb-llama-8l"))
    ap.add_argument("--data-dir", default=str(REPO.parent / "shared/data"))
    ap.add_argument("--examples", default=str(REPO / "examples/ptb-llama-8l.jsonl"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(REPO / "benchmarks/results/gguf_perplexity.json"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="gguf-ppl-") as folder:
        work = Path(folder)
        db = work / "archive.db"
        os.environ["ARCHOPT_CACHE"] = str(work / "cache")
        cli(db, "ingest", args.examples)
        archs = json.loads(cli(db, "archs", "--model", "ptb-llama-8l", "--sort", "ppl_wikitext2", "--json"))["archs"]
        best = next(a for a in archs if 0.78 <= a["fraction"] <= 0.80 and "ppl_wikitext2" in a["metrics"])
        arch_id = best["arch_id"]
        archived = best["metrics"]["ppl_wikitext2"]["value"]
        common = ["--metrics", "ppl_wikitext2", "--data-dir", args.data_dir, "--max-tokens", "8192"]
        started = time.time()
        cli(db, "evaluate", "--model", args.model, "--name", "ptb-llama-8l", "--no-base", "--arch", arch_id[:16],
            "--device", "cpu", *common)
        rows = []
        for outtype in ("f32", "f16", "q8_0"):
            path = work / f"pruned-80-{outtype}.gguf"
            cli(db, "prune", "--model", "ptb-llama-8l", "--arch", arch_id[:16], "--format", "gguf", "--out", path,
                "--outtype", outtype, "--weights", args.model, "--data-dir", args.data_dir)
            t0 = time.time()
            cli(db, "evaluate", "--model", "ptb-llama-8l", "--runtime", "llama.cpp", "--gguf", path,
                "--threads", str(args.threads), *common)
            rows.append({"outtype": outtype, "file_mib": round(path.stat().st_size / 2**20, 2),
                         "eval_s": round(time.time() - t0, 1)})
        values = wikitext_values(db, arch_id[:16])
        ref = values["transformers/float32"]
        precision = {"f32": "float32", "f16": "float16", "q8_0": "q8_0"}
        for row in rows:
            row["ppl_wikitext2"] = values[f"llama.cpp/{precision[row['outtype']]}"]
            row["rel_diff_vs_transformers"] = row["ppl_wikitext2"] / ref - 1
        result = {"model": "ptb-llama-8l", "arch_id": arch_id, "fraction": best["fraction"],
                  "params": best["params"], "protocol": "WikiText-2 raw test, first 8,192 tokens, windows of 128",
                  "archived_transformers_ppl": archived, "transformers_ppl_now": ref, "llama_cpp": rows,
                  "threads": args.threads, "elapsed_s": round(time.time() - started, 1),
                  "machine": {"platform": platform.platform(), "cpus": os.cpu_count()}}
    print(json.dumps(result, indent=2))
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
