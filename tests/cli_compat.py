"""Runs every command family of ``archopt`` on one archive and records what it prints.

``tests/test_cli_compat.py`` compares the record with ``tests/data/cli_compat.json``, made by this
script on the code before the CLI was split into command modules: every command line that worked
then works the same way now, and every ``--json`` document keeps its schema (fields may be added,
never renamed or removed). Regenerate only when a change is meant:

    python tests/cli_compat.py > tests/data/cli_compat.json
"""

from __future__ import annotations

import csv
import io
import json
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

from click.testing import CliRunner

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "ptb-llama-8l.jsonl"
VOLATILE = {"elapsed_ms", "created_at", "query_id", "artifact_sha256", "library_versions"}


def _scrub(value: Any) -> Any:
    """Drop values that change from run to run (times, ids of stored queries, library versions)."""
    if isinstance(value, dict):
        return {k: ("*" if k in VOLATILE else _scrub(v)) for k, v in value.items()}
    if isinstance(value, list):
        return [_scrub(v) for v in value]
    return value


def _help_texts(runner: CliRunner, cli: Any) -> dict[str, str]:
    """``--help`` of every command and subcommand (their options are the command lines)."""
    import click
    out: dict[str, str] = {}

    def walk(group: Any, path: list[str]) -> None:
        ctx = click.Context(group)
        for name in group.list_commands(ctx):
            command = group.get_command(ctx, name)
            words = [*path, name]
            result = runner.invoke(cli, [*words, "--help"], prog_name="archopt")
            out[" ".join(words)] = result.output
            if isinstance(command, click.Group):
                walk(command, words)

    walk(cli, [])
    return out


def errors(db: str, *args: str) -> tuple[int, str]:
    """Exit code and standard error of a failing command, through the console entry point."""
    import subprocess
    done = subprocess.run([sys.executable, "-c", "from archopt.cli import main; main()", "--db", db, *args],
                          capture_output=True, text=True, timeout=120)
    return done.returncode, done.stderr.replace(db, "DB")


def record() -> dict[str, Any]:
    """What each command prints on an archive of the bundled example (JSON where it has JSON)."""
    from archopt.cli import cli
    runner = CliRunner()
    out: dict[str, Any] = {"help": _help_texts(runner, cli)}
    with tempfile.TemporaryDirectory() as tmp:
        db = f"sqlite:///{tmp}/compat.db"
        out.update(_archive_commands(runner, cli, db, tmp))
    text = json.dumps(out, sort_keys=True).replace(str(EXAMPLE), "EXAMPLE").replace(tmp, "TMP")
    return json.loads(text)


def _archive_commands(runner: CliRunner, cli: Any, db: str, tmp: str) -> dict[str, Any]:
    """Each archive command family on one archive of the bundled example."""
    out: dict[str, Any] = {}

    def run(*args: str) -> tuple[int, str]:
        result = runner.invoke(cli, ["--db", db, *args], prog_name="archopt", catch_exceptions=False)
        return result.exit_code, result.output

    def run_json(*args: str) -> Any:
        code, text = run(*args)
        return {"exit": code, "json": _scrub(json.loads(text))}

    out["ingest"] = run("ingest", str(EXAMPLE))
    out["ingest again"] = run("ingest", str(EXAMPLE))
    out["models"] = run_json("models", "--json")
    archs = run_json("archs", "--model", "ptb-llama-8l", "--sort", "ppl_wikitext2", "--limit", "5", "--json")
    out["archs"] = archs
    first = archs["json"]["archs"][0]["arch_id"]
    out["show"] = run_json("show", first[:10], "--json")
    code, text = run("export", "--model", "ptb-llama-8l", "--format", "csv")
    out["export csv"] = {"exit": code, "rows": list(csv.DictReader(io.StringIO(text)))}  # columns may be added
    code, text = run("export", "--model", "ptb-llama-8l")
    out["export jsonl"] = {"exit": code, "lines": [json.loads(line) for line in text.splitlines()]}
    code, text = run("predictors", "train", "--model", "ptb-llama-8l", "--metric", "ppl_wikitext2")
    out["predictors train"] = {"exit": code, "first words": text.split(" v")[0]}
    out["predictors list"] = run_json("predictors", "list", "--json")
    out["predictors show"] = run_json("predictors", "show", "1", "--json")
    query = run_json("query", "--model", "ptb-llama-8l", "--params", "80%", "--top", "3", "--json")
    out["query keys"] = {k: True for k in sorted(query["json"])}          # fields may be added, never removed
    out["query result keys"] = {k: True for k in sorted(query["json"]["results"][0])}
    out["query exit"] = query["exit"]
    out["db current"] = re.sub(r"\d{4}_\w+", "REV", run("db", "current")[1]).split()
    out["db check"] = run_json("db", "check", "--json")
    out["retract"] = run("evaluations", "retract", "1", "--why", "compat check")
    out["bad size"] = errors(db, "query", "--model", "ptb-llama-8l", "--params", "12Q")
    out["unknown model"] = errors(db, "archs", "--model", "nope")
    out["bad file"] = errors(db, "ingest", str(Path(tmp) / "missing.jsonl"))
    return out


if __name__ == "__main__":
    json.dump(record(), sys.stdout, indent=1, sort_keys=True, ensure_ascii=False)
    sys.stdout.write("\n")
