"""The CLI around the archive: help texts with examples, no torch on --help, one-line errors, JSON documents."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap

import click
import pytest
from click.testing import CliRunner

from archopt.archdb import Archive
from archopt.archdb import models as m
from archopt.archdb.records import ORIGINS
from archopt.cli import cli

from conftest import WIKI  # noqa: E402  (shared test data)


def _commands(group: click.Group, path: tuple[str, ...] = ()):
    yield path, group
    if isinstance(group, click.Group):  # the root group loads its commands lazily: ask it for them
        ctx = click.Context(group)
        for name in group.list_commands(ctx):
            yield from _commands(group.get_command(ctx, name), (*path, name))


ALL_COMMANDS = [path for path, _ in _commands(cli)]


def test_the_archive_commands_exist():
    for path in [(), ("db",), ("db", "upgrade"), ("db", "current"), ("db", "downgrade"), ("ingest",), ("export",),
                 ("models",), ("archs",), ("show",), ("evaluations",), ("evaluations", "retract")]:
        assert path in ALL_COMMANDS


@pytest.mark.parametrize("path", ALL_COMMANDS, ids=lambda p: " ".join(p) or "archopt")
def test_every_help_has_an_example(path):
    res = CliRunner().invoke(cli, [*path, "--help"], prog_name="archopt")
    assert res.exit_code == 0, res.output
    assert "Example:" in res.output, f"`archopt {' '.join(path)} --help` shows no example"
    example = res.output.split("Example:", 1)[1]
    assert "archopt" in example  # a command line, not just a heading


def test_short_help_flag_and_version(run_cli):
    res = run_cli("-h")
    assert res.code == 0 and "Example:" in res.out
    res = run_cli("--version")
    assert res.code == 0 and re.search(r"archopt, version \d", res.out)


NO_HEAVY = textwrap.dedent("""
    import sys
    from archopt.cli import main
    for argv in {argvs!r}:
        try:
            main(argv)
        except SystemExit as exc:
            assert exc.code in (0, None), (argv, exc.code)
    heavy = sorted(name for name in ("torch", "transformers", "datasets", "sklearn", "optuna")
                   if name in sys.modules)
    assert not heavy, heavy
    print("light")
""")


def test_help_and_listings_import_no_torch(tmp_path, examples):
    db = f"sqlite:///{tmp_path / 'a.db'}"
    path = examples.jsonl("a.jsonl", examples.standard(3))
    argvs = [["--help"], ["archs", "--help"], ["ingest", "--help"], ["--db", db, "ingest", str(path)],
             ["--db", db, "models"], ["--db", db, "archs", "--model", "tiny", "--json"], ["--db", db, "export"],
             ["--db", db, "db", "current"]]
    done = subprocess.run([sys.executable, "-c", NO_HEAVY.format(argvs=argvs)], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "ARCHOPT_DB": ""})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().endswith("light")


# --- errors ---------------------------------------------------------------------------------------
@pytest.fixture
def filled(sqlite_url, examples, run_cli):
    lines = examples.standard(6)
    # one metric under two protocols: 2 values at seq_len 128 (the default), 3 at 2048
    long = {**WIKI, "seq_len": 2048}
    for j, line in enumerate(lines[1:4]):
        line["evaluations"].append(examples.evaluation("ppl_wikitext2", 5.0 + j, long))
    assert run_cli("--db", sqlite_url, "ingest", examples.jsonl("a.jsonl", lines)).code == 0
    return sqlite_url


@pytest.mark.parametrize("args, message", [
    (["archs", "--model", "tiyn"], "error: unknown base model 'tiyn' (did you mean 'tiny'?)"),
    (["archs", "--model", "tiny", "--sort", "ppl_wikitext"],
     "error: model 'tiny' has no metric 'ppl_wikitext' (did you mean 'ppl_wikitext2'?)"),
    (["show", "abc"], "error: architecture id 'abc' must be 8 to 64 hex characters"),
    (["show", "zzzzzzzzzz"], "error: architecture id 'zzzzzzzzzz' must be 8 to 64 hex characters"),
    (["show", "0123456789"], "error: no architecture with id 0123456789"),
    (["export", "--model", "nope"], "error: unknown base model 'nope' (registered: tiny)"),
    (["archs"], "error: Missing option '--model'"),
    (["archs", "--model", "tiny", "--limit", "0"], "error: Invalid value for '--limit'"),
    (["frobnicate"], "error: No such command 'frobnicate'"),
    (["ingest", "/no/such/file.jsonl"], "error: /no/such/file.jsonl: cannot read"),
])
def test_errors_are_one_line(filled, run_cli, args, message):
    res = run_cli("--db", filled, *args)
    assert res.code != 0
    assert len(res.err_lines) == 1, res.err
    assert res.err_lines[0].startswith(message), res.err
    assert "Traceback" not in res.err


def test_debug_shows_the_traceback(filled, run_cli):
    res = run_cli("--db", filled, "--debug", "archs", "--model", "nope")
    assert res.code == 1
    assert "Traceback (most recent call last)" in res.err
    assert res.err_lines[-1].startswith("error: unknown base model 'nope'")


def test_database_errors_are_one_line(tmp_path, run_cli):
    bad = tmp_path / "not-a-db.db"
    bad.write_bytes(b"this is not an SQLite file" * 100)
    res = run_cli("--db", f"sqlite:///{bad}", "models")
    assert res.code == 1 and len(res.err_lines) == 1 and "Traceback" not in res.err
    assert res.err_lines[0].startswith("error: archive database error:")
    assert "SELECT" not in res.err


def test_db_from_the_environment(filled, run_cli, monkeypatch):
    monkeypatch.setenv("ARCHOPT_DB", filled)
    res = run_cli("models", "--json")
    assert res.code == 0 and json.loads(res.out)["models"][0]["name"] == "tiny"


# --- JSON documents -------------------------------------------------------------------------------
LAYER_KEYS = {"layer", "q_heads", "kv_heads", "intermediate", "dropped"}


def check_archs_document(doc: dict, model: str) -> None:
    """The archopt.archs/1 contract (CONVENTIONS.md, "JSON outputs")."""
    assert doc["schema"] == "archopt.archs/1"
    assert doc["model"] == model
    assert isinstance(doc["archs"], list)
    for arch in doc["archs"]:
        assert {"arch_id", "params", "fraction", "origin", "layers", "metrics"} <= set(arch)
        assert re.fullmatch(r"[0-9a-f]{64}", arch["arch_id"])
        assert isinstance(arch["params"], int) and arch["params"] > 0
        assert isinstance(arch["fraction"], float) and 0 < arch["fraction"] <= 1
        assert arch["origin"] in ORIGINS
        for i, layer in enumerate(arch["layers"]):
            assert set(layer) == LAYER_KEYS and layer["layer"] == i
            assert isinstance(layer["dropped"], bool)
            assert all(isinstance(layer[k], int) for k in ("q_heads", "kv_heads", "intermediate"))
        for metric, entry in arch["metrics"].items():
            assert isinstance(metric, str)
            assert set(entry) >= {"value", "protocol"}
            assert isinstance(entry["value"], float) and isinstance(entry["protocol"], int)


def test_archs_json_follows_the_schema(filled, run_cli):
    res = run_cli("--db", filled, "archs", "--model", "tiny", "--json")
    assert res.code == 0, res.err
    doc = json.loads(res.out)
    check_archs_document(doc, "tiny")
    assert len(doc["archs"]) == 6
    params = [a["params"] for a in doc["archs"]]
    assert params == sorted(params, reverse=True)  # unsorted listing: biggest first
    assert all(len(a["layers"]) == 4 for a in doc["archs"])


def test_archs_sort_limit_offset(filled, run_cli):
    def listing(*args):
        res = run_cli("--db", filled, "archs", "--model", "tiny", "--json", *args)
        assert res.code == 0, res.err
        doc = json.loads(res.out)
        check_archs_document(doc, "tiny")
        return doc["archs"]

    by_ptb = listing("--sort", "ppl_ptb")
    values = [a["metrics"]["ppl_ptb"]["value"] for a in by_ptb if "ppl_ptb" in a["metrics"]]
    assert values == sorted(values) and len(values) == 3
    assert all("ppl_ptb" not in a["metrics"] for a in by_ptb[3:])  # unmeasured last
    by_mmlu = listing("--sort", "mmlu")
    values = [a["metrics"]["mmlu"]["value"] for a in by_mmlu if "mmlu" in a["metrics"]]
    assert values == sorted(values, reverse=True)  # accuracy: higher first
    assert [a["arch_id"] for a in listing("--sort", "ppl_ptb", "--limit", "2", "--offset", "1")] == \
        [a["arch_id"] for a in by_ptb[1:3]]


def test_default_protocol_is_the_most_used(filled, run_cli):
    archive = Archive(filled)
    with archive.read() as session:
        seq = {p.seq_len: p.id for p in session.query(m.Protocol).filter(m.Protocol.dataset == "wikitext2")}
    archive.close()
    archs = json.loads(run_cli("--db", filled, "archs", "--model", "tiny", "--json").out)["archs"]
    # 6 values at seq 128 against 3 at seq 2048: seq 128 is the default, for every architecture
    assert {a["metrics"]["ppl_wikitext2"]["protocol"] for a in archs} == {seq[128]}
    res = run_cli("--db", filled, "archs", "--model", "tiny", "--json", "--sort", "ppl_wikitext2",
                  "--protocol", seq[2048])
    ranked = json.loads(res.out)["archs"]
    assert [a["metrics"]["ppl_wikitext2"]["value"] for a in ranked[:3]] == [5.0, 6.0, 7.0]
    assert {a["metrics"]["ppl_wikitext2"]["protocol"] for a in ranked[:3]} == {seq[2048]}


def test_models_and_show_json(filled, run_cli):
    doc = json.loads(run_cli("--db", filled, "models", "--json").out)
    assert doc["schema"] == "archopt.models/1"
    (model,) = doc["models"]
    assert (model["name"], model["archs"], model["evaluations"], model["layers"]) == ("tiny", 6, 14, 4)
    first = json.loads(run_cli("--db", filled, "archs", "--model", "tiny", "--json").out)["archs"][0]
    res = run_cli("--db", filled, "show", first["arch_id"][:8], "--json")
    assert res.code == 0, res.err
    shown = json.loads(res.out)
    assert shown["arch_id"] == first["arch_id"] and shown["model"] == "tiny"
    assert shown["layers"] == first["layers"]
    for value in shown["all_values"]:
        assert isinstance(value["evaluation"], int) and value["protocol"]["dataset"]
    res = run_cli("--db", filled, "show", first["arch_id"].upper()[:12], "--model", "tiny")  # upper case is fine
    assert res.code == 0 and first["arch_id"] in res.out and "measured" in res.out


def test_ambiguous_prefix(sqlite_url, examples, run_cli):
    assert run_cli("--db", sqlite_url, "ingest", examples.jsonl("a.jsonl", examples.standard(2))).code == 0
    archive = Archive(sqlite_url)
    with archive.write() as session:  # two ids sharing their first 10 characters
        rows = session.query(m.Architecture).order_by(m.Architecture.id).all()
        rows[0].arch_hash = "abcdef0123" + "0" * 54
        rows[1].arch_hash = "abcdef0123" + "1" * 54
    archive.close()
    res = run_cli("--db", sqlite_url, "show", "abcdef0123")
    assert res.code == 1 and "ambiguous" in res.err and len(res.err_lines) == 1
    assert run_cli("--db", sqlite_url, "show", "abcdef01231").code == 0


def test_tables_print(filled, run_cli):
    res = run_cli("--db", filled, "archs", "--model", "tiny", "--sort", "ppl_wikitext2", "--limit", "3")
    assert res.code == 0 and "tiny: 3 architectures" in res.out and "ppl_wikitext2" in res.out
    res = run_cli("--db", filled, "models")
    assert res.code == 0 and "tiny" in res.out
    res = run_cli("--db", filled, "archs", "--model", "tiny", "--json", "--limit", "1")
    assert json.loads(res.out)["archs"][0]["metrics"]  # JSON is plain: no table, no colour codes
    assert "\x1b[" not in res.out


def test_empty_archive_listings(sqlite_url, run_cli):
    res = run_cli("--db", sqlite_url, "models", "--json")
    assert res.code == 0 and json.loads(res.out) == {"schema": "archopt.models/1", "models": []}
    res = run_cli("--db", sqlite_url, "archs", "--model", "tiny")
    assert res.code == 1 and res.err_lines == ["error: unknown base model 'tiny' (the archive holds no models yet)"]
    assert run_cli("--db", sqlite_url, "export").out == ""

