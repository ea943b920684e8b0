"""Everything the commands print: listings as a table or JSON, the query table, the terminal scatter."""

from __future__ import annotations

import json
from typing import Any, Sequence

import click
from rich.markup import escape
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


def distinct_labels(values: Sequence[float], label: Any, start: int = 1, stop: int = 9) -> list[str]:
    """``label(value, digits)`` for each value, with the fewest digits (from ``start``) that tell
    the values apart (equal values keep equal labels)."""
    wanted = len(set(values))
    for digits in range(start, stop):
        out = [label(v, digits) for v in values]
        if len(set(out)) >= wanted:
            return out
    return [label(v, stop) for v in values]


def size_label(params: float, digits: int) -> str:
    """A parameter count with ``digits`` decimals in the unit of ``format_size`` (7.93M)."""
    for suffix, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(params) >= scale:
            return f"{params / scale:.{digits}f}{suffix}"
    return f"{params:.0f}"


def scatter(points: Sequence[tuple[float, float, str]], width: int = 60, height: int = 12,
            x_label: str = "params", y_label: str = "ppl", reference: tuple[float, str] | None = None) -> str:
    """A terminal scatter plot: each point (x, y, mark); ``reference`` (y, label) draws a
    horizontal line of ``-`` (the base model's measured value). Tick labels are distinct."""
    if not points:
        return ""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    if reference is not None:
        ys = ys + [reference[0]]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)
    grid = [[" "] * width for _ in range(height)]

    def row_of(y: float) -> int:
        return height - 1 - int((y - y0) / (y1 - y0) * (height - 1))

    if reference is not None:
        grid[row_of(reference[0])] = ["-"] * width
    for x, y, mark in points:
        col = int((x - x0) / (x1 - x0) * (width - 1))
        row = row_of(y)
        grid[row][col] = mark if grid[row][col] in (" ", "-", mark) else "#"
    y_top, y_bottom = distinct_labels([y1, y0], lambda v, d: f"{v:.{d}g}", start=4)
    lines = [f"{y_top:>9} ┤" + "".join(grid[0])]
    lines += ["          │" + "".join(r) for r in grid[1:-1]]
    lines.append(f"{y_bottom:>9} ┤" + "".join(grid[-1]))
    lines.append("          └" + "─" * width)
    if max(xs) > min(xs):
        left, mid, right = distinct_labels([x0, (x0 + x1) / 2, x1], size_label)
        half = width // 2
        lines.append(f"           {left:<{half - len(mid) // 2}}{mid}{right:>{width - half - (len(mid) + 1) // 2}}")
    else:
        lines.append(f"           {size_label(x0, 2)} (every point)")
    key = f"           {y_label} against {x_label}; o predicted, * measured"
    if reference is not None:
        key += f"; --- {reference[1]}"
    lines.append(key)
    return "\n".join(lines)


def quality_line(doc: dict[str, Any]) -> str:
    """``ppl_wikitext2 v3: gp on 53 rows, CV Kendall τ 0.85, R² 0.79, band held 70% (nominal 68%)``."""
    parts = []
    for metric, version in doc["predictor_versions"].items():
        q = (doc.get("predictor_quality") or {}).get(metric)
        if not q:
            parts.append(f"{metric} v{version}")
            continue
        cov = q.get("coverage")
        parts.append(f"{metric} v{version}: {q.get('algorithm', '?')} on {q['rows']} rows, CV Kendall τ "
                     f"{_fixed(q.get('kendall_tau'))}, R² {_fixed(q.get('r2'))}"
                     + (f", ± band held {100 * cov:.0f}% of held-out values (nominal 68%)" if cov is not None else ""))
    return "; ".join(parts)


def _fixed(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def print_query(state: Any, doc: dict[str, Any]) -> None:
    """An ``archopt.query/1`` document as the Pareto table (rows a table would print alike merged,
    the base model as a reference row), the sketch legend, the scatter, the predictors' quality and
    the answer's warnings."""
    from archopt.optimizer.readable import SKETCH_LEGEND, explain_lines, group_note, lookalike_groups
    objectives = doc["objectives"]
    served = " (served from the store)" if doc.get("served_from_store") else ""
    state.out.print(f"[bold]{doc['model']}[/] at {format_size(doc['target_params'])} "
                    f"(window {format_size(doc['window'][0])}-{format_size(doc['window'][1])}): "
                    f"{len(doc['results'])} Pareto-optimal architectures{served}")
    table = Table()
    for header in ("#", "arch", "params", "% base", *[f"{o} pred" for o in objectives],
                   *[f"{o} meas" for o in objectives], "per-layer kept (sketch)"):
        table.add_column(header, overflow="fold")
    for group in lookalike_groups(doc["results"], objectives):
        r = group[0]
        preds = [f"{r['predicted'][o]:.4g} ± {r['uncertainty'].get(o, 0):.2g}" for o in objectives]
        meas = [cell(r["measured"].get(o)) for o in objectives]
        sketch = r.get("sketch", "")
        if len(group) > 1:
            sketch += f"\n{group_note(group)}"
        elif r.get("sketch_note"):
            sketch += f"\n{r['sketch_note']}"
        table.add_row(",".join(str(g["rank"]) for g in group), "\n".join(g["arch_id"][:10] for g in group),
                      f"{r['params']:,}", f"{100 * r['fraction']:.1f}%", *preds, *meas, sketch)
    reference = doc.get("base_measured") or {}
    if any(v is not None for v in reference.values()):
        table.add_row("base", "(unpruned)", "", "100.0%", *["" for _ in objectives],
                      *[cell(reference.get(o)) for o in objectives], "the base model, measured", style="dim")
    state.out.print(table)
    state.out.print(SKETCH_LEGEND, markup=False)
    first = objectives[0]
    points = [(r["params"], r["predicted"][first], "o") for r in doc["results"]]
    points += [(r["params"], r["measured"][first], "*") for r in doc["results"] if r["measured"].get(first) is not None]
    ref = reference.get(first)
    state.out.print(scatter(points, y_label=first, reference=(ref, f"base model measured {ref:.4g}") if ref is not None
                            else None), markup=False)
    stale = [k for k, v in doc.get("predictors_stale", {}).items() if v]
    retrained = doc.get("predictors_retrained") or []
    notes = (f"; retrained {', '.join(retrained)}" if retrained else "") + (
        f"; STALE (not retrained): {', '.join(stale)}" if stale else "")
    stats = doc.get("stats", {})
    scored = f", {stats['candidates_scored']:,} candidates scored" if "candidates_scored" in stats else ""
    state.out.print(f"predictors: {quality_line(doc)}{notes}", markup=False)
    state.out.print(f"{scored.lstrip(', ')}{'; ' if scored else ''}query #{doc['query_id']} in "
                    f"{doc['elapsed_ms']:.0f} ms", markup=False)
    for warning in doc.get("warnings") or []:
        state.out.print(f"[bold yellow]warning:[/] {escape(warning)}")
    if doc.get("explain"):
        for line in explain_lines(doc["explain"]):
            state.out.print(line, markup=False)


def print_verified(state: Any, doc: dict[str, Any], verified: Sequence[dict[str, Any]]) -> None:
    """Predicted against measured for the verified results of a query document."""
    objectives = doc["objectives"]
    extra = list(dict.fromkeys(m for v in verified for m in v.get("also_measured", {})))
    ranks = {r["arch_id"]: r.get("rank") for r in doc["results"]}
    table = Table(title="predicted against measured")
    for header in ("#", "arch", *[f"{o} pred" for o in objectives], *[f"{o} meas" for o in objectives],
                   *[f"{m} meas" for m in extra]):
        table.add_column(header)
    for v in verified:
        also = v.get("also_measured", {})
        table.add_row(str(ranks.get(v["arch_id"]) or "n"), v["arch_id"][:10],
                      *[cell(v["predicted"].get(o)) for o in objectives], *[cell(v["measured"][o]) for o in objectives],
                      *[cell(also.get(m)) for m in extra])
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
