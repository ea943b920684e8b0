"""End to end on a tiny saved model and local data: evaluate -> archive -> query --verify -> prune -> ingest."""

from __future__ import annotations

import json

import pytest
import torch
from sqlalchemy import func, select

from archopt.archdb import Archive
from archopt.archdb import models as m

from helpers.cli_runs import counts, evaluate

pytestmark = pytest.mark.slow


def test_evaluate_fills_archive_and_rerun_skips(run_cli, sqlite_url, model_dir, data_dir, env):
    r = evaluate(run_cli, sqlite_url, model_dir, data_dir, "--samples", "6", "--uniform", "0.3", "--seed", "1")
    assert r.code == 0, r.err
    assert counts(sqlite_url) == (8, 16)  # base + uniform + 6 random, two metrics each
    r = evaluate(run_cli, sqlite_url, model_dir, data_dir, "--samples", "6", "--uniform", "0.3", "--seed", "1")
    assert r.code == 0 and "0 architectures measured, 8 already in the archive" in r.out
    assert counts(sqlite_url) == (8, 16)
    r = run_cli("--db", sqlite_url, "archs", "--model", "tiny-gqa", "--json", "--sort", "ppl_wikitext2")
    doc = json.loads(r.out)
    assert doc["schema"] == "archopt.archs/1" and len(doc["archs"]) == 8
    assert {a["origin"] for a in doc["archs"]} == {"base", "uniform", "random"}
    base = next(a for a in doc["archs"] if a["origin"] == "base")
    assert base["fraction"] == 1.0 and base["metrics"]["ppl_wikitext2"]["value"] > 1


def test_interrupted_campaign_resumes_without_duplicates(sqlite_url, model_dir, data_dir, env):
    from archopt.archdb.arch import uniform
    from archopt.optimizer.campaign import Campaign, EvalSettings
    archive = Archive(sqlite_url)
    settings = EvalSettings(metrics=("ppl_wikitext2",), data_dir=str(data_dir), seq_len=16, importance="l2")
    campaign = Campaign(archive, str(model_dir), settings)
    archs = [(uniform(campaign.base.spec, r), "uniform") for r in (0.1, 0.3, 0.5, 0.7)]

    class Crash(Exception):
        pass

    def crash_after_two(i, n, result):
        if i == 1:
            raise Crash

    with pytest.raises(Crash):
        campaign.run(archs, crash_after_two)
    assert counts(sqlite_url) == (2, 2)
    report = campaign.run(archs)
    assert report.skipped == 2 and report.evaluated == 2
    assert counts(sqlite_url) == (4, 4)
    archive.close()


def test_query_verify_feeds_back_and_prune_reloads(run_cli, sqlite_url, model_dir, data_dir, env, tmp_path):
    assert evaluate(run_cli, sqlite_url, model_dir, data_dir, "--samples", "10", "--uniform", "0.2,0.4",
                    "--importance", "l2").code == 0
    r = run_cli("--db", sqlite_url, "query", "--model", "tiny-gqa", "--params", "80%", "--tolerance", "10%",
                "--verify", "1", "--data-dir", str(data_dir), "--importance", "l2", "--device", "cpu", "--json")
    assert r.code == 0, r.err
    doc = json.loads(r.out)
    verified = doc["verified"]
    assert len(verified) == 1 and verified[0]["measured"]["ppl_wikitext2"] is not None
    archive = Archive(sqlite_url)
    with archive.read() as session:
        row = session.scalar(select(m.Architecture).where(m.Architecture.arch_hash == verified[0]["arch_id"]))
        assert row is not None and row.origin in ("verify", "random", "uniform", "base")
        n_verify = session.scalar(select(func.count()).select_from(m.Architecture).where(m.Architecture.origin == "verify"))
    archive.close()
    assert n_verify <= 1
    # the next query learns from the verified evaluation when it was new
    again = json.loads(run_cli("--db", sqlite_url, "query", "--model", "tiny-gqa", "--params", "80%",
                               "--tolerance", "10%", "--json").out)
    if n_verify:
        assert again["predictor_versions"]["ppl_wikitext2"] == doc["predictor_versions"]["ppl_wikitext2"] + 1
    # prune the best architecture and reload it with identical logits
    out = tmp_path / "pruned"
    r = run_cli("--db", sqlite_url, "prune", "--model", "tiny-gqa", "--arch", verified[0]["arch_id"][:10],
                "--out", str(out))
    assert r.code == 0, r.err
    info = json.loads((out / "archopt.json").read_text())
    assert info["params"] == doc["results"][0]["params"]
    from archopt.evaluators import load_pruned
    model = load_pruned(out)
    assert sum(p.numel() for p in model.parameters()) == info["params"]
    from archopt.archdb.arch import from_layer_dicts
    from archopt.evaluators import compute_importance, load_base_model, prune_model
    base = load_base_model(str(model_dir))
    pruned = prune_model(base, from_layer_dicts(base.spec, info["architecture"]),
                         compute_importance(base, "l2"))
    ids = torch.tensor([[0, 5, 9, 33, 7, 100, 2]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, pruned(ids).logits)
    # an lm-eval results file of the pruned directory lands on that architecture
    results = {"results": {"toy_task": {"alias": "toy_task", "acc,none": 0.5, "acc_stderr,none": 0.1}},
               "config": {"model": "hf", "model_args": f"pretrained={out},trust_remote_code=True", "limit": None},
               "n-shot": {"toy_task": 0}, "versions": {"toy_task": 1.0}}
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results))
    r = run_cli("--db", sqlite_url, "ingest", str(path))
    assert r.code == 0, r.err
    archive = Archive(sqlite_url)
    with archive.read() as session:
        row = session.scalar(select(m.Evaluation).where(m.Evaluation.metric == "toy_task/acc"))
        assert row is not None and row.architecture.arch_hash == verified[0]["arch_id"]
    archive.close()


def test_verify_without_weights_says_so_and_still_answers(run_cli, sqlite_url, model_dir, data_dir, env):
    assert evaluate(run_cli, sqlite_url, model_dir, data_dir, "--samples", "6", "--importance", "l2").code == 0
    r = run_cli("--db", sqlite_url, "query", "--model", "tiny-gqa", "--params", "80%", "--tolerance", "10%",
                "--verify", "1", "--weights", str(model_dir / "missing"))
    assert r.code == 0
    assert "Pareto-optimal" in r.out and "cannot verify" in r.err
