"""``archopt db check`` and ``archopt db backup``: integrity checks and online backups."""

from __future__ import annotations

import hashlib
import json
import math
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import select, text
from sqlalchemy.engine import make_url

from . import models as m
from .arch import ArchitectureError, from_layer_dicts
from .archive import Archive, ArchiveError, head_revision
from .store import spec_of


@dataclass
class CheckReport:
    """What ``check`` looked at and every problem it found (empty: the archive is sound)."""

    checked: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def check(archive: Archive) -> CheckReport:
    """Database integrity (SQLite ``integrity_check`` and foreign keys), schema version, and the
    archive's own invariants: architecture hashes and parameter counts recomputed from their
    encodings, finite non-negative values, predictor artifacts matching their sha256."""
    report = CheckReport()
    current = archive.current_revision()
    if current != head_revision(archive.url):
        report.problems.append(f"schema at {current}, not at head {head_revision(archive.url)}: run archopt db upgrade")
    with archive.read() as session:
        if archive.dialect == "sqlite":
            rows = [r[0] for r in session.execute(text("PRAGMA integrity_check"))]
            if rows != ["ok"]:
                report.problems.extend(f"sqlite integrity: {r}" for r in rows[:20])
            fk = list(session.execute(text("PRAGMA foreign_key_check")))
            report.problems.extend(f"foreign key broken: table {r[0]} row {r[1]} -> {r[2]}" for r in fk[:20])
        bases = {b.id: b for b in session.scalars(select(m.BaseModel))}
        report.checked["base_models"] = len(bases)
        n_archs = 0
        for row in session.scalars(select(m.Architecture).execution_options(yield_per=2000)):
            n_archs += 1
            base = bases.get(row.base_model_id)
            if base is None:
                report.problems.append(f"architecture {row.id} has no base model")
                continue
            try:
                arch = from_layer_dicts(spec_of(base), json.loads(row.encoding))
            except (ArchitectureError, ValueError) as exc:
                report.problems.append(f"architecture {row.arch_hash[:12]}: unreadable encoding ({exc})")
                continue
            if arch.arch_id(base.name) != row.arch_hash:
                report.problems.append(f"architecture {row.arch_hash[:12]}: hash does not match its encoding")
            if arch.params != row.params:
                report.problems.append(f"architecture {row.arch_hash[:12]}: params {row.params} != {arch.params}")
        report.checked["architectures"] = n_archs
        n_evals = 0
        for eid, metric, value in session.execute(select(m.Evaluation.id, m.Evaluation.metric, m.Evaluation.value)
                                                  .execution_options(yield_per=5000)):
            n_evals += 1
            if value is None or not math.isfinite(value) or value < 0:
                report.problems.append(f"evaluation {eid} ({metric}) has an invalid value {value!r}")
        report.checked["evaluations"] = n_evals
        n_pred = 0
        for pid, metric, version, artifact, digest in session.execute(
                select(m.PredictorVersion.id, m.PredictorVersion.metric, m.PredictorVersion.version,
                       m.PredictorVersion.artifact, m.PredictorVersion.artifact_sha256)):
            n_pred += 1
            if hashlib.sha256(artifact).hexdigest() != digest:
                report.problems.append(f"predictor {pid} ({metric} v{version}): artifact hash mismatch "
                                       "(it will be refused; retrain with archopt predictors train)")
        report.checked["predictors"] = n_pred
    return report


def backup(archive: Archive, destination: Path) -> Path:
    """Copy a SQLite archive with SQLite's online backup API (safe while others write)."""
    if archive.dialect != "sqlite":
        raise ArchiveError("archopt db backup copies SQLite archives; for PostgreSQL use "
                           "`pg_dump --format=custom --file archive.dump DBNAME` (restore with pg_restore)")
    source = make_url(archive.url).database
    if not source or source == ":memory:":
        raise ArchiveError("an in-memory archive cannot be backed up")
    destination = Path(destination)
    if destination.exists():
        raise ArchiveError(f"{destination} exists: choose a new file")
    if not destination.parent.is_dir():
        raise ArchiveError(f"folder {destination.parent} does not exist")
    tmp = destination.with_name(destination.name + ".partial")
    src = sqlite3.connect(source, timeout=120)
    dst = sqlite3.connect(tmp)
    try:
        src.backup(dst)
    finally:
        dst.close()
        src.close()
    tmp.replace(destination)
    return destination
