"""Measuring for real: evaluate (many architectures into the archive) and prune (write one model)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from archopt.cli import (EvalOptions, State, UserError, eval_options, floats, metric_list, pass_state,
                         quiet_libraries)

from .output import progress_runner


def run_campaign(state: State, campaign: Any, archs: list[tuple[Any, str]], title: str) -> Any:
    """Measure ``archs`` with a progress bar (done, ETA, last values); returns the campaign report."""
    progress, on_result = progress_runner(state, title, len(archs))
    with progress:
        return campaign.run(archs, on_result)


@click.command()
@click.option("--model", "-m", "model_ref", required=True, help="Local path or hub id of the base model.")
@click.option("--name", default=None, help="Name to register the base model under (default: hub id or dir name).")
@click.option("--samples", type=click.IntRange(min=0), default=0, show_default=True,
              help="How many sampled architectures to measure.")
@click.option("--sampler", type=click.Choice(["random", "paper"]), default="random", show_default=True,
              help="random: per-layer widths (attention biased toward kept, whole in a quarter of them); "
                   "paper: ratios from --ratios.")
@click.option("--uniform", "uniform_ratios", default=None, help="Also measure uniform baselines, e.g. 0.2,0.3.")
@click.option("--arch", "arch_texts", multiple=True, help="Also measure this architecture (id, JSON or compact).")
@click.option("--layers", default=None, help="Prunable layers, inclusive: 3-29 (LLM-Pruner's end is exclusive).")
@click.option("--ratios", default="0.1,0.2,0.3,0.4,0.5", show_default=True, help="Ratio set of --sampler paper.")
@click.option("--params", "params_text", default=None, help="Random samples and --starts at this size: 5B, 550M, 80%.")
@click.option("--tolerance", default="5%", show_default=True, help="Size window of --params.")
@click.option("--starts", "with_starts", is_flag=True,
              help="Also measure the search-free starts at --params: rules of thumb, a FLAP-style global allocation "
                   "and the least-damage architectures of the sensitivity profile (measured once per base model).")
@click.option("--no-base", is_flag=True, help="Do not measure the unpruned base model.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the sampled architectures and of the calibration windows.")
@click.option("--runtime", type=click.Choice(["transformers", "llama.cpp"]), default="transformers",
              show_default=True, help="llama.cpp: measure the --gguf file (archopt prune --format gguf) in "
                                      "llama.cpp under the same protocol; the protocol records runtime and out type.")
@click.option("--gguf", "gguf_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="The GGUF file --runtime llama.cpp measures (its architecture is read from the file).")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="llama.cpp threads (default: all cores).")
@click.option("--record-to", "record_to", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="--runtime llama.cpp: write the values as a JSON Lines record for archopt ingest instead of "
                   "storing them.")
@eval_options
@pass_state
def evaluate(state: State, model_ref: str, name: str | None, samples: int, sampler: str, uniform_ratios: str | None,
             arch_texts: tuple[str, ...], layers: str | None, ratios: str, params_text: str | None, tolerance: str,
             with_starts: bool, no_base: bool, seed: int, runtime: str, gguf_path: Path | None, threads: int | None,
             record_to: Path | None, evaluation: EvalOptions) -> None:
    """Prune a base model to many architectures and measure them into the archive.

    Each result is written as soon as it is measured; a rerun skips what is there.

    \b
    Example:
      archopt evaluate --model ../shared/models/ptb-llama-8l --data-dir ../shared/data \\
          --samples 20 --uniform 0.2 --metrics ppl_wikitext2,ppl_ptb
      archopt evaluate --model ../shared/models/ptb-llama-8l --data-dir ../shared/data --params 60% --starts
      archopt evaluate --model ptb-llama-8l --runtime llama.cpp --gguf pruned-80.gguf --metrics ppl_wikitext2 \\
          --data-dir ../shared/data --max-tokens 8192
    """
    if runtime == "llama.cpp" or gguf_path is not None or record_to is not None:
        if runtime != "llama.cpp":
            raise UserError("--gguf and --record-to go with --runtime llama.cpp")
        from .gguf import evaluate_gguf
        evaluate_gguf(state, model_ref, gguf_path, evaluation, threads, record_to)
        return
    from archopt.archdb.arch import full, parse_layer_range
    from archopt.archdb.sizes import parse_size, parse_tolerance
    from archopt.optimizer.campaign import Campaign
    from archopt.optimizer.samplers import sample_architectures, uniform_baselines
    if with_starts and not params_text:
        raise UserError("--starts needs --params SIZE")
    from archopt.evaluators.hub import check_model_source, check_text_sources
    check_model_source(model_ref)  # before torch: a missing path or an unreachable hub is one line at once
    check_text_sources(evaluation.data_dir, metric_list(evaluation.metrics))
    settings = evaluation.settings(seed)
    uniform_values = floats(uniform_ratios, "--uniform")
    ratio_values = floats(ratios, "--ratios")
    tol = parse_tolerance(tolerance)
    state.err.print(f"loading {model_ref} on {settings.device} ...")
    campaign = Campaign(state.archive, model_ref, settings, name)
    spec = campaign.base.spec
    layer_idx = parse_layer_range(layers, spec.num_layers) if layers else None
    target = parse_size(params_text, spec.total_params) if params_text else None
    archs: list[tuple[Any, str]] = []
    if not no_base:
        archs.append((full(spec), "base"))
    archs += [(a, "uniform") for a in uniform_baselines(spec, uniform_values, layer_idx)]
    archs += [(parse_arch(state, campaign.name, spec, t), "ingest") for t in arch_texts]
    if with_starts:
        from archopt.optimizer.starts import start_origin, strong_starts, summary
        found = strong_starts(spec, target, campaign.importance.kv_group, campaign.importance.channel)
        found += profile_starts(state, campaign, int(target * (1 - tol)), target)
        for rule, arch in found:
            state.err.print(f"start {rule}: {summary(arch)}", markup=False)
        archs += [(a, start_origin(rule)) for rule, a in found]
    if samples:
        archs += [(a, "random") for a in sample_architectures(
            spec, samples, sampler, seed=seed, layers=layer_idx, ratios=ratio_values or (0.1, 0.2, 0.3, 0.4, 0.5),
            target_params=target, tolerance=tol)]
    report = run_campaign(state, campaign, archs, f"evaluating {campaign.name}")
    failed = f", {report.failed} with a failed run (archopt show ID says why)" if report.failed else ""
    state.out.print(f"{campaign.name}: {report.evaluated} architectures measured, {report.skipped} already in the "
                    f"archive{failed}")


def profile_starts(state: State, campaign: Any, lo: int, target: int) -> list[tuple[str, Any]]:
    """The least-damage architectures in ``[lo, target]`` of the base model's sensitivity profile
    on the first perplexity measured, else on ``kl_base`` (measured once per base model and
    protocol, then read from the archive); none without either or a protocol long enough for a
    cheaper fidelity."""
    from archopt.optimizer.profile import damage_scale
    from archopt.optimizer.profile import profile_starts as solve_starts
    from archopt.optimizer.verify import measure_profile
    metrics = campaign.settings.metrics
    metric = next((m for m in metrics if m.startswith("ppl")), None) or \
        next((m for m in metrics if damage_scale(m) is not None), None)
    if metric is None:
        return []

    def progress(i: int, n: int, result: Any) -> None:
        if i + 1 == n or (i + 1) % 25 == 0:
            state.err.print(f"sensitivity profile: {i + 1}/{n} single-layer variants on a cheap fidelity of {metric}")
    profile = measure_profile(campaign, metric, on_result=progress)
    return solve_starts(profile, lo, target) if profile is not None else []


def parse_arch(state: State, model_name: str, spec: Any, text: str) -> Any:
    """An architecture given as an archive id (prefix), a JSON file, or any written form."""
    from archopt.archdb.arch import from_layer_dicts, parse_architecture
    stripped = text.strip()
    if 8 <= len(stripped) <= 64 and all(c in "0123456789abcdef" for c in stripped.lower()):
        from archopt.archdb.reads import get_base_model, resolve_arch
        with state.archive.read() as session:
            row = resolve_arch(session, stripped, get_base_model(session, model_name))
            return from_layer_dicts(spec, json.loads(row.encoding))
    path = Path(stripped)
    if stripped[:1] not in "[{" and path.suffix == ".json" and path.is_file():
        data = json.loads(path.read_text())
        if isinstance(data, dict) and "architecture" in data:  # an archopt.json
            data = data["architecture"]
        return parse_architecture(spec, data)
    return parse_architecture(spec, stripped)


@click.command()
@click.option("--model", "-m", "model_ref", required=True, help="Base model: registered name, path or hub id.")
@click.option("--arch", "arch_text", required=True, help="Architecture: archive id (prefix), JSON file or string.")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path),
              help="Directory to write (created if missing); with --format gguf, the .gguf file.")
@click.option("--format", "out_format", type=click.Choice(["dir", "gguf"]), default="dir", show_default=True,
              help="dir: safetensors + remote code for transformers; gguf: one file for llama.cpp (Ollama, "
                   "LM Studio), llama.cpp's deci layout with per-layer shapes.")
@click.option("--outtype", type=click.Choice(["f32", "f16", "bf16", "q8_0"]), default=None,
              help="GGUF tensor type (--format gguf; default f16).")
@click.option("--importance", type=click.Choice(["taylor", "l2"]), default=None,
              help="Default: the criterion the archive recorded for this architecture, else taylor.")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Local data (calibration text for taylor).")
@click.option("--device", default="cpu", show_default=True, help="Where to load and prune: cpu or cuda.")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default=None,
              help="dtype of the saved weights (default: the loaded dtype).")
@click.option("--weights", default=None, help="Where the base weights are (default: the archive's location).")
@pass_state
def prune(state: State, model_ref: str, arch_text: str, out_dir: Path, out_format: str, outtype: str | None,
          importance: str | None, data_dir: Path | None, device: str, dtype: str | None, weights: str | None) -> None:
    """Write a pruned model: safetensors, config with per-layer shapes, modeling code, archopt.json, tokenizer.

    The directory loads without archopt: AutoModelForCausalLM.from_pretrained(OUT,
    trust_remote_code=True) runs the modeling_archopt.py written beside the weights (the base
    family's transformers classes, narrowed per layer). lm-eval takes it as
    --model_args pretrained=OUT,trust_remote_code=True, and `archopt ingest` of its results file
    lands on this architecture. --format gguf writes one GGUF file instead (tokenizer and
    archopt.json's provenance inside) that llama.cpp, Ollama and LM Studio run.

    \b
    Example:
      archopt prune --model ptb-llama-8l --arch 3f2a9c1b --out pruned-80pct --dtype bfloat16
      archopt prune --model ptb-llama-8l --arch 3f2a9c1b --format gguf --out pruned-80.gguf --outtype q8_0
    """
    from archopt.commands.gguf import check_prune_output
    check_prune_output(out_dir, out_format, outtype, dtype)
    from archopt.archdb import reads
    from archopt.archdb.reads import arch_pruning, get_base_model
    from archopt.evaluators.hub import check_model_source
    from archopt.optimizer.campaign import cache_dir
    from archopt.archdb.store import spec_of
    location = weights
    registered = registered_hash = spec = None
    with state.archive.read() as session:
        try:
            row = get_base_model(session, model_ref)
            registered, location = row.name, location or row.location
            registered_hash, spec = row.config_hash, spec_of(row)
        except reads.NotFound:
            if not Path(model_ref).is_dir() and "/" not in model_ref:
                raise
    location = location or model_ref
    if weights:
        check_model_source(location, f"--weights {location}")
    elif registered:
        check_model_source(location, f"the weights of {registered} ({location}, the archive's location; "
                                     "--weights DIR overrides)")
    else:
        check_model_source(location)
    if data_dir is not None and not data_dir.is_dir():
        raise UserError(f"--data-dir {data_dir}: no such directory")
    known: tuple[str | None, str | None] = (None, None)
    if registered:  # what the archive recorded for this architecture: criterion and calibration
        arch = parse_arch(state, registered, spec, arch_text)
        with state.archive.read() as session:
            known = arch_pruning(session, get_base_model(session, registered), [arch.arch_id(registered)]).get(
                arch.arch_id(registered), (None, None))
    importance = importance or known[0] or "taylor"
    label = known[1] if importance == known[0] else None  # the calibration this architecture was measured with
    if importance == "taylor" and data_dir is None and registered_hash:
        _check_calibration_source(registered, registered_hash, label)
    quiet_libraries()
    from archopt import evaluators as ev
    base = ev.load_base_model(location, device=device)
    name = registered or base.name
    arch = parse_arch(state, name, base.spec, arch_text)
    imp = ev.compute_importance(base, importance, cache_dir=cache_dir() / "importance",
                                data_dir=str(data_dir) if data_dir else None, calibration_label=label,
                                **calibration_options(label))
    if label and imp.calibration_label() != label:
        raise UserError(f"architecture {arch.arch_id(name)[:12]} was measured with {importance} importance calibrated "
                        f"on {label}, this prune calibrates on {imp.calibration_label()}: pass the --data-dir it "
                        "was measured with")
    model = ev.prune_model(base, arch, imp, lazy=True)  # slices formed as they are written (gguf: via a directory)
    if out_format == "gguf":
        from archopt.commands.gguf import write_gguf
        write_gguf(state, model, base, arch, imp, out_dir, outtype, name)
        return
    ev.save_pruned(model, base, arch, imp, out_dir, dtype=dtype, base_name=name)
    state.out.print(f"wrote {out_dir}: {arch.params:,} params ({100 * arch.fraction():.1f}% of {name}), "
                    f"architecture {arch.arch_id(name)[:12]}; load it with "
                    f"AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True)")


def _check_calibration_source(model: str, config_hash: str, label: str | None) -> None:
    """Before loading the model: a Taylor importance that is not in the cache needs calibration
    text; without --data-dir, a hub that cannot give it is one line at once."""
    from archopt.evaluators.cache import may_hold
    from archopt.evaluators.hub import CALIBRATION_DATASET, SourceError, check_dataset
    from archopt.optimizer.campaign import cache_dir
    folder = cache_dir() / "importance"
    if may_hold(folder, "taylor", config_hash, label):
        return
    try:
        check_dataset(CALIBRATION_DATASET)
    except SourceError as exc:
        raise SourceError(f"taylor importance of {model} is not cached here ({folder}) and needs its calibration "
                          f"text: {exc}") from None


def calibration_options(label: str | None) -> dict[str, int]:
    """``samples``, ``seq_len`` and ``seed`` of a calibration label (``ptb_text_only:train/10x64/seed0/
    sha256:...``, as the archive records it); empty when there is none or it reads otherwise."""
    import re
    found = re.search(r"/(\d+)x(\d+)/seed(-?\d+)/", label or "")
    if found is None:
        return {}
    return {"samples": int(found[1]), "seq_len": int(found[2]), "seed": int(found[3])}

