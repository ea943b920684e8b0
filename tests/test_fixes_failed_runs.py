"""Issue 16, bug 1: a diverged (non-finite) measurement is stored as a failed run, never as a value.

Before the fix the evaluator's ``inf`` went into ``evaluations``: training that metric failed ("features
and targets must be finite"), and ``export`` and every ``--json`` failed on the non-finite number.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import math

import pytest
import sqlalchemy as sa
import torch

import tiny_models as tm
from archopt.archdb import Archive
from archopt.archdb.arch import uniform
from archopt.evaluators import PerplexityTask
from archopt.evaluators.perplexity import PerplexityTask as _Task


def strict_json(text: str):
    def refuse(literal: str):
        raise ValueError(f"non-finite number {literal} in JSON")
    return json.loads(text, parse_constant=refuse)


def _ids() -> torch.Tensor:
    return torch.tensor(tm.make_tokenizer()(tm.CORPUS)["input_ids"])


def test_huge_weights_give_a_failed_measurement_not_a_value():
    model = tm.make_model("llama_gqa_odd").eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(1e7)   # logits of ~1e7: the mean NLL overflows exp()
    task = PerplexityTask(_ids(), metric="ppl_wikitext2", dataset="wikitext", split="test",
                          tokenizer_name="tiny", tokenizer_hash="x", seq_len=16)
    m = task.evaluate(model)
    assert m.failure is not None and "diverged" in m.failure
    assert not math.isfinite(m.value)


def test_nan_loss_is_a_failed_measurement(monkeypatch):
    task = PerplexityTask(_ids(), metric="ppl_wikitext2", dataset="wikitext", split="test",
                          tokenizer_name="tiny", tokenizer_hash="x", seq_len=16)
    monkeypatch.setattr(_Task, "total_nll", lambda self, model: (math.nan, self.predicted_tokens))
    m = task.evaluate(tm.make_model("llama_gqa_odd").eval())
    assert m.failure is not None and "nan" in m.failure.lower()


@pytest.fixture
def diverging(monkeypatch):
    """The third ppl_wikitext2 measurement diverges (mean NLL 800 nats), everything else is real."""
    real = _Task.total_nll
    calls = {"n": 0}

    def total_nll(self, model):
        total, count = real(self, model)
        if self.metric == "ppl_wikitext2":
            calls["n"] += 1
            if calls["n"] == 3:
                return 800.0 * count, count
        return total, count

    monkeypatch.setattr(_Task, "total_nll", total_nll)
    return calls


@pytest.mark.slow
def test_diverged_run_is_recorded_as_failed_and_nothing_else_breaks(run_cli, sqlite_url, model_dir, data_dir, env,
                                                                    diverging, tmp_path):
    from archopt.optimizer.campaign import Campaign, EvalSettings
    archive = Archive(sqlite_url)
    settings = EvalSettings(metrics=("ppl_wikitext2", "ppl_ptb"), data_dir=str(data_dir), seq_len=16,
                            importance="l2")
    campaign = Campaign(archive, str(model_dir), settings)
    archs = [(uniform(campaign.base.spec, r), "uniform") for r in (0.0, 0.1, 0.2, 0.3, 0.5, 0.6, 0.8)]
    assert len({a.arch_id("tiny-gqa") for a, _ in archs}) == 7
    report = campaign.run(archs)
    bad = report.results[2]
    # the result names the failure; its measurements hold only finite values
    assert bad.failed and "ppl_wikitext2" in bad.failed and "diverged" in bad.failed["ppl_wikitext2"]
    assert all(math.isfinite(x.value) for r in report.results for x in r.measurements)
    assert report.failed == 1

    # training the metric with the failed run works (the failed run is not a training value)
    db = ("--db", sqlite_url)
    r = run_cli(*db, "predictors", "train", "--model", "tiny-gqa", "--metric", "ppl_wikitext2,ppl_ptb")
    assert r.code == 0, r.err

    # every --json and export work, and show the failure where it belongs
    r = run_cli(*db, "archs", "--model", "tiny-gqa", "--json", "--sort", "ppl_wikitext2")
    assert r.code == 0, r.err
    doc = strict_json(r.out)
    entry = next(a for a in doc["archs"] if a["arch_id"] == bad.arch_id)
    assert "ppl_wikitext2" not in entry["metrics"] and "ppl_ptb" in entry["metrics"]
    assert [f["metric"] for f in entry["failed"]] == ["ppl_wikitext2"]
    assert "diverged" in entry["failed"][0]["reason"] and entry["failed"][0]["protocol"]
    assert all(a["failed"] == [] for a in doc["archs"] if a["arch_id"] != bad.arch_id)
    r = run_cli(*db, "show", bad.arch_id, "--json")
    assert r.code == 0, r.err
    shown = strict_json(r.out)
    assert [f["metric"] for f in shown["failed"]] == ["ppl_wikitext2"]
    assert all(v["metric"] != "ppl_wikitext2" for v in shown["all_values"])
    # the tables say it too: a column in archs, a table of failed runs in show
    r = run_cli(*db, "archs", "--model", "tiny-gqa")
    assert r.code == 0 and "failed runs" in r.out and bad.arch_id[:12] in r.out, r.out
    r = run_cli(*db, "show", bad.arch_id[:12])
    assert r.code == 0 and "failed runs" in r.out and "diverged" in r.out, r.out
    r = run_cli(*db, "export", "--format", "jsonl")
    assert r.code == 0, r.err
    lines = [strict_json(line) for line in r.out.splitlines()]
    assert sum(len(x.get("evaluations", [])) for x in lines) == 13
    r = run_cli(*db, "export", "--format", "csv")
    assert r.code == 0, r.err
    rows = [row for row in csv.DictReader(io.StringIO(r.out)) if row["value"]]
    assert len(rows) == 13 and all(math.isfinite(float(row["value"])) for row in rows)
    out = tmp_path / "export.jsonl"
    assert run_cli(*db, "export", "--format", "jsonl", "-o", out).code == 0
    copy_db = f"sqlite:///{tmp_path / 'copy.db'}"
    assert run_cli("--db", copy_db, "ingest", out).code == 0

    # nothing non-finite in the archive's values; the failed run is a row of its own
    with archive.read() as session:
        values = [v for (v,) in session.execute(sa.text("SELECT value FROM evaluations"))]
        assert len(values) == 13 and all(math.isfinite(v) for v in values)
        failed = session.execute(sa.text("SELECT metric, reason FROM failed_runs")).all()
    assert len(failed) == 1 and failed[0][0] == "ppl_wikitext2" and "diverged" in failed[0][1]

    # a rerun does not measure the failed architecture again (it would diverge forever): skipped, reported
    again = campaign.run(archs)
    assert again.evaluated == 0 and again.skipped == len(archs)
    assert again.results[2].failed == {"ppl_wikitext2": failed[0][1]}
    assert diverging["n"] == 7
    archive.close()


def test_record_measurements_never_stores_a_non_finite_value(archive_url):
    from archopt.archdb.protocol import Measurement, Protocol
    from archopt.archdb.records import BaseModelInfo
    from archopt.archdb.store import NewArch, record_measurements, register_base_model
    from archopt.archdb.arch import BaseSpec
    spec = BaseSpec.from_hf_config(tm.make_config("llama_gqa_odd").to_dict())
    archive = Archive(archive_url)
    p = Protocol(dataset="wikitext", split="test", seq_len=16, tokens=64)
    ms = [Measurement("ppl_wikitext2", math.inf, p), Measurement("ppl_ptb", math.nan, copy.copy(p)),
          Measurement("mmlu", 0.5, Protocol(dataset="cais/mmlu", questions=4))]
    with archive.write() as session:
        base, _ = register_base_model(session, BaseModelInfo("tiny", spec, "h"))
        report = record_measurements(session, base, NewArch(uniform(spec, 0.2), "uniform"), ms)
    assert report.archs_added == 1 and report.evaluations_added == 1 and report.failed_added == 2
    with archive.read() as session:
        assert session.execute(sa.text("SELECT count(*) FROM evaluations")).scalar() == 1
        reasons = dict(session.execute(sa.text("SELECT metric, reason FROM failed_runs")).all())
    assert set(reasons) == {"ppl_wikitext2", "ppl_ptb"}
    assert "inf" in reasons["ppl_wikitext2"] and "nan" in reasons["ppl_ptb"]
    archive.close()
