"""Everything the commands print: listings as a table or JSON, the query table, the terminal scatter."""

from __future__ import annotations

import json
from typing import Any, Sequence

import click
from rich.table import Table

from archopt.archdb.sizes import format_size


def emit(state: Any, rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]],
         as_json: bool, document: Any = None, title: str | None = None) -> None:
    """Print ``rows`` as a rich table of ``columns`` (key, header), or ``document`` as JSON."""
    if as_json:
        print_json(document if document is not None else list(rows))
        return
    table = Table(title=title, show_lines=False)
    for _, header in columns:
        table.add_column(header, overflow="fold")
    for row in rows:
        table.add_row(*[cell(row.get(key)) for key, _ in columns])
    state.out.print(table)


def print_json(document: Any) -> None:
    """A JSON document on standard output (never NaN or infinity)."""
    click.echo(json.dumps(document, indent=2, allow_nan=False))


def cell(value: Any) -> str:
    """One table cell: ``-`` for nothing, yes/no, four significant digits."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def bar(fraction: float, width: int = 10) -> str:
    filled = int(round(fraction * width))
    return "█" * filled + "·" * (width - filled)


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


def print_query(state: Any, doc: dict[str, Any]) -> None:
    """An ``archopt.query/1`` document as the Pareto table, the scatter and the predictors' line."""
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
        meas = [cell(r["measured"].get(o)) for o in objectives]
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


def print_verified(state: Any, doc: dict[str, Any], verified: Sequence[dict[str, Any]]) -> None:
    """Predicted against measured for the verified results of a query document."""
    objectives = doc["objectives"]
    ranks = {r["arch_id"]: r.get("rank") for r in doc["results"]}
    table = Table(title="predicted against measured")
    for header in ("#", "arch", *[f"{o} pred" for o in objectives], *[f"{o} meas" for o in objectives]):
        table.add_column(header)
    for v in verified:
        table.add_row(str(ranks.get(v["arch_id"]) or "n"), v["arch_id"][:10],
                      *[f"{v['predicted'][o]:.4g}" for o in objectives], *[cell(v["measured"][o]) for o in objectives])
    state.out.print(table)


def progress_runner(state: Any, title: str, total: int) -> Any:
    """A rich progress bar (done, ETA, last values) and the ``on_result`` callback that advances it."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
               TextColumn("{task.fields[last]}")]
    progress = Progress(*columns, console=state.err, transient=False)
    task = progress.add_task(title, total=total, last="")

    def on_result(i: int, n: int, result: Any) -> None:
        shown = " ".join([f"{x.metric}={x.value:.4g}" for x in result.measurements if ":" not in x.metric]
                         + [f"{metric} failed ({why})" for metric, why in getattr(result, "failed", {}).items()])
        progress.update(task, advance=1, last="skipped (in archive)" if result.skipped else shown)

    return progress, on_result


def hide_password(url: str | None) -> str:
    """The archive URL to show in logs: password hidden."""
    from archopt.archdb.archive import resolve_url
    from sqlalchemy.engine import make_url
    try:
        return make_url(resolve_url(url)).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - only for the start-up line
        return "(archive)"
