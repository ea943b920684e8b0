"""Ingest file formats: JSON Lines, CSV and lm-evaluation-harness results; and export writers.

Readers turn a file into ``(line, ArchRecord)`` pairs or raise ``FormatError`` naming the file, the
line and the field. The schemas are documented in README.md, "File formats".
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from pathlib import Path
from typing import IO, Any, Iterable, Iterator

from .errors import ArchoptError
from .records import ArchRecord, RecordError, parse_record

CSV_COLUMNS = ("model", "arch_id", "architecture", "origin", "importance", "calibration", "metric", "value",
               "dataset", "split", "joining", "tokenizer", "tokenizer_hash", "seq_len", "tokens", "questions",
               "shots", "tool", "tool_version", "precision", "protocol_extra", "source", "device", "duration_s",
               "created_at", "retracted_at", "retract_reason", "base_model", "runtime")
_PROTOCOL_INT = ("seq_len", "tokens", "questions", "shots")
_PROTOCOL_STR = ("dataset", "split", "joining", "tokenizer", "tokenizer_hash", "tool", "tool_version", "precision",
                 "runtime")
MAX_JSON_DEPTH = 64


class FormatError(ArchoptError, ValueError):
    """``file:line: field 'x': message`` — one line, ready to print."""

    def __init__(self, path: str, line: int | None, message: str) -> None:
        where = f"{path}:{line}" if line is not None else path
        super().__init__(f"{where}: {message}")
        self.path, self.line = path, line


def detect_format(path: Path, head: bytes) -> str:
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    if suffix in (".csv",):
        return "csv"
    if suffix == ".json":
        return "lmeval"
    stripped = head.lstrip()
    if stripped.startswith(b"{") and b"\"results\"" in head[:65536] and b"\n{" not in stripped[:65536]:
        return "lmeval"
    return "jsonl" if stripped.startswith(b"{") else "csv"


class NonFiniteNumber(ValueError):
    """A NaN, Infinity or overflowing number (``1e400``); ``field`` is its path in the document."""

    def __init__(self, field_path: str, value: float) -> None:
        super().__init__(f"field {field_path!r}: must be a finite number, got {value!r}")
        self.field = field_path


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise ValueError(f"duplicate key {key[:40]!r}")
            seen.add(key)
    return out


_STRING_RE = re.compile(r'"(?:[^"\\]|\\.)*"')
_NOT_BRACKET_RE = re.compile(r"[^\[\]{}]+")


def _nesting(text: str) -> int:
    """How deep ``[`` and ``{`` nest in JSON text (brackets inside strings do not count)."""
    depth = deepest = 0
    for ch in _NOT_BRACKET_RE.sub("", _STRING_RE.sub("", text)):
        if ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth -= 1
    return deepest


def loads_strict(text: str, allow_nonfinite: bool = False) -> Any:
    """JSON without NaN/Infinity (``NonFiniteNumber`` names the field), duplicate keys or absurd nesting.

    Fast path: NaN, Infinity and overflowing numbers (``1e400``) are caught by ``json``'s hooks
    while parsing; the document is walked only to name the field of one.
    """
    if text.count("[") + text.count("{") > MAX_JSON_DEPTH and _nesting(text) > MAX_JSON_DEPTH:
        raise ValueError(f"nested deeper than {MAX_JSON_DEPTH} levels")
    nonfinite: list[float] = []

    def parse_float(literal: str) -> float:
        value = float(literal)
        if value - value != 0.0:  # 1e400 overflows to infinity
            nonfinite.append(value)
        return value

    def parse_constant(literal: str) -> float:  # NaN, Infinity, -Infinity
        nonfinite.append(float(literal))
        return float(literal)

    value = json.loads(text, object_pairs_hook=_no_duplicates, parse_float=parse_float,
                       parse_constant=parse_constant)
    if nonfinite and not allow_nonfinite:
        _raise_nonfinite(value, "")
    if "\\u" in text and _BAD_ESCAPE_RE.search(text):
        _raise_unstorable(value, "")
    return value


# Only a ``\u`` escape can put a NUL or an unpaired surrogate into a parsed string (raw control
# characters are invalid JSON and decoded UTF-8 holds no surrogates); neither can be stored
# (SQLite's driver cannot encode a lone surrogate, PostgreSQL refuses NUL in text).
_BAD_ESCAPE_RE = re.compile(r"\\u(?:0000|[dD][89a-fA-F])")


def _unstorable(text: str) -> bool:
    if "\x00" in text:
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _raise_unstorable(value: Any, where: str) -> None:
    """Raise ``ValueError`` for the first string (key or value) holding a NUL or a lone surrogate."""
    if isinstance(value, str):
        if _unstorable(value):
            raise ValueError(f"field {where or '(value)'!r}: text holds a NUL character or an unpaired surrogate")
    elif isinstance(value, dict):
        for k, v in value.items():
            if _unstorable(str(k)):
                raise ValueError(f"field {where or '(object)'!r}: a key holds a NUL character or an unpaired surrogate")
            _raise_unstorable(v, f"{where}.{str(k)[:40]}" if where else str(k)[:40])
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _raise_unstorable(v, f"{where}[{i}]")


def _raise_nonfinite(value: Any, where: str) -> None:
    """Raise ``NonFiniteNumber`` for the first NaN or infinity in ``value``, named by its path."""
    if isinstance(value, float) and not math.isfinite(value):
        raise NonFiniteNumber(where or "(value)", value)
    if isinstance(value, dict):
        for k, v in value.items():
            _raise_nonfinite(v, f"{where}.{str(k)[:40]}" if where else str(k)[:40])
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _raise_nonfinite(v, f"{where}[{i}]")


def read_jsonl(path: str, stream: IO[bytes]) -> Iterator[tuple[int, ArchRecord]]:
    for number, raw in enumerate(stream, start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise FormatError(path, number, "is not valid UTF-8") from None
        if number == 1 and line.startswith("\ufeff"):  # a byte-order mark some editors write
            line = line[1:]
        if not line.strip():
            continue
        try:
            data = loads_strict(line)
        except NonFiniteNumber as exc:
            raise FormatError(path, number, str(exc)) from None
        except (ValueError, RecursionError) as exc:
            raise FormatError(path, number, f"invalid JSON: {str(exc).splitlines()[0][:120]}") from None
        try:
            yield number, parse_record(data, source=path)
        except RecordError as exc:
            raise FormatError(path, number, str(exc)) from None


def _csv_record(row: dict[str, str], path: str) -> dict[str, Any]:
    def text(key: str) -> str | None:
        value = row.get(key)
        return value if value not in (None, "") else None

    def json_field(key: str) -> Any:
        value = text(key)
        if value is None:
            return None
        try:
            return loads_strict(value)
        except (ValueError, RecursionError) as exc:
            raise RecordError(key, f"invalid JSON: {str(exc)[:80]}") from None

    out: dict[str, Any] = {"model": text("model")}
    arch = text("architecture")
    if arch is not None:
        out["architecture"] = json_field("architecture") if arch.lstrip()[:1] in "[{" else arch
    for key in ("arch_id", "origin", "importance", "calibration"):
        if text(key) is not None:
            out[key] = text(key)
    if text("base_model") is not None:
        out["base_model"] = json_field("base_model")
    if text("metric") is not None or text("value") is not None:
        protocol: dict[str, Any] = {}
        for key in _PROTOCOL_STR:
            # a column in the header states the value, even an empty one (``tool`` defaults to
            # "archopt" only where the column is absent: an exported tool "" must come back as "")
            if row.get(key) is not None and (row[key] != "" or key == "tool"):
                protocol[key] = row[key]
        for key in _PROTOCOL_INT:
            if text(key) is not None:
                try:
                    protocol[key] = int(text(key))  # type: ignore[arg-type]
                except ValueError:
                    raise RecordError(key, f"must be an integer, got {text(key)[:40]!r}") from None
        extra = json_field("protocol_extra")
        if extra is not None:
            protocol["extra"] = extra
        value_text = text("value")
        try:
            value: Any = float(value_text) if value_text is not None else None
        except ValueError:
            raise RecordError("value", f"must be a number, got {value_text[:40]!r}") from None
        if value is None:
            raise RecordError("value", "is missing")
        ev: dict[str, Any] = {"metric": text("metric"), "value": value, "protocol": protocol}
        for key in ("source", "device", "created_at", "retracted_at", "retract_reason"):
            if text(key) is not None:
                ev[key] = text(key)
        if text("duration_s") is not None:
            try:
                ev["duration_s"] = float(text("duration_s"))  # type: ignore[arg-type]
            except ValueError:
                raise RecordError("duration_s", "must be a number") from None
        out["evaluations"] = [ev]
    return out


def read_csv(path: str, stream: IO[bytes]) -> Iterator[tuple[int, ArchRecord]]:
    try:
        text_stream = io.TextIOWrapper(stream, encoding="utf-8-sig", newline="")  # Excel writes a BOM
        reader = csv.DictReader(text_stream, strict=True)
        header = reader.fieldnames or []
    except (UnicodeDecodeError, csv.Error) as exc:
        raise FormatError(path, 1, f"cannot read the CSV header: {exc}") from None
    unknown = [h for h in header if h not in CSV_COLUMNS]
    if unknown:
        raise FormatError(path, 1, f"field {unknown[0][:40]!r}: unknown column")
    if "model" not in header:
        raise FormatError(path, 1, "field 'model': column is missing")
    try:
        for row in reader:
            number = reader.line_num
            if None in row:
                raise FormatError(path, number, "row has more cells than the header")
            bad = next((k for k, v in row.items() if isinstance(v, str) and "\x00" in v), None)
            if bad is not None:
                raise FormatError(path, number, f"field {bad[:40]!r}: holds a NUL character")
            try:
                yield number, parse_record(_csv_record(row, path), source=path)
            except RecordError as exc:
                raise FormatError(path, number, str(exc)) from None
    except UnicodeDecodeError:
        raise FormatError(path, None, "is not valid UTF-8") from None
    except csv.Error as exc:
        raise FormatError(path, reader.line_num, f"malformed CSV: {exc}") from None


def write_jsonl(records: Iterable[dict[str, Any]], out: IO[str]) -> int:
    n = 0
    for rec in records:
        out.write(json.dumps(rec, ensure_ascii=False, allow_nan=False, separators=(",", ":")) + "\n")
        n += 1
    return n


def write_csv(records: Iterable[dict[str, Any]], out: IO[str]) -> int:
    writer = csv.DictWriter(out, fieldnames=list(CSV_COLUMNS), lineterminator="\n")
    writer.writeheader()
    n = 0
    for rec in records:
        base: dict[str, Any] = {"model": rec["model"]}
        if "base_model" in rec:
            base["base_model"] = json.dumps(rec["base_model"], separators=(",", ":"))
        if "architecture" in rec:
            base["architecture"] = json.dumps(rec["architecture"], separators=(",", ":"))
        for key in ("arch_id", "origin", "importance", "calibration"):
            if key in rec:
                base[key] = rec[key]
        evaluations = rec.get("evaluations") or [None]
        for ev in evaluations:
            row = dict(base)
            if ev is not None:
                row.update({"metric": ev["metric"], "value": repr(float(ev["value"]))})
                for key, value in ev["protocol"].items():
                    if key == "extra":
                        if value:
                            row["protocol_extra"] = json.dumps(value, sort_keys=True)
                    elif value is not None:
                        row[key] = value
                for key in ("source", "device", "duration_s", "created_at", "retracted_at", "retract_reason"):
                    if ev.get(key) is not None:
                        row[key] = ev[key]
            writer.writerow(row)
            n += 1
    return n
