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

METRICS = ("ppl_wikitext2", "ppl_ptb", "mmlu")
LOWER_IS_BETTER_PREFIXES = ("ppl", "kl", "loss", "word_perplexity", "byte_perplexity", "bits_per_byte")


class ProtocolError(ArchoptError, ValueError):
    """A protocol description that is incomplete or malformed."""


def lower_is_better(metric: str) -> bool:
    """Perplexities, KL divergences and losses go down; accuracies go up."""
    return metric.split(",")[0].startswith(LOWER_IS_BETTER_PREFIXES)


def validate_metric_name(metric: Any) -> str:
    if not isinstance(metric, str) or not metric or len(metric) > 200:
        raise ProtocolError("metric name must be a non-empty string of at most 200 characters")
    if any(ch.isspace() for ch in metric) or not metric.isprintable():
        raise ProtocolError(f"metric name {metric[:40]!r} may not contain spaces or control characters")
    return metric


@dataclass(frozen=True)
class Protocol:
    """Dataset, split, text joining, tokenizer, window, amount evaluated, shots and tool."""

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
        if not isinstance(self.extra, dict):
            raise ProtocolError("protocol field 'extra' must be an object")
        try:
            json.dumps(self.extra, allow_nan=False, sort_keys=True)
        except (TypeError, ValueError):
            raise ProtocolError("protocol field 'extra' must hold plain JSON (no NaN)") from None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

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
        """Hex sha256 of the canonical JSON of every field."""
        text = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"), ensure_ascii=True)
        return hashlib.sha256(text.encode()).hexdigest()

    def is_cheaper_fidelity_of(self, other: "Protocol") -> bool:
        """True when this protocol measures the same text the same way as ``other``, on fewer
        tokens (e.g. the first 1,024 of the 8,192 that ``other`` reads): a cheap fidelity of it,
        whose values rank architectures much like ``other``'s (``archopt query --screen``)."""
        same = ("dataset", "split", "joining", "tokenizer", "tokenizer_hash", "seq_len", "questions", "shots", "tool")
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
        return "/".join(parts)


def validate_value(metric: str, value: Any) -> float:
    """A stored value is a finite, non-negative number; accuracies lie in [0, 1]."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ProtocolError(f"value of {metric} must be a number, got {type(value).__name__}")
    v = float(value)
    if not math.isfinite(v):
        raise ProtocolError(f"value of {metric} must be finite, got {value!r}")
    if v < 0:
        raise ProtocolError(f"value of {metric} must not be negative, got {value!r}")
    if (metric == "mmlu" or metric.startswith("mmlu:")) and v > 1:
        raise ProtocolError(f"value of {metric} is an accuracy in [0, 1], got {value!r}")
    return v


@dataclass(frozen=True)
class Measurement:
    """One measured value with its protocol, as evaluators produce it and the archive stores it."""

    metric: str
    value: float
    protocol: Protocol
    device: str = ""
    duration_s: float | None = None
