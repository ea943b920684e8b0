"""Memory and time of archopt on 7B-wide Llama models: peak memory per stage over the weights' bytes.

Makes a randomly initialised Llama of a given shape on local disk (no download; default the widths
of Llama-2-7B: hidden 4096, 32 heads, MLP 11008, vocabulary 32000; ``--layers N``, ``--kv-heads K``),
written layer by layer into safetensors shards (never more than one layer in memory), with the
tokenizer of ``--tokenizer`` (default ``../shared/models/ptb-llama-8l``: its ids are a subset of
the vocabulary). Then, each stage a process of its own:

- ``evaluate``: ``archopt evaluate`` with Taylor importance (calibrated on PTB train from
  ``--data-dir``), the base model, one uniform (``--uniform 0.2``) and one random architecture, on
  the first ``--tokens`` tokens of WikiText-2;
- ``prune``: ``archopt prune`` of the uniform architecture (its Taylor importance from the cache);
- ``throughput`` (``--device cuda`` only): perplexity evaluation of the base model on
  ``--throughput-tokens`` tokens, as tokens/s and as a share of the card's dense bf16 peak.

Per stage it reports the peak resident memory of the process (``VmHWM``), on CUDA also
``torch.cuda.max_memory_allocated``, each divided by the weights' bytes (the safetensors tensors in
the loaded dtype), and the wall seconds. Writes ``benchmarks/results/scale-<device>-<layers>l.json``.

    python benchmarks/scale.py [--layers 4] [--kv-heads 32] [--device cpu|cuda] [--keep DIR]

The goal (issue 20): peak resident memory <= 1.3x the weights on CPU (float32), a 32-layer 7B
Taylor pass within 24 GB of GPU memory and perplexity evaluation at >= 40% of the bf16 peak on CUDA.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
GOAL_RSS = 1.3
GOAL_GPU_BYTES = 24 * 2 ** 30
GOAL_PEAK_SHARE = 0.40
# dense (no sparsity) bf16 tensor-core peaks, TFLOPS, from the vendors' data sheets
BF16_PEAK_TFLOPS = {
    "H200": 989.0, "H100 SXM": 989.0, "H100 NVL": 835.0, "H100 PCIe": 756.0, "H100": 989.0,
    "A100": 312.0, "A10G": 70.0, "A10": 125.0, "L40S": 362.0, "L4": 121.0, "RTX 4090": 165.0,
    "RTX 3090": 71.0, "B200": 2250.0, "GH200": 989.0,
}


def bf16_peak_tflops(card: str) -> float | None:
    """The dense bf16 peak of a card named like ``NVIDIA H100 80GB HBM3`` (longest known name it contains)."""
    text = card.upper().replace("-", " ")
    found = [(len(k), v) for k, v in BF16_PEAK_TFLOPS.items() if k.upper() in text]
    if "H100" in text and "PCIE" not in text and "NVL" not in text:
        return BF16_PEAK_TFLOPS["H100 SXM"]
    return max(found)[1] if found else None


# ----- the random model on disk ---------------------------------------------------------------

def make_model(out: Path, *, layers: int, hidden: int, heads: int, kv_heads: int, intermediate: int,
               vocab: int, tokenizer: Path, dtype: str = "float32", seed: int = 0, tied: bool = False) -> int:
    """A random Llama in ``out`` (one safetensors shard per layer plus one for embeddings, norm and
    lm_head); returns the weights' bytes. Peak memory: the largest shard."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    out.mkdir(parents=True, exist_ok=True)
    tok_file = tokenizer / "config.json"
    tok_config = json.loads(tok_file.read_text()) if tok_file.is_file() else {}
    config = LlamaConfig(hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         intermediate_size=intermediate, num_hidden_layers=layers, vocab_size=vocab,
                         max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=tied,
                         bos_token_id=tok_config.get("bos_token_id", 1), eos_token_id=tok_config.get("eos_token_id", 2),
                         pad_token_id=tok_config.get("pad_token_id"), dtype=dtype)
    config.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model"):
        if (tokenizer / name).is_file():
            shutil.copyfile(tokenizer / name, out / name)
    torch_dtype = getattr(torch, dtype)
    gen = torch.Generator().manual_seed(seed)
    head_dim = hidden // heads
    std = 0.02

    def rand(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * std).to(torch_dtype)

    weight_map: dict[str, str] = {}
    total = 0

    def write(shard: str, tensors: dict[str, torch.Tensor]) -> None:
        nonlocal total
        save_file(tensors, str(out / shard), metadata={"format": "pt"})
        for key, t in tensors.items():
            weight_map[key] = shard
            total += t.numel() * t.element_size()

    count = layers + 1
    outer = {"model.embed_tokens.weight": rand(vocab, hidden), "model.norm.weight": torch.ones(hidden, dtype=torch_dtype)}
    if not tied:
        outer["lm_head.weight"] = rand(vocab, hidden)
    write(f"model-00001-of-{count:05d}.safetensors", outer)
    del outer
    for i in range(layers):
        p = f"model.layers.{i}."
        tensors = {
            p + "self_attn.q_proj.weight": rand(heads * head_dim, hidden),
            p + "self_attn.k_proj.weight": rand(kv_heads * head_dim, hidden),
            p + "self_attn.v_proj.weight": rand(kv_heads * head_dim, hidden),
            p + "self_attn.o_proj.weight": rand(hidden, heads * head_dim),
            p + "mlp.gate_proj.weight": rand(intermediate, hidden),
            p + "mlp.up_proj.weight": rand(intermediate, hidden),
            p + "mlp.down_proj.weight": rand(hidden, intermediate),
            p + "input_layernorm.weight": torch.ones(hidden, dtype=torch_dtype),
            p + "post_attention_layernorm.weight": torch.ones(hidden, dtype=torch_dtype),
        }
        write(f"model-{i + 2:05d}-of-{count:05d}.safetensors", tensors)
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return total


# ----- one stage, one process -----------------------------------------------------------------

def child_main(report: str, argv: list[str]) -> None:
    """Run ``archopt ARGV`` (or the throughput stage) in this process; at exit write its peak memory."""
    import atexit

    def write() -> None:
        data: dict[str, Any] = {"vm_hwm_bytes": vm_hwm()}
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
            data["gpu_peak_bytes"] = int(torch.cuda.max_memory_allocated())
            data["gpu_peak_reserved_bytes"] = int(torch.cuda.max_memory_reserved())
            data["card"] = torch.cuda.get_device_name(0)
        extra = os.environ.get("SCALE_EXTRA")
        if extra and Path(extra).is_file():
            data.update(json.loads(Path(extra).read_text()))
        Path(report).write_text(json.dumps(data))

    atexit.register(write)
    if argv and argv[0] == "throughput":
        throughput(argv[1:])
        sys.exit(0)
    from archopt.cli import main
    main(argv)


def vm_hwm() -> int:
    """Peak resident set of this process (bytes), from /proc/self/status."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def throughput(argv: list[str]) -> None:
    """Perplexity evaluation of the base model on CUDA: tokens/s and FLOP/s (2 x matmul params per
    token plus attention), written to ``$SCALE_EXTRA``."""
    import torch

    from archopt.evaluators import PerplexityTask, load_base_model

    model_dir, data_dir, tokens, seq_len = argv[0], argv[1], int(argv[2]), int(argv[3])
    base = load_base_model(model_dir, device="cuda")
    task = PerplexityTask.prepare(base.tokenizer, "ppl_wikitext2", data_dir=data_dir, seq_len=seq_len,
                                  max_tokens=tokens)
    task.evaluate(base.model)  # warm-up (kernels, allocator)
    torch.cuda.synchronize()
    started = time.perf_counter()
    result = task.evaluate(base.model)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    spec, fed = base.spec, task.forwarded_tokens
    matmul = sum(p.numel() for n, p in base.model.named_parameters() if p.dim() == 2 and "embed_tokens" not in n)
    if spec.tie_embeddings:
        matmul += spec.vocab_size * spec.hidden_size
    attention = 2 * 2 * spec.num_layers * spec.num_heads * spec.head_dim * seq_len / 2  # QK^T and PV, causal half
    flops = fed * (2 * matmul + attention)
    card = torch.cuda.get_device_name(0)
    peak = bf16_peak_tflops(card)
    data = {"tokens": fed, "seconds": seconds, "tokens_per_s": fed / seconds, "tflops": flops / seconds / 1e12,
            "card": card, "bf16_peak_tflops": peak, "peak_share": (flops / seconds / 1e12 / peak) if peak else None,
            "ppl": result.value, "batch_size": task._batch_size(base.model)}
    Path(os.environ["SCALE_EXTRA"]).write_text(json.dumps(data))


def run_stage(name: str, argv: list[str], env: dict[str, str], log: Path) -> dict[str, Any]:
    """One stage as its own process (this script in child mode); its peak memory and seconds."""
    report = log.with_suffix(f".{name}.json")
    extra = log.with_suffix(f".{name}.extra.json")
    env = dict(env, SCALE_EXTRA=str(extra))
    cmd = ["nice", "-n", "10", sys.executable, str(Path(__file__).resolve()), "--child", str(report), "--", *argv]
    started = time.perf_counter()
    with open(log.with_suffix(f".{name}.log"), "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        tail = log.with_suffix(f".{name}.log").read_text()[-2000:]
        sys.exit(f"stage {name} failed ({proc.returncode}):\n{tail}")
    data = json.loads(report.read_text()) if report.is_file() else {}
    data.setdefault("vm_hwm_bytes", usage.ru_maxrss * 1024)
    data["ru_maxrss_bytes"] = usage.ru_maxrss * 1024
    data["seconds"] = round(seconds, 1)
    data["cpu_seconds"] = round(usage.ru_utime + usage.ru_stime, 1)
    return data


def archs_json(env: dict[str, str], db: str, model: str) -> list[dict[str, Any]]:
    done = subprocess.run([sys.executable, "-c", "from archopt.cli import main; main()", "--db", db, "archs",
                           "--model", model, "--json"], capture_output=True, text=True, env=env, cwd=ROOT, check=True)
    return json.loads(done.stdout)["archs"]


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        child_main(sys.argv[2], sys.argv[4:])
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--intermediate", type=int, default=11008)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--tied", action="store_true", help="Tie lm_head to the embeddings.")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--dtype", default=None, help="Weights on disk and in memory (default: float32 on CPU, "
                                                   "bfloat16 on CUDA).")
    ap.add_argument("--tokens", type=int, default=512, help="Perplexity tokens of the evaluate stage.")
    ap.add_argument("--throughput-tokens", type=int, default=65536)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--max-memory", default=None, help="Passed to archopt evaluate (e.g. 6GB).")
    ap.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--tokenizer", type=Path, default=ROOT.parent / "shared" / "models" / "ptb-llama-8l")
    ap.add_argument("--keep", type=Path, default=None, help="Work in this directory and keep it (model, archive).")
    ap.add_argument("--stages", default="evaluate,prune,throughput")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    work = args.keep or Path(tempfile.mkdtemp(prefix="archopt-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    name = f"llama7bw-{args.layers}l"
    model_dir = work / name
    try:
        started = time.perf_counter()
        if not (model_dir / "model.safetensors.index.json").is_file():
            make_model(model_dir, layers=args.layers, hidden=args.hidden, heads=args.heads, kv_heads=args.kv_heads,
                       intermediate=args.intermediate, vocab=args.vocab, tokenizer=args.tokenizer, dtype=dtype,
                       tied=args.tied)
        index = json.loads((model_dir / "model.safetensors.index.json").read_text())
        weights = int(index["metadata"]["total_size"])
        made_s = time.perf_counter() - started
        print(f"{name}: {weights / 1e9:.2f} GB of {dtype} weights in {model_dir} ({made_s:.0f} s)", flush=True)
        env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                   ARCHOPT_CACHE=str(work / "cache"))
        db = f"sqlite:///{work / 'archive.db'}"
        log = work / "stage"
        device = ["--device", args.device] + (["--dtype", dtype] if args.device.startswith("cuda") else [])
        stages: dict[str, dict[str, Any]] = {}
        wanted = [s.strip() for s in args.stages.split(",") if s.strip()]
        if "evaluate" in wanted:
            argv = ["--db", db, "evaluate", "--model", str(model_dir), "--name", name, "--data-dir", str(args.data_dir),
                    "--samples", "1", "--uniform", "0.2", "--metrics", "ppl_wikitext2", "--max-tokens",
                    str(args.tokens), "--seq-len", str(args.seq_len), *device]
            if args.max_memory:
                argv += ["--max-memory", args.max_memory]
            stages["evaluate"] = run_stage("evaluate", argv, env, log)
        if "prune" in wanted:
            uniform = next(a for a in archs_json(env, db, name) if a["origin"] == "uniform")
            out_dir = work / "pruned"
            argv = ["--db", db, "prune", "--model", name, "--arch", uniform["arch_id"], "--out", str(out_dir),
                    "--device", args.device]
            stages["prune"] = run_stage("prune", argv, env, log)
            stages["prune"]["pruned_params"] = uniform["params"]
        if "throughput" in wanted and args.device.startswith("cuda"):
            stages["throughput"] = run_stage("throughput", ["throughput", str(model_dir), str(args.data_dir),
                                                           str(args.throughput_tokens), str(args.seq_len)], env, log)
        for stage in stages.values():
            stage["rss_over_weights"] = round(stage["vm_hwm_bytes"] / weights, 3)
            if "gpu_peak_bytes" in stage:
                stage["gpu_over_weights"] = round(stage["gpu_peak_bytes"] / weights, 3)
        params = weights // (2 if dtype in ("bfloat16", "float16") else 4)
        result = {
            "benchmark": "scale", "device": args.device, "dtype": dtype, "layers": args.layers,
            "shape": {"hidden": args.hidden, "heads": args.heads, "kv_heads": args.kv_heads,
                      "intermediate": args.intermediate, "vocab": args.vocab, "tied": args.tied},
            "params": params, "weights_bytes": weights, "make_model_s": round(made_s, 1),
            "protocol": {"tokens": args.tokens, "seq_len": args.seq_len, "calibration": "ptb train 10x64",
                         "archs": "base + uniform 0.2 + 1 random"},
            "stages": stages,
            "max_rss_over_weights": max((s["rss_over_weights"] for s in stages.values()), default=None),
            "goal_rss_over_weights": GOAL_RSS,
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                        "load_average_after": [round(x, 2) for x in os.getloadavg()]},
        }
        for key, stage in stages.items():
            gpu = f", GPU {stage['gpu_peak_bytes'] / 2 ** 30:.2f} GiB" if "gpu_peak_bytes" in stage else ""
            tps = f", {stage['tokens_per_s']:,.0f} tokens/s" if "tokens_per_s" in stage else ""
            print(f"{key:>10}: peak RSS {stage['vm_hwm_bytes'] / 1e9:.2f} GB = {stage['rss_over_weights']:.2f}x "
                  f"the weights{gpu}{tps}, {stage['seconds']:.0f} s", flush=True)
        out = args.out or ROOT / "benchmarks" / "results" / f"scale-{args.device.split(':')[0]}-{args.layers}l.json"
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {out}")
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
