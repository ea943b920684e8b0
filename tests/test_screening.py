"""Cheap fidelities (``archopt query --screen``): the protocol relation, the default protocol, the
predictors that learn from mapped cheap values, the loop that verifies the best screened
candidates, and the Campaign/CLI path on a tiny model."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from archopt.archdb import Archive, reads
from archopt.archdb.protocol import Protocol
from archopt.optimizer.encoding import encode
from archopt.optimizer.loop import verify_loop
from archopt.optimizer.query import QueryRequest
from archopt.optimizer.training import ensure_predictors, is_stale, latest_row

from helpers.archives import PPL, SPEC, TRUTH, fill, record_ppl
from helpers.synthetic import SyntheticTruth, random_archive

CHEAP = dataclasses.replace(PPL, tokens=1024)


def _cheap_of(ppl, seed=0):
    """A cheap fidelity: a monotone map of the full value with its own noise (log scale, sd 0.01)."""
    rng = np.random.default_rng(seed)
    return np.exp(0.6 * np.log(ppl) + 1.0 + rng.normal(0.0, 0.01, len(ppl)))


def test_cheaper_fidelity_relation():
    assert CHEAP.is_cheaper_fidelity_of(PPL)
    assert not PPL.is_cheaper_fidelity_of(CHEAP)
    assert not PPL.is_cheaper_fidelity_of(PPL)
    assert not dataclasses.replace(CHEAP, seq_len=64).is_cheaper_fidelity_of(PPL)     # another window
    assert not dataclasses.replace(CHEAP, split="validation").is_cheaper_fidelity_of(PPL)
    assert not dataclasses.replace(CHEAP, tokens=None).is_cheaper_fidelity_of(PPL)


def test_default_protocol_stays_the_full_one_when_cheap_values_outnumber_it(archive):
    fill(archive, 10)
    extra = random_archive(SPEC, 40, 5)
    record_ppl(archive, extra.architectures(), _cheap_of(TRUTH.ppl(extra)), CHEAP, "screen")
    with archive.read() as session:
        base = reads.get_base_model(session, "synth")
        pid = reads.default_protocol(session, base, "ppl_wikitext2")
        assert reads.protocol_dict(session, pid)["tokens"] == 8192
        cheap = reads.cheaper_fidelities(session, base, "ppl_wikitext2", pid)
        assert [reads.protocol_dict(session, c)["tokens"] for c in cheap] == [1024]


def test_predictor_learns_from_mapped_cheap_values_and_goes_stale_on_new_ones(archive):
    batch = random_archive(SPEC, 140, 11)
    archs = batch.architectures()
    truth = SyntheticTruth(noise=0.01, seed=12)
    ppl = truth.ppl(batch, noisy=True)
    full, test = list(range(20)), list(range(100, 140))
    record_ppl(archive, [archs[i] for i in full], ppl[full], PPL)
    # without cheap values: a predictor on the 20 full ones
    only_full = ensure_predictors(archive, "synth", ["ppl_wikitext2"])["ppl_wikitext2"]
    # cheap values for the 20 (pairs) and 80 more
    cheap_idx = list(range(100))
    record_ppl(archive, [archs[i] for i in cheap_idx], _cheap_of(ppl[cheap_idx]), CHEAP, "screen")
    with archive.read() as session:
        assert is_stale(session, latest_row(session, reads.get_base_model(session, "synth"), "ppl_wikitext2",
                                            only_full.protocol_id))
    with_cheap = ensure_predictors(archive, "synth", ["ppl_wikitext2"])["ppl_wikitext2"]
    assert with_cheap.retrained and with_cheap.version == only_full.version + 1
    with archive.read() as session:
        row = latest_row(session, reads.get_base_model(session, "synth"), "ppl_wikitext2", with_cheap.protocol_id)
        fid = row.trained_on["fidelity"]
        assert row.n_train == 20 and fid["pairs"] == 20 and fid["rows"] == 80 and fid["corr"] > 0.9
        assert fid["slope"] == pytest.approx(1 / 0.6, rel=0.15)          # inverts the cheap map
        assert not is_stale(session, row)
    from archopt.optimizer.predictors import kendall_tau
    truth_test = truth.ppl(batch.take(np.array(test)))
    X = only_full.predictor.featurizer.transform(batch.take(np.array(test)))
    tau_full = kendall_tau(only_full.predictor.predict(X)[0], truth_test)
    tau_cheap = kendall_tau(with_cheap.predictor.predict(X)[0], truth_test)
    assert with_cheap.predictor.n_train == 100
    assert tau_cheap > tau_full + 0.05, (tau_full, tau_cheap)


def test_screening_rounds_verify_the_best_screened_candidates(archive):
    fill(archive, 30)
    target = int(0.75 * SPEC.total_params)
    truth = SyntheticTruth(noise=TRUTH.noise, seed=7)
    screened_values: dict[str, float] = {}
    verified: list[str] = []

    def measure_cheap(archs, picks, doc):
        values = _cheap_of(truth.ppl(encode(archs, SPEC)), seed=len(screened_values))
        record_ppl(archive, archs, values, CHEAP, "screen")
        for a, v in zip(archs, values):
            screened_values[a.arch_id("synth")] = float(v)
        return list(values)

    def measure(archs, picks, doc):
        for a in archs:    # verified ones were screened, and are the best screened still waiting
            aid = a.arch_id("synth")
            assert aid in screened_values
            waiting = [v for k, v in screened_values.items() if k not in verified]
            assert screened_values[aid] <= sorted(waiting)[len(archs) - 1] + 1e-12
        ppl = truth.ppl(encode(archs, SPEC), noisy=True)
        record_ppl(archive, archs, ppl)
        verified.extend(a.arch_id("synth") for a in archs)

    report = verify_loop(archive, QueryRequest(model="synth", params=target, candidates=3000), verify=2, rounds=3,
                         measure=measure, screen=6, measure_cheap=measure_cheap)
    assert len(report.rounds) == 3 and len(verified) == 6 == len(set(verified))
    assert report.screened == 18 == len(screened_values)
    assert all(r.screened == 6 for r in report.rounds)
    with pytest.raises(ValueError):
        verify_loop(archive, QueryRequest(model="synth", params=target), verify=1, rounds=1, measure=measure, screen=3)


@pytest.mark.slow
def test_query_screen_cli_on_tiny_model(run_cli, sqlite_url, tmp_path, monkeypatch):
    from helpers.cli_runs import fidelity_pairs, sampled_tiny_archive
    data_dir = sampled_tiny_archive(run_cli, sqlite_url, tmp_path, monkeypatch)

    def pairs():
        return fidelity_pairs(sqlite_url)

    tokens, n_full, cheap = pairs()
    assert tokens == 512 and cheap == []
    r = run_cli("--db", sqlite_url, "query", "--model", "tiny-gqa", "--params", "80%", "--tolerance", "5%",
                "--verify", "1", "--rounds", "2", "--screen", "3", "--data-dir", str(data_dir), "--seq-len", "16",
                "--device", "cpu", "--metrics", "ppl_wikitext2", "--seed", "1",  # the archive's calibration seed
                "--no-starts")
    assert r.code == 0, r.err
    assert "2 rounds, 2 architectures verified" in r.out and "6 screened" in r.out
    assert "screening ppl_wikitext2 on 128 tokens" in r.err     # an eighth of 512, at least 8 windows
    tokens_after, n_full_after, cheap = pairs()
    assert tokens_after == 512 and n_full_after == n_full + 2     # the full protocol stays the default
    assert len(cheap) == 1 and cheap[0][0] == 128
    assert cheap[0][1] >= 6 + 2      # the screened ones, the verified ones, the archived ones paired
    r = run_cli("--db", sqlite_url, "query", "--model", "tiny-gqa", "--params", "80%", "--screen", "3")
    assert r.code != 0 and "--screen goes with --verify" in r.err
    r = run_cli("--db", sqlite_url, "query", "--model", "tiny-gqa", "--params", "80%", "--screen-tokens", "64")
    assert r.code != 0 and "--screen-tokens goes with --screen" in r.err
