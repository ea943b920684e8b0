"""How a value was measured: the one definition ingest, evaluate and query share.

Two values are comparable only when they share a protocol. A protocol's identity is the sha256 of
its canonical JSON (``Protocol.key``), so the same protocol written by two tools is one row.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field, fields
from collections.abc import Mapping
from typing import Any

from .errors import ArchoptError
from .metrics import EVALUATED, metric_info

# what ``archopt evaluate`` measures: the registry's evaluated metrics and kl_base (``evaluators.kl``)
METRICS = tuple(dict.fromkeys((*EVALUATED, "kl_base")))
# float formats the model computed in; q8_0 is llama.cpp's 8-bit weight format (runtime "llama.cpp")
PRECISIONS = ("float32", "bfloat16", "float16", "float64", "q8_0")
DEFAULT_PRECISION = "float32"
RUNTIMES = ("transformers", "llama.cpp")
DEFAULT_RUNTIME = "transformers"


class ProtocolError(ArchoptError, ValueError):
    """A protocol description that is incomplete or malformed."""


def lower_is_better(metric: str) -> bool:
    """Perplexities, KL divergences and losses go down; accuracies go up (``archdb.metrics``)."""
    return not metric_info(metric, strict=False).higher_is_better


def validate_metric_name(metric: Any) -> str:
    if not isinstance(metric, str) or not metric or len(metric) > 200:
        raise ProtocolError("metric name must be a non-empty string of at most 200 characters")
    if any(ch.isspace() for ch in metric) or not metric.isprintable():
        raise ProtocolError(f"metric name {metric[:40]!r} may not contain spaces or control characters")
    return metric


@dataclass(frozen=True)
class Protocol:
    """Dataset, split, text joining, tokenizer, window, amount evaluated, shots, tool, the numeric
    precision the model ran in (``float32`` unless said: bfloat16 values are another protocol) and
    the runtime whose forward pass gave the logits (``transformers`` unless said; ``llama.cpp`` for a
    GGUF export, whose ``precision`` is the file's out type: float32, float16, bfloat16 or q8_0).

    ``precision`` and ``runtime`` enter the canonical JSON (``to_dict``, ``key``) only when they are
    not the defaults, so the keys of every protocol stored before they existed are unchanged.
    """

    dataset: str
    split: str = ""
    joining: str = ""
    tokenizer: str = ""
    tokenizer_hash: str = ""
    seq_len: int | None = None
    tokens: int | None = None
    questions: int | None = None
    shots: int | None = None
    tool: str = "archopt"
    tool_version: str = ""
    extra: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)
    precision: str = DEFAULT_PRECISION
    runtime: str = DEFAULT_RUNTIME

    def __post_init__(self) -> None:
        if not isinstance(self.dataset, str) or not self.dataset:
            raise ProtocolError("protocol field 'dataset' must be a non-empty string")
        for name in ("split", "joining", "tokenizer", "tokenizer_hash", "tool", "tool_version"):
            value = getattr(self, name)
            if not isinstance(value, str) or len(value) > 500:
                raise ProtocolError(f"protocol field {name!r} must be a string of at most 500 characters")
        for name in ("seq_len", "tokens", "questions", "shots"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                      or value < 0 or value > 10**13):
                raise ProtocolError(f"protocol field {name!r} must be a non-negative integer or null")
        if self.precision not in PRECISIONS:
            raise ProtocolError(f"protocol field 'precision' must be one of {', '.join(PRECISIONS)}, "
                                f"got {str(self.precision)[:40]!r}")
        if self.runtime not in RUNTIMES:
            raise ProtocolError(f"protocol field 'runtime' must be one of {', '.join(RUNTIMES)}, "
                                f"got {str(self.runtime)[:40]!r}")
        if not isinstance(self.extra, dict):
            raise ProtocolError("protocol field 'extra' must be an object")
        try:
            json.dumps(self.extra, allow_nan=False, sort_keys=True)
        except (TypeError, ValueError):
            raise ProtocolError("protocol field 'extra' must hold plain JSON (no NaN)") from None

    def to_dict(self) -> dict[str, Any]:
        """The canonical form (exports, ``key``): ``precision`` only when it is not float32,
        ``runtime`` only when it is not transformers."""
        out = asdict(self)
        if self.precision == DEFAULT_PRECISION:
            del out["precision"]
        if self.runtime == DEFAULT_RUNTIME:
            del out["runtime"]
        return out

    @classmethod
    def from_dict(cls, data: Any) -> "Protocol":
        if not isinstance(data, Mapping):
            raise ProtocolError("protocol must be an object")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ProtocolError(f"unknown protocol field {str(unknown[0])[:40]!r}")
        if "dataset" not in data:
            raise ProtocolError("protocol lacks 'dataset'")
        return cls(**dict(data))

    def key(self) -> str:
        """Hex sha256 of the canonical JSON (``to_dict``)."""
        text = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"), ensure_ascii=True)
        return hashlib.sha256(text.encode()).hexdigest()

    def is_cheaper_fidelity_of(self, other: "Protocol") -> bool:
        """True when this protocol measures the same text the same way as ``other``, on fewer
        tokens (e.g. the first 1,024 of the 8,192 that ``other`` reads): a cheap fidelity of it,
        whose values rank architectures much like ``other``'s (``archopt query --screen``)."""
        same = ("dataset", "split", "joining", "tokenizer", "tokenizer_hash", "seq_len", "questions", "shots", "tool",
                "precision", "runtime")
        if any(getattr(self, f) != getattr(other, f) for f in same):
            return False
        return self.tokens is not None and other.tokens is not None and self.tokens < other.tokens

    def describe(self) -> str:
        parts = [self.dataset]
        if self.split:
            parts.append(self.split)
        if self.seq_len:
            parts.append(f"seq{self.seq_len}")
        if self.tokens:
            parts.append(f"{self.tokens}tok")
        if self.questions:
            parts.append(f"{self.questions}q")
        if self.shots is not None:
            parts.append(f"{self.shots}-shot")
        if self.tool and self.tool != "archopt":
            parts.append(self.tool)
        if self.runtime != DEFAULT_RUNTIME:
            parts.append(self.runtime)
        if self.precision != DEFAULT_PRECISION:
            parts.append(self.precision)
        return "/".join(parts)


def validate_value(metric: str, value: Any) -> float:
    """A stored value is a finite number within the metric's bounds (``archdb.metrics``): most are
    non-negative, accuracies lie in [0, 1]."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ProtocolError(f"value of {metric} must be a number, got {type(value).__name__}")
    v = float(value)
    if not math.isfinite(v):
        raise ProtocolError(f"value of {metric} must be finite, got {value!r}")
    info = metric_info(metric, strict=False)
    if info.lower_bound is not None and v < info.lower_bound:
        raise ProtocolError(f"value of {metric} must not be negative, got {value!r}" if info.lower_bound == 0
                            else f"value of {metric} must be at least {info.lower_bound:g}, got {value!r}")
    if info.upper_bound is not None and v > info.upper_bound:
        raise ProtocolError(f"value of {metric} is an accuracy in [0, 1], got {value!r}" if info.is_accuracy
                            else f"value of {metric} must be at most {info.upper_bound:g}, got {value!r}")
    return v


@dataclass(frozen=True)
class Measurement:
    """One measured value with its protocol, as evaluators produce it and the archive stores it."""

    metric: str
    value: float
    protocol: Protocol
    device: str = ""
    duration_s: float | None = None
    failed: str | None = None

    @property
    def failure(self) -> str | None:
        """Why this run gives no storable value (a diverged model, a non-finite or impossible
        number), or None. The archive records such a run as a failed run, never as a value."""
        if self.failed:
            return self.failed
        try:
            validate_value(self.metric, self.value)
        except ProtocolError as exc:
            return str(exc)
        return None
