"""Reading the archive: models with counts, architectures with their metrics, default protocols,
training sets and exports. Functions take an open session and return plain data."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Iterator

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from .errors import ArchoptError
from . import models as m
from .arch import Architecture, from_layer_dicts
from .protocol import lower_is_better
from .store import info_of, protocol_of, spec_of


class NotFound(ArchoptError, LookupError):
    """A model, architecture or protocol the archive does not hold (message says which)."""


def architecture_of(row: m.Architecture, base: m.BaseModel) -> Architecture:
    return from_layer_dicts(spec_of(base), json.loads(row.encoding))


def model_rows(session: Session) -> list[dict[str, Any]]:
    archs = dict(session.execute(select(m.Architecture.base_model_id, func.count())
                                 .group_by(m.Architecture.base_model_id)).all())
    evals = dict(session.execute(
        select(m.Architecture.base_model_id, func.count())
        .join(m.Evaluation, m.Evaluation.architecture_id == m.Architecture.id)
        .where(m.Evaluation.retracted_at.is_(None))
        .group_by(m.Architecture.base_model_id)).all())
    out = []
    for row in session.scalars(select(m.BaseModel).order_by(m.BaseModel.name)):
        out.append({"name": row.name, "family": row.family, "layers": row.num_layers,
                    "heads": row.num_heads, "kv_heads": row.num_kv_heads, "hidden": row.hidden_size,
                    "intermediate": row.intermediate_size, "vocab": row.vocab_size,
                    "tied": row.tie_embeddings, "params": row.total_params, "location": row.location,
                    "config_hash": row.config_hash, "archs": archs.get(row.id, 0),
                    "evaluations": evals.get(row.id, 0)})
    return out


def get_base_model(session: Session, name: str) -> m.BaseModel:
    from .store import find_base_model
    row = find_base_model(session, name)
    if row is None:
        import difflib
        names = list(session.scalars(select(m.BaseModel.name)))
        close = difflib.get_close_matches(name, names, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else (
            f" (registered: {', '.join(names[:5])})" if names else " (the archive holds no models yet)")
        raise NotFound(f"unknown base model {name!r}{hint}")
    return row


def default_protocol(session: Session, base: m.BaseModel, metric: str) -> int | None:
    """The protocol with the most live evaluations of ``metric`` on ``base`` (ties: the newest),
    leaving out cheap fidelities (``Protocol.is_cheaper_fidelity_of``) of another protocol that
    has values: screening measures many architectures on a few tokens, but the full protocol stays
    the one predictors and answers are about. Measurements of another runtime (llama.cpp, as
    ``archopt evaluate --runtime llama.cpp`` stores them) count only when there is nothing else:
    archopt verifies and searches in transformers."""
    q = (select(m.Evaluation.protocol_id, func.count().label("n"), func.max(m.Evaluation.id).label("last"))
         .join(m.Architecture, m.Architecture.id == m.Evaluation.architecture_id)
         .join(m.Protocol, m.Protocol.id == m.Evaluation.protocol_id)
         .where(m.Architecture.base_model_id == base.id, m.Evaluation.metric == metric,
                m.Evaluation.retracted_at.is_(None))
         .group_by(m.Evaluation.protocol_id, m.Protocol.runtime)
         .order_by((m.Protocol.runtime != "transformers").asc(), func.count().desc(),
                   func.max(m.Evaluation.id).desc()))
    rows = [(int(pid), int(n)) for pid, n, _ in session.execute(q)]
    if len(rows) <= 1:
        return rows[0][0] if rows else None
    protocols = {pid: protocol_of(session.get(m.Protocol, pid)) for pid, _ in rows}
    for pid, _ in rows:
        if not any(protocols[pid].is_cheaper_fidelity_of(protocols[o]) for o, _ in rows if o != pid):
            return pid
    return rows[0][0]


def cheaper_fidelities(session: Session, base: m.BaseModel, metric: str, protocol_id: int) -> list[int]:
    """Protocols holding live values of ``metric`` on ``base`` that are cheap fidelities of
    ``protocol_id`` (same text and window, fewer tokens), most tokens first."""
    q = (select(m.Evaluation.protocol_id).distinct()
         .join(m.Architecture, m.Architecture.id == m.Evaluation.architecture_id)
         .where(m.Architecture.base_model_id == base.id, m.Evaluation.metric == metric,
                m.Evaluation.retracted_at.is_(None), m.Evaluation.protocol_id != protocol_id))
    full = protocol_of(session.get(m.Protocol, protocol_id))
    found = [(protocol_of(session.get(m.Protocol, int(pid))), int(pid)) for pid in session.scalars(q)]
    return [pid for p, pid in sorted(found, key=lambda t: -(t[0].tokens or 0)) if p.is_cheaper_fidelity_of(full)]


def metrics_of(session: Session, base: m.BaseModel) -> list[str]:
    q = (select(m.Evaluation.metric).distinct()
         .join(m.Architecture, m.Architecture.id == m.Evaluation.architecture_id)
         .where(m.Architecture.base_model_id == base.id, m.Evaluation.retracted_at.is_(None)))
    return sorted(session.scalars(q))


def resolve_arch(session: Session, text: str, base: m.BaseModel | None = None) -> m.Architecture:
    """An architecture by id or a unique prefix of at least 8 hex characters."""
    text = text.strip().lower()
    if len(text) < 8 or any(c not in "0123456789abcdef" for c in text):
        raise NotFound(f"architecture id {text[:70]!r} must be 8 to 64 hex characters")
    q = select(m.Architecture).where(m.Architecture.arch_hash.startswith(text, autoescape=True))
    if base is not None:
        q = q.where(m.Architecture.base_model_id == base.id)
    rows = list(session.scalars(q.limit(2)))
    if not rows:
        raise NotFound(f"no architecture with id {text}")
    if len(rows) > 1:
        raise NotFound(f"architecture id prefix {text} is ambiguous: give more characters")
    return rows[0]


@dataclass
class MetricValue:
    value: float
    protocol_id: int
    evaluation_id: int


def live_metrics(session: Session, arch_ids: list[int]) -> dict[int, dict[str, list[MetricValue]]]:
    """Every live (not retracted) value of the given architectures, by architecture and metric."""
    out: dict[int, dict[str, list[MetricValue]]] = {}
    for start in range(0, len(arch_ids), 2000):
        chunk = arch_ids[start:start + 2000]
        q = (select(m.Evaluation.architecture_id, m.Evaluation.metric, m.Evaluation.value,
                    m.Evaluation.protocol_id, m.Evaluation.id)
             .where(m.Evaluation.architecture_id.in_(chunk), m.Evaluation.retracted_at.is_(None))
             .order_by(m.Evaluation.id))
        for aid, metric, value, pid, eid in session.execute(q):
            out.setdefault(aid, {}).setdefault(metric, []).append(MetricValue(value, pid, eid))
    return out


def arch_view(row: m.Architecture, base: m.BaseModel, values: dict[str, list[MetricValue]],
              protocols: dict[str, int | None] | None = None) -> dict[str, Any]:
    """The ``archopt.archs/1`` entry of one architecture: for each metric the value under the
    metric's chosen protocol (default: the base model's default protocol), else the newest."""
    arch = architecture_of(row, base)
    metrics: dict[str, Any] = {}
    for metric, vals in sorted(values.items()):
        want = (protocols or {}).get(metric)
        if want is None:
            chosen: MetricValue | None = vals[-1]
        else:
            chosen = next((v for v in reversed(vals) if v.protocol_id == want), None)
        if chosen is not None:
            metrics[metric] = {"value": chosen.value, "protocol": chosen.protocol_id}
    return {"arch_id": row.arch_hash, "params": row.params, "fraction": round(row.params / base.total_params, 6),
            "origin": row.origin, "importance": row.importance, "layers": arch.layer_dicts(),
            "sketch": arch.sketch(), "metrics": metrics}


def arch_rows(session: Session, base: m.BaseModel, sort: str | None = None, protocol: int | None = None,
              limit: int | None = None, offset: int = 0) -> list[dict[str, Any]]:
    """Architectures of ``base`` with their metrics, sorted best-first by ``sort`` (a metric) or by size."""
    rows = list(session.scalars(select(m.Architecture).where(m.Architecture.base_model_id == base.id)
                                .order_by(m.Architecture.params.desc(), m.Architecture.id)))
    values = live_metrics(session, [r.id for r in rows])
    protocols: dict[str, int | None] = {}
    for metric in {k for v in values.values() for k in v}:
        protocols[metric] = default_protocol(session, base, metric)
    if sort and protocol is not None:
        protocols[sort] = protocol
    views = [arch_view(r, base, values.get(r.id, {}), protocols) for r in rows]
    if sort:
        sign = 1.0 if lower_is_better(sort) else -1.0
        views.sort(key=lambda v: (sort not in v["metrics"], sign * v["metrics"].get(sort, {"value": 0})["value"]))
    end = None if limit is None else offset + limit
    return views[offset:end]


def protocol_dict(session: Session, protocol_id: int) -> dict[str, Any]:
    row = session.get(m.Protocol, protocol_id)
    if row is None:
        raise NotFound(f"no protocol with id {protocol_id}")
    return {"id": row.id, **protocol_of(row).to_dict()}


def training_pairs(session: Session, base: m.BaseModel, metric: str,
                   protocol_id: int) -> list[tuple[m.Architecture, float, int]]:
    """(architecture row, value, evaluation id) of every live value of one (metric, protocol)."""
    q = (select(m.Architecture, m.Evaluation.value, m.Evaluation.id)
         .join(m.Evaluation, m.Evaluation.architecture_id == m.Architecture.id)
         .where(m.Architecture.base_model_id == base.id, m.Evaluation.metric == metric,
                m.Evaluation.protocol_id == protocol_id, m.Evaluation.retracted_at.is_(None))
         .order_by(m.Evaluation.id))
    return [(a, float(v), int(e)) for a, v, e in session.execute(q)]


def export_records(session: Session, model: str | None = None) -> Iterator[dict[str, Any]]:
    """Ingest-schema objects: first one line per base model, then one per architecture."""
    bases = [get_base_model(session, model)] if model else list(session.scalars(select(m.BaseModel).order_by(m.BaseModel.id)))
    protocols = {p.id: protocol_of(p).to_dict() for p in session.scalars(select(m.Protocol))}
    for base in bases:
        yield {"model": base.name, "base_model": info_of(base).to_dict()}
    for base in bases:
        rows = list(session.scalars(select(m.Architecture).where(m.Architecture.base_model_id == base.id)
                                    .order_by(m.Architecture.id)))
        evals: dict[int, list[m.Evaluation]] = {}
        for start in range(0, len(rows), 2000):
            ids = [r.id for r in rows[start:start + 2000]]
            for e in session.scalars(select(m.Evaluation).where(m.Evaluation.architecture_id.in_(ids))
                                     .order_by(m.Evaluation.id)):
                evals.setdefault(e.architecture_id, []).append(e)
        for row in rows:
            out: dict[str, Any] = {"model": base.name, "arch_id": row.arch_hash,
                                   "architecture": architecture_of(row, base).layer_dicts(),
                                   "origin": row.origin}
            if row.importance:
                out["importance"] = row.importance
            if row.calibration:
                out["calibration"] = row.calibration
            out["evaluations"] = [_eval_dict(e, protocols[e.protocol_id]) for e in evals.get(row.id, [])]
            yield out


def _eval_dict(e: m.Evaluation, protocol: dict[str, Any]) -> dict[str, Any]:
    d: dict[str, Any] = {"metric": e.metric, "value": e.value, "protocol": protocol}
    for key in ("source", "device", "duration_s"):
        if getattr(e, key) is not None:
            d[key] = getattr(e, key)
    d["created_at"] = e.created_at.isoformat()
    if e.retracted_at is not None:
        d["retracted_at"] = e.retracted_at.isoformat()
        d["retract_reason"] = e.retract_reason
    return d


def find_base_model_by_hash(session: Session, ref: str, digest: str) -> m.BaseModel | None:
    """A registered model named or located ``ref``, else the first with config hash ``digest``."""
    from .store import find_base_model
    row = find_base_model(session, ref)
    if row is None:
        row = session.scalar(select(m.BaseModel).where(m.BaseModel.config_hash == digest).order_by(m.BaseModel.id))
    return row


def measured_keys(session: Session, base: m.BaseModel, protocol_keys: list[str]) -> set[tuple[str, str, str]]:
    """(architecture hash, metric, protocol key) of every live value of ``base`` under those protocols."""
    q = (select(m.Architecture.arch_hash, m.Evaluation.metric, m.Protocol.key)
         .join(m.Evaluation, m.Evaluation.architecture_id == m.Architecture.id)
         .join(m.Protocol, m.Protocol.id == m.Evaluation.protocol_id)
         .where(m.Architecture.base_model_id == base.id, m.Protocol.key.in_(protocol_keys),
                m.Evaluation.retracted_at.is_(None)))
    return {(a, b, c) for a, b, c in session.execute(q)}


def values_under(session: Session, base: m.BaseModel, arch_hashes: list[str], metric: str,
                 protocol_key: str) -> dict[str, float]:
    """Architecture hash -> newest live value of ``metric`` under the protocol with key ``protocol_key``."""
    out: dict[str, float] = {}
    for start in range(0, len(arch_hashes), 2000):
        q = (select(m.Architecture.arch_hash, m.Evaluation.value)
             .join(m.Evaluation, m.Evaluation.architecture_id == m.Architecture.id)
             .join(m.Protocol, m.Protocol.id == m.Evaluation.protocol_id)
             .where(m.Architecture.base_model_id == base.id, m.Architecture.arch_hash.in_(arch_hashes[start:start + 2000]),
                    m.Evaluation.metric == metric, m.Protocol.key == protocol_key,
                    m.Evaluation.retracted_at.is_(None))
             .order_by(m.Evaluation.id))
        out.update({h: float(v) for h, v in session.execute(q)})
    return out


def archs_lacking(session: Session, base: m.BaseModel, metric: str, have_key: str, lack_key: str, lo: int, hi: int,
                  limit: int) -> list[Architecture]:
    """Up to ``limit`` architectures of ``base`` in ``[lo, hi]`` parameters with a live value of
    ``metric`` under protocol ``have_key`` and none under ``lack_key`` (newest first)."""
    def measured(key: str) -> Any:
        return (select(m.Evaluation.architecture_id).join(m.Protocol, m.Protocol.id == m.Evaluation.protocol_id)
                .where(m.Evaluation.metric == metric, m.Protocol.key == key, m.Evaluation.retracted_at.is_(None)))
    q = (select(m.Architecture).where(m.Architecture.base_model_id == base.id, m.Architecture.params >= lo,
                                      m.Architecture.params <= hi, m.Architecture.id.in_(measured(have_key)),
                                      m.Architecture.id.not_in(measured(lack_key)))
         .order_by(m.Architecture.id.desc()).limit(limit))
    return [architecture_of(row, base) for row in session.scalars(q)]


def arch_importance(session: Session, base: m.BaseModel, arch_hash: str) -> str | None:
    """The importance criterion an existing architecture was pruned with (None: unknown or new)."""
    return session.scalar(select(m.Architecture.importance).where(
        m.Architecture.base_model_id == base.id, m.Architecture.arch_hash == arch_hash))


def arch_pruning(session: Session, base: m.BaseModel,
                 arch_hashes: list[str]) -> dict[str, tuple[str | None, str | None]]:
    """(importance criterion, calibration label) of each stored architecture among ``arch_hashes``
    (absent: not stored; None inside: unknown, e.g. ingested without it)."""
    out: dict[str, tuple[str | None, str | None]] = {}
    for start in range(0, len(arch_hashes), 2000):
        q = select(m.Architecture.arch_hash, m.Architecture.importance, m.Architecture.calibration).where(
            m.Architecture.base_model_id == base.id, m.Architecture.arch_hash.in_(arch_hashes[start:start + 2000]))
        out.update({h: (imp, cal) for h, imp, cal in session.execute(q)})
    return out


# --- failed runs (measurements that gave no value): never values, never training rows, never exported ---
def failed_keys(session: Session, base: m.BaseModel, protocol_keys: list[str]) -> dict[tuple[str, str, str], str]:
    """(architecture hash, metric, protocol key) -> reason, of the failed runs of ``base`` under those protocols."""
    q = (select(m.Architecture.arch_hash, m.FailedRun.metric, m.Protocol.key, m.FailedRun.reason)
         .join(m.FailedRun, m.FailedRun.architecture_id == m.Architecture.id)
         .join(m.Protocol, m.Protocol.id == m.FailedRun.protocol_id)
         .where(m.Architecture.base_model_id == base.id, m.Protocol.key.in_(protocol_keys)))
    return {(a, b, c): reason for a, b, c, reason in session.execute(q)}


def failed_runs(session: Session, base: m.BaseModel, arch_hashes: list[str]) -> dict[str, list[dict[str, Any]]]:
    """Architecture hash -> its failed runs (``metric``, ``protocol`` id, ``reason``, ``created_at``), oldest first."""
    out: dict[str, list[dict[str, Any]]] = {}
    for start in range(0, len(arch_hashes), 2000):
        q = (select(m.Architecture.arch_hash, m.FailedRun)
             .join(m.FailedRun, m.FailedRun.architecture_id == m.Architecture.id)
             .where(m.Architecture.base_model_id == base.id,
                    m.Architecture.arch_hash.in_(arch_hashes[start:start + 2000]))
             .order_by(m.FailedRun.id))
        for h, run in session.execute(q):
            out.setdefault(h, []).append({"metric": run.metric, "protocol": run.protocol_id, "reason": run.reason,
                                          "created_at": run.created_at.isoformat(timespec="seconds")})
    return out
