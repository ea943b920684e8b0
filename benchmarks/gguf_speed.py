"""Tokens/s in llama.cpp of a base model and its 80% and 70% pruned GGUFs: the speed-up pruning gives.

    python benchmarks/gguf_speed.py [--models ../shared/models/ptb-llama-24l,../shared/models/ptb-llama-8l]
                                    [--outtype f16] [--threads 2] [--prompt 256] [--gen 128] [--repeat 5]

For each base model: the full architecture and the uniform architectures at 80% and 70% of its
parameters (LLM-Pruner's baseline, ratio found by bisection; L2 importance, which does not change
the shapes and so not the speed) are written with archopt's GGUF export, all with the same
``--outtype`` and run by llama.cpp (llama-cpp-python) with the same thread count:

- prompt processing (pp): one batch of ``--prompt`` tokens from an empty context, tokens/s;
- generation (tg): ``--gen`` single-token decode steps after the prompt, tokens/s (the model's
  forward pass only: no sampling).

Each figure is the median of ``--repeat`` runs after one warm-up. Writes
``benchmarks/results/gguf_speed-<date>.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def build(model_dir: str, work: Path, outtype: str) -> list[dict]:
    """The base and its 80% / 70% uniform GGUFs: [{label, path, params, fraction, layers}]."""
    from archopt.archdb.arch import full, uniform_at_size
    from archopt.evaluators import load_base_model, prune_model, save_pruned
    from archopt.evaluators.gguf_export import export_gguf
    from archopt.evaluators.importance import compute_importance

    base = load_base_model(model_dir)
    imp = compute_importance(base, "l2")
    out = []
    for label, fraction in (("base", 1.0), ("80%", 0.8), ("70%", 0.7)):
        if fraction == 1.0:
            arch, ratio = full(base.spec), 0.0
        else:
            ratio, arch = uniform_at_size(base.spec, int(fraction * base.spec.total_params))
        model = prune_model(base, arch, imp)
        directory = save_pruned(model, base, arch, imp, work / f"{base.name}-{fraction}")
        path = export_gguf(directory, work / f"{base.name}-{fraction}.gguf", outtype).path
        out.append({"model": base.name, "label": label, "path": path, "params": arch.params,
                    "fraction": round(arch.fraction(), 4), "uniform_ratio": round(ratio, 4),
                    "layer0": arch.layers[0].to_dict(0), "file_mib": round(path.stat().st_size / 2**20, 2)})
    return out


def speed(path: Path, threads: int, prompt: int, gen: int, repeat: int) -> dict[str, float]:
    from archopt.evaluators.llamacpp import load_gguf
    llm = load_gguf(path, n_ctx=prompt + gen + 8, n_threads=threads, logits_all=False, kv_f32=False)
    tokens = [(17 * i + 5) % 4000 + 3 for i in range(prompt + gen)]
    pp, tg = [], []
    try:
        for run in range(repeat + 1):
            llm.reset()
            t0 = time.perf_counter()
            llm.eval(tokens[:prompt])
            t1 = time.perf_counter()
            for tok in tokens[prompt:]:
                llm.eval([tok])
            t2 = time.perf_counter()
            if run:  # the first run warms caches up
                pp.append(prompt / (t1 - t0))
                tg.append(gen / (t2 - t1))
    finally:
        llm.close()
    return {"pp_tok_s": statistics.median(pp), "tg_tok_s": statistics.median(tg),
            "pp_runs": [round(x, 1) for x in pp], "tg_runs": [round(x, 1) for x in tg]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    shared = REPO.parent / "shared/models"
    ap.add_argument("--models", default=f"{shared / 'ptb-llama-24l'},{shared / 'ptb-llama-8l'}")
    ap.add_argument("--outtype", default="f16", choices=["f32", "f16", "bf16", "q8_0"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from archopt.evaluators.llamacpp import runtime_version
    rows = []
    with tempfile.TemporaryDirectory(prefix="gguf-speed-") as folder:
        for model_dir in args.models.split(","):
            for entry in build(model_dir, Path(folder), args.outtype):
                entry.update(speed(entry["path"], args.threads, args.prompt, args.gen, args.repeat))
                entry["path"] = entry["path"].name
                rows.append(entry)
                print(f"{entry['model']:>14} {entry['label']:>4} {entry['params']:>10,} params "
                      f"pp {entry['pp_tok_s']:8.0f} tok/s  tg {entry['tg_tok_s']:7.0f} tok/s", file=sys.stderr)
    for row in rows:
        base = next(r for r in rows if r["model"] == row["model"] and r["label"] == "base")
        row["pp_speedup"] = round(row["pp_tok_s"] / base["pp_tok_s"], 3)
        row["tg_speedup"] = round(row["tg_tok_s"] / base["tg_tok_s"], 3)
    result = {"command": "python " + " ".join(sys.argv), "outtype": args.outtype, "threads": args.threads,
              "prompt_tokens": args.prompt, "gen_tokens": args.gen, "repeat": args.repeat,
              "runtime": runtime_version(), "rows": rows,
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                          "load_average": os.getloadavg()}}
    out = Path(args.out or REPO / f"benchmarks/results/gguf_speed-{dt.date.today().isoformat()}.json")
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
