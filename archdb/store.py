"""Writing to the archive: base models, protocols, architectures and evaluations, in bulk.

Every function takes an open session from ``Archive.write()`` and leaves committing to it, so a
caller's whole batch (one ingest file, one measured architecture) is one transaction. Inserts are
idempotent: an existing row (same base model name, protocol key, architecture hash, or
(architecture, metric, protocol)) is kept and counted, never duplicated nor overwritten.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import asdict, dataclass, field
from operator import itemgetter
from pathlib import Path
from typing import Any, Iterable, Sequence

from sqlalchemy import DateTime, bindparam, select, text
from sqlalchemy.orm import Session

from .errors import ArchoptError
from . import models as m
from .arch import Architecture, ArchitectureError, BaseSpec, config_hash, parse_architecture
from .protocol import Measurement, Protocol
from .records import ArchRecord, BaseModelInfo

CHUNK = 2000
WRITER_LOCK_KEY = 712007  # pg_advisory_xact_lock key of archive writers (712006 guards migrations)


class StoreError(ArchoptError, ValueError):
    """A write the archive refuses; ``index`` is the position of the offending record, if any."""

    def __init__(self, message: str, index: int | None = None, field_name: str | None = None) -> None:
        super().__init__(message)
        self.index = index
        self.field = field_name


@dataclass
class WriteReport:
    """What a batch did: rows added and rows that were already there."""

    models_added: int = 0
    archs_added: int = 0
    archs_existing: int = 0
    evaluations_added: int = 0
    evaluations_existing: int = 0
    failed_added: int = 0
    arch_ids: list[str] = field(default_factory=list)

    def merge(self, other: "WriteReport") -> None:
        for name in ("models_added", "archs_added", "archs_existing", "evaluations_added", "evaluations_existing",
                     "failed_added"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.arch_ids.extend(other.arch_ids)


def _insert(session: Session, entity: Any) -> Any:
    """A Core INSERT for the session's dialect (with ON CONFLICT support)."""
    if session.get_bind().dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    return insert(entity.__table__)


def _run(session: Session, stmt: Any, rows: Any = None) -> Any:
    """Execute Core statements on the session's connection (same transaction, plain cursor results).

    ``preserve_rowcount``: SQLAlchemy 2.1 with psycopg reports ``rowcount == -1`` for INSERTs
    otherwise, which made every row count as "already there" on PostgreSQL.
    """
    conn = session.connection()
    stmt = stmt.execution_options(preserve_rowcount=True)
    return conn.execute(stmt) if rows is None else conn.execute(stmt, rows)


def _bulk_insert(session: Session, model: Any, rows: Sequence[dict[str, Any]], conflict: list[str]) -> int:
    """``INSERT ... ON CONFLICT DO NOTHING`` of many rows (all with the same keys); returns how many
    were inserted.

    SQLAlchemy compiles the statement once; the rows go to the driver's ``executemany`` as plain
    tuples (or dicts, for named parameter styles), each value through its column type's bind
    processor (SQLite keeps DateTime as text). SQLAlchemy's own per-row parameter handling cost
    about as much as SQLite's insert itself on a 100,000-row ingest. Driver errors still leave as
    SQLAlchemy errors (``Archive.write`` turns them into ``ArchiveError``).
    """
    if not rows:
        return 0
    conn = session.connection()
    dialect = conn.dialect
    table = model.__table__
    columns = list(rows[0])
    stmt = _insert(session, model).values({c: bindparam(c) for c in columns}).on_conflict_do_nothing(
        index_elements=conflict)
    compiled = stmt.compile(dialect=dialect)
    processors = {c: p for c in columns
                  if (p := table.c[c].type.dialect_impl(dialect).bind_processor(dialect)) is not None}
    # a batch shares a few timestamps: convert each distinct one once
    memo: dict[str, dict[Any, Any]] = {c: {} for c in processors if isinstance(table.c[c].type, DateTime)}

    def process(column: str, value: Any) -> Any:
        seen = memo.get(column)
        if seen is None:
            return processors[column](value)
        try:
            return seen[value]
        except KeyError:
            out = seen[value] = processors[column](value)
            return out

    if compiled.positional:
        order = list(compiled.positiontup or [])
        getter = itemgetter(*order)
        params: list[Any] = [getter(r) if len(order) > 1 else (getter(r),) for r in rows]
        slots = [(order.index(c), c) for c in processors]
        if slots:
            for n, tup in enumerate(params):
                values = list(tup)
                for i, c in slots:
                    values[i] = process(c, values[i])
                params[n] = tuple(values)
    else:
        params = [{**r, **{c: process(c, r[c]) for c in processors}} if processors else r for r in rows]
    added = 0
    for chunk in _chunks(params):
        result = conn.exec_driver_sql(compiled.string, list(chunk), execution_options={"preserve_rowcount": True})
        added += max(result.rowcount, 0) if result.rowcount is not None else len(chunk)
    return added


def serialize_writers(session: Session) -> None:
    """On PostgreSQL, queue this transaction behind other archive writers (released at commit).

    Concurrent batches that insert overlapping architectures or evaluations in different orders
    would otherwise deadlock (PostgreSQL aborts one with "deadlock detected"); SQLite already
    serialises writers with ``BEGIN IMMEDIATE``. Readers are never blocked.
    """
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": WRITER_LOCK_KEY})


def _chunks(items: Sequence[Any], size: int = CHUNK) -> Iterable[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


# --- base models ---------------------------------------------------------------------------------
def spec_of(row: m.BaseModel) -> BaseSpec:
    return BaseSpec(family=row.family, num_layers=row.num_layers, hidden_size=row.hidden_size,
                    num_heads=row.num_heads, num_kv_heads=row.num_kv_heads, head_dim=row.head_dim,
                    intermediate_size=row.intermediate_size, vocab_size=row.vocab_size,
                    tie_embeddings=row.tie_embeddings, qkv_bias=row.qkv_bias, o_bias=row.o_bias,
                    mlp_bias=row.mlp_bias)


def info_of(row: m.BaseModel) -> BaseModelInfo:
    return BaseModelInfo(row.name, spec_of(row), row.config_hash, row.location, row.revision)


def register_base_model(session: Session, info: BaseModelInfo) -> tuple[m.BaseModel, bool]:
    """Return the row named ``info.name``, creating it; refuse a different shape under that name."""
    row = session.scalar(select(m.BaseModel).where(m.BaseModel.name == info.name))
    if row is not None:
        if spec_of(row) != info.spec:
            raise StoreError(f"base model {info.name!r} is registered with another shape", field_name="base_model")
        if info.location and not row.location:
            row.location = info.location
        return row, False
    spec = info.spec
    stmt = _insert(session, m.BaseModel).values(
        name=info.name, family=spec.family, config_hash=info.config_hash, location=info.location,
        revision=info.revision, num_layers=spec.num_layers, hidden_size=spec.hidden_size,
        num_heads=spec.num_heads, num_kv_heads=spec.num_kv_heads, head_dim=spec.head_dim,
        intermediate_size=spec.intermediate_size, vocab_size=spec.vocab_size,
        tie_embeddings=spec.tie_embeddings, qkv_bias=spec.qkv_bias, o_bias=spec.o_bias,
        mlp_bias=spec.mlp_bias, total_params=spec.total_params, created_at=m.utcnow(),
    ).on_conflict_do_nothing(index_elements=["name"])
    added = _run(session, stmt).rowcount == 1
    row = session.scalar(select(m.BaseModel).where(m.BaseModel.name == info.name))
    assert row is not None
    return row, added


def find_base_model(session: Session, text: str) -> m.BaseModel | None:
    """A registered name, or a local path / hub id whose location or config hash is registered."""
    row = session.scalar(select(m.BaseModel).where(m.BaseModel.name == text))
    if row is not None:
        return row
    row = session.scalar(select(m.BaseModel).where(m.BaseModel.location == text).order_by(m.BaseModel.id))
    if row is not None:
        return row
    path = Path(text).expanduser()
    config_file = path / "config.json"
    if config_file.is_file():
        try:
            digest = config_hash(json.loads(config_file.read_text()))
        except (OSError, ValueError):
            return None
        return session.scalar(select(m.BaseModel).where(m.BaseModel.config_hash == digest).order_by(m.BaseModel.id))
    return None


# --- protocols -----------------------------------------------------------------------------------
def protocol_ids(session: Session, protocols: Iterable[Protocol]) -> dict[str, int]:
    """Map each protocol's key to its row id, inserting the missing ones."""
    wanted = {p.key(): p for p in protocols}
    found: dict[str, int] = {}
    keys = list(wanted)
    for chunk in _chunks(keys):
        for pid, key in session.execute(select(m.Protocol.id, m.Protocol.key).where(m.Protocol.key.in_(chunk))):
            found[key] = pid
    missing = [k for k in keys if k not in found]
    if missing:
        now = m.utcnow()
        rows = [{"key": k, **asdict(wanted[k]), "created_at": now} for k in missing]  # every column, precision and runtime too
        _run(session, _insert(session, m.Protocol).on_conflict_do_nothing(index_elements=["key"]), rows)
        for chunk in _chunks(missing):
            for pid, key in session.execute(select(m.Protocol.id, m.Protocol.key).where(m.Protocol.key.in_(chunk))):
                found[key] = pid
    return found


def protocol_of(row: m.Protocol) -> Protocol:
    return Protocol(dataset=row.dataset, split=row.split, joining=row.joining, tokenizer=row.tokenizer,
                    tokenizer_hash=row.tokenizer_hash, seq_len=row.seq_len, tokens=row.tokens,
                    questions=row.questions, shots=row.shots, tool=row.tool, tool_version=row.tool_version,
                    extra=dict(row.extra or {}), precision=row.precision, runtime=row.runtime)


# --- architectures -------------------------------------------------------------------------------
@dataclass(frozen=True)
class NewArch:
    arch: Architecture
    origin: str = "ingest"
    importance: str | None = None
    calibration: str | None = None


def architecture_ids(session: Session, base: m.BaseModel, archs: Sequence[NewArch],
                     hashes: Sequence[str] | None = None) -> tuple[dict[str, int], int]:
    """Map each architecture's hash to its row id, inserting missing ones (first origin wins).

    ``hashes``, if given, are the ``arch_id``s of ``archs`` already computed by the caller.
    Returns the mapping and the number of rows added.
    """
    by_hash: dict[str, NewArch] = {}
    if hashes is None:
        hashes = [item.arch.arch_id(base.name) for item in archs]
    for h, item in zip(hashes, archs):
        by_hash.setdefault(h, item)
    found: dict[str, int] = {}

    def load(hashes: Sequence[str]) -> None:
        for chunk in _chunks(hashes):
            q = select(m.Architecture.id, m.Architecture.arch_hash).where(
                m.Architecture.base_model_id == base.id, m.Architecture.arch_hash.in_(chunk))
            for aid, h in session.execute(q):
                found[h] = aid

    load(list(by_hash))
    missing = [h for h in by_hash if h not in found]
    added = 0
    if missing:
        now = m.utcnow()
        rows = [{"base_model_id": base.id, "arch_hash": h, "encoding": by_hash[h].arch.canonical_json(),
                 "params": by_hash[h].arch.params, "origin": by_hash[h].origin,
                 "importance": by_hash[h].importance, "calibration": by_hash[h].calibration,
                 "created_at": now} for h in missing]
        _bulk_insert(session, m.Architecture, rows, ["base_model_id", "arch_hash"])
        before = len(found)
        load(missing)
        added = len(found) - before
    return found, added


# --- evaluations ---------------------------------------------------------------------------------
def insert_evaluations(session: Session, rows: list[dict[str, Any]]) -> tuple[int, int]:
    """Insert evaluation rows (dicts of column values); returns (added, already there).

    A row whose (architecture, metric, protocol) is stored already, or repeated in ``rows``, is
    kept as it is (``ON CONFLICT DO NOTHING``; the first of repeated rows wins) and counted as
    already there. The counts come from the inserts' row counts: no query per row beforehand.
    """
    unique: dict[tuple[int, str, int], dict[str, Any]] = {}
    for row in rows:
        unique.setdefault((row["architecture_id"], row["metric"], row["protocol_id"]), row)
    new_rows = list(unique.values())
    added = _bulk_insert(session, m.Evaluation, new_rows, ["architecture_id", "metric", "protocol_id"])
    return added, len(rows) - added


def record_measurements(session: Session, base: m.BaseModel, item: NewArch,
                        measurements: Sequence[Measurement], source: str | None = None) -> WriteReport:
    """Store one architecture and its measured values (the evaluator's path).

    A measurement without a storable value (``Measurement.failure``: a diverged model's infinite
    perplexity, a NaN) becomes a failed run with its reason, never a value; the architecture is
    stored all the same, so the run is known. A failed run already stored is kept as it is.
    """
    serialize_writers(session)
    ids, archs_added = architecture_ids(session, base, [item])
    arch_hash = item.arch.arch_id(base.name)
    pids = protocol_ids(session, [x.protocol for x in measurements])
    now = m.utcnow()
    rows, failed = [], []
    for x in measurements:
        row = {"architecture_id": ids[arch_hash], "metric": x.metric, "protocol_id": pids[x.protocol.key()],
               "source": source, "device": x.device, "duration_s": x.duration_s, "created_at": now}
        reason = x.failure
        if reason is None:
            rows.append({**row, "value": float(x.value)})
        else:
            failed.append({**row, "reason": reason[:2000]})
    added, existing = insert_evaluations(session, rows)
    failed_added = _bulk_insert(session, m.FailedRun, failed, ["architecture_id", "metric", "protocol_id"])
    return WriteReport(archs_added=archs_added, archs_existing=1 - archs_added, evaluations_added=added,
                       evaluations_existing=existing, failed_added=failed_added, arch_ids=[arch_hash])


def ingest_records(session: Session, records: Sequence[ArchRecord]) -> WriteReport:
    """Validate every record against its base model and write them all (caller's transaction).

    Raises ``StoreError`` with the record's index on the first impossible record.
    """
    serialize_writers(session)
    report = WriteReport()
    bases: dict[str, m.BaseModel] = {}
    for i, rec in enumerate(records):
        if rec.model in bases:
            if rec.base is not None and rec.base.spec != spec_of(bases[rec.model]):
                raise StoreError(f"base model {rec.model!r} is registered with another shape", i, "base_model")
            continue
        if rec.base is not None:
            try:
                row, added = register_base_model(session, rec.base)
            except StoreError as exc:  # give it the record's position, so the error names the line
                raise StoreError(str(exc), i, exc.field) from None
            if spec_of(row) != rec.base.spec:
                raise StoreError(f"base model {rec.model!r} is registered with another shape", i, "base_model")
            report.models_added += int(added)
        else:
            row = session.scalar(select(m.BaseModel).where(m.BaseModel.name == rec.model))
            if row is None:
                raise StoreError(f"unknown base model {rec.model!r} and no base_model description to create it",
                                 i, "model")
        bases[rec.model] = row

    specs = {name: spec_of(row) for name, row in bases.items()}
    per_base: dict[str, list[tuple[int, NewArch, str]]] = {}
    for i, rec in enumerate(records):
        if rec.architecture is None:
            continue
        try:
            arch = parse_architecture(specs[rec.model], rec.architecture)
        except ArchitectureError as exc:
            raise StoreError(str(exc), i, "architecture") from None
        h = arch.arch_id(rec.model)  # hashed once per record
        if rec.arch_id and h != rec.arch_id:
            raise StoreError("arch_id does not match the architecture", i, "arch_id")
        per_base.setdefault(rec.model, []).append(
            (i, NewArch(arch, rec.origin, rec.importance, rec.calibration), h))

    # each distinct Protocol object is hashed once (records of one file share them: records.protocol_from_dict)
    protocol_keys: dict[int, str] = {}
    distinct: list[Protocol] = []
    for rec in records:
        for v in rec.values:
            if id(v.protocol) not in protocol_keys:
                protocol_keys[id(v.protocol)] = v.protocol.key()
                distinct.append(v.protocol)
    pids = protocol_ids(session, distinct)
    eval_rows: list[dict[str, Any]] = []
    now = m.utcnow()
    for name, items in per_base.items():
        base = bases[name]
        ids, added = architecture_ids(session, base, [a for _, a, _ in items], [h for _, _, h in items])
        report.archs_added += added
        report.archs_existing += len({h for _, _, h in items}) - added
        for i, item, h in items:
            report.arch_ids.append(h)
            aid = ids[h]
            for v in records[i].values:
                eval_rows.append({
                    "architecture_id": aid, "metric": v.metric, "value": v.value,
                    "protocol_id": pids[protocol_keys[id(v.protocol)]], "source": v.source, "device": v.device,
                    "duration_s": v.duration_s, "created_at": v.created_at or now,
                    "retracted_at": v.retracted_at, "retract_reason": v.retract_reason})
    added, existing = insert_evaluations(session, eval_rows)
    report.evaluations_added += added
    report.evaluations_existing += existing
    return report


def retract_evaluation(session: Session, evaluation_id: int, why: str) -> m.Evaluation:
    row = session.get(m.Evaluation, evaluation_id)
    if row is None:
        raise StoreError(f"no evaluation with id {evaluation_id}")
    if row.retracted_at is None:
        row.retracted_at = m.utcnow()
        row.retract_reason = why
    return row


def now_iso(value: dt.datetime | None) -> str | None:
    return value.isoformat() if value is not None else None
