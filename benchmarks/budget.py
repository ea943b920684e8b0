"""Token accounting for the search-quality benchmark: every method pays in forwarded tokens.

A method's cost is the sum over every forward pass it makes, in tokens fed to a model:

- ``full``: a full evaluation, every metric of the protocol (WikiText-2 and PTB, ``--max-tokens``
  each: 16,384 tokens at the default 8,192);
- ``cheap``: a cheap fidelity of a perplexity (the same text on fewer tokens);
- ``kl``: a KL-divergence pass of a pruned candidate on calibration windows;
- ``reference``: the base model's reference log-probabilities of a calibration text, once per
  method that uses them (cached on disk, but still charged to each method that reads them).

The importance pass shared by every method (Taylor scores) is not charged. A measurement served
from the benchmark's shared cache is charged all the same: the cache saves wall time, not budget.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

KINDS = ("full", "cheap", "kl", "reference")


class BudgetSpent(Exception):
    """Raised inside a method when the next forward pass would exceed its token budget."""


@dataclass
class Ledger:
    """Tokens a method has forwarded, by kind, against its ``limit``."""

    limit: int
    tokens: int = 0
    by_kind: dict[str, int] = field(default_factory=lambda: {k: 0 for k in KINDS})
    passes: dict[str, int] = field(default_factory=lambda: {k: 0 for k in KINDS})

    def left(self) -> int:
        return self.limit - self.tokens

    def can(self, tokens: int) -> bool:
        return self.tokens + int(tokens) <= self.limit

    def charge(self, kind: str, tokens: int, passes: int = 1) -> None:
        """Add ``passes`` forward passes of ``kind`` totalling ``tokens`` (no limit check)."""
        if kind not in KINDS:
            raise ValueError(f"unknown kind {kind!r}: use {', '.join(KINDS)}")
        self.tokens += int(tokens)
        self.by_kind[kind] += int(tokens)
        self.passes[kind] += int(passes)

    def pay(self, kind: str, tokens: int, passes: int = 1) -> None:
        """``charge`` if it fits, else raise ``BudgetSpent`` (nothing charged)."""
        if not self.can(tokens):
            raise BudgetSpent(f"{kind} pass of {tokens:,} tokens exceeds the {self.left():,} left")
        self.charge(kind, tokens, passes)

    def to_dict(self) -> dict[str, Any]:
        return {"tokens": self.tokens, "limit": self.limit, "tokens_by_kind": dict(self.by_kind),
                "passes": dict(self.passes)}


def full_evaluations_worth(tokens: int, full_tokens: int) -> float:
    """``tokens`` as a number of full evaluations (for tables)."""
    return tokens / full_tokens if full_tokens else 0.0
