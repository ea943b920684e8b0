"""Issue 17: every answer carries its predictors' quality and one-line warnings, in the CLI table,
``--json``, the API (the page is checked in test_service_page.py); the base model's measured value
is the table's reference row."""

from __future__ import annotations

import json


from archopt.archdb import Archive
from archopt.archdb.arch import full
from archopt.optimizer.quality import MIN_ROWS, MIN_TAU, evaluate_command, predictor_warnings
from archopt.optimizer.query import QueryRequest, run_query
from archopt.optimizer.training import ensure_predictors
from archopt.service.client import Client

from helpers.archives import SPEC, fill, record_ppl
from helpers.service import TOKEN, serving


def flat(text: str) -> str:
    """Console output with its line wrapping undone."""
    return " ".join(text.split())


def test_seven_architectures_warn_everywhere_fifty_do_not(sqlite_url, archive, run_cli, tmp_path):
    fill(archive, 7)
    doc = run_query(archive, QueryRequest(model="synth", params="80%", top=5))
    quality = doc["predictor_quality"]["ppl_wikitext2"]
    assert quality["rows"] == 7 and set(quality) >= {"rows", "kendall_tau", "r2", "coverage"}
    assert len(doc["warnings"]) == 1
    warning = doc["warnings"][0]
    assert warning.startswith("ppl_wikitext2: weak predictor (7 measured architectures, fewer than 20")
    assert "archopt evaluate --model synth --params 80% --samples 20 --metrics ppl_wikitext2" in warning
    assert "\n" not in warning

    r = run_cli("--db", sqlite_url, "query", "--model", "synth", "--params", "80%", "--top", "5")
    assert r.code == 0, r.err
    assert "warning: ppl_wikitext2: weak predictor (7 measured architectures" in flat(r.out)
    assert "CV Kendall τ" in flat(r.out) and "band held" in flat(r.out)
    r = run_cli("--db", sqlite_url, "query", "--model", "synth", "--params", "80%", "--top", "5", "--json")
    assert json.loads(r.out)["warnings"] == doc["warnings"]      # the stored answer keeps them

    r = run_cli("--db", sqlite_url, "predictors", "train", "--model", "synth", "--metric", "ppl_wikitext2")
    assert r.code == 0 and "warning: ppl_wikitext2: weak predictor (7 measured architectures" in flat(r.out)
    assert "band held" in flat(r.out)
    listed = json.loads(run_cli("--db", sqlite_url, "predictors", "list", "--json").out)["predictors"]
    assert all(0 <= p["coverage"] <= 1 for p in listed)

    with serving(sqlite_url, retrain_interval=3600) as server:
        api = Client(server.url, TOKEN).query({"model": "synth", "params": "80%", "top": 5})
    assert api["warnings"] == doc["warnings"] and api["predictor_quality"] == doc["predictor_quality"]

    fifty = Archive(f"sqlite:///{tmp_path / 'fifty.db'}")
    fill(fifty, 50)
    doc = run_query(fifty, QueryRequest(model="synth", params="80%", top=5))
    fifty.close()
    assert doc["warnings"] == [] and doc["predictor_quality"]["ppl_wikitext2"]["kendall_tau"] > MIN_TAU
    assert doc["predictor_quality"]["ppl_wikitext2"]["rows"] == 50 >= MIN_ROWS


def test_weak_borrowed_and_outside_warnings_name_the_fix():
    fix = evaluate_command("/models/m", 0.8, "ppl_wikitext2", 2048)
    assert fix == "archopt evaluate --model /models/m --params 80% --samples 20 --metrics ppl_wikitext2 --max-tokens 2048"
    weak = predictor_warnings("ppl_wikitext2", {"rows": 60, "kendall_tau": 0.33, "r2": -2.84, "coverage": 0.3}, fix)
    assert len(weak) == 1 and "Kendall tau 0.33, below 0.5" in weak[0] and "R² -2.84" in weak[0]
    assert "held 30%" in weak[0] and weak[0].endswith(fix)
    assert predictor_warnings("ppl_wikitext2", {"rows": 60, "kendall_tau": 0.8, "r2": 0.7, "coverage": 0.7}, fix) == []


def test_target_outside_the_measured_sizes_and_results_better_than_the_base(archive):
    fill(archive, 50)                          # sizes 70%-87% of the base
    doc = run_query(archive, QueryRequest(model="synth", params="98%", top=5))
    assert doc["base_measured"] == {"ppl_wikitext2": None}
    outside = [w for w in doc["warnings"] if "lies outside the sizes the predictor learnt from" in w]
    assert len(outside) == 1 and "--params 98%" in outside[0]
    record_ppl(archive, [full(SPEC)], [1e6], origin="base")   # retrained: now every result beats the base
    doc = run_query(archive, QueryRequest(model="synth", params="80%", top=5))
    assert doc["base_measured"] == {"ppl_wikitext2": 1e6}
    assert [w for w in doc["warnings"] if "results are predicted better than the unpruned base model's "
            "measured 1e+06" in w]
    assert not [w for w in doc["warnings"] if "lies outside" in w]


def test_borrowed_predictor_warns(archive):
    fill(archive, 60, model="donor")
    small = type(SPEC)(**{**SPEC.__dict__, "num_layers": 8})
    fill(archive, 2, model="newcomer", spec=small, seed=9)
    doc = run_query(archive, QueryRequest(model="newcomer", params="80%", top=3))
    assert doc["predictors_borrowed_from"] == {"ppl_wikitext2": ["donor"]}
    assert any(w.startswith("ppl_wikitext2: borrowed predictor (learnt on donor") for w in doc["warnings"])


def test_the_base_model_is_the_tables_reference_row(sqlite_url, archive, run_cli):
    fill(archive, 40)
    record_ppl(archive, [full(SPEC)], [3.5], origin="base")
    ensure_predictors(archive, "synth", ["ppl_wikitext2"])
    r = run_cli("--db", sqlite_url, "query", "--model", "synth", "--params", "80%", "--top", "3")
    assert r.code == 0, r.err
    row = next(line for line in r.out.splitlines() if line.startswith("│ base"))
    assert "(unpruned)" in row and "100.0%" in row and "3.5" in row
    assert "--- base model measured 3.5" in r.out
