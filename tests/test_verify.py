"""Verification measures each objective under its own predictor's protocol (optimizer/verify.py)."""

from __future__ import annotations

import dataclasses
import json

import pytest
from sqlalchemy import func, select

from archopt.archdb import Archive
from archopt.archdb import models as m
from archopt.archdb.arch import BaseSpec
from archopt.optimizer.campaign import EvalSettings
from archopt.optimizer.profile import profile_variants
from archopt.optimizer.starts import RULES, start_origin
from archopt.optimizer.verify import measurement_settings

from helpers.cli_runs import evaluate


def test_each_metric_gets_its_own_protocol_options():
    defaults = EvalSettings(metrics=("ppl_wikitext2",), seq_len=128, max_tokens=None, shots=5, dtype="float32")
    protocols = {"ppl_wikitext2": {"seq_len": 128, "tokens": 4096, "split": "test"},
                 "ppl_ptb": {"seq_len": 128, "tokens": 1024, "split": "test"},
                 "mmlu": {"questions": 570, "shots": 0}}
    groups = measurement_settings(protocols, ["ppl_wikitext2", "ppl_ptb", "mmlu", "ppl_wikitext2"], defaults)
    by_metric = {metric: s for s in groups for metric in s.metrics}
    assert sorted(by_metric) == ["mmlu", "ppl_ptb", "ppl_wikitext2"]
    # perplexities of different token counts share one group (one job, one pass), each with its count
    assert by_metric["ppl_wikitext2"] is by_metric["ppl_ptb"]
    assert dict(by_metric["ppl_ptb"].metric_tokens) == {"ppl_wikitext2": 4096, "ppl_ptb": 1024}
    assert by_metric["ppl_ptb"].ptb_split == "test"
    assert by_metric["mmlu"].max_questions == 570 and by_metric["mmlu"].shots == 0
    # metrics that agree share one group (one evaluator, one pass over the architectures)
    same = measurement_settings({"ppl_wikitext2": {"seq_len": 128, "tokens": 2048},
                                 "ppl_ptb": {"seq_len": 128, "tokens": 2048, "split": "validation"}},
                                ["ppl_wikitext2", "ppl_ptb"], defaults)
    assert len(same) == 1 and same[0].metrics == ("ppl_wikitext2", "ppl_ptb")
    # a metric without a predictor is measured under the defaults
    alone = measurement_settings({}, ["ppl_ptb"], defaults)
    assert alone == [EvalSettings(metrics=("ppl_ptb",), seq_len=128, max_tokens=None, shots=5, dtype="float32")]
    # a protocol's precision decides the dtype unless the command line chose one
    auto = dataclasses.replace(defaults, dtype=None)
    picked = measurement_settings({"ppl_ptb": {"seq_len": 128, "tokens": 64, "precision": "bfloat16"}},
                                  ["ppl_ptb", "ppl_wikitext2"], auto)
    assert {s.metrics: s.dtype for s in picked} == {("ppl_ptb",): "bfloat16", ("ppl_wikitext2",): None}


@pytest.mark.slow
def test_verify_keeps_each_objective_on_its_predictors_protocol(run_cli, sqlite_url, model_dir, data_dir, env):
    """WikiText-2 learned on 160 tokens and PTB on 96: ``query --verify`` with both objectives measures
    each under its own protocol (the last protocol used to win for both)."""
    common = ("--samples", "6", "--uniform", "0.3", "--seed", "2", "--importance", "l2")
    r = evaluate(run_cli, sqlite_url, model_dir, data_dir, *common, "--metrics", "ppl_wikitext2", "--max-tokens", "160")
    assert r.code == 0, r.err
    r = evaluate(run_cli, sqlite_url, model_dir, data_dir, *common, "--metrics", "ppl_ptb", "--max-tokens", "96")
    assert r.code == 0, r.err
    r = run_cli("--db", sqlite_url, "query", "--model", "tiny-gqa", "--params", "85%", "--tolerance", "10%",
                "--objectives", "ppl_wikitext2,ppl_ptb", "--verify", "1", "--data-dir", str(data_dir),
                "--importance", "l2", "--device", "cpu", "--seq-len", "16", "--json")
    assert r.code == 0, r.err
    doc = json.loads(r.out)
    assert doc["verified"], r.err
    archive = Archive(sqlite_url)
    try:
        with archive.read() as session:
            rows = session.execute(
                select(m.Evaluation.metric, m.Protocol.tokens)
                .join(m.Protocol, m.Protocol.id == m.Evaluation.protocol_id)
                .join(m.Architecture, m.Architecture.id == m.Evaluation.architecture_id)
                .where(m.Architecture.arch_hash == doc["verified"][0]["arch_id"])).all()
            origin = session.scalar(select(m.Architecture.origin)
                                    .where(m.Architecture.arch_hash == doc["verified"][0]["arch_id"]))
    finally:
        archive.close()
    assert origin == "verify"  # measured by this verification, not found in the archive
    assert sorted(rows) == [("ppl_ptb", 96), ("ppl_wikitext2", 160)]
    assert all(v is not None for v in doc["verified"][0]["measured"].values())


@pytest.mark.slow
def test_rounds_measure_the_strong_starts_first(run_cli, sqlite_url, model_dir, data_dir, env):
    """``query --verify K --rounds R`` begins with the rules of thumb and global allocations at the
    target (measured before its own picks), so its best is never worse than the best of them."""
    r = evaluate(run_cli, sqlite_url, model_dir, data_dir, "--samples", "6", "--seed", "1", "--importance", "l2",
                 "--metrics", "ppl_wikitext2", "--max-tokens", "160")
    assert r.code == 0, r.err
    r = run_cli("--db", sqlite_url, "query", "--model", "tiny-gqa", "--params", "85%", "--tolerance", "5%",
                "--verify", "1", "--rounds", "2", "--data-dir", str(data_dir), "--importance", "l2",
                "--device", "cpu", "--seq-len", "16", "--metrics", "ppl_wikitext2", "--json")
    assert r.code == 0, r.err
    doc = json.loads(r.out)
    first = doc["rounds"]["rounds"][0]
    assert first["starts"] and first["verified"][:len(first["starts"])] == first["starts"]
    measured = {v["arch_id"]: v["measured"]["ppl_wikitext2"] for v in doc["verified"]}
    assert set(first["starts"]) <= set(measured) and all(measured[a] is not None for a in first["starts"])
    assert min(measured.values()) <= min(measured[a] for a in first["starts"])
    # the answer says what verification spent and where its best stands against the rules of thumb
    spent = doc["verification"]["forwarded_tokens"]
    assert spent >= 160 * len(measured)  # 10 windows of 16 tokens per architecture, and the profile's
    standing = doc["verification"]["standing"]
    assert standing["best_rule"] is not None and standing["best_rule"]["origin"] in ("uniform", "rule")
    assert standing["ratio"] <= 1.0
    # the sensitivity profile (single-layer variants on a cheap fidelity) is in the archive for later queries
    archive = Archive(sqlite_url)
    try:
        with archive.read() as session:
            profiled = session.scalars(select(m.Architecture).where(m.Architecture.origin == "profile")).all()
    finally:
        archive.close()
    assert len(profiled) >= 4 * 2  # every layer at least: attention and MLP variants


@pytest.mark.slow
def test_one_round_verifies_the_best_ranked_starts_within_k(run_cli, sqlite_url, model_dir, data_dir, env):
    """``query --verify K`` (one round, K >= 2) spends all but a quarter of K on strong starts: the
    sensitivity profile's least-damage architecture first (the profile measured on one window per
    variant, about K/2 evaluations' worth, and reused by the next query), then the rules of thumb
    and global allocations its predictors rank best; the rest on its own top results: K in all, and
    the answer stands against the best rule measured, not the profile's solution; ``--verify 1``
    and ``--no-starts`` verify the top."""
    r = evaluate(run_cli, sqlite_url, model_dir, data_dir, "--samples", "6", "--seed", "1", "--importance", "l2",
                 "--metrics", "ppl_wikitext2", "--max-tokens", "160")
    assert r.code == 0, r.err
    args = ("--db", sqlite_url, "query", "--model", "tiny-gqa", "--params", "85%", "--tolerance", "5%",
            "--data-dir", str(data_dir), "--importance", "l2", "--device", "cpu", "--seq-len", "16",
            "--metrics", "ppl_wikitext2", "--json")
    r = run_cli(*args, "--verify", "3")
    assert r.code == 0, r.err
    doc = json.loads(r.out)
    first = doc["rounds"]["rounds"][0]
    assert len(first["starts"]) == 2 and len(doc["verified"]) == 3
    assert first["verified"][:2] == first["starts"]
    archive = Archive(sqlite_url)
    try:
        with archive.read() as session:
            origins = {a.arch_hash: a.origin for a in session.scalars(select(m.Architecture))}
    finally:
        archive.close()
    names = first["start_names"]
    assert names[first["starts"][0]] == "profile-1"   # the profile's integer-program solution leads
    assert origins[first["starts"][0]] == "search"
    second = names[first["starts"][1]]   # then the rule of thumb or global allocation ranked best
    assert second in {*RULES, "flap", "global_raw"} and origins[first["starts"][1]] == start_origin(second)

    def profile_tokens() -> list[tuple[str, str, str, int, int]]:
        archive = Archive(sqlite_url)
        try:
            with archive.read() as session:
                return [tuple(row) for row in session.execute(
                    select(m.Evaluation.metric, m.Protocol.dataset, m.Protocol.split, m.Protocol.tokens, func.count())
                    .join(m.Evaluation, m.Evaluation.protocol_id == m.Protocol.id)
                    .join(m.Architecture, m.Architecture.id == m.Evaluation.architecture_id)
                    .where(m.Architecture.origin == "profile")
                    .group_by(m.Evaluation.metric, m.Protocol.dataset, m.Protocol.split, m.Protocol.tokens)).all()]
        finally:
            archive.close()

    # 3/2 evaluations' worth of 160 tokens is under a window per variant: one window (16 tokens) each,
    # of the objective's own text (the base, measured on it too, keeps its origin)
    profiled = [("ppl_wikitext2", "wikitext-2-raw-v1", "test", 16, len(profile_variants(spec_of_dir(model_dir))))]
    assert profile_tokens() == profiled
    assert doc["verification"]["standing"]["best_rule"]["origin"] in ("uniform", "rule")
    spent = doc["verification"]["forwarded_tokens"]
    assert spent >= 3 * 160 + 16 * len(profile_variants(spec_of_dir(model_dir)))
    # another size, a larger K (5 evaluations' worth: 32 tokens a variant if new): the stored profile serves
    r = run_cli(*args[:6], "88%", *args[7:], "--verify", "10")
    assert r.code == 0, r.err
    assert profile_tokens() == profiled
    for extra in (("--verify", "1"), ("--verify", "2", "--no-starts")):
        r = run_cli(*args, *extra, "--seed", "3")
        assert r.code == 0, r.err
        assert "rounds" not in json.loads(r.out)


def spec_of_dir(model_dir) -> BaseSpec:
    return BaseSpec.from_hf_config(json.loads((model_dir / "config.json").read_text()))
