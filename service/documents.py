"""The JSON documents that the API serves and the CLI prints: one builder per document.

``archopt models|archs|show --json`` and ``GET /v1/models``, ``/v1/models/{model}/archs``,
``/v1/archs/{id}`` call the same builder, so a client of the service prints what the local command
prints. Builders take an ``Archive``, open one read session, and return plain data (no SQL here:
they call ``archdb.reads`` and ``optimizer.training``). Nothing in this module imports the web
framework, so the CLI can use it without the service's dependencies.
"""

from __future__ import annotations

import difflib
from typing import Any

from archopt.archdb.archive import Archive
from archopt.archdb.errors import ArchoptError
from archopt.archdb.sizes import format_size
from archopt.archdb.store import WriteReport


class RequestError(ArchoptError, ValueError):
    """A request the archive cannot answer as asked (an unknown sort metric, a bad field)."""


def models_document(archive: Archive) -> dict[str, Any]:
    """``archopt.models/1``: every base model with its shape and counts."""
    from archopt.archdb.reads import model_rows
    with archive.read() as session:
        rows = model_rows(session)
    for row in rows:
        row["size"] = format_size(row["params"])
        row["shape"] = f"{row['layers']}L {row['heads']}/{row['kv_heads']}h {row['hidden']}d"
    return {"schema": "archopt.models/1", "models": rows}


def model_document(archive: Archive, model: str) -> dict[str, Any]:
    """``archopt.model/1``: one base model, its measured metrics and their default protocols."""
    from archopt.archdb.reads import default_protocol, get_base_model, metrics_of, model_rows
    with archive.read() as session:
        base = get_base_model(session, model)
        row = next(r for r in model_rows(session) if r["name"] == base.name)
        metrics = metrics_of(session, base)
        protocols = {name: default_protocol(session, base, name) for name in metrics}
        head_dim = base.head_dim
    row["size"] = format_size(row["params"])
    return {"schema": "archopt.model/1", **row, "head_dim": head_dim, "metrics": metrics,
            "default_protocols": protocols}


def archs_document(archive: Archive, model: str, sort: str | None = None, protocol: int | None = None,
                   limit: int | None = None, offset: int = 0) -> dict[str, Any]:
    """``archopt.archs/1``: the architectures of ``model`` with their metrics, best-first by ``sort``.

    Each architecture also lists its ``failed`` runs (``metric``, ``protocol``, ``reason``,
    ``created_at``): measurements that gave no value, e.g. a pruned model that diverged.
    """
    from archopt.archdb.reads import arch_rows, failed_runs, get_base_model, metrics_of
    with archive.read() as session:
        base = get_base_model(session, model)
        known = metrics_of(session, base)
        if sort and sort not in known:
            close = difflib.get_close_matches(sort, known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise RequestError(f"model {base.name!r} has no metric {sort!r}{hint}")
        views = arch_rows(session, base, sort, protocol, limit, offset)
        failed = failed_runs(session, base, [v["arch_id"] for v in views])
        name = base.name
    for view in views:
        view["failed"] = failed.get(view["arch_id"], [])
    return {"schema": "archopt.archs/1", "model": name, "metrics": known, "archs": views}


def arch_document(archive: Archive, arch_id: str, model: str | None = None) -> dict[str, Any]:
    """One architecture (``archopt show --json``): per-layer shape, chosen metrics, every value and
    every failed run (``failed``: ``metric``, ``protocol`` id, ``reason``, ``created_at``)."""
    from archopt.archdb.reads import (arch_view, failed_runs, get_base_model, live_metrics, protocol_dict,
                                      resolve_arch)
    with archive.read() as session:
        base = get_base_model(session, model) if model else None
        row = resolve_arch(session, arch_id, base)
        base = row.base_model
        values = live_metrics(session, [row.id]).get(row.id, {})
        view = arch_view(row, base, values)
        view["model"] = base.name
        view["base"] = {"num_layers": base.num_layers, "num_heads": base.num_heads,
                        "num_kv_heads": base.num_kv_heads, "intermediate_size": base.intermediate_size}
        view["all_values"] = [{"metric": k, "value": v.value, "evaluation": v.evaluation_id,
                               "protocol": protocol_dict(session, v.protocol_id)}
                              for k, vals in sorted(values.items()) for v in vals]
        view["failed"] = failed_runs(session, base, [row.arch_hash]).get(row.arch_hash, [])
    return view


def predictors_document(archive: Archive, model: str | None = None) -> dict[str, Any]:
    """``archopt.predictors/1``: predictor versions with their cross-validation scores."""
    from archopt.optimizer.training import predictor_rows
    with archive.read() as session:
        rows = predictor_rows(session, model)
    slim = [{k: v for k, v in r.items() if k not in ("hyperparams", "cv", "library_versions")} for r in rows]
    return {"schema": "archopt.predictors/1", "predictors": slim}


def ingest_document(name: str, report: WriteReport) -> dict[str, Any]:
    """``archopt.ingest/1``: what ingesting one file did."""
    return {"schema": "archopt.ingest/1", "file": name, "evaluations_added": report.evaluations_added,
            "evaluations_existing": report.evaluations_existing, "archs_added": report.archs_added,
            "archs_existing": report.archs_existing, "models_added": report.models_added}


def ingest_line(doc: dict[str, Any]) -> str:
    """The line ``archopt ingest`` prints for one file."""
    return (f"{doc['file']}: {doc['evaluations_added']} evaluations added, {doc['evaluations_existing']} already "
            f"there; {doc['archs_added']} new architectures, {doc['models_added']} new base models")
