"""Evaluation overhead per architecture: prune + perplexity against a bare forward pass over the same tokens.

For each architecture: ``prune_model`` then ``PerplexityTask.evaluate`` (what archopt pays per
architecture), then a bare ``model(input_ids)`` loop over the same windows and batch size (the floor).
Overhead = (prune + PPL) / bare - 1 from the fastest of ``--repeats`` interleaved runs, in process CPU
time on CPU (robust on a shared machine; wall-clock figures are reported too) and wall time on GPU.
The goal is <= 15%. One-time costs (loading, importance,
tokenization) are reported apart. Writes ``benchmarks/results/eval_overhead.json``.

    python benchmarks/eval_overhead.py [--model DIR] [--data-dir DIR] [--tokens 16384] [--archs 8]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from archopt.archdb.arch import DROPPED, Architecture, from_ratios, full, uniform  # noqa: E402
from archopt.evaluators import PerplexityTask, compute_importance, load_base_model, prune_model  # noqa: E402
from archopt.evaluators.loading import model_device  # noqa: E402
from archopt.evaluators.perplexity import autocast_for  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def architectures(spec, count: int, seed: int) -> list[tuple[str, Architecture]]:
    """Full, uniform 0.2 and 0.5, then random per-layer ratios with some dropped layers."""
    out = [("full", full(spec)), ("uniform:0.2", uniform(spec, 0.2)), ("uniform:0.5", uniform(spec, 0.5))]
    rng = np.random.default_rng(seed)
    while len(out) < count:
        attn, mlp = rng.uniform(0, 0.8, spec.num_layers), rng.uniform(0, 0.8, spec.num_layers)
        layers = [DROPPED if (i > 0 and rng.random() < 0.15) else l
                  for i, l in enumerate(from_ratios(spec, attn.tolist(), mlp.tolist()).layers)]
        out.append((f"random-{len(out)}", Architecture(spec, tuple(layers))))
    return out[:count]


def bare_forward(model: torch.nn.Module, task: PerplexityTask) -> float:
    device = model_device(model)
    batch = task._batch_size(model)
    started = time.perf_counter()
    with torch.inference_mode(), autocast_for(device):
        for start in range(0, task.windows.shape[0], batch):
            model(input_ids=task.windows[start: start + batch].to(device), use_cache=False).logits
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(ROOT.parent / "shared" / "models" / "ptb-llama-8l"))
    parser.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--archs", type=int, default=8)
    parser.add_argument("--importance", default="l2", choices=["l2", "taylor"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per architecture (minimum reported)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "eval_overhead.json"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    t = time.perf_counter()
    base = load_base_model(args.model, device=args.device)
    load_s = time.perf_counter() - t
    t = time.perf_counter()
    imp = compute_importance(base, args.importance, data_dir=args.data_dir)
    importance_s = time.perf_counter() - t
    t = time.perf_counter()
    task = PerplexityTask.prepare(base.tokenizer, "ppl_wikitext2", data_dir=args.data_dir, seq_len=args.seq_len,
                                  max_tokens=args.tokens)
    prepare_s = time.perf_counter() - t
    bare_forward(base.model, task)  # warm-up

    rows = []
    for label, arch in architectures(base.spec, args.archs, args.seed):
        runs: dict[str, list[float]] = {k: [] for k in ("prune_s", "ppl_s", "bare_forward_s", "total_cpu_s", "bare_cpu_s")}
        for _ in range(args.repeats):  # interleaved repeats; the fastest is the least disturbed run
            c0, t0 = time.process_time(), time.perf_counter()
            model = prune_model(base, arch, imp)
            t1 = time.perf_counter()
            measurement = task.evaluate(model)
            c2, t2 = time.process_time(), time.perf_counter()
            bare = bare_forward(model, task)
            c3 = time.process_time()
            for key, value in (("prune_s", t1 - t0), ("ppl_s", t2 - t1), ("bare_forward_s", bare),
                               ("total_cpu_s", c2 - c0), ("bare_cpu_s", c3 - c2)):
                runs[key].append(value)
            del model
        total = [p + q for p, q in zip(runs["prune_s"], runs["ppl_s"])]
        row = {"arch": label, "compact": arch.compact(), "params": arch.params, "fraction": round(arch.fraction(), 4),
               "prune_s": min(runs["prune_s"]), "ppl_s": min(runs["ppl_s"]), "total_s": min(total),
               "bare_forward_s": min(runs["bare_forward_s"]),
               "overhead_wall": min(total) / min(runs["bare_forward_s"]) - 1,
               "overhead_cpu": min(runs["total_cpu_s"]) / min(runs["bare_cpu_s"]) - 1,
               "runs": runs, "ppl_wikitext2": measurement.value}
        row["overhead"] = row["overhead_cpu"] if base.device == "cpu" else row["overhead_wall"]
        rows.append(row)
        print(f"{label:12s} frac {row['fraction']:.3f}  prune {row['prune_s'] * 1e3:6.1f} ms  "
              f"prune+ppl {row['total_s']:.3f} s  bare {row['bare_forward_s']:.3f} s  "
              f"overhead wall {row['overhead_wall'] * 100:+5.1f}% cpu {row['overhead_cpu'] * 100:+5.1f}%  "
              f"PPL {measurement.value:.2f}")

    overheads = [r["overhead"] for r in rows]
    summary = {"mean_seconds_per_arch": statistics.mean(r["total_s"] for r in rows),
               "mean_bare_forward_s": statistics.mean(r["bare_forward_s"] for r in rows),
               "mean_prune_s": statistics.mean(r["prune_s"] for r in rows),
               "overhead_mean": statistics.mean(overheads), "overhead_median": statistics.median(overheads),
               "overhead_max": max(overheads), "goal": 0.15,
               "overhead_pooled_cpu": sum(min(r["runs"]["total_cpu_s"]) for r in rows)
               / sum(min(r["runs"]["bare_cpu_s"]) for r in rows) - 1,
               "overhead_pooled_wall": sum(r["total_s"] for r in rows) / sum(r["bare_forward_s"] for r in rows) - 1}
    summary["meets_goal"] = summary["overhead_mean"] <= summary["goal"]
    result = {"benchmark": "eval_overhead", "model": args.model, "device": args.device,
              "cpu_threads": torch.get_num_threads(), "machine": platform.machine(), "torch": torch.__version__,
              "tokens": task.protocol.tokens, "seq_len": args.seq_len, "importance": args.importance,
              "repeats": args.repeats, "load_average": os.getloadavg(),
              "setup": {"load_s": load_s, "importance_s": importance_s, "prepare_s": prepare_s},
              "archs": rows, "summary": summary}
    print(f"mean {summary['mean_seconds_per_arch']:.3f} s/arch vs bare {summary['mean_bare_forward_s']:.3f} s: "
          f"overhead mean {summary['overhead_mean'] * 100:+.1f}% median {summary['overhead_median'] * 100:+.1f}% "
          f"(goal <= 15%: {'met' if summary['meets_goal'] else 'NOT met'})")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
