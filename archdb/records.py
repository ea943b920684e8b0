"""What one line of an ingest file says, validated before anything touches the database.

A record names a base model (and may describe it, so an empty archive can learn it), an
architecture in any accepted written form, and zero or more measured values with their
protocols. Parsing raises ``RecordError`` whose message names the field; the caller adds the file
and line.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import ArchoptError
from .arch import ArchitectureError, BaseSpec
from .protocol import Protocol, ProtocolError, validate_metric_name, validate_value

ORIGINS = ("base", "uniform", "random", "search", "verify", "ingest", "rule", "screen", "profile")
IMPORTANCE_CRITERIA = ("taylor", "l2")


class RecordError(ArchoptError, ValueError):
    """A record that cannot be ingested; ``field`` names the offending field."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"field {field_name!r}: {message}")
        self.field = field_name
        self.detail = message


@dataclass(frozen=True)
class BaseModelInfo:
    """A base model as registered: its name, shape and where its weights live."""

    name: str
    spec: BaseSpec
    config_hash: str
    location: str | None = None
    revision: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, **self.spec.to_dict(), "config_hash": self.config_hash,
                "location": self.location, "revision": self.revision}


@dataclass(frozen=True)
class ValueRecord:
    metric: str
    value: float
    protocol: Protocol
    source: str | None = None
    device: str | None = None
    duration_s: float | None = None
    created_at: dt.datetime | None = None
    retracted_at: dt.datetime | None = None
    retract_reason: str | None = None


@dataclass(frozen=True)
class ArchRecord:
    """One evaluated architecture: ``architecture`` is still in its written form (parsed later
    against the base model's shape). ``architecture is None`` only registers a base model."""

    model: str
    base: BaseModelInfo | None
    architecture: Any
    origin: str = "ingest"
    importance: str | None = None
    calibration: str | None = None
    arch_id: str | None = None
    values: tuple[ValueRecord, ...] = field(default=())


_STR_LIMIT = 10_000


def _opt_str(data: Mapping[str, Any], key: str, limit: int = _STR_LIMIT) -> str | None:
    value = data.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise RecordError(key, f"must be a string, got {type(value).__name__}")
    if len(value) > limit:
        raise RecordError(key, f"is longer than {limit} characters")
    return value


def _opt_time(data: Mapping[str, Any], key: str) -> dt.datetime | None:
    text = _opt_str(data, key, 64)
    if text is None:
        return None
    try:
        value = dt.datetime.fromisoformat(text)
    except ValueError:
        raise RecordError(key, f"is not an ISO time: {text[:40]!r}") from None
    if value.tzinfo is not None:
        value = value.astimezone(dt.timezone.utc).replace(tzinfo=None)
    return value


def parse_base_model(data: Any, name: str | None = None) -> BaseModelInfo:
    """Read a ``base_model`` object: the shape fields of ``BaseSpec`` plus ``config_hash``,
    optional ``location`` and ``revision`` (``name`` may sit inside or come from the record)."""
    if not isinstance(data, Mapping):
        raise RecordError("base_model", "must be an object")
    data = dict(data)
    inner_name = data.pop("name", None)
    name = name or inner_name
    if not isinstance(name, str) or not name.strip():
        raise RecordError("base_model.name", "must be a non-empty string")
    config_hash = data.pop("config_hash", None)
    location = data.pop("location", None)
    revision = data.pop("revision", None)
    data.pop("total_params", None)  # derived; accepted for readability of exports
    for key, value in (("config_hash", config_hash), ("location", location), ("revision", revision)):
        if value is not None and (not isinstance(value, str) or len(value) > 2000):
            raise RecordError(f"base_model.{key}", "must be a string")
    try:
        spec = BaseSpec.from_dict(data)
    except (ArchitectureError, TypeError) as exc:
        raise RecordError("base_model", str(exc)) from None
    if config_hash is None:
        from .arch import config_hash as hash_config
        config_hash = hash_config({"archopt_base": spec.to_dict()})
    return BaseModelInfo(name.strip(), spec, config_hash, location, revision)


def protocol_from_dict(data: Any) -> Protocol:
    """``Protocol.from_dict`` with a cache: a file of 100,000 values usually names a handful of
    protocols, so each distinct one is validated (and later hashed) once. The cache key keeps
    every value's type (``1``, ``1.0`` and ``true`` differ), so validation is never skipped."""
    if not isinstance(data, dict):
        return Protocol.from_dict(data)
    values = tuple(data.values())
    try:
        key: Any = (tuple(data), values, tuple(map(type, values)))
        hash(key)
    except TypeError:  # a nested "extra" object: its JSON text keeps the types apart too
        try:
            key = json.dumps(data)  # in its own order: the protocol keeps the order of "extra"
        except (TypeError, ValueError):
            return Protocol.from_dict(data)
    return _protocol_of_key(key)


@functools.lru_cache(maxsize=4096)
def _protocol_of_key(key: Any) -> Protocol:
    """The protocol a ``protocol_from_dict`` key describes (its JSON text, or names, values, types)."""
    if isinstance(key, str):
        return Protocol.from_dict(json.loads(key))
    names, values, _ = key
    return Protocol.from_dict(dict(zip(names, values)))


_VALUE_FIELDS = frozenset({"metric", "value", "protocol", "source", "device", "duration_s", "created_at",
                           "retracted_at", "retract_reason"})
@functools.lru_cache(maxsize=10_000)
def _checked_metric_name(metric: str) -> str:
    """``validate_metric_name``, once per name (a file repeats a few metric names)."""
    return validate_metric_name(metric)


def parse_value(data: Any, where: str, source: str | None) -> ValueRecord:
    if not isinstance(data, Mapping):
        raise RecordError(where, "must be an object")
    if not data.keys() <= _VALUE_FIELDS:
        unknown = sorted(str(k) for k in set(data) - _VALUE_FIELDS)
        raise RecordError(f"{where}.{unknown[0][:40]}", "unknown field")
    metric = data.get("metric")
    try:
        metric = _checked_metric_name(metric) if metric.__class__ is str else validate_metric_name(metric)
    except ProtocolError as exc:
        raise RecordError(f"{where}.metric", str(exc)) from None
    if "value" not in data:
        raise RecordError(f"{where}.value", "is missing")
    try:
        value = validate_value(metric, data["value"])
    except ProtocolError as exc:
        raise RecordError(f"{where}.value", str(exc)) from None
    if "protocol" not in data:
        raise RecordError(f"{where}.protocol", "is missing")
    try:
        protocol = protocol_from_dict(data["protocol"])
    except (ProtocolError, TypeError) as exc:
        raise RecordError(f"{where}.protocol", str(exc)) from None
    duration = data.get("duration_s")
    if duration is not None and (not isinstance(duration, (int, float)) or isinstance(duration, bool)
                                 or not math.isfinite(duration) or duration < 0):
        raise RecordError(f"{where}.duration_s", "must be a non-negative finite number")
    try:
        return ValueRecord(
            metric, value, protocol,
            _opt_str(data, "source") or source,
            _opt_str(data, "device", 200),
            float(duration) if duration is not None else None,
            _opt_time(data, "created_at") if "created_at" in data else None,
            _opt_time(data, "retracted_at") if "retracted_at" in data else None,
            _opt_str(data, "retract_reason") if "retract_reason" in data else None,
        )
    except RecordError as exc:  # name the field with its place: evaluations[2].created_at
        raise RecordError(f"{where}.{exc.field}", exc.detail) from None


_RECORD_FIELDS = {"model", "base_model", "architecture", "origin", "importance", "calibration",
                  "arch_id", "evaluations", "params"}


def parse_record(data: Any, source: str | None = None) -> ArchRecord:
    """Validate one JSON object of the ingest schema (see README, "File formats")."""
    if not isinstance(data, Mapping):
        raise RecordError("(line)", f"must be a JSON object, got {type(data).__name__}")
    unknown = sorted(str(k) for k in set(data) - _RECORD_FIELDS)
    if unknown:
        raise RecordError(unknown[0][:40], "unknown field")
    model = data.get("model")
    if model is None and isinstance(data.get("base_model"), Mapping):
        model = data["base_model"].get("name")
    if not isinstance(model, str) or not model.strip() or len(model) > 300:
        raise RecordError("model", "must be a non-empty string of at most 300 characters")
    base = parse_base_model(data["base_model"], model.strip()) if data.get("base_model") is not None else None
    origin = data.get("origin", "ingest")
    if origin not in ORIGINS:
        raise RecordError("origin", f"must be one of {', '.join(ORIGINS)}, got {str(origin)[:40]!r}")
    importance = _opt_str(data, "importance", 40)
    if importance is not None and importance not in IMPORTANCE_CRITERIA:
        raise RecordError("importance", f"must be one of {', '.join(IMPORTANCE_CRITERIA)}")
    arch_id = _opt_str(data, "arch_id", 64)
    evaluations = data.get("evaluations", [])
    if not isinstance(evaluations, list):
        raise RecordError("evaluations", "must be a list")
    values = tuple(parse_value(v, f"evaluations[{i}]", source) for i, v in enumerate(evaluations))
    architecture = data.get("architecture")
    if architecture is None and (values or arch_id):
        raise RecordError("architecture", "is missing")
    if architecture is None and base is None:
        raise RecordError("architecture", "is missing (a line without one must describe a base_model)")
    return ArchRecord(model=model.strip(), base=base, architecture=architecture, origin=origin,
                      importance=importance, calibration=_opt_str(data, "calibration"),
                      arch_id=arch_id, values=values)
