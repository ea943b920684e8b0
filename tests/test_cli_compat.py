"""Every command line that worked before the CLI split works the same way, and every ``--json``
document keeps its schema: ``tests/cli_compat.py`` runs each command family on one archive and the
result must contain the record made before the split (``tests/data/cli_compat.json``): the same
values and fields, new fields allowed; every option of every command's help still offered."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import pytest

from cli_compat import record

GOLDEN = Path(__file__).parent / "data" / "cli_compat.json"


def contains(new: Any, old: Any, where: str = "") -> list[str]:
    """Where ``new`` lacks or changes something of ``old`` (dicts may gain keys)."""
    if isinstance(old, dict):
        if not isinstance(new, dict):
            return [f"{where}: was an object"]
        return [p for k, v in old.items()
                for p in (contains(new[k], v, f"{where}.{k}") if k in new else [f"{where}.{k}: missing"])]
    if isinstance(old, list):
        if not isinstance(new, list) or len(new) != len(old):
            return [f"{where}: list changed length or type"]
        return [p for i, (a, b) in enumerate(zip(new, old)) for p in contains(a, b, f"{where}[{i}]")]
    if isinstance(old, float) and isinstance(new, (int, float)):
        return [] if math.isclose(new, old, rel_tol=1e-9, abs_tol=1e-12) else [f"{where}: {old} -> {new}"]
    return [] if new == old else [f"{where}: {old!r} -> {new!r}"]


def options_of(help_text: str) -> set[str]:
    return set(re.findall(r"(?m)^\s+(-{1,2}[\w-]+)", help_text))


@pytest.fixture(scope="module")
def now() -> dict[str, Any]:
    return record()


def test_every_command_keeps_its_options(now: dict[str, Any]) -> None:
    old = json.loads(GOLDEN.read_text())["help"]
    assert set(old) <= set(now["help"]), set(old) - set(now["help"])
    for command, text in old.items():
        assert text.splitlines()[0] == now["help"][command].splitlines()[0], command  # the usage line
        assert options_of(text) <= options_of(now["help"][command]), (command, options_of(text) - options_of(now["help"][command]))


def test_every_command_prints_what_it_printed(now: dict[str, Any]) -> None:
    old = {k: v for k, v in json.loads(GOLDEN.read_text()).items() if k != "help"}
    problems = contains(now, old)
    assert not problems, problems[:10]


def test_contains_finds_a_renamed_field() -> None:
    assert contains({"a": 1, "b": 2}, {"a": 1}) == []
    assert contains({"b": 1}, {"a": 1}) == [".a: missing"]
    assert contains({"a": [1.0, 2.0]}, {"a": [1.0, 2.5]}) == [".a[1]: 2.5 -> 2.0"]
