"""The ``archopt`` command line: parses arguments, makes one library call, prints the result.

No SQL and no torch here: heavy modules are imported inside the commands that need them, so
``archopt --help`` and ``archopt query`` stay fast.
"""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path
from typing import Any, Sequence

import click
from rich.console import Console
from rich.table import Table

from .archdb.arch import ArchitectureError
from .archdb.archive import Archive, ArchiveError
from .archdb.formats import FormatError
from .archdb.protocol import ProtocolError
from .archdb.reads import NotFound
from .archdb.errors import ArchoptError
from .archdb.sizes import SizeError, format_size
from .archdb.store import StoreError

USER_ERRORS = (ArchoptError, ArchiveError, FormatError, NotFound, SizeError, ArchitectureError, StoreError, ProtocolError,
               click.UsageError)


class UserError(click.ClickException):
    """A one-line error for the user."""


class State:
    """What every command shares: the archive URL (opened on first use, closed at exit) and output."""

    def __init__(self, db: str | None, debug: bool) -> None:
        self.db = db
        self.debug = debug
        self._archive: Archive | None = None
        self.out = Console(highlight=False)
        self.err = Console(stderr=True, highlight=False)
        for console in (self.out, self.err):
            if not console.is_terminal:
                console.width = 160  # pipes and logs: wide enough for a Pareto table

    @property
    def archive(self) -> Archive:
        if self._archive is None:
            self._archive = Archive(self.db)
        return self._archive

    def close(self) -> None:
        if self._archive is not None:
            self._archive.close()


pass_state = click.make_pass_decorator(State)


def emit(state: State, rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]],
         as_json: bool, document: Any = None, title: str | None = None) -> None:
    """Print ``rows`` as a rich table of ``columns`` (key, header), or ``document`` as JSON."""
    if as_json:
        click.echo(json.dumps(document if document is not None else list(rows), indent=2, allow_nan=False))
        return
    table = Table(title=title, show_lines=False)
    for _, header in columns:
        table.add_column(header, overflow="fold")
    for row in rows:
        table.add_row(*[_cell(row.get(key)) for key, _ in columns])
    state.out.print(table)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def server_options(func: Any) -> Any:
    """``--server URL`` and ``--token``: make the same call to an archopt service instead of the archive."""
    func = click.option("--token", envvar="ARCHOPT_TOKEN", default=None, metavar="TOKEN",
                        help="Bearer token for writes to --server (default: $ARCHOPT_TOKEN).")(func)
    return click.option("--server", envvar="ARCHOPT_SERVER", default=None, metavar="URL",
                        help="Ask an archopt service (archopt serve) at URL instead of --db "
                             "(default: $ARCHOPT_SERVER).")(func)


def _client(server: str, token: str | None) -> Any:
    from .service.client import Client
    return Client(server, token)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--db", envvar="ARCHOPT_DB", default=None, metavar="URL",
              help="Archive database URL (default: $ARCHOPT_DB, else sqlite:///archopt.db).")
@click.option("--debug", is_flag=True, help="Show tracebacks on errors.")
@click.version_option(package_name="archopt", prog_name="archopt")
@click.pass_context
def cli(ctx: click.Context, db: str | None, debug: bool) -> None:
    """archopt: find the best pruned LLM for a size target.

    \b
    Example:
      archopt ingest examples/ptb-llama-8l.jsonl
      archopt query --model ptb-llama-8l --params 80%
    """
    state = State(db, debug)
    ctx.obj = state
    ctx.call_on_close(state.close)


# --- db -------------------------------------------------------------------------------------------
@cli.group()
def db() -> None:
    """Archive schema: upgrade, current version.

    \b
    Example:
      archopt db upgrade
    """


@db.command("upgrade")
@click.option("--revision", default="head", show_default=True, help="Target revision.")
@pass_state
def db_upgrade(state: State, revision: str) -> None:
    """Create or migrate the archive schema.

    \b
    Example:
      archopt --db postgresql://user@host/archopt db upgrade
    """
    archive = Archive(state.db, check_schema=False)
    try:
        before = archive.current_revision()
        archive.upgrade(revision)
        after = archive.current_revision()
    finally:
        archive.close()
    click.echo(f"archive {archive.url.split('@')[-1]}: {before or 'empty'} -> {after}")
    if archive.dialect == "postgresql":
        from .optimizer.jobs import upgrade_queue_schema
        created = upgrade_queue_schema(archive.url)
        click.echo(f"job queue (schema procrastinate): {'created' if created else 'up to date'}")


@db.command("current")
@pass_state
def db_current(state: State) -> None:
    """Print the archive's schema version and the newest this archopt knows.

    \b
    Example:
      archopt db current
    """
    from .archdb.archive import head_revision
    archive = Archive(state.db, check_schema=False)
    try:
        current = archive.current_revision()
    finally:
        archive.close()
    head = head_revision(archive.url)
    status = "up to date" if current == head else ("empty" if current is None else "behind: run archopt db upgrade")
    click.echo(f"{current or '-'} (head {head}, {status})")


@db.command("downgrade")
@click.argument("revision")
@pass_state
def db_downgrade(state: State, revision: str) -> None:
    """Migrate the schema down to REVISION (``base`` removes every archopt table).

    \b
    Example:
      archopt db downgrade 0001_initial
    """
    archive = Archive(state.db, check_schema=False)
    try:
        archive.downgrade(revision)
        click.echo(f"archive now at {archive.current_revision() or 'base'}")
    finally:
        archive.close()


@db.command("check")
@click.option("--json", "as_json", is_flag=True)
@pass_state
def db_check(state: State, as_json: bool) -> None:
    """Check the archive: database integrity, foreign keys, hashes, parameter counts, artifacts.

    Exits non-zero when a problem is found.

    \b
    Example:
      archopt db check
    """
    from .archdb.maintenance import check
    report = check(state.archive)
    if as_json:
        click.echo(json.dumps({"ok": report.ok, "checked": report.checked, "problems": report.problems}, indent=2))
    else:
        counts = ", ".join(f"{v} {k}" for k, v in report.checked.items())
        for problem in report.problems:
            state.out.print(f"problem: {problem}", markup=False)
        state.out.print(f"{'ok' if report.ok else f'{len(report.problems)} problem(s)'}: checked {counts}")
    if not report.ok:
        sys.exit(1)


@db.command("backup")
@click.argument("destination", type=click.Path(dir_okay=False, path_type=Path))
@pass_state
def db_backup(state: State, destination: Path) -> None:
    """Copy a SQLite archive to DESTINATION with the online backup API (safe while others write).

    For PostgreSQL it prints the pg_dump command to use instead.

    \b
    Example:
      archopt db backup backups/archopt-2026-11-24.db
    """
    from .archdb.maintenance import backup
    path = backup(state.archive, destination)
    click.echo(f"backed up to {path}")


# --- ingest / export ------------------------------------------------------------------------------
@cli.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["jsonl", "csv", "lmeval"]), default=None,
              help="File format (default: from the extension and contents).")
@click.option("--allow-limit", is_flag=True, help="Accept lm-eval results evaluated with --limit.")
@server_options
@pass_state
def ingest(state: State, files: tuple[Path, ...], fmt: str | None, allow_limit: bool, server: str | None,
           token: str | None) -> None:
    """Add evaluations from JSONL, CSV or lm-evaluation-harness results files.

    Each file is one transaction: all of it or nothing. Re-ingesting adds nothing. With --server the
    file is sent to the service (an lm-eval file's model path is then looked up on the server).

    \b
    Example:
      archopt ingest examples/ptb-llama-8l.jsonl results.csv lm_eval_results.json
      archopt ingest --server http://archopt.lab:8000 --token "$TOKEN" results.csv
    """
    from .archdb.ingest import ingest_file
    from .service.documents import ingest_document, ingest_line
    client = _client(server, token) if server else None
    for path in files:
        if client is not None:
            try:
                data = path.read_bytes()
            except OSError as exc:
                raise FormatError(str(path), None, f"cannot read: {exc.strerror or exc}") from None
            doc = client.post_bytes("/v1/evaluations", data, "application/octet-stream", format=fmt,
                                    allow_limit=allow_limit or None, filename=str(path))
        else:
            doc = ingest_document(str(path), ingest_file(state.archive, path, fmt=fmt, allow_limit=allow_limit))
        state.out.print(ingest_line(doc))


@cli.command()
@click.option("--model", "-m", default=None, help="Only this base model.")
@click.option("--format", "fmt", type=click.Choice(["jsonl", "csv"]), default="jsonl", show_default=True)
@click.option("--output", "-o", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="File (default: stdout).")
@pass_state
def export(state: State, model: str | None, fmt: str, output: Path | None) -> None:
    """Write the archive (or one model) in an ingestable format.

    \b
    Example:
      archopt export --model ptb-llama-8l --format csv -o archive.csv
    """
    from .archdb.formats import write_csv, write_jsonl
    from .archdb.reads import export_records
    writer = write_csv if fmt == "csv" else write_jsonl
    with state.archive.read() as session:
        records = list(export_records(session, model))
    if output is None:
        writer(records, sys.stdout)
    else:
        tmp = output.with_name(output.name + ".tmp")
        with open(tmp, "w", encoding="utf-8", newline="") as handle:
            writer(records, handle)
        tmp.replace(output)


# --- listings -------------------------------------------------------------------------------------
@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@server_options
@pass_state
def models(state: State, as_json: bool, server: str | None, token: str | None) -> None:
    """List base models with their architecture and evaluation counts.

    \b
    Example:
      archopt models --json
      archopt models --server http://127.0.0.1:8000
    """
    if server:
        doc = _client(server, token).get("/v1/models")
    else:
        from .service.documents import models_document
        doc = models_document(state.archive)
    emit(state, doc["models"], [("name", "model"), ("family", "family"), ("shape", "layers/heads"),
                                ("size", "params"), ("tied", "tied emb"), ("archs", "archs"),
                                ("evaluations", "evaluations")], as_json, doc)


def _metric_cells(view: dict[str, Any]) -> dict[str, Any]:
    return {k: v["value"] for k, v in view["metrics"].items()}


@cli.command()
@click.option("--model", "-m", required=True, help="Base model (name, path or hub id).")
@click.option("--sort", default=None, help="Sort best-first by this metric (e.g. ppl_wikitext2).")
@click.option("--protocol", type=int, default=None, help="Protocol id for --sort (default: most used).")
@click.option("--limit", type=click.IntRange(min=1), default=None)
@click.option("--offset", type=click.IntRange(min=0), default=0)
@click.option("--json", "as_json", is_flag=True, help="Print the archopt.archs/1 JSON document.")
@server_options
@pass_state
def archs(state: State, model: str, sort: str | None, protocol: int | None, limit: int | None, offset: int,
          as_json: bool, server: str | None, token: str | None) -> None:
    """List the architectures of a base model with their measured metrics.

    \b
    Example:
      archopt archs --model ptb-llama-8l --sort ppl_wikitext2 --limit 10
    """
    if server:
        doc = _client(server, token).get(f"/v1/models/{model}/archs", sort=sort, protocol=protocol, limit=limit,
                                         offset=offset or None)
    else:
        from .service.documents import archs_document
        doc = archs_document(state.archive, model, sort, protocol, limit, offset)
    known, views, name = doc["metrics"], doc["archs"], doc["model"]
    shown = [m for m in ("ppl_wikitext2", "ppl_ptb", "mmlu") if m in known] or known[:3]
    rows = [{"id": v["arch_id"][:12], "params": format_size(v["params"]), "pct": f"{100 * v['fraction']:.1f}%",
             "origin": v["origin"], "sketch": v["sketch"], **_metric_cells(v)} for v in views]
    emit(state, rows, [("id", "arch"), ("params", "params"), ("pct", "% base"), ("origin", "origin"),
                       *[(mname, mname) for mname in shown], ("sketch", "per-layer kept (A attn, M mlp)")],
         as_json, doc, title=f"{name}: {len(views)} architectures")


@cli.command()
@click.argument("arch_id")
@click.option("--model", "-m", default=None, help="Base model, if the id prefix is ambiguous.")
@click.option("--json", "as_json", is_flag=True)
@pass_state
def show(state: State, arch_id: str, model: str | None, as_json: bool) -> None:
    """Show one architecture: per-layer heads and channels, and every measured value.

    \b
    Example:
      archopt show 3f2a9c1b
    """
    from .service.documents import arch_document
    view = arch_document(state.archive, arch_id, model)
    spec = view["base"]
    spec_heads, spec_kv, spec_inter = spec["num_heads"], spec["num_kv_heads"], spec["intermediate_size"]
    if as_json:
        click.echo(json.dumps(view, indent=2))
        return
    state.out.print(f"[bold]{view['arch_id']}[/] of {view['model']}: {view['params']:,} params "
                    f"({100 * view['fraction']:.2f}% of base), origin {view['origin']}")
    table = Table()
    for header in ("layer", "q heads", "kv heads", "intermediate", "attn kept", "mlp kept"):
        table.add_column(header, justify="right")
    for layer in view["layers"]:
        if layer["dropped"]:
            table.add_row(str(layer["layer"]), "dropped", "", "", "", "")
        else:
            table.add_row(str(layer["layer"]), f"{layer['q_heads']}/{spec_heads}", f"{layer['kv_heads']}/{spec_kv}",
                          f"{layer['intermediate']}/{spec_inter}", _bar(layer["kv_heads"] / spec_kv),
                          _bar(layer["intermediate"] / spec_inter))
    state.out.print(table)
    values_table = Table(title="measured")
    for header in ("evaluation", "metric", "value", "protocol"):
        values_table.add_column(header)
    for v in view["all_values"]:
        p = v["protocol"]
        desc = "/".join(str(x) for x in (p["dataset"], p["split"], f"seq{p['seq_len']}" if p["seq_len"] else "",
                                           f"{p['tokens']}tok" if p["tokens"] else "",
                                           f"{p['shots']}-shot" if p["shots"] is not None else "") if x)
        values_table.add_row(str(v["evaluation"]), v["metric"], f"{v['value']:.4g}", f"#{p['id']} {desc}")
    state.out.print(values_table)


def _bar(fraction: float, width: int = 10) -> str:
    filled = int(round(fraction * width))
    return "█" * filled + "·" * (width - filled)


@cli.group()
def evaluations() -> None:
    """Manage stored evaluations (retract a bad one; nothing is ever deleted).

    \b
    Example:
      archopt evaluations retract 42 --why "wrong tokenizer"
    """


@evaluations.command("retract")
@click.argument("evaluation_ids", nargs=-1, type=int, required=True)
@click.option("--why", required=True, help="Reason, kept with the evaluation.")
@pass_state
def evaluations_retract(state: State, evaluation_ids: tuple[int, ...], why: str) -> None:
    """Mark evaluations as retracted: predictors and tables ignore them from now on.

    \b
    Example:
      archopt evaluations retract 42 43 --why "evaluated on the wrong split"
    """
    from .archdb.store import retract_evaluation
    with state.archive.write() as session:
        for eid in evaluation_ids:
            retract_evaluation(session, eid, why)
    click.echo(f"retracted {len(evaluation_ids)} evaluation(s)")


# --- evaluate / prune -----------------------------------------------------------------------------
def _floats(text: str | None, option: str) -> list[float]:
    if not text:
        return []
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"{option} takes comma-separated numbers, got {text!r}") from None


def _metric_list(text: str) -> tuple[str, ...]:
    from .archdb.protocol import METRICS
    names = tuple(dict.fromkeys(x.strip() for x in text.split(",") if x.strip()))
    for name in names:
        if name not in METRICS:
            import difflib
            close = difflib.get_close_matches(name, METRICS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f" (known: {', '.join(METRICS)})"
            raise UserError(f"unknown metric {name!r}{hint}")
    if not names:
        raise UserError("--metrics needs at least one metric")
    return names


def eval_options(func: Any) -> Any:
    """Options that define how architectures are measured (shared by evaluate and query --verify)."""
    options = [
        click.option("--metrics", default="ppl_wikitext2,ppl_ptb", show_default=True,
                     help="Comma-separated: ppl_wikitext2, ppl_ptb, mmlu."),
        click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
                     help="Local data laid out like ../shared/data (default: Hugging Face datasets)."),
        click.option("--seq-len", type=click.IntRange(min=8), default=128, show_default=True,
                     help="Perplexity window (LLM-Pruner and the paper use 128)."),
        click.option("--max-tokens", type=click.IntRange(min=1), default=None,
                     help="Evaluate perplexity on the first T tokens only (recorded in the protocol)."),
        click.option("--max-questions", type=click.IntRange(min=1), default=None,
                     help="MMLU questions per run (recorded in the protocol)."),
        click.option("--shots", type=click.IntRange(min=0), default=5, show_default=True, help="MMLU shots."),
        click.option("--ptb-split", type=click.Choice(["validation", "test"]), default="validation",
                     show_default=True, help="PTB split (LLM-Pruner reports validation)."),
        click.option("--importance", type=click.Choice(["taylor", "l2"]), default="taylor", show_default=True,
                     help="What pruning keeps: first-order Taylor (needs gradients) or L2 magnitude."),
        click.option("--device", default=None, help="cpu or cuda (default: cuda when available)."),
        click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default=None,
                     help="Weights dtype (default: float32 on CPU, bfloat16 on CUDA)."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _settings(metrics: str, data_dir: Path | None, seq_len: int, max_tokens: int | None, max_questions: int | None,
              shots: int, ptb_split: str, importance: str, device: str | None, dtype: str | None, seed: int):
    from .optimizer.campaign import EvalSettings
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()  # our own progress bar is the one to watch
    if device is None:
        import torch
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return EvalSettings(metrics=_metric_list(metrics), data_dir=str(data_dir) if data_dir else None,
                        seq_len=seq_len, max_tokens=max_tokens, max_questions=max_questions, shots=shots,
                        ptb_split=ptb_split, importance=importance, device=device, dtype=dtype, seed=seed)


def run_campaign(state: State, campaign: Any, archs: list[tuple[Any, str]], title: str) -> Any:
    """Measure ``archs`` with a progress bar (done, ETA, last PPL); returns the campaign report."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
               TextColumn("{task.fields[last]}")]
    with Progress(*columns, console=state.err, transient=False) as progress:
        task = progress.add_task(title, total=len(archs), last="")

        def on_result(i: int, n: int, result: Any) -> None:
            shown = " ".join(f"{x.metric}={x.value:.4g}" for x in result.measurements if ":" not in x.metric)
            progress.update(task, advance=1, last="skipped (in archive)" if result.skipped else shown)

        return campaign.run(archs, on_result)


@cli.command()
@click.option("--model", "-m", "model_ref", required=True, help="Local path or hub id of the base model.")
@click.option("--name", default=None, help="Name to register the base model under (default: hub id or dir name).")
@click.option("--samples", type=click.IntRange(min=0), default=0, show_default=True,
              help="How many sampled architectures to measure.")
@click.option("--sampler", type=click.Choice(["random", "paper"]), default="random", show_default=True,
              help="random: per-layer widths (attention biased toward kept); paper: ratios from --ratios.")
@click.option("--uniform", "uniform_ratios", default=None, help="Also measure uniform baselines, e.g. 0.2,0.3.")
@click.option("--arch", "arch_texts", multiple=True, help="Also measure this architecture (id, JSON or compact).")
@click.option("--layers", default=None, help="Prunable layers, inclusive: 3-29 (LLM-Pruner's end is exclusive).")
@click.option("--ratios", default="0.1,0.2,0.3,0.4,0.5", show_default=True, help="Ratio set of --sampler paper.")
@click.option("--params", "params_text", default=None, help="Random samples near this size: 5B, 550M, 80%.")
@click.option("--tolerance", default="5%", show_default=True, help="Size window of --params.")
@click.option("--no-base", is_flag=True, help="Do not measure the unpruned base model.")
@click.option("--seed", type=int, default=0, show_default=True)
@eval_options
@pass_state
def evaluate(state: State, model_ref: str, name: str | None, samples: int, sampler: str, uniform_ratios: str | None,
             arch_texts: tuple[str, ...], layers: str | None, ratios: str, params_text: str | None, tolerance: str,
             no_base: bool, seed: int, metrics: str, data_dir: Path | None, seq_len: int, max_tokens: int | None,
             max_questions: int | None, shots: int, ptb_split: str, importance: str, device: str | None,
             dtype: str | None) -> None:
    """Prune a base model to many architectures and measure them into the archive.

    Each result is written as soon as it is measured; a rerun skips what is there.

    \b
    Example:
      archopt evaluate --model ../shared/models/ptb-llama-8l --data-dir ../shared/data \\
          --samples 20 --uniform 0.2 --metrics ppl_wikitext2,ppl_ptb
    """
    from .archdb.arch import full, parse_layer_range
    from .archdb.sizes import parse_size, parse_tolerance
    from .optimizer.campaign import Campaign
    from .optimizer.samplers import sample_architectures, uniform_baselines
    settings = _settings(metrics, data_dir, seq_len, max_tokens, max_questions, shots, ptb_split, importance,
                         device, dtype, seed)
    uniform_values = _floats(uniform_ratios, "--uniform")
    ratio_values = _floats(ratios, "--ratios")
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
    archs += [(_parse_arch(state, campaign.name, spec, t), "ingest") for t in arch_texts]
    if samples:
        archs += [(a, "random") for a in sample_architectures(
            spec, samples, sampler, seed=seed, layers=layer_idx, ratios=ratio_values or (0.1, 0.2, 0.3, 0.4, 0.5),
            target_params=target, tolerance=tol)]
    report = run_campaign(state, campaign, archs, f"evaluating {campaign.name}")
    state.out.print(f"{campaign.name}: {report.evaluated} architectures measured, {report.skipped} already in the archive")


def _parse_arch(state: State, model_name: str, spec: Any, text: str) -> Any:
    """An architecture given as an archive id (prefix), a JSON file, or any written form."""
    from .archdb.arch import from_layer_dicts, parse_architecture
    stripped = text.strip()
    if 8 <= len(stripped) <= 64 and all(c in "0123456789abcdef" for c in stripped.lower()):
        from .archdb.reads import get_base_model, resolve_arch
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


@cli.command()
@click.option("--model", "-m", "model_ref", required=True, help="Base model: registered name, path or hub id.")
@click.option("--arch", "arch_text", required=True, help="Architecture: archive id (prefix), JSON file or string.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--importance", type=click.Choice(["taylor", "l2"]), default=None,
              help="Default: the criterion the archive recorded for this architecture, else taylor.")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Local data (calibration text for taylor).")
@click.option("--device", default="cpu", show_default=True)
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default=None,
              help="dtype of the saved weights (default: the loaded dtype).")
@click.option("--weights", default=None, help="Where the base weights are (default: the archive's location).")
@pass_state
def prune(state: State, model_ref: str, arch_text: str, out_dir: Path, importance: str | None,
          data_dir: Path | None, device: str, dtype: str | None, weights: str | None) -> None:
    """Write a pruned model: safetensors, config with per-layer shapes, modeling code, archopt.json, tokenizer.

    The directory loads without archopt: AutoModelForCausalLM.from_pretrained(OUT,
    trust_remote_code=True) runs the modeling_archopt.py written beside the weights (the base
    family's transformers classes, narrowed per layer). lm-eval takes it as
    --model_args pretrained=OUT,trust_remote_code=True, and `archopt ingest` of its results file
    lands on this architecture.

    \b
    Example:
      archopt prune --model ptb-llama-8l --arch 3f2a9c1b --out pruned-80pct --dtype bfloat16
    """
    from .archdb.reads import arch_importance, get_base_model
    from .optimizer.campaign import cache_dir
    from . import evaluators as ev
    location = weights
    registered = None
    with state.archive.read() as session:
        try:
            row = get_base_model(session, model_ref)
            registered, location = row.name, location or row.location
        except NotFound:
            if not Path(model_ref).is_dir() and "/" not in model_ref:
                raise
    location = location or model_ref
    base = ev.load_base_model(location, device=device)
    name = registered or base.name
    arch = _parse_arch(state, name, base.spec, arch_text)
    if importance is None:
        with state.archive.read() as session:
            known = None
            if registered:
                known = arch_importance(session, get_base_model(session, registered), arch.arch_id(name))
        importance = known or "taylor"
    imp = ev.compute_importance(base, importance, cache_dir=cache_dir() / "importance",
                                data_dir=str(data_dir) if data_dir else None)
    model = ev.prune_model(base, arch, imp)
    ev.save_pruned(model, base, arch, imp, out_dir, dtype=dtype, base_name=name)
    state.out.print(f"wrote {out_dir}: {arch.params:,} params ({100 * arch.fraction():.1f}% of {name}), "
                    f"architecture {arch.arch_id(name)[:12]}; load it with "
                    f"AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True)")


# --- query / predictors ---------------------------------------------------------------------------
def scatter(points: Sequence[tuple[float, float, str]], width: int = 60, height: int = 12,
            x_label: str = "params", y_label: str = "ppl") -> str:
    """A terminal scatter plot: each point (x, y, mark)."""
    if not points:
        return ""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)
    grid = [[" "] * width for _ in range(height)]
    for x, y, mark in points:
        col = int((x - x0) / (x1 - x0) * (width - 1))
        row = height - 1 - int((y - y0) / (y1 - y0) * (height - 1))
        grid[row][col] = mark if grid[row][col] in (" ", mark) else "#"
    lines = [f"{y1:>9.4g} ┤" + "".join(grid[0])]
    lines += ["          │" + "".join(r) for r in grid[1:-1]]
    lines.append(f"{y0:>9.4g} ┤" + "".join(grid[-1]))
    lines.append("          └" + "─" * width)
    lines.append(f"           {format_size(int(x0)):<{width // 2}}{format_size(int(x1)):>{width - width // 2}}")
    lines.append(f"           {y_label} against {x_label}; o predicted, * measured")
    return "\n".join(lines)


def print_query(state: State, doc: dict[str, Any]) -> None:
    objectives = doc["objectives"]
    served = " (served from the store)" if doc.get("served_from_store") else ""
    state.out.print(f"[bold]{doc['model']}[/] at {format_size(doc['target_params'])} "
                    f"(window {format_size(doc['window'][0])}-{format_size(doc['window'][1])}): "
                    f"{len(doc['results'])} Pareto-optimal architectures{served}")
    table = Table()
    for header in ("#", "arch", "params", "% base", *[f"{o} pred" for o in objectives],
                   *[f"{o} meas" for o in objectives], "per-layer kept (A attn, M mlp)"):
        table.add_column(header, overflow="fold")
    for r in doc["results"]:
        preds = [f"{r['predicted'][o]:.4g} ± {r['uncertainty'].get(o, 0):.2g}" for o in objectives]
        meas = [_cell(r["measured"].get(o)) for o in objectives]
        table.add_row(str(r["rank"]), r["arch_id"][:10], f"{r['params']:,}", f"{100 * r['fraction']:.1f}%",
                      *preds, *meas, r.get("sketch", ""))
    state.out.print(table)
    first = objectives[0]
    points = [(r["params"], r["predicted"][first], "o") for r in doc["results"]]
    points += [(r["params"], r["measured"][first], "*") for r in doc["results"] if r["measured"].get(first) is not None]
    state.out.print(scatter(points, y_label=first), markup=False)
    versions = ", ".join(f"{k} v{v}" for k, v in doc["predictor_versions"].items())
    stale = [k for k, v in doc.get("predictors_stale", {}).items() if v]
    retrained = doc.get("predictors_retrained") or []
    notes = (f"; retrained {', '.join(retrained)}" if retrained else "") + (
        f"; STALE (not retrained): {', '.join(stale)}" if stale else "")
    stats = doc.get("stats", {})
    scored = f", {stats['candidates_scored']:,} candidates scored" if "candidates_scored" in stats else ""
    state.out.print(f"predictors: {versions}{notes}{scored}; query #{doc['query_id']} in {doc['elapsed_ms']:.0f} ms")
    if doc.get("explain"):
        state.out.print_json(json.dumps(doc["explain"]))


@cli.command()
@click.option("--model", "-m", required=True, help="Base model (name, path or hub id).")
@click.option("--params", "params_text", required=True, help="Size target: 5B, 550M, 5.2e9 or 80% of the base.")
@click.option("--tolerance", default="2%", show_default=True, help="Results lie in [target*(1-tol), target].")
@click.option("--objectives", default="ppl_wikitext2", show_default=True,
              help="Comma-separated metrics to optimise (ppl_* minimised, mmlu maximised).")
@click.option("--top", type=click.IntRange(min=1, max=200), default=10, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--explain", is_flag=True, help="Show the refined search space (which layers matter).")
@click.option("--no-retrain", is_flag=True, help="Use the current predictors even if the archive has newer data.")
@click.option("--verify", type=click.IntRange(min=0), default=0, help="Prune and measure the top K for real.")
@click.option("--queue", "to_queue", is_flag=True,
              help="With --verify K: enqueue the top K for `archopt worker`s instead (PostgreSQL archive).")
@click.option("--rounds", type=click.IntRange(min=1), default=1, show_default=True,
              help="With --verify: rounds of query -> verify K new architectures -> retrain.")
@click.option("--explore", type=click.FloatRange(min=0.0), default=0.0, show_default=True,
              help="With --rounds > 1: verify by predicted - EXPLORE x uncertainty (active learning).")
@click.option("--screen", type=click.IntRange(min=0), default=0, show_default=True,
              help="With --rounds: measure N candidates per round on a cheap fidelity (an eighth of the "
                   "tokens) and verify the K best of those.")
@click.option("--screen-tokens", type=click.IntRange(min=2), default=None,
              help="Tokens of the cheap fidelity (default: an eighth of the full protocol's).")
@click.option("--weights", default=None, help="Base weights for --verify (default: the archive's location).")
@click.option("--json", "as_json", is_flag=True, help="Print the archopt.query/1 JSON document.")
@eval_options
@server_options
@pass_state
def query(state: State, model: str, params_text: str, tolerance: str, objectives: str, top: int, seed: int,
          explain: bool, no_retrain: bool, verify: int, to_queue: bool, rounds: int, explore: float, screen: int,
          screen_tokens: int | None, weights: str | None, as_json: bool, metrics: str,
          data_dir: Path | None, seq_len: int, max_tokens: int | None, max_questions: int | None, shots: int,
          ptb_split: str, importance: str, device: str | None, dtype: str | None, server: str | None,
          token: str | None) -> None:
    """Pareto-optimal pruned architectures of MODEL for a size target.

    Trains stale predictors first, searches over them, stores the answer; --verify K measures the
    top K for real and ingests them (the next query learns from them). With --server the service
    answers with its current predictors (it retrains stale ones in the background).

    \b
    Example:
      archopt query --model ptb-llama-8l --params 80% --top 5
      archopt query --model ptb-llama-8l --params 80% --verify 2 --data-dir ../shared/data
      archopt query --model ptb-llama-8l --params 80% --verify 4 --rounds 5 --data-dir ../shared/data
      archopt query --model ptb-llama-8l --params 80% --verify 4 --rounds 5 --screen 24 --data-dir ../shared/data
      archopt query --model ptb-llama-8l --params 80% --server http://127.0.0.1:8000
    """
    objective_names = tuple(x.strip() for x in objectives.split(",") if x.strip())
    if to_queue:
        if not verify or rounds > 1 or server:
            raise UserError("--queue goes with --verify K (one round, without --server)")
        _queue_url(state)
    if screen_tokens and not screen:
        raise UserError("--screen-tokens goes with --screen N")
    if screen and not verify:
        raise UserError("--screen goes with --verify K (and --rounds R)")
    if rounds > 1 or screen:
        if not verify or server:
            raise UserError("--rounds and --screen need --verify K (and run on this machine, without --server)")
        eval_args = (weights, metrics, data_dir, seq_len, max_tokens, max_questions, shots, ptb_split, importance,
                     device, dtype, seed)
        _query_rounds(state, model, params_text, tolerance, objective_names, top, seed, not no_retrain, verify,
                      rounds, explore, as_json,
                      lambda d, k, campaigns: verify_results(state, d, k, *eval_args, show=not as_json,
                                                             campaigns=campaigns),
                      lambda d, campaigns: verify_campaign(state, d, *eval_args, campaigns), screen, screen_tokens)
        return
    if server:
        if verify:
            raise UserError("--verify measures on this machine: run it without --server")
        body = {"model": model, "params": params_text, "tolerance": tolerance, "objectives": list(objective_names),
                "top": top, "seed": seed, "explain": explain}
        doc = _client(server, token).query(body, on_wait=lambda message: state.err.print(message))
    else:
        from .optimizer.query import QueryRequest, run_query
        request = QueryRequest(model=model, params=params_text, tolerance=tolerance, objectives=objective_names,
                               top=top, seed=seed, explain=explain, retrain=not no_retrain)
        doc = run_query(state.archive, request)
    if as_json and not verify:
        click.echo(json.dumps(doc, indent=2))
        return
    if not as_json:
        print_query(state, doc)
    if verify and to_queue:
        doc["queued"] = _queue_verify(state, doc, verify, weights, metrics, data_dir, seq_len, max_tokens,
                                      max_questions, shots, ptb_split, importance, dtype, seed)
        if as_json:
            click.echo(json.dumps(doc, indent=2))
    elif verify:
        doc["verified"] = verify_results(state, doc, verify, weights, metrics, data_dir, seq_len, max_tokens,
                                         max_questions, shots, ptb_split, importance, device, dtype, seed,
                                         show=not as_json)
        if as_json:
            click.echo(json.dumps(doc, indent=2))


def _queue_verify(state: State, doc: dict[str, Any], k: int, weights: str | None, metrics: str,
                  data_dir: Path | None, seq_len: int, max_tokens: int | None, max_questions: int | None, shots: int,
                  ptb_split: str, importance: str, dtype: str | None, seed: int) -> dict[str, Any]:
    """``query --verify K --queue``: enqueue the top K under the predictors' protocols; returns the job ids."""
    from .archdb.arch import from_layer_dicts
    from .archdb.reads import get_base_model, protocol_dict
    from .archdb.store import spec_of
    with state.archive.read() as session:
        spec = spec_of(get_base_model(session, doc["model"]))
        protocols = {mname: protocol_dict(session, pid) for mname, pid in doc.get("predictor_protocols", {}).items()}
    for mname, p in protocols.items():  # the same protocol choice as verify_results
        if mname.startswith("ppl"):
            seq_len = p.get("seq_len") or seq_len
            max_tokens = p.get("tokens") or max_tokens
            if mname == "ppl_ptb" and p.get("split") in ("validation", "test"):
                ptb_split = p["split"]
        elif mname == "mmlu":
            max_questions = p.get("questions") or max_questions
            shots = p["shots"] if p.get("shots") is not None else shots
    wanted = tuple(dict.fromkeys([*doc["objectives"], *[x for x in metrics.split(",") if x.strip()]]))
    settings = _settings(",".join(wanted), data_dir, seq_len, max_tokens, max_questions, shots, ptb_split,
                         importance, "cpu", dtype, seed)
    archs = [(from_layer_dicts(spec, r["layers"]), "verify") for r in doc["results"][:k]]
    report = _submit(state, doc["model"], archs, settings, weights, 0, console=state.err)
    return {"jobs": report.enqueued, "in_archive": report.in_archive, "in_queue": report.in_queue}


def _query_rounds(state: State, model: str, params_text: str, tolerance: str, objectives: tuple[str, ...],
                  top: int, seed: int, retrain: bool, verify: int, rounds: int, explore: float, as_json: bool,
                  verify_fn: Any, campaign_fn: Any = None, screen: int = 0, screen_tokens: int | None = None) -> None:
    """``query --verify K --rounds R [--screen N]``: optimizer.loop.verify_loop, measuring with one
    loaded model (``campaign_fn(doc, campaigns)`` gives it for screening)."""
    from .optimizer.loop import verify_loop
    from .optimizer.query import QueryRequest
    request = QueryRequest(model=model, params=params_text, tolerance=tolerance, objectives=objectives,
                           top=top, seed=seed, retrain=retrain)
    campaigns: dict[Any, Any] = {}
    verified: list[Any] = []

    def measure(archs: list[Any], picks: list[dict[str, Any]], doc: dict[str, Any]) -> None:
        if not as_json:
            state.err.print(f"round: verifying {len(picks)} of query #{doc['query_id']} "
                            f"(predictors {', '.join(f'{k} v{v}' for k, v in doc['predictor_versions'].items())})")
        got = verify_fn({**doc, "results": picks}, len(picks), campaigns)
        if not got:
            raise UserError("verification measured nothing (see above); stopping the rounds")
        verified.extend(got)

    def measure_cheap(archs: list[Any], picks: list[dict[str, Any]], doc: dict[str, Any]) -> list[float | None]:
        found = campaign_fn(doc, campaigns)
        if found is None:
            raise UserError("screening cannot load the base model (see above); stopping the rounds")
        campaign, _ = found
        obj = objectives[0]
        if campaign.screener is None:
            from .optimizer.campaign import CampaignError
            try:
                key = campaign.enable_screening(obj, screen_tokens)
            except CampaignError as exc:
                raise UserError(str(exc)) from None
            lo, hi = doc["window"]
            paired = campaign.calibrate_screening(obj, int(lo * 0.95), int(hi * 1.05))
            if not as_json:
                tokens = campaign.screener.tasks[obj].protocol.tokens
                state.err.print(f"screening {obj} on {tokens:,} tokens (protocol {key[:12]}); "
                                f"{paired} archived architectures measured on it for pairing")
        if not as_json:
            state.err.print(f"round: screening {len(archs)} candidates of query #{doc['query_id']}")
        return campaign.screen_values(archs, obj)

    report = verify_loop(state.archive, request, verify=verify, rounds=rounds, measure=measure, explore=explore,
                         screen=screen, measure_cheap=measure_cheap if screen else None)
    import dataclasses
    from .optimizer.query import run_query
    # the final answer, from predictors that learned from every round
    doc = run_query(state.archive, dataclasses.replace(request, seed=seed + len(report.rounds)))
    doc["verified"] = verified
    doc["rounds"] = report.to_dict()
    if as_json:
        click.echo(json.dumps(doc, indent=2))
        return
    print_query(state, doc)
    obj = objectives[0]
    best = min((v for v in verified if v["measured"].get(obj) is not None),
               key=lambda v: v["measured"][obj] * (1 if obj.startswith(("ppl", "kl")) else -1), default=None)
    state.out.print(f"{len(report.rounds)} rounds, {len(verified)} architectures verified ({report.stopped})"
                    + (f", {report.screened} screened" if screen else "")
                    + (f"; best measured {obj} = {best['measured'][obj]:.4g} ({best['arch_id'][:12]})" if best else ""))


def verify_campaign(state: State, doc: dict[str, Any], weights: str | None, metrics: str,
                    data_dir: Path | None, seq_len: int, max_tokens: int | None, max_questions: int | None,
                    shots: int, ptb_split: str, importance: str, device: str | None, dtype: str | None, seed: int,
                    campaigns: dict[Any, Any] | None = None) -> tuple[Any, Any] | None:
    """(Campaign, base spec) measuring under the query's predictor protocols, or None (said why)."""
    from .archdb.reads import get_base_model
    from .optimizer.campaign import Campaign, CampaignError
    with state.archive.read() as session:
        base = get_base_model(session, doc["model"])
        location = weights or base.location
        from .archdb.store import spec_of
        spec = spec_of(base)
    if not location or not (Path(location).is_dir() or ("/" in location and not Path(location).exists()
                                                          and not location.startswith((".", "/")))):
        state.err.print(f"cannot verify: the weights of {doc['model']} are not reachable "
                        f"({location or 'no location recorded'}); pass --weights PATH")
        return None
    # Measure under the predictors' own protocols, so the next query learns from the results.
    from .archdb.reads import protocol_dict
    with state.archive.read() as session:
        protocols = {mname: protocol_dict(session, pid) for mname, pid in doc.get("predictor_protocols", {}).items()}
    for mname, p in protocols.items():
        if mname.startswith("ppl"):
            seq_len = p.get("seq_len") or seq_len
            max_tokens = p.get("tokens") or max_tokens
            if mname == "ppl_ptb" and p.get("split") in ("validation", "test"):
                ptb_split = p["split"]
        elif mname == "mmlu":
            max_questions = p.get("questions") or max_questions
            shots = p["shots"] if p.get("shots") is not None else shots
    wanted = tuple(dict.fromkeys([*doc["objectives"], *[x for x in metrics.split(",") if x.strip()]]))
    settings = _settings(",".join(wanted), data_dir, seq_len, max_tokens, max_questions, shots, ptb_split,
                         importance, device, dtype, seed)
    key = (location, settings, doc["model"])
    campaign = campaigns.get(key) if campaigns is not None else None
    if campaign is None:
        try:
            campaign = Campaign(state.archive, location, settings, doc["model"])
        except (CampaignError, OSError) as exc:
            state.err.print(f"cannot verify: {str(exc).splitlines()[0]}")
            return None
        if campaigns is not None:
            campaigns[key] = campaign
    return campaign, spec


def verify_results(state: State, doc: dict[str, Any], k: int, weights: str | None, metrics: str,
                   data_dir: Path | None, seq_len: int, max_tokens: int | None, max_questions: int | None, shots: int,
                   ptb_split: str, importance: str, device: str | None, dtype: str | None, seed: int,
                   show: bool = True, campaigns: dict[Any, Any] | None = None) -> list[Any]:
    """Measure the top ``k`` of a query for real; prints predicted against measured (``show``).

    ``campaigns``: a dict kept across calls (rounds) so the base model is loaded once per settings."""
    from .archdb.arch import from_layer_dicts
    found = verify_campaign(state, doc, weights, metrics, data_dir, seq_len, max_tokens, max_questions, shots,
                            ptb_split, importance, device, dtype, seed, campaigns)
    if found is None:
        return []
    campaign, spec = found
    top = doc["results"][:k]
    archs = [(from_layer_dicts(spec, r["layers"]), "verify") for r in top]
    report = run_campaign(state, campaign, archs, "verifying")
    by_id = {res.arch_id: res for res in report.results}
    table = Table(title="predicted against measured")
    for header in ("#", "arch", *[f"{o} pred" for o in doc["objectives"]], *[f"{o} meas" for o in doc["objectives"]]):
        table.add_column(header)
    out = []
    from .archdb.reads import get_base_model as _gb, live_metrics, resolve_arch
    with state.archive.read() as session:
        base = _gb(session, doc["model"])
        for r in top:
            row = resolve_arch(session, r["arch_id"], base)
            values = live_metrics(session, [row.id]).get(row.id, {})
            measured = {o: (values[o][-1].value if o in values else None) for o in doc["objectives"]}
            for mm in by_id[r["arch_id"]].measurements:
                if mm.metric in measured:
                    measured[mm.metric] = mm.value
            out.append({"arch_id": r["arch_id"], "predicted": r["predicted"], "measured": measured})
            table.add_row(str(r.get("rank") or "n"), r["arch_id"][:10], *[f"{r['predicted'][o]:.4g}" for o in doc["objectives"]],
                          *[_cell(measured[o]) for o in doc["objectives"]])
    if show:
        state.out.print(table)
    return out


@cli.group()
def predictors() -> None:
    """Versioned accuracy predictors: list, train, show.

    \b
    Example:
      archopt predictors train --model ptb-llama-8l --metric ppl_wikitext2
    """


@predictors.command("list")
@click.option("--model", "-m", default=None)
@click.option("--json", "as_json", is_flag=True)
@pass_state
def predictors_list(state: State, model: str | None, as_json: bool) -> None:
    """List predictor versions with their cross-validation scores.

    \b
    Example:
      archopt predictors list --model ptb-llama-8l
    """
    from .optimizer.training import predictor_rows
    with state.archive.read() as session:
        rows = predictor_rows(session, model)
    slim = [{k: v for k, v in r.items() if k not in ("hyperparams", "cv", "library_versions")} for r in rows]
    emit(state, slim, [("id", "id"), ("model", "model"), ("metric", "metric"), ("protocol", "protocol"),
                       ("version", "v"), ("algorithm", "algorithm"), ("n_train", "n"), ("r2", "R²"),
                       ("kendall_tau", "Kendall τ"), ("spearman", "Spearman"), ("mae", "MAE"), ("stale", "stale")],
         as_json, {"schema": "archopt.predictors/1", "predictors": slim})


@predictors.command("train")
@click.option("--model", "-m", required=True)
@click.option("--metric", "metric_names", default=None, help="Comma-separated (default: every measured metric).")
@click.option("--protocol", type=int, default=None, help="Protocol id (default: the most used).")
@click.option("--seed", type=int, default=0, show_default=True)
@pass_state
def predictors_train(state: State, model: str, metric_names: str | None, protocol: int | None, seed: int) -> None:
    """Train new predictor versions now (a query also retrains stale ones itself).

    \b
    Example:
      archopt predictors train --model ptb-llama-8l --metric ppl_wikitext2,ppl_ptb
    """
    from .archdb.reads import get_base_model, metrics_of
    from .optimizer.training import ensure_predictors
    with state.archive.read() as session:
        base = get_base_model(session, model)
        names = [x.strip() for x in metric_names.split(",")] if metric_names else [
            mm for mm in metrics_of(session, base) if ":" not in mm]
        name = base.name
    protocols = {n: protocol for n in names} if protocol is not None else None
    trained = ensure_predictors(state.archive, name, names, force=True, protocols=protocols, seed=seed)
    for metric, t in trained.items():
        cv = t.predictor.cv
        state.out.print(f"{name} {metric}: v{t.version} {t.predictor.algorithm} on {t.predictor.n_train} pairs, "
                        f"CV R²={_cell(cv.get('r2'))} Kendall τ={_cell(cv.get('kendall_tau'))} "
                        f"Spearman={_cell(cv.get('spearman'))} MAE={_cell(cv.get('mae'))}")


@predictors.command("show")
@click.argument("predictor_id", type=int)
@click.option("--json", "as_json", is_flag=True)
@pass_state
def predictors_show(state: State, predictor_id: int, as_json: bool) -> None:
    """Show one predictor version: algorithm, hyperparameters, CV scores, data, library versions.

    \b
    Example:
      archopt predictors show 3
    """
    from .optimizer.training import predictor_by_id
    with state.archive.read() as session:
        info = predictor_by_id(session, predictor_id)
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    state.out.print_json(json.dumps(info))


# --- serve ----------------------------------------------------------------------------------------
def _byte_size(text: str) -> int:
    """``64MB``, ``500KB``, ``1GB`` (binary units: MB = 2**20) or a number of bytes."""
    import re
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(|B|K|KB|KIB|M|MB|MIB|G|GB|GIB)\s*", text.upper())
    if not match:
        raise UserError(f"--max-body takes a size such as 64MB, 500KB or a number of bytes, got {text!r}")
    scale = {"": 1, "B": 1, "K": 2**10, "M": 2**20, "G": 2**30}[match.group(2)[:1]]
    value = int(float(match.group(1)) * scale)
    if value < 1:
        raise UserError("--max-body must be at least 1 byte")
    return value


@cli.command()
@click.option("--db", "db_url", default=None, metavar="URL",
              help="Archive database URL (default: archopt --db, $ARCHOPT_DB, else sqlite:///archopt.db).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: every one).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="Worker processes (each opens the archive and keeps its own memory of answers).")
@click.option("--token-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="File whose first line is the write token (default: $ARCHOPT_TOKEN; none: read-only).")
@click.option("--max-body", default="64MB", show_default=True, help="Largest request body (413 above it).")
@click.option("--retrain-interval", type=click.FloatRange(min=0), default=30.0, show_default=True,
              help="Seconds between two background retrains of one stale predictor.")
@click.option("--search-processes", type=click.IntRange(min=0), default=1, show_default=True,
              help="Processes per worker that run cold searches (0: in a thread of the worker).")
@click.option("--log-level", type=click.Choice(["critical", "error", "warning", "info", "debug"]), default="info",
              show_default=True)
@click.option("--no-access-log", is_flag=True, help="Do not log every request.")
@pass_state
def serve(state: State, db_url: str | None, host: str, port: int, workers: int, token_file: Path | None,
          max_body: str, retrain_interval: float, search_processes: int, log_level: str, no_access_log: bool) -> None:
    """Serve the archive over HTTP: a JSON API under /v1, /openapi.json, and a page at /.

    Queries use the current predictors and never train in the request: stale ones are retrained in
    the background. Writes (POST /v1/evaluations, /v1/predictors/train) need the bearer token of
    $ARCHOPT_TOKEN or --token-file; without one the service is read-only.

    \b
    Example:
      archopt serve --db sqlite:///archopt.db --port 8000
      ARCHOPT_TOKEN=$(cat ~/.archopt-token) archopt serve --db postgresql://archopt@db/archopt \\
          --host 0.0.0.0 --workers 4
    """
    from .service.app import ServiceConfig, read_token
    from .service.server import serve as run_server
    config = ServiceConfig(db=db_url or state.db, token=read_token(str(token_file) if token_file else None),
                           max_body=_byte_size(max_body), retrain_interval=retrain_interval,
                           search_processes=search_processes)
    Archive(config.db).close()  # a bad URL or an archive behind head fails here, as one line
    mode = "read-write (bearer token)" if config.token else "read-only (no token: set ARCHOPT_TOKEN or --token-file)"
    state.err.print(f"archopt {mode} on http://{host}:{port}, {workers} worker(s), archive "
                    f"{_hide_password(config.db)}", markup=False)
    if config.token and host not in ("127.0.0.1", "localhost", "::1"):
        state.err.print("note: the token travels in clear text over http: put the service behind a TLS proxy",
                        markup=False)
    run_server(config, host=host, port=port, workers=workers, token_file=str(token_file) if token_file else None,
               log_level=log_level, access_log=not no_access_log)


def _hide_password(url: str | None) -> str:
    from .archdb.archive import resolve_url
    from sqlalchemy.engine import make_url
    try:
        return make_url(resolve_url(url)).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - only for the start-up line
        return "(archive)"


# --- queue: submit / worker / jobs (PostgreSQL only) ---------------------------------------------
def _queue_url(state: State) -> str:
    """The archive URL if it is PostgreSQL; else the one-line answer that the queue needs it."""
    from .archdb.archive import resolve_url
    from .optimizer.jobs import NEEDS_POSTGRES
    url = resolve_url(state.db)
    if not url.startswith("postgresql"):
        raise UserError(NEEDS_POSTGRES)
    return url


def _submit(state: State, model: str, archs: list[tuple[Any, str]], settings: Any, weights: str | None,
            priority: int, console: Console | None = None) -> Any:
    from .optimizer.jobs import submit as submit_jobs
    report = submit_jobs(state.archive, model, archs, settings, location=weights, priority=priority)
    note = "" if report.archive_checked else " (weights not reachable here: archive not checked, workers skip what it holds)"
    (console or state.out).print(f"enqueued {len(report.enqueued)} job(s); {report.in_archive} already in the archive, "
                    f"{report.in_queue} already queued or running{note}")
    return report


@cli.command()
@click.option("--model", "-m", required=True, help="Registered base model (name, path or hub id).")
@click.option("--arch", "arch_texts", multiple=True, help="Architecture to measure (id, JSON or compact).")
@click.option("--samples", type=click.IntRange(min=0), default=0, help="Sampled architectures to measure.")
@click.option("--sampler", type=click.Choice(["random", "paper"]), default="random", show_default=True)
@click.option("--layers", default=None, help="Prunable layers, inclusive: 3-29.")
@click.option("--ratios", default="0.1,0.2,0.3,0.4,0.5", show_default=True, help="Ratio set of --sampler paper.")
@click.option("--params", "params_text", default=None, help="Random samples near this size: 5B, 550M, 80%.")
@click.option("--tolerance", default="5%", show_default=True, help="Size window of --params.")
@click.option("--from-query", "query_id", type=int, default=None, help="Every result of this stored query.")
@click.option("--priority", type=int, default=0, show_default=True, help="Higher runs first.")
@click.option("--weights", default=None, help="Where workers find the base weights (default: the archive's).")
@click.option("--seed", type=int, default=0, show_default=True)
@eval_options
@pass_state
def submit(state: State, model: str, arch_texts: tuple[str, ...], samples: int, sampler: str, layers: str | None,
           ratios: str, params_text: str | None, tolerance: str, query_id: int | None, priority: int,
           weights: str | None, seed: int, metrics: str, data_dir: Path | None, seq_len: int,
           max_tokens: int | None, max_questions: int | None, shots: int, ptb_split: str, importance: str,
           device: str | None, dtype: str | None) -> None:
    """Queue evaluations for `archopt worker`s (needs a PostgreSQL archive).

    One job per architecture the archive does not hold under these protocol settings; submitting the
    same thing twice enqueues nothing new. --device is the workers' choice (archopt worker --device).

    \b
    Example:
      archopt --db postgresql://archopt@db/archopt submit --model ptb-llama-8l --samples 50 --max-tokens 4096
      archopt submit --model ptb-llama-8l --from-query 12
    """
    _queue_url(state)
    if not (arch_texts or samples or query_id is not None):
        raise UserError("give --arch, --samples N or --from-query ID")
    from .archdb.arch import from_layer_dicts, parse_layer_range
    from .archdb.reads import get_base_model
    from .archdb.sizes import parse_size, parse_tolerance
    from .archdb.store import spec_of
    from .optimizer.samplers import sample_architectures
    with state.archive.read() as session:
        base = get_base_model(session, model)
        name, spec = base.name, spec_of(base)
    archs: list[tuple[Any, str]] = [(_parse_arch(state, name, spec, t), "ingest") for t in arch_texts]
    if samples:
        layer_idx = parse_layer_range(layers, spec.num_layers) if layers else None
        target = parse_size(params_text, spec.total_params) if params_text else None
        archs += [(a, "random") for a in sample_architectures(
            spec, samples, sampler, seed=seed, layers=layer_idx,
            ratios=tuple(_floats(ratios, "--ratios")) or (0.1, 0.2, 0.3, 0.4, 0.5),
            target_params=target, tolerance=parse_tolerance(tolerance))]
    if query_id is not None:
        from .optimizer.query import get_query
        doc = get_query(state.archive, query_id)
        if doc["model"] != name:
            raise UserError(f"query #{query_id} is about {doc['model']}, not {name}")
        archs += [(from_layer_dicts(spec, r["layers"]), "verify") for r in doc["results"]]
    settings = _settings(metrics, data_dir, seq_len, max_tokens, max_questions, shots, ptb_split, importance,
                         device or "cpu", dtype, seed)
    _submit(state, name, archs, settings, weights, priority)


@cli.command()
@click.option("--device", default=None, help="cpu or cuda (default: cuda when available); one worker per GPU.")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default=None)
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Local data laid out like ../shared/data (default: Hugging Face datasets).")
@click.option("--concurrency", type=click.IntRange(min=1), default=1, show_default=True,
              help="Jobs at once in this process (1 per GPU is right for most models).")
@click.option("--max-jobs", type=click.IntRange(min=0), default=None, help="Exit after this many jobs.")
@click.option("--idle-exit", type=click.FloatRange(min=0), default=None, help="Exit after S seconds without a job.")
@click.option("--attempts", type=click.IntRange(min=1), default=3, show_default=True,
              help="Runs of a job before it is marked failed (a stalled worker counts as one).")
@click.option("--heartbeat", type=click.FloatRange(min=0.1), default=10.0, show_default=True,
              help="Seconds between two heartbeats of this worker.")
@click.option("--stall-timeout", type=click.FloatRange(min=0.5), default=60.0, show_default=True,
              help="A job whose worker sent no heartbeat for this long is retried by another worker.")
@click.option("--poll", type=click.FloatRange(min=0.1), default=2.0, show_default=True,
              help="Seconds between two looks at the queue (besides PostgreSQL notifications).")
@click.option("--name", default=None, help="Worker name in `archopt jobs` (default: host:pid).")
@pass_state
def worker(state: State, device: str | None, dtype: str | None, data_dir: Path | None, concurrency: int,
           max_jobs: int | None, idle_exit: float | None, attempts: int, heartbeat: float, stall_timeout: float,
           poll: float, name: str | None) -> None:
    """Run queued evaluations (from `archopt submit` / `query --verify K --queue`) on this machine.

    Keeps each base model loaded between jobs. SIGTERM or Ctrl-C finishes the job in hand, then exits;
    a worker killed outright leaves its job to another worker after --stall-timeout.

    \b
    Example:
      CUDA_VISIBLE_DEVICES=0 archopt --db postgresql://archopt@db/archopt worker --device cuda \\
          --data-dir ../shared/data
    """
    import logging
    url = _queue_url(state)
    if heartbeat >= stall_timeout:
        raise UserError("--heartbeat must be shorter than --stall-timeout")
    if device is None:
        import torch
        device = "cuda" if torch.cuda.is_available() else "cpu"
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("procrastinate").setLevel(logging.WARNING)
    from .optimizer.jobs import run_worker
    state.err.print(f"worker on {device}, archive {_hide_password(url)}", markup=False)
    ran = run_worker(url, device=device, dtype=dtype, data_dir=str(data_dir) if data_dir else None,
                     concurrency=concurrency, max_jobs=max_jobs, idle_exit=idle_exit, attempts=attempts,
                     heartbeat=heartbeat, stall_timeout=stall_timeout, poll=poll, name=name)
    state.err.print(f"worker done: {ran} job(s)", markup=False)


@cli.group(invoke_without_command=True)
@click.option("--status", "statuses", multiple=True,
              type=click.Choice(["todo", "doing", "succeeded", "failed", "cancelled", "aborting", "aborted"]),
              help="Only jobs in this status (repeatable).")
@click.option("--limit", type=click.IntRange(min=1), default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def jobs(ctx: click.Context, statuses: tuple[str, ...], limit: int, as_json: bool) -> None:
    """The evaluation queue: counts per status and per worker, newest jobs; retry or cancel jobs.

    \b
    Example:
      archopt jobs --status failed
      archopt jobs retry 17 18
      archopt jobs cancel 19
    """
    if ctx.invoked_subcommand is not None:
        return  # retry / cancel check the archive themselves
    state: State = ctx.obj
    url = _queue_url(state)
    from .optimizer.jobs import list_jobs
    doc = list_jobs(url, statuses, limit)
    if as_json:
        click.echo(json.dumps(doc, indent=2))
        return
    state.out.print("jobs: " + (", ".join(f"{n} {s}" for s, n in doc["counts"].items()) or "none"))
    if doc["workers"]:
        emit(state, doc["workers"], [("worker", "worker"), ("alive", "alive"), ("doing", "running"),
                                     ("succeeded", "succeeded"), ("failed_or_stalled", "failed/stalled"),
                                     ("busy_seconds", "busy s")], False, title="workers")
    rows = [{**j, "arch_id": (j["arch_id"] or "")[:12], "updated": (j["updated"] or "")[:19]} for j in doc["jobs"]]
    emit(state, rows, [("id", "job"), ("status", "status"), ("model", "model"), ("arch_id", "arch"),
                       ("attempts", "runs"), ("priority", "priority"), ("worker", "worker"),
                       ("updated", "updated"), ("error", "last error")], False)


@jobs.command("retry")
@click.argument("job_ids", nargs=-1, type=int, required=True)
@pass_state
def jobs_retry(state: State, job_ids: tuple[int, ...]) -> None:
    """Put failed jobs back in the queue.

    \b
    Example:
      archopt jobs retry 17 18
    """
    from .optimizer.jobs import retry_jobs
    done = retry_jobs(_queue_url(state), job_ids)
    state.out.print(f"requeued {len(done)} job(s)" + (f"; not failed, left alone: "
                    f"{', '.join(str(j) for j in job_ids if j not in done)}" if len(done) < len(job_ids) else ""))


@jobs.command("cancel")
@click.argument("job_ids", nargs=-1, type=int, required=True)
@pass_state
def jobs_cancel(state: State, job_ids: tuple[int, ...]) -> None:
    """Cancel queued jobs (a running one is asked to abort).

    \b
    Example:
      archopt jobs cancel 19 20
    """
    from .optimizer.jobs import cancel_jobs
    done = cancel_jobs(_queue_url(state), job_ids)
    state.out.print(f"cancelled {len(done)} job(s)" + (f"; already finished or unknown: "
                    f"{', '.join(str(j) for j in job_ids if j not in done)}" if len(done) < len(job_ids) else ""))


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point: one-line errors with a non-zero exit, tracebacks only with --debug."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    try:
        cli.main(args=args, prog_name="archopt", standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        # an argument echoed back may hold line breaks (or \x1c-\x1e, \u2028): keep the error on one line
        click.echo(f"error: {' '.join(exc.format_message().splitlines())}", err=True)
        sys.exit(exc.exit_code if exc.exit_code else 1)
    except USER_ERRORS as exc:
        if debug:
            traceback.print_exc()
        click.echo(f"error: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except UnicodeEncodeError:  # a path or name holding a lone surrogate (only possible in-process)
        if debug:
            traceback.print_exc()
        click.echo("error: an argument holds characters that cannot be encoded (a lone surrogate)", err=True)
        sys.exit(1)
    except OSError as exc:  # a file that cannot be written or read (--output into a missing folder)
        if debug:
            traceback.print_exc()
        where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
        click.echo(f"error: {where}{exc.strerror or exc}".splitlines()[0], err=True)
        sys.exit(1)
    except Exception as exc:  # noqa: BLE001 - last resort: one line, never a traceback
        if debug:
            traceback.print_exc()
        first = str(exc).splitlines()[0] if str(exc) else ""
        click.echo(f"error: {type(exc).__name__}: {first[:300]} (run with --debug for details)", err=True)
        sys.exit(1)


