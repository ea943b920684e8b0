"""A new user's first hour (issue 18): fast start-up, one-line errors that say what to do, offline
failures within seconds, ``query --allow-drop``, ``predictors show`` for people, help on every
option, and a ``make demo`` that needs no root and no browser.

The failures run ``archopt`` as a new process (what a user types) and check the one line it prints
and the wall time it takes, with the hub either offline (``HF_HUB_OFFLINE=1``) or unreachable
(``HF_ENDPOINT`` on a closed local port). No test uses the network.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from archopt.cli import cli

from helpers.first_hour import CLOSED_PORT, archopt_env, assert_fails_fast, timed_cli

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "ptb-llama-8l.jsonl"


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory) -> tuple[Path, Path]:
    """A saved tiny model and a data folder (module scope: saved once)."""
    import tiny_models as tm
    root = tmp_path_factory.mktemp("first-hour")
    return tm.save_tiny("llama_gqa_odd", root / "tiny-gqa"), tm.write_local_data(root / "data")


# --- offline and bad names: one line, within seconds -----------------------------------------------
@pytest.mark.parametrize("offline", [True, False], ids=["offline", "unreachable"])
def test_a_hub_model_that_cannot_be_had_fails_in_one_line(tmp_path, offline):
    env = archopt_env(tmp_path, offline=offline)
    db = f"sqlite:///{tmp_path / 'a.db'}"
    result = timed_cli(env, "--db", db, "evaluate", "--model", "meta-llama/Llama-2-7b-hf", "--samples", "1")
    why = "HF_HUB_OFFLINE=1" if offline else "cannot be reached"
    assert_fails_fast(result, "--model meta-llama/Llama-2-7b-hf: not a local directory", why,
                      "pass a local model directory")


@pytest.mark.parametrize("ref", ["./no/such/model", "/no/such/model", "no-such-dir/"])
def test_a_path_that_does_not_exist_says_so(tmp_path, ref):
    env = archopt_env(tmp_path, offline=False)
    result = timed_cli(env, "--db", f"sqlite:///{tmp_path / 'a.db'}", "evaluate", "--model", ref)
    assert_fails_fast(result, f"--model {ref}: no such directory")
    assert "Repo id" not in result[1][0]


@pytest.mark.parametrize("offline", [True, False], ids=["offline", "unreachable"])
def test_texts_without_data_dir_fail_in_one_line_naming_data_dir(tmp_path, tiny_dirs, offline):
    model, _ = tiny_dirs
    env = archopt_env(tmp_path, offline=offline)
    result = timed_cli(env, "--db", f"sqlite:///{tmp_path / 'a.db'}", "evaluate", "--model", str(model),
                       "--metrics", "ppl_wikitext2")
    assert_fails_fast(result, "dataset wikitext", "--data-dir DIR")


def test_a_missing_data_dir_says_so(tmp_path, tiny_dirs):
    model, _ = tiny_dirs
    env = archopt_env(tmp_path, offline=True)
    result = timed_cli(env, "--db", f"sqlite:///{tmp_path / 'a.db'}", "evaluate", "--model", str(model),
                       "--data-dir", str(tmp_path / "nope"))
    assert_fails_fast(result, f"--data-dir {tmp_path / 'nope'}: no such directory")


def test_query_verify_without_texts_says_so_at_once(tmp_path, run_cli):
    db = f"sqlite:///{tmp_path / 'a.db'}"
    assert run_cli("--db", db, "ingest", str(EXAMPLE)).code == 0
    env = archopt_env(tmp_path, offline=True)
    # rounds verify before any query: one line, at once
    result = timed_cli(env, "--db", db, "query", "--model", "ptb-llama-8l", "--params", "70%", "--verify", "1",
                       "--rounds", "2", "--no-starts")
    assert_fails_fast(result, "cannot verify: dataset wikitext", "--data-dir DIR")
    # one round answers the query, then says in one line why it cannot verify (as for missing weights)
    done = subprocess.run([sys.executable, "-c", "from archopt.cli import main; main()", "--db", db, "query",
                           "--model", "ptb-llama-8l", "--params", "70%", "--top", "3", "--verify", "1"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0 and "Pareto-optimal" in done.stdout, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("cannot verify: dataset wikitext"), done.stderr
    assert errors[0].rstrip().endswith("(a folder laid out like ../shared/data)"), done.stderr


def test_a_reachable_hub_is_asked_once_and_quickly(monkeypatch):
    """The probe answers within its bound and remembers its answer for a minute."""
    from archopt.evaluators import hub
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", CLOSED_PORT)
    hub._probe.cache_clear()
    start = time.perf_counter()
    assert hub.hub_reachable() is False
    assert hub.hub_reachable() is False
    assert time.perf_counter() - start < hub.PROBE_TIMEOUT_S + 0.5
    assert hub._probe.cache_info().hits >= 1
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub.hub_reachable() is False and hub.hub_offline()


# --- start-up: what --help, models and a stored query import ---------------------------------------
IMPORTS = textwrap.dedent("""
    import json, sys
    from archopt.cli import main
    try:
        main({argv!r})
    except SystemExit as exc:
        assert exc.code in (0, None), exc.code
    print(json.dumps(sorted(name for name in ("alembic", "sklearn", "scipy", "torch", "transformers", "optuna")
                            if name in sys.modules)))
""")


def imported(argv: list[str], tmp_path: Path) -> list[str]:
    done = subprocess.run([sys.executable, "-c", IMPORTS.format(argv=argv)], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "ARCHOPT_DB": ""}, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_help_and_models_import_neither_alembic_nor_scikit_learn(tmp_path, run_cli):
    db = f"sqlite:///{tmp_path / 'a.db'}"
    assert run_cli("--db", db, "ingest", str(EXAMPLE)).code == 0
    assert imported(["--help"], tmp_path) == []
    assert imported(["--db", db, "models"], tmp_path) == []


def test_a_stored_query_imports_no_scikit_learn_or_scipy(tmp_path, run_cli):
    db = f"sqlite:///{tmp_path / 'a.db'}"
    assert run_cli("--db", db, "ingest", str(EXAMPLE)).code == 0
    query = ["--db", db, "query", "--model", "ptb-llama-8l", "--params", "80%", "--top", "3"]
    first = run_cli(*query, "--json")
    assert first.code == 0, first.err
    assert not json.loads(first.out)["served_from_store"]
    heavy = imported(query, tmp_path)
    assert not {"sklearn", "scipy", "alembic", "torch", "optuna"} & set(heavy), heavy
    again = json.loads(run_cli(*query, "--json").out)
    assert again["served_from_store"] and again["query_id"] == json.loads(first.out)["query_id"]


def test_the_schema_head_is_read_without_alembic():
    from archopt.archdb.archive import declared_head, head_revision
    assert declared_head() == head_revision()


# --- the small things -----------------------------------------------------------------------------
@pytest.mark.parametrize("value", ["foo", "archive", "my.archive"])
def test_a_db_that_is_neither_url_nor_sqlite_file_is_refused(tmp_path, value, run_cli, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = run_cli("--db", value, "models")
    assert res.code == 1 and len(res.err_lines) == 1, res.err
    assert res.err_lines[0].startswith(f"error: database {value!r} is neither a URL nor a SQLite file name")
    assert "sqlite:///" in res.err_lines[0] and ".db" in res.err_lines[0]
    assert not (tmp_path / value).exists()
    monkeypatch.setenv("ARCHOPT_DB", value)
    assert run_cli("models").code == 1 and not (tmp_path / value).exists()


@pytest.mark.parametrize("value", ["new.db", "new.sqlite", "sub/new.sqlite3"])
def test_a_bare_sqlite_file_name_is_fine(tmp_path, value, run_cli, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    res = run_cli("--db", value, "models", "--json")
    assert res.code == 0, res.err
    assert (tmp_path / value).exists()


@pytest.fixture(scope="module")
def example_db(tmp_path_factory) -> str:
    """The bundled example with trained predictors (module scope)."""
    from conftest import _run_cli
    db = f"sqlite:///{tmp_path_factory.mktemp('example') / 'a.db'}"
    assert _run_cli("--db", db, "ingest", str(EXAMPLE)).code == 0
    assert _run_cli("--db", db, "predictors", "train", "--model", "ptb-llama-8l", "--metric", "ppl_wikitext2").code == 0
    return db


def test_a_target_below_the_smallest_architecture_names_allow_drop(example_db, run_cli):
    for size in ("1K", "30%"):
        res = run_cli("--db", example_db, "query", "--model", "ptb-llama-8l", "--params", size)
        assert res.code == 1 and len(res.err_lines) == 1, res.err
        line = res.err_lines[0]
        assert line.startswith("error: target ") and "below the smallest architecture the search can make" in line
        assert "ValueError" not in line and "(query --allow-drop)" in line


def test_allow_drop_reaches_the_search(example_db, run_cli):
    base = ["--db", example_db, "query", "--model", "ptb-llama-8l", "--params", "30%", "--tolerance", "5%",
            "--top", "3", "--json"]
    res = run_cli(*base, "--allow-drop")
    assert res.code == 0, res.err
    doc = json.loads(res.out)
    assert doc["results"], doc
    lo, hi = doc["window"]
    for row in doc["results"]:
        assert lo <= row["params"] <= hi
        assert any(layer["dropped"] for layer in row["layers"])  # below the all-layers minimum: drops needed
    again = json.loads(run_cli(*base, "--allow-drop").out)
    assert again["served_from_store"] and again["query_id"] == doc["query_id"]
    # without --allow-drop the same target is another query (refused, as above), never this stored answer
    assert run_cli(*base).code == 1
    # the 80% answer with and without layer drop are two stored queries
    common = ["--db", example_db, "query", "--model", "ptb-llama-8l", "--params", "80%", "--top", "3", "--json"]
    plain, drop = json.loads(run_cli(*common).out), json.loads(run_cli(*common, "--allow-drop").out)
    assert plain["query_id"] != drop["query_id"]


def test_the_service_takes_allow_drop():
    from archopt.service.queries import RequestError, parse_query_body
    assert parse_query_body({"model": "m", "params": "80%", "allow_drop": True}).allow_drop is True
    assert parse_query_body({"model": "m", "params": "80%"}).allow_drop is False
    with pytest.raises(RequestError, match="allow_drop"):
        parse_query_body({"model": "m", "params": "80%", "allow_drop": "yes"})


def test_predictors_show_is_a_table_unless_json(example_db, run_cli):
    res = run_cli("--db", example_db, "predictors", "show", "1")
    assert res.code == 0, res.err
    assert "cross-validation" in res.out and "Kendall τ" in res.out and not res.out.lstrip().startswith("{")
    doc = json.loads(run_cli("--db", example_db, "predictors", "show", "1", "--json").out)
    assert doc["id"] == 1 and "cv" in doc


def _options(group: click.Command, path: tuple[str, ...] = ()):
    if isinstance(group, click.Group):
        ctx = click.Context(group)
        for name in group.list_commands(ctx):
            yield from _options(group.get_command(ctx, name), (*path, name))
    for param in group.params:
        if isinstance(param, click.Option) and not param.hidden:
            yield " ".join(path) or "archopt", param


def test_every_option_has_help():
    missing = [f"{path} {'/'.join(p.opts)}" for path, p in _options(cli) if not (p.help or "").strip()]
    assert not missing, missing


def test_query_top_help_is_shown():
    out = CliRunner().invoke(cli, ["query", "--help"]).output
    assert "--top" in out and "Show at most K architectures" in out and "--allow-drop" in out


# --- make demo: Python and make only ---------------------------------------------------------------
@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_demo_needs_no_root_no_browser_and_no_apt(tmp_path):
    """``make -n demo`` on a set-up environment runs no apt-get and installs no browser; the browser
    belongs to ``make test``. Runs as the user with PATH lacking apt-get."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / ".installed-stamp").touch()
    tools = tmp_path / "path"  # a PATH with make and sh only: no apt-get, no chromium
    tools.mkdir()
    make = shutil.which("make")
    for name, where in (("make", make), ("sh", shutil.which("sh"))):
        (tools / name).symlink_to(where)
    env = {**os.environ, "PATH": str(tools)}
    demo = subprocess.run([make, "-n", "demo", f"VENV={venv}"], cwd=ROOT, capture_output=True, text=True,
                          env=env, timeout=60)
    assert demo.returncode == 0, demo.stderr
    assert "apt-get" not in demo.stdout and "chromium" not in demo.stdout.lower()
    assert demo.stdout.index("archopt finds the best pruned LLM") < demo.stdout.index("ingest")
    test = subprocess.run([make, "-n", "test", f"VENV={venv}"], cwd=ROOT, capture_output=True, text=True,
                          env=env, timeout=60)
    assert "chromium" in test.stdout and "ARCHOPT_REQUIRE_BROWSER=1" in test.stdout


# --- the latency benchmark ---------------------------------------------------------------------
@pytest.mark.slow
def test_cli_latency_benchmark_writes_its_figures(tmp_path):
    out = tmp_path / "cli_latency.json"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "cli_latency.py"), "--repeats", "1",
                           "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    doc = json.loads(out.read_text())
    assert set(doc["results"]) == {"baseline_import_click_rich", "help", "models", "stored_query", "cold_query"}
    assert doc["goals_s"] == {"help": 0.35, "stored_query": 0.6}
    assert 'python -c "import click, rich"' in done.stdout and "archopt --help" in done.stdout
