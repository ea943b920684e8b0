"""The archive's own commands: ingest, export, models, archs, show, evaluations retract."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click
from rich.table import Table

from archopt.archdb.sizes import format_size
from archopt.cli import State, pass_state, server_options

from .output import bar, emit, print_json


def _client(server: str, token: str | None) -> Any:
    from archopt.service.client import Client
    return Client(server, token)



@click.command()
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
    from archopt.archdb import formats
    from archopt.archdb.ingest import ingest_file
    from archopt.service.documents import ingest_document, ingest_line
    client = _client(server, token) if server else None
    for path in files:
        if client is not None:
            try:
                data = path.read_bytes()
            except OSError as exc:
                raise formats.FormatError(str(path), None, f"cannot read: {exc.strerror or exc}") from None
            doc = client.post_bytes("/v1/evaluations", data, "application/octet-stream", format=fmt,
                                    allow_limit=allow_limit or None, filename=str(path))
        else:
            doc = ingest_document(str(path), ingest_file(state.archive, path, fmt=fmt, allow_limit=allow_limit))
        state.out.print(ingest_line(doc))


@click.command()
@click.option("--model", "-m", default=None, help="Only this base model.")
@click.option("--format", "fmt", type=click.Choice(["jsonl", "csv"]), default="jsonl", show_default=True,
              help="JSON Lines (one architecture per line) or CSV (one value per row).")
@click.option("--output", "-o", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="File (default: stdout).")
@pass_state
def export(state: State, model: str | None, fmt: str, output: Path | None) -> None:
    """Write the archive (or one model) in an ingestable format.

    \b
    Example:
      archopt export --model ptb-llama-8l --format csv -o archive.csv
    """
    from archopt.archdb.formats import write_csv, write_jsonl
    from archopt.archdb.reads import export_records
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
@click.command()
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
        from archopt.service.documents import models_document
        doc = models_document(state.archive)
    emit(state, doc["models"], [("name", "model"), ("family", "family"), ("shape", "layers/heads"),
                                ("size", "params"), ("tied", "tied emb"), ("archs", "archs"),
                                ("evaluations", "evaluations")], as_json, doc)


def _metric_cells(view: dict[str, Any]) -> dict[str, Any]:
    return {k: v["value"] for k, v in view["metrics"].items()}


@click.command()
@click.option("--model", "-m", required=True, help="Base model (name, path or hub id).")
@click.option("--sort", default=None, help="Sort best-first by this metric (e.g. ppl_wikitext2).")
@click.option("--protocol", type=int, default=None, help="Protocol id for --sort (default: most used).")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Show at most N architectures.")
@click.option("--offset", type=click.IntRange(min=0), default=0, help="Skip the first N (with --limit: pages).")
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
        from archopt.service.documents import archs_document
        doc = archs_document(state.archive, model, sort, protocol, limit, offset)
    known, views, name = doc["metrics"], doc["archs"], doc["model"]
    shown = [m for m in ("ppl_wikitext2", "ppl_ptb", "mmlu") if m in known] or known[:3]
    rows = [{"id": v["arch_id"][:12], "params": format_size(v["params"]), "pct": f"{100 * v['fraction']:.1f}%",
             "origin": v["origin"], "sketch": v["sketch"], **_metric_cells(v),
             "failed": ", ".join(sorted({f["metric"] for f in v.get("failed", [])})) or None} for v in views]
    columns = [("id", "arch"), ("params", "params"), ("pct", "% base"), ("origin", "origin"),
               *[(mname, mname) for mname in shown], ("sketch", "per-layer kept (A attn, M mlp)")]
    if any(r["failed"] for r in rows):
        columns.append(("failed", "failed runs (archopt show ID)"))
    emit(state, rows, columns, as_json, doc, title=f"{name}: {len(views)} architectures")


@click.command()
@click.argument("arch_id")
@click.option("--model", "-m", default=None, help="Base model, if the id prefix is ambiguous.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_state
def show(state: State, arch_id: str, model: str | None, as_json: bool) -> None:
    """Show one architecture: per-layer heads and channels, and every measured value.

    \b
    Example:
      archopt show 3f2a9c1b
    """
    from archopt.service.documents import arch_document
    view = arch_document(state.archive, arch_id, model)
    spec = view["base"]
    spec_heads, spec_kv, spec_inter = spec["num_heads"], spec["num_kv_heads"], spec["intermediate_size"]
    if as_json:
        print_json(view)
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
                          f"{layer['intermediate']}/{spec_inter}", bar(layer["kv_heads"] / spec_kv),
                          bar(layer["intermediate"] / spec_inter))
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
    if view.get("failed"):
        failed_table = Table(title="failed runs (never measured again; retracting nothing is needed)")
        for header in ("metric", "protocol", "reason", "when"):
            failed_table.add_column(header)
        for f in view["failed"]:
            failed_table.add_row(f["metric"], f"#{f['protocol']}", f["reason"], str(f["created_at"])[:19])
        state.out.print(failed_table)


@click.group()
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
    from archopt.archdb.store import retract_evaluation
    with state.archive.write() as session:
        for eid in evaluation_ids:
            retract_evaluation(session, eid, why)
    click.echo(f"retracted {len(evaluation_ids)} evaluation(s)")

