"""Rounds of query -> verify -> retrain (optimizer.loop, ``archopt query --verify K --rounds R``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from archopt.optimizer.encoding import encode
from archopt.optimizer.loop import pick_to_verify, verify_loop
from archopt.optimizer.query import QueryRequest

from helpers.archives import SPEC, TRUTH, fill, record_ppl
from helpers.synthetic import SyntheticTruth


def _row(arch_id, pred, std, measured=None):
    return {"arch_id": arch_id, "predicted": {"ppl_wikitext2": pred}, "uncertainty": {"ppl_wikitext2": std},
            "measured": {"ppl_wikitext2": measured}}


def test_pick_to_verify_skips_measured_and_explores_within_gap():
    rows = [_row("a", 10.0, 0.0, measured=10.1), _row("b", 10.2, 0.1), _row("c", 10.5, 2.0), _row("d", 20.0, 9.0)]
    assert [r["arch_id"] for r in pick_to_verify(rows, 2, objective="ppl_wikitext2")] == ["b", "c"]
    # exploring: c (uncertain, close) before b; d is far worse than the best and never picked
    assert [r["arch_id"] for r in pick_to_verify(rows, 3, objective="ppl_wikitext2", explore=1.0)] == ["c", "b"]
    assert [r["arch_id"] for r in pick_to_verify(rows, 2, objective="ppl_wikitext2", exclude={"b", "c", "d"})] == []
    acc = [{"arch_id": "x", "predicted": {"mmlu": 0.3}, "measured": {}}, {"arch_id": "y", "predicted": {"mmlu": 0.4}}]
    assert pick_to_verify(acc, 1, objective="mmlu")[0]["arch_id"] == "y"


def test_verify_loop_measures_new_architectures_each_round_and_retrains(archive):
    fill(archive, 30)
    target = int(0.75 * SPEC.total_params)
    measured: list[str] = []

    truth = SyntheticTruth(noise=TRUTH.noise, seed=7)  # its own noise: independent of test order

    def measure(archs, picks, doc):
        ppl = truth.ppl(encode(archs, SPEC), noisy=True)
        record_ppl(archive, archs, ppl)
        measured.extend(a.arch_id("synth") for a in archs)
        assert all(int(np.ceil(target * 0.98)) <= a.params <= target for a in archs)

    versions = []
    report = verify_loop(archive, QueryRequest(model="synth", params=target, candidates=3000), verify=3, rounds=3,
                         measure=measure, explore=0.5,
                         on_round=lambda rnd, doc: versions.append(doc["predictor_versions"]["ppl_wikitext2"]))
    assert len(report.rounds) == 3 and report.stopped == "rounds"
    assert len(measured) == 9 == len(set(measured)) == len(report.verified)
    assert versions == sorted(versions) and versions[-1] > versions[0]   # each round retrained on the last
    # a budget caps the total
    report = verify_loop(archive, QueryRequest(model="synth", params=target, candidates=3000), verify=3, rounds=5,
                         measure=measure, budget=4)
    assert len(report.verified) == 4 and report.stopped == "budget"
    with pytest.raises(ValueError):
        verify_loop(archive, QueryRequest(model="synth", params=target), verify=0, rounds=1, measure=measure)


@pytest.mark.slow
def test_query_rounds_cli_on_tiny_model(run_cli, sqlite_url, tmp_path, monkeypatch):
    import tiny_models as tm
    from helpers.cli_runs import counts, evaluate
    monkeypatch.setenv("ARCHOPT_CACHE", str(tmp_path / "cache"))
    model_dir = tm.save_tiny("llama_gqa_odd", tmp_path / "tiny-gqa")
    data_dir = tm.write_local_data(tmp_path / "data")
    r = evaluate(run_cli, sqlite_url, model_dir, data_dir, "--samples", "8", "--params", "80%", "--seed", "1")
    assert r.code == 0, r.err
    _, before = counts(sqlite_url)
    r = run_cli("--db", sqlite_url, "query", "--model", "tiny-gqa", "--params", "80%", "--tolerance", "5%",
                "--verify", "2", "--rounds", "2", "--data-dir", str(data_dir), "--seq-len", "16",
                "--device", "cpu", "--metrics", "ppl_wikitext2,ppl_ptb", "--no-starts")  # starts: test_verify
    assert r.code == 0, r.err
    assert "2 rounds, 4 architectures verified" in r.out
    _, after = counts(sqlite_url)
    assert after == before + 4 * 2      # 4 new architectures x 2 metrics
    r = run_cli("--db", sqlite_url, "query", "--model", "tiny-gqa", "--params", "80%", "--rounds", "2")
    assert r.code != 0 and "--rounds and --screen need --verify" in r.err


@pytest.mark.parametrize("local", [0.0, 1.0])
def test_trust_region_share_and_distinct_picks(archive, local):
    """``local=1``: every verified candidate is a close variant of a measured incumbent; ``local=0``:
    none is. Picks of one round keep ``min_distance`` between them."""
    from archopt.optimizer.loop import layer_distance
    from archopt.archdb.store import spec_of
    from archopt.archdb import reads
    fill(archive, 30)
    with archive.read() as session:
        spec = spec_of(reads.get_base_model(session, "synth"))
    target = int(0.75 * SPEC.total_params)
    truth = SyntheticTruth(noise=TRUTH.noise, seed=9)
    rounds: list[list[dict]] = []

    def measure(archs, picks, doc):
        rounds.append(picks)
        ppl = truth.ppl(encode(archs, SPEC), noisy=True)
        record_ppl(archive, archs, ppl)

    verify_loop(archive, QueryRequest(model="synth", params=target, candidates=3000), verify=4, rounds=2,
                measure=measure, local=local, min_distance=0.01)
    picks = [p for r in rounds for p in r]
    assert len(picks) == 8
    assert all((p["origin"] == "neighbour") == (local == 1.0) for p in picks)
    for r in rounds:
        assert all(layer_distance(a, b, spec) >= 0.01 for i, a in enumerate(r) for b in r[i + 1:])
