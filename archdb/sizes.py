"""The one size parser every command shares: ``5B``, ``550M``, ``5.2e9``, ``80%`` or a plain integer."""

from __future__ import annotations

import math
import re

from .errors import ArchoptError

_SUFFIXES = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9, "T": 10**12}
_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([KMBGT%]?)\s*$", re.IGNORECASE)
_TOL_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*(%?)\s*$")
MAX_PARAMS = 10**15


class SizeError(ArchoptError, ValueError):
    """A size or tolerance string that cannot be read."""


def parse_size(text: str | int, base_params: int | None = None) -> int:
    """Return the parameter count that ``text`` names.

    ``80%`` is relative to ``base_params`` (required then); ``5B``, ``550M``, ``1.5K``, ``5.2e9`` and
    plain integers are absolute. The result is a positive integer no larger than 10^15.
    """
    if isinstance(text, bool):
        raise SizeError(f"size must be a string such as 5B, 550M, 5.2e9 or 80%, got {text!r}")
    if isinstance(text, int):
        value = float(text)
        suffix = ""
    else:
        match = _SIZE_RE.match(str(text))
        if not match:
            raise SizeError(f"cannot read size {str(text)[:40]!r}: write it as 5B, 550M, 5.2e9 or 80%")
        value = float(match.group(1))
        suffix = match.group(2).upper()
    if not math.isfinite(value) or value <= 0:
        raise SizeError(f"size {str(text)[:40]!r} must be a positive finite number")
    if suffix == "%":
        if base_params is None:
            raise SizeError(f"size {text!r} is relative: it needs a base model")
        if value > 100:
            raise SizeError(f"size {text!r} is more than 100% of the base model")
        result = math.floor(base_params * value / 100.0)
    else:
        result = math.floor(value * _SUFFIXES[suffix])
    if result < 1 or result > MAX_PARAMS:
        raise SizeError(f"size {str(text)[:40]!r} is out of range (1 to 1e15 parameters)")
    return int(result)


def parse_tolerance(text: str | float) -> float:
    """Read a relative tolerance: ``2%`` or ``0.02``. Returns a fraction in [0, 1)."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value, percent = float(text), False
    else:
        match = _TOL_RE.match(str(text))
        if not match:
            raise SizeError(f"cannot read tolerance {str(text)[:40]!r}: write it as 2% or 0.02")
        value, percent = float(match.group(1)), bool(match.group(2))
    if percent:
        value /= 100.0
    if not math.isfinite(value) or value < 0 or value >= 1:
        raise SizeError(f"tolerance {str(text)[:40]!r} must lie in [0%, 100%)")
    return value


def format_size(params: int) -> str:
    """Short human form: 6.74B, 550.0M, 7.9M, 260.1K."""
    for suffix, scale in (("T", 10**12), ("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if params >= scale:
            return f"{params / scale:.2f}{suffix}" if scale >= 10**9 else f"{params / scale:.1f}{suffix}"
    return str(params)
