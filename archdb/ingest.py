"""``archopt ingest``: read a file, validate every line, write it in one transaction.

All of a file or nothing: the first bad line raises ``FormatError`` (file, line, field) before or
during the transaction, which is then rolled back. Re-ingesting a file adds nothing and reports
how many rows were already there.
"""

from __future__ import annotations

import contextlib
import gc
import json
from pathlib import Path
from typing import Iterator

from .arch import ArchitectureError, BaseSpec, config_hash
from .archive import Archive
from .formats import FormatError, detect_format, read_csv, read_jsonl
from .lmeval import archopt_json, read_lmeval
from .records import ArchRecord, BaseModelInfo, ValueRecord
from .store import StoreError, WriteReport, find_base_model, ingest_records


def read_records(path: Path, fmt: str | None = None,
                 name: str | None = None) -> tuple[str, list[tuple[int, ArchRecord]]]:
    """Parse a JSONL or CSV file completely (no database access); ``name`` names it in messages."""
    name = name or str(path)
    try:
        with open(path, "rb") as handle:
            head = handle.read(65536)
            fmt = fmt or detect_format(path, head)
            handle.seek(0)
            if fmt == "jsonl":
                return fmt, list(read_jsonl(name, handle))
            if fmt == "csv":
                return fmt, list(read_csv(name, handle))
    except OSError as exc:
        raise FormatError(name, None, f"cannot read: {exc.strerror or exc}") from None
    return fmt, []


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while a file is read and written.

    Parsing builds hundreds of thousands of small, acyclic containers; each generation-2 pass
    walks all of them again, which doubled the time of a 100,000-row ingest. Nothing here makes
    reference cycles, and collection resumes (where it was enabled) when the file is done.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def ingest_file(archive: Archive, path: Path, *, fmt: str | None = None, allow_limit: bool = False,
                name: str | None = None) -> WriteReport:
    """Ingest one file (JSONL, CSV or lm-eval results JSON) as one transaction.

    ``name`` is how error messages and the stored ``source`` call the file (default: ``path``); the
    service passes the client's file name for a body it wrote to a temporary file.
    """
    with _gc_paused():
        return _ingest_file(archive, Path(path), fmt, allow_limit, name or str(path))


def _ingest_file(archive: Archive, path: Path, fmt: str | None, allow_limit: bool, name: str) -> WriteReport:
    try:
        with path.open("rb") as handle:
            raw_head = handle.read(65536)
    except OSError as exc:
        raise FormatError(name, None, f"cannot read: {exc.strerror or exc}") from None
    fmt = fmt or detect_format(path, raw_head)
    if fmt == "lmeval":
        return _ingest_lmeval(archive, path, allow_limit, name)
    _, numbered = read_records(path, fmt, name)
    if not numbered:
        raise FormatError(name, None, "holds no records")
    records = [r for _, r in numbered]
    try:
        with archive.write() as session:
            return ingest_records(session, records)
    except StoreError as exc:
        line = numbered[exc.index][0] if exc.index is not None else None
        prefix = f"field {exc.field!r}: " if exc.field else ""
        raise FormatError(name, line, f"{prefix}{exc}") from None


def _ingest_lmeval(archive: Archive, path: Path, allow_limit: bool, name: str) -> WriteReport:
    try:
        parsed = read_lmeval(name, path.read_bytes(), allow_limit)
    except OSError as exc:
        raise FormatError(name, None, f"cannot read: {exc.strerror or exc}") from None
    values = tuple(ValueRecord(metric, value, protocol, source=name) for metric, value, protocol in parsed.values)
    try:
        with archive.write() as session:
            record = _lmeval_record(session, parsed.model_ref, values, name)
            return ingest_records(session, [record])
    except StoreError as exc:
        prefix = f"field {exc.field!r}: " if exc.field else ""
        raise FormatError(name, None, f"{prefix}{exc}") from None


def _lmeval_record(session, ref: str, values: tuple[ValueRecord, ...], name: str) -> ArchRecord:  # noqa: ANN001
    pruned = archopt_json(ref)
    if pruned is not None:
        # evaluators/saving.py writes "base" (name, location, config_hash, spec) and an importance
        # object ({"criterion": ...}); "base_model" and a plain criterion string are read too.
        base = next((pruned[k] for k in ("base", "base_model") if isinstance(pruned.get(k), dict)), {})
        base_name = base.get("name")
        layers = pruned.get("architecture")
        importance = pruned.get("importance")
        if isinstance(importance, dict):
            importance = importance.get("criterion")
        if not isinstance(base_name, str) or not isinstance(layers, list):
            raise FormatError(name, None, f"field 'model_args': {ref}/archopt.json lacks base.name or architecture")
        row = find_base_model(session, base_name)
        if row is None and isinstance(base.get("config_hash"), str):
            from sqlalchemy import select
            from . import models as m
            row = session.scalar(select(m.BaseModel).where(m.BaseModel.config_hash == base["config_hash"]))
        if row is None:
            raise FormatError(name, None, f"field 'model_args': base model {base_name!r} of {ref} is not in the archive")
        return ArchRecord(model=row.name, base=None, architecture=layers, origin="ingest",
                          importance=importance if importance in ("taylor", "l2") else None,
                          values=values)
    row = find_base_model(session, ref)
    if row is not None:
        return ArchRecord(model=row.name, base=None, architecture="full", origin="base", values=values)
    config_file = Path(ref).expanduser() / "config.json"
    if config_file.is_file():
        try:
            config = json.loads(config_file.read_text())
            spec = BaseSpec.from_hf_config(config)
        except (OSError, ValueError, ArchitectureError, TypeError) as exc:
            raise FormatError(name, None, f"field 'model_args': cannot read {config_file}: {exc}") from None
        info = BaseModelInfo(Path(ref).resolve().name, spec, config_hash(config), str(Path(ref).resolve()))
        return ArchRecord(model=info.name, base=info, architecture="full", origin="base", values=values)
    raise FormatError(name, None, f"field 'model_args': unknown base model {ref!r} (not registered, not a local model)")
