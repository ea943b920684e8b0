"""GGUF for llama.cpp: ``archopt prune --format gguf`` and ``archopt evaluate --runtime llama.cpp``.

The library work lives in :mod:`archopt.evaluators.gguf_export` (writing the file) and
:mod:`archopt.evaluators.llamacpp` (running it); these helpers parse, check and print.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from archopt.cli import EvalOptions, State, UserError, metric_list

GGUF_METRICS = ("ppl_wikitext2", "ppl_ptb")


def check_prune_output(out: Path, out_format: str, outtype: str | None, dtype: str | None) -> None:
    """Refuse conflicting or impossible ``prune`` outputs before any model is loaded."""
    if out_format == "gguf":
        if dtype is not None:
            raise UserError("--dtype is for --format dir; a GGUF's tensor type is --outtype f32|f16|bf16|q8_0")
        if out.is_dir() or str(out).endswith(("/", "\\")):
            raise UserError(f"--out {out} is a directory; --format gguf writes one file (e.g. {out / 'model.gguf'})")
        if out.suffix.lower() != ".gguf":
            raise UserError(f"--out {out}: a GGUF file name ends in .gguf")
        if out.parent.exists() and not out.parent.is_dir():
            raise UserError(f"--out {out}: {out.parent} is not a directory")
    else:
        if outtype is not None:
            raise UserError("--outtype is for --format gguf")
        if out.exists() and not out.is_dir():
            raise UserError(f"--out {out} is a file; --format dir writes a directory (--format gguf writes one file)")


def write_gguf(state: State, model: Any, base: Any, arch: Any, imp: Any, out: Path, outtype: str | None,
               name: str) -> None:
    """Save the pruned ``model`` to a scratch directory beside ``out``, convert it, remove the scratch."""
    from archopt import evaluators as ev
    from archopt.evaluators.gguf_export import DEFAULT_OUTTYPE, GgufExportError, export_gguf

    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        ev.save_pruned(model, base, arch, imp, scratch, base_name=name)
        report = export_gguf(scratch, out, outtype or DEFAULT_OUTTYPE)
    except GgufExportError as exc:
        raise UserError(str(exc)) from None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    for note in report.notes:
        state.err.print(f"note: {note}", markup=False)
    heads = ",".join(f"{s['q_heads']}/{s['kv_heads']}/{s['intermediate']}" for s in report.layers)
    state.out.print(f"wrote {out} ({report.outtype}, {report.bytes / 2**20:.1f} MiB, llama.cpp architecture deci, "
                    f"{len(report.layers)} layers q/kv/ffn {heads}): {arch.params:,} params "
                    f"({100 * arch.fraction():.1f}% of {name}), architecture {arch.arch_id(name)[:12]}; run it with "
                    f"llama-cli -m {out}", markup=False, soft_wrap=True)


def _base_location(state: State, model_ref: str, info: dict[str, Any]) -> tuple[str | None, str]:
    """(registered name or None, where the base model's tokenizer is)."""
    from archopt.archdb import reads
    with state.archive.read() as session:
        try:
            row = reads.get_base_model(session, model_ref)
            return row.name, row.location or model_ref
        except reads.NotFound:
            pass
    if Path(model_ref).is_dir() or "/" in model_ref:
        return None, model_ref
    location = (info.get("base") or {}).get("location")
    if location:
        return None, str(location)
    raise UserError(f"base model {model_ref!r} is neither registered in the archive nor a path")


def evaluate_gguf(state: State, model_ref: str, gguf_path: Path | None, evaluation: EvalOptions,
                  threads: int | None, output: Path | None) -> None:
    """Perplexity of a GGUF in llama.cpp under archopt's protocol, into the archive (or ``output``)."""
    from archopt.evaluators.gguf_export import GgufExportError, read_gguf_provenance
    from archopt.evaluators.hub import check_text_sources
    from archopt.evaluators.llamacpp import LlamaCppError, llama_cpp_module

    if gguf_path is None:
        raise UserError("--runtime llama.cpp measures a GGUF file: pass --gguf FILE (archopt prune --format gguf)")
    if not gguf_path.is_file():
        raise UserError(f"--gguf {gguf_path}: no such file")
    metrics = metric_list(evaluation.metrics)
    others = [m for m in metrics if m not in GGUF_METRICS]
    if others:
        raise UserError(f"--runtime llama.cpp measures {', '.join(GGUF_METRICS)}; not {others[0]}")
    try:
        llama_cpp_module()
        prov = read_gguf_provenance(gguf_path)
    except (LlamaCppError, GgufExportError) as exc:
        raise UserError(str(exc)) from None
    except ValueError as exc:
        raise UserError(f"--gguf {gguf_path}: not a GGUF file ({exc})") from None
    info = prov.get("info") or {}
    check_text_sources(evaluation.data_dir, metrics)
    registered, location = _base_location(state, model_ref, info)
    name = registered or (info.get("base") or {}).get("name") or Path(location).name
    record = measure_gguf_record(gguf_path, info, location, name, metrics, evaluation, threads, state)
    if output is not None:
        output.write_text(json.dumps(record, allow_nan=False, separators=(",", ":")) + "\n", encoding="utf-8")
        state.out.print(f"wrote {output}: archopt ingest {output} attaches it to architecture "
                        f"{str(info.get('arch_id', ''))[:12]}", markup=False)
        return
    from archopt.archdb.ingest import ingest_file
    with tempfile.TemporaryDirectory(prefix="archopt-gguf-") as folder:
        path = Path(folder) / "llamacpp.jsonl"
        path.write_text(json.dumps(record, allow_nan=False, separators=(",", ":")) + "\n", encoding="utf-8")
        ingest_file(state.archive, path, fmt="jsonl")
    state.out.print(f"{name}: {len(record.get('evaluations', []))} llama.cpp measurements of architecture "
                    f"{str(info.get('arch_id', ''))[:12]} stored", markup=False)


def measure_gguf_record(gguf_path: Path, info: dict[str, Any], location: str, name: str, metrics: tuple[str, ...],
                        evaluation: EvalOptions, threads: int | None, state: State | None = None) -> dict[str, Any]:
    """One ingest record (JSON Lines format) with the GGUF's perplexities measured in llama.cpp."""
    from transformers import AutoTokenizer

    from archopt.cli import quiet_libraries
    from archopt.evaluators import llamacpp
    from archopt.evaluators.perplexity import PerplexityTask
    from archopt.optimizer.campaign import cache_dir

    quiet_libraries()
    tokenizer = AutoTokenizer.from_pretrained(location)
    evaluations = []
    for metric in metrics:
        task = PerplexityTask.prepare(tokenizer, metric, data_dir=evaluation.data_dir,
                                      split=evaluation.ptb_split if metric == "ppl_ptb" else None,
                                      seq_len=evaluation.seq_len, max_tokens=evaluation.max_tokens,
                                      cache_dir=cache_dir() / "tokens")
        measured = llamacpp.perplexity(task, gguf_path, n_threads=threads)
        if measured.failure:
            raise UserError(f"{metric} of {gguf_path} in llama.cpp: {measured.failure}")
        if state is not None:
            state.err.print(f"{metric} = {measured.value:.4f} (llama.cpp, {measured.protocol.precision}, "
                            f"{measured.duration_s:.1f} s)", markup=False)
        evaluations.append({"metric": metric, "value": measured.value, "protocol": measured.protocol.to_dict(),
                            "device": measured.device, "duration_s": round(measured.duration_s or 0.0, 3),
                            "source": f"llama.cpp:{gguf_path.name}"})
    base = dict((info.get("base") or {}).get("spec") or {})
    base_info = info.get("base") or {}
    if base:
        base.update({k: base_info[k] for k in ("config_hash", "location", "revision") if base_info.get(k)})
    importance = info.get("importance") or {}
    record: dict[str, Any] = {"model": name, "architecture": info["architecture"], "origin": "verify",
                              "evaluations": evaluations}
    if base:
        record["base_model"] = base
    if importance.get("criterion") in ("taylor", "l2"):
        record["importance"] = importance["criterion"]
        if importance.get("calibration"):
            record["calibration"] = str(importance["calibration"])
    return record
