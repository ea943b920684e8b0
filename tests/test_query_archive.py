"""Predictors versioned in the archive and ``archopt query`` on synthetic archives with a known truth."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sqlalchemy import select, update

from archopt.archdb import Archive
from archopt.archdb import models as m
from archopt.archdb.arch import BaseSpec
from archopt.optimizer.encoding import encode
from archopt.optimizer.query import QueryRequest, get_query, run_query
from archopt.optimizer.training import PredictorError, ensure_predictors
from archopt.optimizer.pareto import pareto_mask

from helpers.archives import SPEC, TRUTH, fill
from helpers.synthetic import random_archive


def test_query_respects_budget_pareto_and_finds_good_architectures(archive):
    fill(archive, 200)
    target = int(0.75 * SPEC.total_params)
    doc = run_query(archive, QueryRequest(model="synth", params=target, tolerance="2%", top=8))
    assert doc["schema"] == "archopt.query/1" and doc["results"]
    lo = int(np.ceil(target * 0.98))
    for r in doc["results"]:
        assert lo <= r["params"] <= target
    values = np.array([[r["params"], r["predicted"]["ppl_wikitext2"]] for r in doc["results"]], dtype=float)
    assert pareto_mask(values, ["minimize", "minimize"]).all()
    # the best returned architecture is much better (true PPL) than uniform pruning at the same size
    from archopt.archdb.arch import from_layer_dicts, uniform_at_size
    best = from_layer_dicts(SPEC, doc["results"][0]["layers"])
    _, uni = uniform_at_size(SPEC, target)
    true_best = float(TRUTH.ppl(encode([best], SPEC))[0])
    true_uniform = float(TRUTH.ppl(encode([uni], SPEC))[0])
    assert true_best < 0.9 * true_uniform


def test_repeated_query_is_served_from_store_and_new_size_needs_no_evaluation(archive):
    fill(archive, 60)
    first = run_query(archive, QueryRequest(model="synth", params="80%", top=5))
    again = run_query(archive, QueryRequest(model="synth", params="80%", top=5))
    assert not first["served_from_store"] and again["served_from_store"]
    assert again["results"] == first["results"] and again["query_id"] == first["query_id"]
    assert get_query(archive, first["query_id"])["results"] == first["results"]
    other = run_query(archive, QueryRequest(model="synth", params="70%", top=5))
    assert not other["served_from_store"] and other["predictor_versions"] == first["predictor_versions"]
    with archive.read() as session:
        from sqlalchemy import func
        assert session.scalar(select(func.count()).select_from(m.PredictorVersion)) == 1


def test_results_are_deterministic_for_a_seed(archive):
    fill(archive, 60)
    a = run_query(archive, QueryRequest(model="synth", params="75%", top=5, seed=3))
    with archive.write() as session:
        session.execute(m.StoredQuery.__table__.delete())
    b = run_query(archive, QueryRequest(model="synth", params="75%", top=5, seed=3))
    assert not b["served_from_store"]
    assert [r["arch_id"] for r in a["results"]] == [r["arch_id"] for r in b["results"]]


def test_versions_increase_and_stale_predictors_retrain(archive):
    fill(archive, 30, seed=0)
    v1 = ensure_predictors(archive, "synth", ["ppl_wikitext2"])["ppl_wikitext2"]
    assert v1.version == 1 and v1.retrained
    same = ensure_predictors(archive, "synth", ["ppl_wikitext2"])["ppl_wikitext2"]
    assert same.version == 1 and not same.retrained and not same.stale
    fill(archive, 10, seed=5)
    kept = ensure_predictors(archive, "synth", ["ppl_wikitext2"], retrain=False)["ppl_wikitext2"]
    assert kept.version == 1 and kept.stale
    doc = run_query(archive, QueryRequest(model="synth", params="80%", top=3, retrain=False))
    assert doc["predictors_stale"]["ppl_wikitext2"] is True
    v2 = ensure_predictors(archive, "synth", ["ppl_wikitext2"])["ppl_wikitext2"]
    assert v2.version == 2 and v2.predictor.n_train == 40
    # retracting an evaluation the predictor learned from makes it stale too
    with archive.write() as session:
        eid = session.scalar(select(m.Evaluation.id).where(m.Evaluation.metric == "ppl_wikitext2").limit(1))
        from archopt.archdb.store import retract_evaluation
        retract_evaluation(session, eid, "test")
    v3 = ensure_predictors(archive, "synth", ["ppl_wikitext2"])["ppl_wikitext2"]
    assert v3.version == 3 and v3.predictor.n_train == 39


def test_tampered_artifact_is_refused(archive):
    fill(archive, 20)
    ensure_predictors(archive, "synth", ["ppl_wikitext2"])
    with archive.write() as session:
        row = session.scalar(select(m.PredictorVersion))
        data = bytearray(row.artifact)
        data[len(data) // 2] ^= 0xFF
        session.execute(update(m.PredictorVersion).values(artifact=bytes(data)))
    with pytest.raises(PredictorError, match="hash mismatch"):
        ensure_predictors(archive, "synth", ["ppl_wikitext2"])
    # an explicit retrain replaces it with a fresh version
    fresh = ensure_predictors(archive, "synth", ["ppl_wikitext2"], force=True)["ppl_wikitext2"]
    assert fresh.version == 2


def test_artifact_of_another_sklearn_version_is_retrained(archive):
    fill(archive, 20)
    ensure_predictors(archive, "synth", ["ppl_wikitext2"])
    with archive.write() as session:
        row = session.scalar(select(m.PredictorVersion))
        row.library_versions = {**row.library_versions, "scikit-learn": "0.0.1"}
    t = ensure_predictors(archive, "synth", ["ppl_wikitext2"])["ppl_wikitext2"]
    assert t.retrained and t.version == 2


def test_two_objectives_and_mmlu_maximised(archive):
    fill(archive, 80)
    doc = run_query(archive, QueryRequest(model="synth", params="75%", objectives=("ppl_wikitext2", "mmlu"), top=10))
    vals = np.array([[r["params"], r["predicted"]["ppl_wikitext2"], r["predicted"]["mmlu"]] for r in doc["results"]])
    assert pareto_mask(vals, ["minimize", "minimize", "maximize"]).all()
    assert set(doc["predictor_versions"]) == {"ppl_wikitext2", "mmlu"}
    for r in doc["results"]:
        assert set(r["uncertainty"]) >= {"ppl_wikitext2", "mmlu"}


def test_too_few_evaluations_and_unknown_metric_are_clear_errors(archive):
    fill(archive, 3)
    with pytest.raises(PredictorError, match="fewer than 5 ppl_wikitext2"):
        run_query(archive, QueryRequest(model="synth", params="80%"))
    with pytest.raises(PredictorError, match="ppl_ptb"):
        run_query(archive, QueryRequest(model="synth", params="80%", objectives=("ppl_ptb",)))


def test_measured_values_appear_beside_predictions(archive):
    archs = fill(archive, 60)
    target = max(a.params for a in archs)
    doc = run_query(archive, QueryRequest(model="synth", params=target, tolerance="30%", top=50))
    known = {a.arch_id("synth") for a in archs}
    for r in doc["results"]:
        if r["arch_id"] in known:
            assert r["measured"]["ppl_wikitext2"] is not None
            assert r["measured_protocol"]["ppl_wikitext2"] == doc["predictor_protocols"]["ppl_wikitext2"]
        else:
            assert r["measured"]["ppl_wikitext2"] is None


def test_cli_query_json_and_table(sqlite_url, run_cli):
    archive = Archive(sqlite_url)
    fill(archive, 40)
    archive.close()
    r = run_cli("--db", sqlite_url, "query", "--model", "synth", "--params", "80%", "--json", "--top", "3")
    assert r.code == 0, r.err
    doc = json.loads(r.out)
    assert doc["schema"] == "archopt.query/1" and len(doc["results"]) <= 3
    r = run_cli("--db", sqlite_url, "query", "--model", "synth", "--params", "80%", "--top", "3")
    assert r.code == 0 and "served from the store" in r.out and "predictors: ppl_wikitext2 v1" in r.out
    r = run_cli("--db", sqlite_url, "predictors", "list", "--json")
    assert r.code == 0 and json.loads(r.out)["predictors"][0]["version"] == 1
    r = run_cli("--db", sqlite_url, "query", "--model", "synth", "--params", "120%")
    assert r.code != 0 and len(r.err_lines) == 1 and r.err_lines[0].startswith("error:") and "100%" in r.err


def test_model_with_few_evaluations_borrows_a_family_predictor(archive):
    """B (16 layers, 2 evaluations) borrows from A (12 layers, 150) through depth-normalised features:
    the query answers, and the borrowed predictor ranks B's architectures better than chance."""
    from scipy.stats import kendalltau
    fill(archive, 150, model="synth")
    spec_b = BaseSpec(family="llama", num_layers=16, hidden_size=96, num_heads=6, num_kv_heads=3, head_dim=16,
                      intermediate_size=256, vocab_size=500)
    fill(archive, 2, seed=9, model="synth-b", spec=spec_b)
    doc = run_query(archive, QueryRequest(model="synth-b", params="80%", top=5))
    assert doc["results"] and doc["predictors_borrowed_from"] == {"ppl_wikitext2": ["synth"]}
    trained = ensure_predictors(archive, "synth-b", ["ppl_wikitext2"])["ppl_wikitext2"]
    assert trained.borrowed_from == ("synth",) and not trained.retrained  # reused, not retrained each time
    held_out = random_archive(spec_b, 200, seed=3)
    predicted, _ = trained.predictor.predict_architectures(held_out)
    tau = kendalltau(predicted, TRUTH.ppl(held_out)).statistic
    params_tau = kendalltau(-held_out.params, TRUTH.ppl(held_out)).statistic
    assert tau > 0.5 and tau > params_tau + 0.1
    again = run_query(archive, QueryRequest(model="synth-b", params="80%", top=5))
    assert again["served_from_store"]


def test_no_family_to_borrow_from_is_a_clear_error(archive):
    fill(archive, 2, model="lonely")
    with pytest.raises(PredictorError, match="borrow"):
        run_query(archive, QueryRequest(model="lonely", params="80%"))
