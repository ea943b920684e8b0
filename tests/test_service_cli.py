"""``archopt query|models|archs|ingest --server URL`` print what the local commands print."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from archopt.archdb import Archive
from archopt.optimizer.training import ensure_predictors
from archopt.service.app import ServiceConfig, create_app
from archopt.service.server import BackgroundServer

from conftest import TINY_BASE, WIKI  # noqa: E402  (shared test data)
from helpers.archives import fill  # noqa: E402  (synthetic archives with a known truth)

TOKEN = "cli-token-abcdef"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """One archive read locally (``--db``) and through a service on it (``--server``)."""
    folder = tmp_path_factory.mktemp("cli")
    url = f"sqlite:///{folder / 'archive.db'}"
    archive = Archive(url)
    fill(archive, 30)
    ensure_predictors(archive, "synth", ["ppl_wikitext2"])
    archive.close()
    with BackgroundServer(create_app(ServiceConfig(db=url, token=TOKEN, search_processes=0))) as server:
        yield url, server.url, folder


def both(run_cli, setup, *args: str, token: bool = False):
    url, server, _ = setup
    local = run_cli("--db", url, *args)
    remote = run_cli(*args, "--server", server, *(("--token", TOKEN) if token else ()))
    return local, remote


def test_models_and_archs_print_the_same(run_cli, setup):
    for args in (("models",), ("models", "--json"),
                 ("archs", "--model", "synth", "--sort", "ppl_wikitext2", "--limit", "5"),
                 ("archs", "--model", "synth", "--sort", "mmlu", "--limit", "3", "--offset", "2", "--json"),
                 ("archs", "--model", "synth")):
        local, remote = both(run_cli, setup, *args)
        assert local.code == 0 and local.out.strip(), local.err
        assert (remote.code, remote.out, remote.err) == (0, local.out, local.err), args
    doc = json.loads(both(run_cli, setup, "archs", "--model", "synth", "--json")[1].out)
    assert doc["schema"] == "archopt.archs/1" and len(doc["archs"]) == 30
    for args in (("archs", "--model", "synth", "--sort", "ppl_wiki"), ("archs", "--model", "synht")):
        local, remote = both(run_cli, setup, *args)
        assert local.code == remote.code == 1 and local.err_lines == remote.err_lines, (local.err, remote.err)
        assert len(remote.err_lines) == 1 and "did you mean" in remote.err


def test_query_prints_the_same(run_cli, setup):
    args = ("query", "--model", "synth", "--params", "80%", "--top", "3")
    url = setup[0]
    run_cli("--db", url, *args)  # computed and stored: both sides now answer from the store
    local, remote = both(run_cli, setup, *args, "--json")
    assert local.code == remote.code == 0, (local.err, remote.err)
    a, b = json.loads(local.out), json.loads(remote.out)
    for doc in (a, b):
        assert doc.pop("elapsed_ms") >= 0 and doc["served_from_store"]
    assert a == b
    local, remote = both(run_cli, setup, *args)
    assert local.code == remote.code == 0 and "served from the store" in remote.out
    timing = re.compile(r" in \d+ ms$")
    assert [timing.sub("", x) for x in local.out.splitlines()] == [timing.sub("", x) for x in remote.out.splitlines()]
    for bad in (("query", "--model", "synth", "--params", "130%"), ("query", "--model", "nope", "--params", "5B")):
        local, remote = both(run_cli, setup, *bad)
        assert local.code == remote.code == 1 and local.err_lines == remote.err_lines, (local.err, remote.err)
    refused = run_cli(*args, "--server", setup[1], "--verify", "1")
    assert refused.code != 0 and "--verify" in refused.err


def test_ingest_prints_the_same_and_needs_the_token(run_cli, setup, tmp_path):
    url, server, folder = setup
    lines = [{"model": "tiny", "base_model": TINY_BASE}] + [
        {"model": "tiny", "architecture": [[2, 1, 8 * (j + 1)]] * 4, "origin": "random",
         "evaluations": [{"metric": "ppl_wikitext2", "value": 11.0 + j, "protocol": WIKI}]} for j in range(5)]
    path = tmp_path / "new.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    other = f"sqlite:///{tmp_path / 'other.db'}"  # the local run writes elsewhere: both start without "tiny"
    for _ in range(2):  # then again: nothing added, on both sides
        local = run_cli("--db", other, "ingest", path)
        remote = run_cli("ingest", path, "--server", server, "--token", TOKEN)
        assert local.code == remote.code == 0 and local.out == remote.out, (local.out, remote.out, remote.err)
    assert "0 evaluations added, 5 already there" in remote.out
    bad = tmp_path / "bad.jsonl"
    bad.write_text(path.read_text() + '{"model": "tiny", "architecture": "full", "evaluations": '
                                      '[{"metric": "mmlu", "value": 7, "protocol": {"dataset": "mmlu"}}]}\n')
    local = run_cli("--db", other, "ingest", bad)
    remote = run_cli("ingest", bad, "--server", server, "--token", TOKEN)
    assert local.code == remote.code == 1 and local.err_lines == remote.err_lines, (local.err, remote.err)
    assert remote.err_lines[0].startswith(f"error: {bad}:7: field 'evaluations[0].value'")
    anonymous = run_cli("ingest", path, "--server", server)
    assert anonymous.code == 1 and "token" in anonymous.err and len(anonymous.err_lines) == 1
    gone = run_cli("models", "--server", "http://127.0.0.1:9")
    assert gone.code == 1 and "cannot reach the archopt service" in gone.err


def test_client_and_service_import_no_torch(setup):
    """``archopt query --server`` and the service's handlers (a query searched in-process) load no torch."""
    url, server, _ = setup
    code = (
        "import sys, json, urllib.request\n"
        "from archopt.cli import main\n"
        f"main(['query', '--model', 'synth', '--params', '80%', '--top', '3', '--json', '--server', {server!r}])\n"
        "from archopt.service.app import ServiceConfig, create_app\n"
        "from archopt.service.server import BackgroundServer\n"
        f"with BackgroundServer(create_app(ServiceConfig(db={url!r}, search_processes=0))) as s:\n"
        "    body = json.dumps({'model': 'synth', 'params': '80%', 'top': 3}).encode()\n"
        "    urllib.request.urlopen(urllib.request.Request(s.url + '/v1/query', data=body)).read()\n"
        "print('LOADED', [m for m in ('torch', 'transformers') if m in sys.modules])\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "LOADED []" in out.stdout, out.stdout[-500:]
