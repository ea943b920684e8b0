"""The HTTP service (``archopt serve``) on SQLite and PostgreSQL: every endpoint, refusals with the right
status and a clear message (the archive unchanged), tokens, body limit, background training, and
concurrent clients. The server is uvicorn in a thread on 127.0.0.1; the client is ``service.client``."""

from __future__ import annotations

import contextlib
import dataclasses
import http.client
import io
import json
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from archopt.archdb import Archive
from archopt.archdb import models as m
from archopt.archdb.reads import export_records
from archopt.optimizer.training import ensure_predictors
from archopt.service.client import Client, ServerError
from archopt.service.documents import arch_document, archs_document, models_document

from conftest import MMLU, TINY_BASE, WIKI, Examples  # noqa: E402  (shared test data)
from helpers.archives import SPEC, fill  # noqa: E402  (synthetic archives with a known truth)
from helpers.service import MAX_BODY, TOKEN, serving  # noqa: E402  (the server in a thread)


def snapshot(archive: Archive) -> str:
    """Everything an export carries, plus the stored queries and predictor versions."""
    with archive.read() as session:
        records = list(export_records(session))
        extra = [session.scalar(select(func.count()).select_from(t)) for t in (m.StoredQuery, m.PredictorVersion)]
    return json.dumps([records, extra], sort_keys=True, default=str)


def tiny_line(j: int) -> dict[str, Any]:
    """A distinct architecture of conftest's tiny base model for every j < 4096, with one or two values."""
    kv = 1 + j % 4
    layers = [[2 * kv, kv, 8 * (1 + ((j >> (4 * i)) & 15))] for i in range(4)]
    evals = [{"metric": "ppl_wikitext2", "value": 10.0 + j / 7, "protocol": WIKI}]
    if j % 2:
        evals.append({"metric": "mmlu", "value": 0.25 + j / 10000, "protocol": MMLU})
    return {"model": "tiny", "architecture": layers, "origin": "random", "evaluations": evals}


def jsonl(lines: list[Any]) -> bytes:
    return "".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines).encode()


BASE_LINE = {"model": "tiny", "base_model": TINY_BASE}


def error_of(call) -> ServerError:  # noqa: ANN001
    with pytest.raises(ServerError) as info:
        call()
    return info.value


def raw(url: str, method: str = "GET", body: bytes | None = None, headers: dict[str, str] | None = None):
    """(status, headers, JSON body) of one request, without the client's error handling."""
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.headers, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers, json.loads(exc.read())


# --- one served archive per backend, predictors trained ------------------------------------------------
@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def served(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp("served")
    url = (f"sqlite:///{folder / 'archive.db'}" if request.param == "sqlite"
           else request.getfixturevalue("pg_server").new_database("svc"))
    archive = Archive(url)
    fill(archive, 40)
    ensure_predictors(archive, "synth", ["ppl_wikitext2"])
    with serving(url, retrain_interval=3600, search_processes=1) as server:  # searches in a worker process
        server.archive = archive
        server.client = Client(server.url, TOKEN)
        yield server
    archive.close()
    if request.param != "sqlite":
        with contextlib.suppress(Exception):
            request.getfixturevalue("pg_server").drop_database(url)


def test_read_endpoints_serve_the_cli_documents(served):
    c, archive = served.client, served.archive
    health = c.get("/healthz")
    assert health["status"] == "ok" and health["read_only"] is False and health["schema"]
    assert c.get("/v1/models") == models_document(archive)
    model = c.get("/v1/models/synth")
    assert model["name"] == "synth" and model["metrics"] == ["mmlu", "ppl_wikitext2"]
    listed = c.get("/v1/models/synth/archs", sort="ppl_wikitext2", limit=5, offset=2)
    assert listed == archs_document(archive, "synth", "ppl_wikitext2", None, 5, 2)
    assert listed["schema"] == "archopt.archs/1" and len(listed["archs"]) == 5
    values = [a["metrics"]["ppl_wikitext2"]["value"] for a in listed["archs"]]
    assert values == sorted(values)
    arch_id = listed["archs"][0]["arch_id"]
    shown = c.get(f"/v1/archs/{arch_id[:10]}")
    assert shown == arch_document(archive, arch_id) and shown["arch_id"] == arch_id
    predictors = c.get("/v1/predictors", model="synth")
    assert [(p["metric"], p["version"]) for p in predictors["predictors"]] == [("ppl_wikitext2", 1)]
    assert predictors["schema"] == "archopt.predictors/1" and predictors["training"] == []
    spec = c.get("/openapi.json")
    assert spec["openapi"].startswith("3.")
    from archopt.service.app import ROUTES
    for route in ROUTES:
        if route.path != "/static":
            assert route.path.replace(":path", "") in spec["paths"], route.path
    with urllib.request.urlopen(served.url + "/") as page:
        html = page.read().decode()
    assert "<svg" in html and "/static/app.js" in html and "http" not in html.split("<body>")[1].split("footer")[0]
    with urllib.request.urlopen(served.url + "/static/app.js") as script:
        assert b"/v1/query" in script.read()


def test_query_is_answered_then_served_from_the_store(served):
    c = served.client
    body = {"model": "synth", "params": "80%", "objectives": ["ppl_wikitext2"], "top": 5}
    first = c.post_json("/v1/query", body)
    assert first["schema"] == "archopt.query/1" and 1 <= len(first["results"]) <= 5
    assert first["predictor_versions"] == {"ppl_wikitext2": 1}
    assert first["predictors_stale"] == {"ppl_wikitext2": False}
    lo, hi = first["window"]
    assert all(lo <= r["params"] <= hi <= first["target_params"] for r in first["results"])
    again = c.post_json("/v1/query", {**body, "objectives": "ppl_wikitext2"})
    assert again["served_from_store"] and again["query_id"] == first["query_id"]
    assert again["results"] == first["results"]
    stored = c.get(f"/v1/queries/{first['query_id']}")
    assert stored["results"] == first["results"] and stored["served_from_store"]
    # an absolute size and an integer size name the same target
    absolute = c.post_json("/v1/query", {**body, "params": first["target_params"]})
    assert absolute["query_id"] == first["query_id"]


BAD_REQUESTS = [
    # (body bytes, status, words in the message)
    (b"{not json", 400, "not valid JSON"),
    (b"", 400, "empty"),
    (b"[1, 2]", 422, "JSON object"),
    (b'{"model": "synth"}', 422, "'params' is required"),
    (b'{"model": "synth", "params": true}', 422, "field 'params'"),
    (b'{"model": "synth", "params": "80%", "top": "ten"}', 422, "field 'top'"),
    (b'{"model": "synth", "params": "80%", "top": 0}', 422, "from 1 to 200"),
    (b'{"model": "synth", "params": "80%", "explain": "yes"}', 422, "field 'explain'"),
    (b'{"model": "synth", "params": "80%", "objectives": 3}', 422, "field 'objectives'"),
    (b'{"model": "synth", "params": "80%", "tolerance": "lots"}', 422, "tolerance"),
    (b'{"model": "synth", "params": "80%", "sizes": 1}', 422, "unknown field 'sizes'"),
    (b'{"model": "synht", "params": "80%"}', 404, "did you mean 'synth'"),
    (b'{"model": "synth", "params": "120%"}', 422, "more than 100%"),
    (b'{"model": "synth", "params": "5B"}', 422, "larger than synth"),
    (b'{"model": "synth", "params": "1K"}', 422, "below the smallest architecture"),
    (b'{"model": "synth", "params": "eighty"}', 422, "cannot read size"),
    (b'{"model": "synth", "params": "80%", "objectives": ["ppl_ptb"]}', 422, "no ppl_ptb evaluations"),
]


def test_bad_requests_get_a_clear_4xx_and_change_nothing(served):
    before = snapshot(served.archive)
    for body, status, words in BAD_REQUESTS:
        code, _, doc = raw(served.url + "/v1/query", "POST", body, {"Content-Type": "application/json"})
        assert code == status, (body, code, doc)
        assert set(doc) == {"error"} and words in doc["error"], (body, doc)
        assert "Traceback" not in doc["error"] and "SELECT" not in doc["error"]
    gets = [("/v1/models/nope/archs", 404, "unknown base model 'nope'"),
            ("/v1/models/synth/archs?sort=ppl_wiki", 422, "did you mean 'ppl_wikitext2'"),
            ("/v1/models/synth/archs?limit=zero", 422, "'limit' must be an integer"),
            ("/v1/models/synth/archs?offset=-1", 422, "at least 0"),
            ("/v1/archs/abc", 404, "8 to 64 hex"),
            ("/v1/archs/00000000", 404, "no architecture"),
            ("/v1/queries/123456", 404, "no query with id 123456"),
            ("/v1/queries/first", 422, "positive integer"),
            ("/v1/nothing", 404, "no such endpoint"),
            ("/v1/predictors?model=nope", 404, "unknown base model")]
    for path, status, words in gets:
        code, _, doc = raw(served.url + path)
        assert code == status and set(doc) == {"error"} and words in doc["error"], (path, code, doc)
    code, _, doc = raw(served.url + "/v1/query")
    assert code == 405 and "GET is not allowed" in doc["error"]
    code, _, doc = raw(served.url + "/v1/query", "POST", b"{" + b" " * MAX_BODY + b"}")
    assert code == 413 and "--max-body" in doc["error"]
    # a chunked body (no Content-Length) is cut off while it streams in
    conn = http.client.HTTPConnection("127.0.0.1", served.port, timeout=60)
    conn.request("POST", "/v1/evaluations", body=iter([b"x" * 16384] * 8), encode_chunked=True,
                 headers={"Authorization": f"Bearer {TOKEN}", "Transfer-Encoding": "chunked"})
    response = conn.getresponse()
    assert response.status == 413 and "--max-body" in json.loads(response.read())["error"]
    conn.close()
    assert snapshot(served.archive) == before


def test_writes_need_the_token(served, tmp_path):
    before = snapshot(served.archive)
    body = jsonl([BASE_LINE, tiny_line(1)])
    anonymous = error_of(lambda: Client(served.url).post_bytes("/v1/evaluations", body, "application/x-ndjson"))
    assert anonymous.status == 401 and "Bearer" in str(anonymous)
    wrong = error_of(lambda: Client(served.url, "not-the-token").post_bytes("/v1/evaluations", body, "text/csv"))
    assert wrong.status == 403 and "wrong token" in str(wrong)
    train = error_of(lambda: Client(served.url, "x" + TOKEN).post_json("/v1/predictors/train", {"model": "synth"}))
    assert train.status == 403
    code, headers, doc = raw(served.url + "/v1/evaluations", "POST", body)
    assert code == 401 and headers["WWW-Authenticate"] == "Bearer"
    assert snapshot(served.archive) == before
    # a service started without a token is read-only, on any address
    with serving(served.archive.url, token=None) as readonly:
        refused = error_of(lambda: Client(readonly.url, TOKEN).post_bytes("/v1/evaluations", body, "text/csv"))
        assert refused.status == 403 and "read-only" in str(refused) and "ARCHOPT_TOKEN" in str(refused)
        assert Client(readonly.url).get("/healthz")["read_only"] is True
        assert Client(readonly.url).get("/v1/models")["models"]
    assert snapshot(served.archive) == before


def test_ingest_jsonl_csv_lmeval_idempotent_and_all_or_nothing(served, tmp_path):
    c = served.client
    examples = Examples(tmp_path)
    lines = [BASE_LINE] + [tiny_line(j) for j in range(100, 106)]
    first = c.post_bytes("/v1/evaluations", jsonl(lines), "application/x-ndjson", filename="batch.jsonl")
    assert {k: v for k, v in first.items() if k != "models_added"} == {
        "schema": "archopt.ingest/1", "file": "batch.jsonl", "evaluations_added": 9, "evaluations_existing": 0,
        "archs_added": 6, "archs_existing": 0}
    again = c.post_bytes("/v1/evaluations", jsonl(lines), "application/x-ndjson", filename="batch.jsonl")
    assert again["evaluations_added"] == 0 and again["evaluations_existing"] == 9 and again["archs_added"] == 0
    csv_path = examples.csv("more.csv", [{"model": "tiny", "architecture": tiny_line(200)["architecture"],
                                          "metric": "ppl_wikitext2", "value": 12.5, **WIKI}])
    doc = c.post_bytes("/v1/evaluations", csv_path.read_bytes(), "text/csv", filename="more.csv")
    assert doc["evaluations_added"] == 1 and doc["file"] == "more.csv"
    lm = examples.lmeval("results.json", "tiny")
    doc = c.post_bytes("/v1/evaluations", lm.read_bytes(), "application/json", filename="results.json")
    assert doc["evaluations_added"] >= 3
    doc = c.post_bytes("/v1/evaluations", lm.read_bytes(), "application/octet-stream", format="lmeval")
    assert doc["evaluations_added"] == 0 and doc["file"] == "request body"
    before = snapshot(served.archive)
    # a bad line late in the file: 422 naming file, line and field; nothing of the file is stored
    bad = [BASE_LINE, tiny_line(300), tiny_line(301), {**tiny_line(302), "evaluations": [
        {"metric": "ppl_wikitext2", "value": -3.0, "protocol": WIKI}]}]
    err = error_of(lambda: c.post_bytes("/v1/evaluations", jsonl(bad), "application/x-ndjson", filename="up.jsonl"))
    assert err.status == 422 and str(err).startswith("up.jsonl:4: field 'evaluations[0].value'"), str(err)
    err = error_of(lambda: c.post_bytes("/v1/evaluations", b"model,metric\ntiny,ppl\n,", "text/csv", filename="x.csv"))
    assert err.status == 422 and str(err).startswith("x.csv:"), str(err)
    err = error_of(lambda: c.post_bytes("/v1/evaluations", jsonl([BASE_LINE, "{oops"]), "application/x-ndjson"))
    assert err.status == 422 and "request body:2" in str(err) and "invalid JSON" in str(err)
    err = error_of(lambda: c.post_bytes("/v1/evaluations", b"", "text/csv"))
    assert err.status == 400 and "empty" in str(err)
    err = error_of(lambda: c.post_bytes("/v1/evaluations", b"x", "text/csv", format="xml"))
    assert err.status == 422 and "'format'" in str(err)
    big = jsonl([BASE_LINE] + [tiny_line(j) for j in range(400, 1400)])
    assert len(big) > MAX_BODY
    err = error_of(lambda: c.post_bytes("/v1/evaluations", big, "application/x-ndjson"))
    assert err.status == 413 and "--max-body" in str(err)
    assert snapshot(served.archive) == before


def test_eight_concurrent_clients_lose_and_duplicate_nothing(served):
    """Queries (repeated and cold) and ingests at once: every answer valid, every value stored once."""
    errors: list[str] = []
    answers: list[dict[str, Any]] = []
    batches = [[BASE_LINE] + [tiny_line(2000 + 10 * k + i) for i in range(10)] for k in range(6)]
    expected = sum(len(line["evaluations"]) for batch in batches for line in batch[1:])

    def client(k: int) -> None:
        c = Client(served.url, TOKEN)
        try:
            for i in range(4):
                if k % 2 == 0:  # ingest: each batch twice, by two clients (idempotent)
                    doc = c.post_bytes("/v1/evaluations", jsonl(batches[(k // 2 + i) % 6]), "application/x-ndjson")
                    assert doc["schema"] == "archopt.ingest/1"
                else:  # repeated queries, and one cold one that several clients ask at once
                    size = "80%" if i % 2 == 0 else "77%"
                    doc = c.post_json("/v1/query", {"model": "synth", "params": size, "top": 3})
                    assert doc["schema"] == "archopt.query/1" and doc["results"]
                    assert all(r["params"] <= doc["target_params"] for r in doc["results"])
                    answers.append(doc)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(f"client {k}: {exc!r}")

    threads = [threading.Thread(target=client, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert len(answers) == 16
    by_target: dict[int, set[int]] = {}
    for doc in answers:
        by_target.setdefault(doc["target_params"], set()).add(doc["query_id"])
    assert all(len(ids) == 1 for ids in by_target.values())  # one stored query per distinct request
    with served.archive.read() as session:
        tiny = session.scalar(select(m.BaseModel.id).where(m.BaseModel.name == "tiny"))
        hashes = [h for (h,) in session.execute(select(m.Architecture.arch_hash)
                                                .where(m.Architecture.base_model_id == tiny))]
        stored = session.scalar(select(func.count()).select_from(m.Evaluation).join(m.Architecture)
                                .where(m.Architecture.base_model_id == tiny, m.Evaluation.value >= 10.0 + 2000 / 7))
        queries = session.scalar(select(func.count()).select_from(m.StoredQuery))
    assert len(hashes) == len(set(hashes))
    ppl = sum(1 for batch in batches for line in batch[1:])
    assert stored == ppl  # the ppl values of these batches (mmlu values are below 10)
    assert expected > ppl
    assert queries >= len(by_target)


def test_identical_cold_queries_are_computed_once(served):
    stats = served.service.queries.stats
    before = dict(stats)
    results: list[dict[str, Any]] = []
    barrier = threading.Barrier(6)

    def ask() -> None:
        barrier.wait()
        results.append(Client(served.url).post_json("/v1/query", {"model": "synth", "params": "66%", "top": 4}))

    threads = [threading.Thread(target=ask) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == 6 and len({r["query_id"] for r in results}) == 1
    assert stats["computed"] - before["computed"] == 1


# --- background training (own archives) ------------------------------------------------------------
def test_predictors_train_in_the_background_never_in_a_query(sqlite_url):
    """No predictor: 503 while the first one trains. New data: answered now with the stale version,
    marked stale, and retrained in the background; the next answer uses the new version."""
    archive = Archive(sqlite_url)
    fill(archive, 30)
    with serving(sqlite_url, retrain_interval=0, state_ttl=0) as server:
        code, headers, doc = raw(server.url + "/v1/query", "POST", b'{"model": "synth", "params": "75%", "top": 3}')
        assert code == 503 and int(headers["Retry-After"]) > 0
        assert "no predictor for ppl_wikitext2" in doc["error"] and "background" in doc["error"]
        c = Client(server.url, TOKEN)
        waits: list[str] = []
        first = c.query({"model": "synth", "params": "75%", "top": 3}, on_wait=waits.append, wait_s=120)
        assert first["predictor_versions"] == {"ppl_wikitext2": 1}
        assert first["predictors_stale"] == {"ppl_wikitext2": False}
        assert server.service.queries.stats["not_ready"] >= 1
        # ten more measured architectures arrive through the API
        other = Archive(f"sqlite:///{Path(sqlite_url[10:]).with_name('more.db')}")
        fill(other, 10, seed=5)
        buffer = io.StringIO()
        from archopt.archdb.formats import write_jsonl
        with other.read() as session:
            write_jsonl(list(export_records(session)), buffer)
        other.close()
        c.post_bytes("/v1/evaluations", buffer.getvalue().encode(), "application/x-ndjson")
        stale = c.post_json("/v1/query", {"model": "synth", "params": "75%", "top": 3})
        assert stale["predictor_versions"] == {"ppl_wikitext2": 1} and stale["query_id"] == first["query_id"]
        assert stale["predictors_stale"] == {"ppl_wikitext2": True}
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            versions = [p["version"] for p in c.get("/v1/predictors")["predictors"]]
            if max(versions) == 2:
                break
            time.sleep(0.1)
        fresh = c.post_json("/v1/query", {"model": "synth", "params": "75%", "top": 3})
        assert fresh["predictor_versions"] == {"ppl_wikitext2": 2}
        assert fresh["predictors_stale"] == {"ppl_wikitext2": False} and fresh["query_id"] != first["query_id"]
        # too few evaluations and no model of the family to borrow from: a clear 422, not a 503 loop
        fill(archive, 3, seed=9, model="small", spec=dataclasses.replace(SPEC, family="mistral"))
        err = error_of(lambda: c.post_json("/v1/query", {"model": "small", "params": "80%"}))
        assert err.status == 422 and "borrow" in str(err)
    archive.close()


def test_service_borrows_a_family_predictor_as_the_cli_does(sqlite_url):
    """A model with fewer than 5 evaluations is answered over HTTP with the family predictor that
    ``archopt query`` uses (the service's own choice of predictor used to answer 422), and a
    tampered artifact is refused by both."""
    from archopt.optimizer.query import QueryRequest, run_query
    archive = Archive(sqlite_url)
    fill(archive, 40)
    fill(archive, 3, seed=9, model="small")
    cli_doc = run_query(archive, QueryRequest(model="small", params="80%", top=3))
    assert cli_doc["predictors_borrowed_from"] == {"ppl_wikitext2": ["synth"]}
    with serving(sqlite_url, retrain_interval=3600, state_ttl=0) as server:
        doc = Client(server.url, TOKEN).query({"model": "small", "params": "80%", "top": 3}, wait_s=120)
        assert doc["predictors_borrowed_from"] == cli_doc["predictors_borrowed_from"]
        assert doc["predictor_versions"] == cli_doc["predictor_versions"] and doc["query_id"] == cli_doc["query_id"]
        with archive.write() as session:
            row = session.scalar(select(m.PredictorVersion).where(m.PredictorVersion.feature_set == "family"))
            row.artifact = row.artifact[:-1] + bytes([row.artifact[-1] ^ 0xFF])
        err = error_of(lambda: Client(server.url, TOKEN).post_json("/v1/query", {"model": "small", "params": "79%"}))
        assert err.status == 422 and "hash mismatch" in str(err)
    archive.close()


def test_train_endpoint_waits_or_queues(sqlite_url):
    archive = Archive(sqlite_url)
    fill(archive, 20)
    with serving(sqlite_url) as server:
        c = Client(server.url, TOKEN)
        done = c.post_json("/v1/predictors/train", {"model": "synth", "metrics": ["mmlu"], "wait": True})
        assert done == {"schema": "archopt.training/1", "model": "synth", "trained": {"mmlu": 1}}
        queued = c.post_json("/v1/predictors/train", {"model": "synth", "metrics": "ppl_wikitext2"})
        assert queued == {"schema": "archopt.training/1", "model": "synth", "queued": ["ppl_wikitext2"]}
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(c.get("/v1/predictors")["predictors"]) < 2:
            time.sleep(0.1)
        assert sorted((p["metric"], p["version"]) for p in c.get("/v1/predictors")["predictors"]) == [
            ("mmlu", 1), ("ppl_wikitext2", 1)]
        for body, words in [({"model": "synth", "metrics": ["ppl_ptb"]}, "no ppl_ptb evaluations"),
                            ({"model": "synth", "seed": "x"}, "'seed'"), ({"metrics": ["mmlu"]}, "'model'"),
                            ({"model": "synth", "colour": 1}, "unknown field")]:
            err = error_of(lambda body=body: c.post_json("/v1/predictors/train", body))
            assert err.status == 422 and words in str(err), (body, str(err))
        assert error_of(lambda: c.post_json("/v1/predictors/train", {"model": "nope"})).status == 404
    archive.close()
