"""``kl_base`` as a metric of the product: ``archopt evaluate --metrics kl_base`` on a tiny model
stores it under its protocol (calibration text, tokens, window, top-k), the base model's reference
is computed once per model and protocol (then read from the cache), a cheap fidelity of it screens,
and a predictor of it trains and answers ``archopt query --verify``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from archopt.archdb import Archive, reads
from archopt.evaluators import kl as kl_module

pytestmark = pytest.mark.slow

MODEL = "tiny-gqa"


def evaluate_kl(run_cli, db: str, model_dir: Path, data_dir: Path, *extra: str):
    """``archopt evaluate --metrics kl_base`` on 16-token windows with L2 importance, on CPU."""
    return run_cli("--db", db, "evaluate", "--model", str(model_dir), "--data-dir", str(data_dir),
                   "--metrics", "kl_base", "--seq-len", "16", "--importance", "l2", "--device", "cpu", *extra)


def kl_values(db: str) -> dict[str, tuple[str, float, float, dict]]:
    """arch id -> (origin, fraction, kl_base value, its protocol) of every architecture with one."""
    archive = Archive(db)
    try:
        with archive.read() as session:
            base = reads.get_base_model(session, MODEL)
            pid = reads.default_protocol(session, base, "kl_base")
            protocol = reads.protocol_dict(session, pid)
            rows = reads.training_pairs(session, base, "kl_base", pid)
            return {a.arch_hash: (a.origin, a.params / base.total_params, v, protocol) for a, v, _ in rows}
    finally:
        archive.close()


@pytest.fixture
def computed(monkeypatch):
    """What each ``KLTask.prepare_reference`` call returned (True: computed, False: read from disk)."""
    calls: list[bool] = []
    original = kl_module.KLTask.prepare_reference

    def counting(self, base, cache_dir=None):
        calls.append(original(self, base, cache_dir))
        return calls[-1]

    monkeypatch.setattr(kl_module.KLTask, "prepare_reference", counting)
    return calls


def test_evaluate_stores_kl_base_under_its_protocol(run_cli, sqlite_url, model_dir, data_dir, env, computed):
    r = evaluate_kl(run_cli, sqlite_url, model_dir, data_dir, "--uniform", "0.1,0.3,0.5,0.7", "--samples", "6",
                    "--seed", "3")
    assert r.code == 0, r.err
    assert computed == [True]                       # one reference pass for the whole run
    values = kl_values(sqlite_url)
    assert len(values) == 11                        # base + 4 uniform + 6 random
    protocol = next(iter(values.values()))[3]
    assert protocol["dataset"] == "ptb_text_only" and protocol["split"] == "train"   # never a test split
    assert protocol["seq_len"] == 16 and protocol["joining"] == "\n\n" and protocol["tokenizer_hash"]
    assert protocol["extra"]["top_k"] == kl_module.DEFAULT_TOP_K and protocol["extra"]["reference"] == "base"
    assert 0 < protocol["tokens"] <= kl_module.DEFAULT_TOKENS and protocol["tokens"] % 16 == 0
    base = [v for o, _, v, _ in values.values() if o == "base"]
    assert base == [pytest.approx(0.0, abs=1e-6)]   # the base model itself: stored, KL 0
    uniform = sorted((f, v) for o, f, v, _ in values.values() if o == "uniform")
    assert all(v > 1e-3 for _, v in uniform)
    assert [v for _, v in uniform] == sorted((v for _, v in uniform), reverse=True)  # smaller, further
    pruned = [(f, v) for o, f, v, _ in values.values() if o != "base"]
    small = [v for f, v in pruned if f < np.median([f for f, _ in pruned])]
    large = [v for f, v in pruned if f >= np.median([f for f, _ in pruned])]
    assert np.mean(small) > np.mean(large)          # more pruning, larger KL on average
    files = list((env / "cache" / "kl").glob("kl-*.npz"))
    assert len(files) == 1                          # cached under the archive's cache dir

    # a second run (new architectures, same protocol) reads the reference from the cache
    computed.clear()
    r = evaluate_kl(run_cli, sqlite_url, model_dir, data_dir, "--uniform", "0.2", "--no-base")
    assert r.code == 0, r.err
    assert computed == [False]
    assert len(kl_values(sqlite_url)) == 12
    # another token count is another protocol, with its own reference
    computed.clear()
    r = evaluate_kl(run_cli, sqlite_url, model_dir, data_dir, "--uniform", "0.2", "--max-tokens", "320")
    assert r.code == 0, r.err
    assert computed == [True]
    assert len(list((env / "cache" / "kl").glob("kl-*.npz"))) == 2


def test_kl_text_and_top_k_options_define_the_protocol(run_cli, sqlite_url, model_dir, data_dir, env, tmp_path):
    local = tmp_path / "data"      # the shared layout with a WikiText-2 raw validation file
    (local / "wikitext-2").mkdir(parents=True)
    (local / "ptb").symlink_to(data_dir / "ptb", target_is_directory=True)
    raw = (data_dir / "wikitext-2" / "wiki.test.raw").read_text()
    for split in ("test", "valid"):
        (local / "wikitext-2" / f"wiki.{split}.raw").write_text(raw)
    r = evaluate_kl(run_cli, sqlite_url, model_dir, local, "--uniform", "0.4", "--kl-text", "wikitext2-validation",
                    "--kl-top-k", "0", "--max-tokens", "480")
    assert r.code == 0, r.err
    values = kl_values(sqlite_url)
    protocol = next(iter(values.values()))[3]
    assert (protocol["dataset"], protocol["split"]) == ("wikitext-2-raw-v1", "validation")
    assert protocol["extra"]["top_k"] is None and protocol["tokens"] == 480
    assert sorted(v > 1e-3 for _, _, v, _ in values.values()) == [False, True]


def test_cheap_fidelity_of_kl_base_screens(sqlite_url, model_dir, data_dir, env):
    from archopt.archdb.arch import full, uniform
    from archopt.optimizer.campaign import Campaign, CampaignError, EvalSettings
    archive = Archive(sqlite_url)
    try:
        settings = EvalSettings(metrics=("kl_base",), data_dir=str(data_dir), seq_len=16, importance="l2")
        campaign = Campaign(archive, str(model_dir), settings)
        full_protocol = campaign.evaluator.tasks["kl_base"].protocol
        cheap = campaign.cheap_evaluator("kl_base")
        cheap_protocol = cheap.tasks["kl_base"].protocol
        assert cheap_protocol.is_cheaper_fidelity_of(full_protocol)
        assert not full_protocol.is_cheaper_fidelity_of(cheap_protocol)
        assert cheap_protocol.tokens == max(8 * 16, full_protocol.tokens // 8)
        assert cheap_protocol.extra["top_k"] == full_protocol.extra["top_k"]
        with pytest.raises(CampaignError):
            campaign.cheap_evaluator("kl_base", full_protocol.tokens)
        key = campaign.enable_screening("kl_base")
        assert key == cheap_protocol.key() != full_protocol.key()
        spec = campaign.base.spec
        values = campaign.screen_values([full(spec), uniform(spec, 0.2), uniform(spec, 0.6)], "kl_base")
        assert values[0] == pytest.approx(0.0, abs=1e-6) and 0 < values[1] < values[2]
        # run() measures the full protocol and, with screening on, the cheap one too
        report = campaign.run([(uniform(spec, 0.4), "uniform")])
        assert report.evaluated == 1 and report.results[0].measurements[0].protocol.key() == full_protocol.key()
        assert len(list((env / "cache" / "kl").glob("kl-*.npz"))) == 2   # a reference per protocol
    finally:
        archive.close()


def test_pruning_leaves_the_base_and_its_reference_alone(sqlite_url, model_dir, data_dir, env):
    """The reference is the unpruned base's: measuring pruned models (copied or per-call slices)
    between two measurements of the base changes neither the base's KL nor the cached reference."""
    from archopt.archdb.arch import full, uniform
    import torch

    from archopt import evaluators as ev
    from archopt.optimizer.campaign import EvalSettings, make_evaluator
    settings = EvalSettings(metrics=("kl_base",), data_dir=str(data_dir), seq_len=16, importance="l2")
    base = ev.load_base_model(str(model_dir))
    imp = ev.compute_importance(base, "l2")
    evaluator = make_evaluator(base.tokenizer, settings)
    before = {k: v.clone() for k, v in base.model.state_dict().items()}
    measure = evaluator.evaluate_architecture
    first = measure(base, full(base.spec), imp)[0].value
    values = [measure(base, uniform(base.spec, 0.5), imp)[0].value]   # sliced copies
    evaluator.max_memory = 1   # nothing fits: slices formed per call from the base's tensors
    values.append(measure(base, uniform(base.spec, 0.5), imp)[0].value)
    evaluator.max_memory = None
    assert values[0] == pytest.approx(values[1], rel=1e-5) and values[0] > 1e-3
    assert all(torch.equal(before[k], v) for k, v in base.model.state_dict().items())
    assert first == pytest.approx(0.0, abs=1e-6)
    assert evaluator.evaluate_architecture(base, full(base.spec), imp)[0].value == pytest.approx(0.0, abs=1e-6)
    task = evaluator.tasks["kl_base"]
    stored = np.load(next((env / "cache" / "kl").glob("kl-*.npz")))["logp"]
    assert np.array_equal(stored, task.task.ref_logp.numpy())
    # a diverged model is a failed run (never a value), and the base is still at 0 afterwards
    model = ev.prune_model(base, full(base.spec), None)
    model.model.norm.weight = torch.nn.Parameter(torch.full_like(model.model.norm.weight, float("nan")))
    assert task.evaluate(model).failure.startswith("diverged")
    assert task.evaluate(base.model).value == pytest.approx(0.0, abs=1e-6)


def test_predictor_of_kl_base_trains_and_query_verifies(run_cli, sqlite_url, model_dir, data_dir, env):
    from archopt.optimizer.training import ensure_predictors
    # stored under 320 tokens and the whole distribution: the verification below, given neither
    # option, must still measure under the predictor's protocol (its value is read back under it)
    r = evaluate_kl(run_cli, sqlite_url, model_dir, data_dir, "--uniform", "0.1,0.2,0.3", "--samples", "8",
                    "--seed", "5", "--max-tokens", "320", "--kl-top-k", "0")
    assert r.code == 0, r.err
    archive = Archive(sqlite_url)
    try:
        trained = ensure_predictors(archive, MODEL, ["kl_base"])["kl_base"]
        with archive.read() as session:
            base = reads.get_base_model(session, MODEL)
            assert trained.protocol_id == reads.default_protocol(session, base, "kl_base")
    finally:
        archive.close()
    assert trained.version >= 1
    r = run_cli("--db", sqlite_url, "query", "--model", MODEL, "--params", "80%", "--tolerance", "10%",
                "--objectives", "kl_base", "--verify", "1", "--data-dir", str(data_dir), "--metrics", "kl_base",
                "--seq-len", "16", "--importance", "l2", "--device", "cpu", "--no-starts", "--json")
    assert r.code == 0, r.err
    doc = json.loads(r.out)
    assert doc["predictor_versions"]["kl_base"] >= 1
    verified = doc["verified"]
    assert len(verified) == 1 and verified[0]["measured"]["kl_base"] > 0
    stored = kl_values(sqlite_url)   # the predictor's (default) protocol: 320 tokens, no top-k
    assert verified[0]["arch_id"] in stored, "verified under another protocol than its predictor's"
    protocol = next(iter(stored.values()))[3]
    assert protocol["tokens"] == 320 and not (protocol.get("extra") or {}).get("top_k")


def test_rounds_search_on_kl_base_with_its_profile_and_report_perplexity(run_cli, sqlite_url, model_dir, data_dir,
                                                                         env):
    """``query --objectives kl_base --verify K --rounds R --metrics kl_base,ppl_wikitext2``: the
    loop measures a kl_base sensitivity profile on a cheap fidelity (stored, origin ``profile``,
    damages on KL's own scale), the predictors learn from it, and every verified architecture has
    its perplexity too."""
    from sqlalchemy import select

    from archopt.archdb import models as m
    from archopt.archdb.arch import full
    from archopt.optimizer.profile import profile_variants
    from archopt.optimizer.training import stored_profile
    common = ("--data-dir", str(data_dir), "--seq-len", "16", "--importance", "l2", "--device", "cpu",
              "--max-tokens", "1024", "--kl-top-k", "0")
    r = run_cli("--db", sqlite_url, "evaluate", "--model", str(model_dir), "--metrics", "kl_base,ppl_wikitext2",
                "--samples", "4", "--uniform", "0.2", "--seed", "3", *common)
    assert r.code == 0, r.err
    r = run_cli("--db", sqlite_url, "query", "--model", MODEL, "--params", "80%", "--tolerance", "10%",
                "--objectives", "kl_base", "--verify", "2", "--rounds", "2", "--metrics", "kl_base,ppl_wikitext2",
                *common, "--json")
    assert r.code == 0, r.err
    doc = json.loads(r.out)
    assert doc["verified"] and all(v["measured"]["kl_base"] is not None for v in doc["verified"])
    assert all(v["also_measured"]["ppl_wikitext2"] > 1 for v in doc["verified"])   # the reported metric
    archive = Archive(sqlite_url)
    try:
        with archive.read() as session:
            base = reads.get_base_model(session, MODEL)
            pid = reads.default_protocol(session, base, "kl_base")
            found = stored_profile(session, base, "kl_base", pid)
            assert found is not None, "no kl_base profile stored"
            profile, profile_pid, count = found
            cheap = session.get(reads.m.Protocol, profile_pid)
            cheap_tokens = cheap.tokens
            variants = profile_variants(profile.spec)
            ids = [full(profile.spec).arch_id(MODEL)] + [v.architecture.arch_id(MODEL) for v in variants]
            values = reads.values_under(session, base, ids, "kl_base", cheap.key)
            version = session.scalars(select(m.PredictorVersion).where(
                m.PredictorVersion.base_model_id == base.id, m.PredictorVersion.metric == "kl_base")
                .order_by(m.PredictorVersion.version.desc())).first()
            learned_from = (version.trained_on.get("profile") or {}).get("protocol_id")
            features = list(version.features["names"])
            row_ids = [reads.resolve_arch(session, v["arch_id"], base).id for v in doc["verified"]]
            metrics = reads.live_metrics(session, row_ids)
    finally:
        archive.close()
    assert count > 10 and cheap_tokens < 1024
    assert learned_from == profile_pid and "damage_sum" in features   # the predictors learned from it
    assert values[ids[0]] == pytest.approx(0.0, abs=1e-6)
    for v, arch_id in zip(variants, ids[1:]):
        if v.kind == "attn" and arch_id in values:   # the damage is the KL itself, not its log
            assert profile.attn[(v.layer, v.level)] == pytest.approx(values[arch_id] - values[ids[0]])
    assert all("ppl_wikitext2" in metrics[row_id] for row_id in row_ids)
