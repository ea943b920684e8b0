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
from .archdb.sizes import SizeError, format_size
from .archdb.store import StoreError

USER_ERRORS = (ArchiveError, FormatError, NotFound, SizeError, ArchitectureError, StoreError, ProtocolError,
               click.UsageError)


class UserError(click.ClickException):
    """A one-line error for the user."""


class State:
    """What every command shares: the archive URL (opened on first use, closed at exit) and output."""

    def __init__(self, db: str | None, debug: bool) -> None:
        self.db = db
        self.debug = debug
        self._archive: Archive | None = None
        self.out = Console(soft_wrap=True, highlight=False)
        self.err = Console(stderr=True, soft_wrap=True, highlight=False)

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


# --- ingest / export ------------------------------------------------------------------------------
@cli.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["jsonl", "csv", "lmeval"]), default=None,
              help="File format (default: from the extension and contents).")
@click.option("--allow-limit", is_flag=True, help="Accept lm-eval results evaluated with --limit.")
@pass_state
def ingest(state: State, files: tuple[Path, ...], fmt: str | None, allow_limit: bool) -> None:
    """Add evaluations from JSONL, CSV or lm-evaluation-harness results files.

    Each file is one transaction: all of it or nothing. Re-ingesting adds nothing.

    \b
    Example:
      archopt ingest examples/ptb-llama-8l.jsonl results.csv lm_eval_results.json
    """
    from .archdb.ingest import ingest_file
    for path in files:
        report = ingest_file(state.archive, path, fmt=fmt, allow_limit=allow_limit)
        state.out.print(
            f"{path}: {report.evaluations_added} evaluations added, {report.evaluations_existing} already there; "
            f"{report.archs_added} new architectures, {report.models_added} new base models")


@cli.command()
@click.option("--model", "-m", default=None, help="Only this base model.")
@click.option("--format", "fmt", type=click.Choice(["jsonl", "csv"]), default="jsonl", show_default=True)
@click.option("--output", "-o", type=click.Path(path_type=Path), default=None, help="File (default: stdout).")
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
@pass_state
def models(state: State, as_json: bool) -> None:
    """List base models with their architecture and evaluation counts.

    \b
    Example:
      archopt models --json
    """
    from .archdb.reads import model_rows
    with state.archive.read() as session:
        rows = model_rows(session)
    for row in rows:
        row["size"] = format_size(row["params"])
        row["shape"] = f"{row['layers']}L {row['heads']}/{row['kv_heads']}h {row['hidden']}d"
    emit(state, rows, [("name", "model"), ("family", "family"), ("shape", "layers/heads"), ("size", "params"),
                       ("tied", "tied emb"), ("archs", "archs"), ("evaluations", "evaluations")], as_json,
         {"schema": "archopt.models/1", "models": rows})


def _metric_cells(view: dict[str, Any]) -> dict[str, Any]:
    return {k: v["value"] for k, v in view["metrics"].items()}


@cli.command()
@click.option("--model", "-m", required=True, help="Base model (name, path or hub id).")
@click.option("--sort", default=None, help="Sort best-first by this metric (e.g. ppl_wikitext2).")
@click.option("--protocol", type=int, default=None, help="Protocol id for --sort (default: most used).")
@click.option("--limit", type=click.IntRange(min=1), default=None)
@click.option("--offset", type=click.IntRange(min=0), default=0)
@click.option("--json", "as_json", is_flag=True, help="Print the archopt.archs/1 JSON document.")
@pass_state
def archs(state: State, model: str, sort: str | None, protocol: int | None, limit: int | None, offset: int,
          as_json: bool) -> None:
    """List the architectures of a base model with their measured metrics.

    \b
    Example:
      archopt archs --model ptb-llama-8l --sort ppl_wikitext2 --limit 10
    """
    from .archdb.reads import arch_rows, get_base_model, metrics_of
    with state.archive.read() as session:
        base = get_base_model(session, model)
        known = metrics_of(session, base)
        if sort and sort not in known:
            import difflib
            close = difflib.get_close_matches(sort, known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise UserError(f"model {base.name!r} has no metric {sort!r}{hint}")
        views = arch_rows(session, base, sort, protocol, limit, offset)
        name = base.name
    shown = [m for m in ("ppl_wikitext2", "ppl_ptb", "mmlu") if m in known] or known[:3]
    rows = [{"id": v["arch_id"][:12], "params": format_size(v["params"]), "pct": f"{100 * v['fraction']:.1f}%",
             "origin": v["origin"], "sketch": v["sketch"], **_metric_cells(v)} for v in views]
    emit(state, rows, [("id", "arch"), ("params", "params"), ("pct", "% base"), ("origin", "origin"),
                       *[(mname, mname) for mname in shown], ("sketch", "per-layer kept (A attn, M mlp)")],
         as_json, {"schema": "archopt.archs/1", "model": name, "archs": views}, title=f"{name}: {len(views)} architectures")


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
    from .archdb.reads import arch_view, get_base_model, live_metrics, protocol_dict, resolve_arch
    with state.archive.read() as session:
        base = get_base_model(session, model) if model else None
        row = resolve_arch(session, arch_id, base)
        base = row.base_model
        values = live_metrics(session, [row.id]).get(row.id, {})
        view = arch_view(row, base, values)
        view["model"] = base.name
        view["all_values"] = [{"metric": k, "value": v.value, "protocol": protocol_dict(session, v.protocol_id)}
                              for k, vals in sorted(values.items()) for v in vals]
        spec_heads, spec_kv, spec_inter = base.num_heads, base.num_kv_heads, base.intermediate_size
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
    for header in ("metric", "value", "protocol"):
        values_table.add_column(header)
    for v in view["all_values"]:
        p = v["protocol"]
        desc = "/".join(str(x) for x in (p["dataset"], p["split"], f"seq{p['seq_len']}" if p["seq_len"] else "",
                                           f"{p['tokens']}tok" if p["tokens"] else "",
                                           f"{p['shots']}-shot" if p["shots"] is not None else "") if x)
        values_table.add_row(v["metric"], f"{v['value']:.4g}", f"#{p['id']} {desc}")
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
        click.echo(f"error: {exc.format_message()}", err=True)
        sys.exit(exc.exit_code if exc.exit_code else 1)
    except USER_ERRORS as exc:
        if debug:
            traceback.print_exc()
        click.echo(f"error: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001 - last resort: one line, never a traceback
        if debug:
            traceback.print_exc()
        first = str(exc).splitlines()[0] if str(exc) else ""
        click.echo(f"error: {type(exc).__name__}: {first[:300]} (run with --debug for details)", err=True)
        sys.exit(1)


