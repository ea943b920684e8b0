"""Search-free starts (optimizer.starts): rules of thumb, FLAP-style global allocation, starts in
the verify loop, ``archopt evaluate --starts`` and the sampler's MLP-only share."""

from __future__ import annotations

import json

import numpy as np
import pytest

from archopt.archdb.arch import BaseSpec, full, uniform
from archopt.optimizer.encoding import encode, layer_param_coefficients
from archopt.optimizer.loop import verify_loop
from archopt.optimizer.profile import profile_variants
from archopt.optimizer.query import QueryRequest
from archopt.optimizer.samplers import mlp_only_rows, sample_architectures
from archopt.optimizer.starts import (RULES, global_allocation, prunable_range, rule_of_thumb, rules_of_thumb,
                                      strong_starts, summary)

from helpers.archives import SPEC, TRUTH, fill, record_ppl
from helpers.synthetic import SyntheticTruth

# shapes of real models (arithmetic only: no weights)
DEEP24 = BaseSpec(family="llama", num_layers=24, hidden_size=192, num_heads=6, num_kv_heads=2, head_dim=32,
                  intermediate_size=512, vocab_size=4096, tie_embeddings=True)          # ptb-llama-24l
DEEP30 = BaseSpec(family="llama", num_layers=30, hidden_size=576, num_heads=9, num_kv_heads=3, head_dim=64,
                  intermediate_size=1536, vocab_size=49152, tie_embeddings=True)        # SmolLM-135M shape
HEAD_DIM = BaseSpec(family="llama", num_layers=12, hidden_size=128, num_heads=4, num_kv_heads=2, head_dim=64,
                    intermediate_size=344, vocab_size=1000)                             # head_dim != hidden / heads
SHALLOW8 = BaseSpec(family="llama", num_layers=8, hidden_size=256, num_heads=8, num_kv_heads=4, head_dim=32,
                    intermediate_size=704, vocab_size=8000)
LLAMA32 = BaseSpec(family="llama", num_layers=32, hidden_size=256, num_heads=8, num_kv_heads=8, head_dim=32,
                   intermediate_size=688, vocab_size=1000)
SPECS = [DEEP24, DEEP30, HEAD_DIM, SHALLOW8]


def _gap(spec: BaseSpec) -> int:
    """Room a rule may leave under the target: less than one channel multiple of one layer."""
    return 8 * layer_param_coefficients(spec)[1]


def _pruned(arch) -> list[int]:
    return [i for i, l in enumerate(arch.layers) if l != arch.spec.full_layer()]


@pytest.mark.parametrize("spec,expected", [(DEEP24, (3, 21)), (DEEP30, (3, 27)), (SHALLOW8, (1, 6)),
                                           (LLAMA32, (4, 29)), (HEAD_DIM, (1, 10))])
def test_prunable_range_scales_llm_pruner_to_depth(spec, expected):
    assert prunable_range(spec) == list(range(expected[0], expected[1] + 1))


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.num_layers}L-{s.num_heads}q{s.num_kv_heads}kv")
@pytest.mark.parametrize("fraction", [0.8, 0.6])
def test_rules_land_just_under_the_target_and_keep_their_layers_whole(spec, fraction):
    target = int(fraction * spec.total_params)
    rng = prunable_range(spec)
    found = rules_of_thumb(spec, target)
    assert set(found) >= {"uniform", "llm_pruner_range", "mlp_only"}
    for rule in set(RULES) - set(found):   # MLP alone on 6 of 8 layers cannot reach 60%: narrowest is larger
        layers = rng if rule.endswith("_range") else None
        assert uniform(spec, 0.999, layers, attention=not rule.startswith("mlp_only")).params > target
    for rule, arch in found.items():
        assert target - _gap(spec) < arch.params <= target, rule
        pruned = _pruned(arch)
        if rule.endswith("_range"):
            assert set(pruned) <= set(rng) and len(pruned) == len(rng), rule
        else:
            assert len(pruned) == spec.num_layers, rule
        if rule.startswith("mlp_only"):
            assert all(l.kv_heads == spec.num_kv_heads for l in arch.layers), rule
        widths = {arch.layers[i].intermediate for i in pruned}
        assert max(widths) - min(widths) <= 8 and all(w % 8 == 0 for w in widths), rule  # one ratio
        kvs = {arch.layers[i].kv_heads for i in pruned}
        assert len(kvs) == 1 and min(kvs) >= 1, rule
    # one ratio for the whole layer: attention lands on whole KV groups, 1 of 2 at 60% of ptb-llama-24l
    if spec is DEEP24 and fraction == 0.6:
        assert found["llm_pruner_range"].layers[5].kv_heads == 1
        assert "layers 3-21 pruned, KV groups 2 of 2" in summary(found["mlp_only_range"])


def test_rule_that_cannot_reach_the_size_gives_none():
    tiny = int(0.05 * DEEP24.total_params)   # below the embeddings alone
    assert all(rule_of_thumb(DEEP24, r, tiny) is None for r in RULES)
    assert rule_of_thumb(DEEP24, "mlp_only", DEEP24.total_params).is_full()
    with pytest.raises(ValueError, match="did you mean 'mlp_only'"):
        rule_of_thumb(DEEP24, "mlp_onyl", 1000)


def _scores(spec: BaseSpec, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (rng.uniform(0.5, 1.5, (spec.num_layers, spec.num_kv_heads)),
            rng.uniform(0.5, 1.5, (spec.num_layers, spec.intermediate_size)))


def test_global_allocation_removes_the_least_important_units_first():
    spec = DEEP24
    kv, ch = _scores(spec)
    ch[5, :51] = 1e-3      # a tenth of layer 5's channels are clearly unimportant (standardised: z about -2.2)
    per_ch = layer_param_coefficients(spec)[1]
    target = spec.total_params - 40 * per_ch
    for normalize in ("standardize", "mean", "none"):
        arch = global_allocation(spec, kv, ch, target, normalize=normalize)
        assert arch.params == target
        assert arch.layers[5].intermediate == spec.intermediate_size - 40, normalize
        assert all(l == spec.full_layer() for i, l in enumerate(arch.layers) if i != 5), normalize
    # a layer outside ``layers`` stays whole whatever its scores
    arch = global_allocation(spec, kv, ch, target, layers=prunable_range(spec)[3:])
    assert arch.layers[5] == spec.full_layer() and arch.params <= target
    # an unimportant KV group goes before any channel
    kv[7, 1] = -50.0
    arch = global_allocation(spec, kv, ch, spec.total_params - 1, normalize="none")
    assert arch.layers[7].kv_heads == 1 and all(l.intermediate == spec.intermediate_size for l in arch.layers)
    # per parameter: a KV group scoring 20 channels' worth costs 85 channels, so it goes first
    kv, ch = np.full_like(kv, 20.0), ch + 0.0
    per_kv = layer_param_coefficients(spec)[0]
    by_unit = global_allocation(spec, kv, ch, spec.total_params - per_kv, normalize="none")
    by_param = global_allocation(spec, kv, ch, spec.total_params - per_kv, normalize="none", per_param=True)
    assert all(l.kv_heads == 2 for l in by_unit.layers)
    assert sum(l.kv_heads for l in by_param.layers) == 2 * 24 - 1 and by_param.params == spec.total_params - per_kv


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.num_layers}L-{s.num_heads}q{s.num_kv_heads}kv")
def test_global_allocation_respects_size_and_keeps_one_kv_group(spec):
    kv, ch = _scores(spec, 1)
    kv[:] = 1e-6   # attention looks worthless: it goes down to one group per layer, never below
    for fraction in (0.8, 0.5):
        target = int(fraction * spec.total_params)
        for attention in (True, False):
            arch = global_allocation(spec, kv, ch, target, attention=attention, normalize="none")
            if arch is None:
                assert not attention   # MLP alone may not reach half the size
                continue
            assert target - _gap(spec) < arch.params <= target
            assert all(l.kv_heads >= 1 for l in arch.layers)
            assert all(l.kv_heads == (1 if attention else spec.num_kv_heads) for l in arch.layers)
            assert all(l.intermediate % 8 == 0 or l.intermediate == spec.intermediate_size for l in arch.layers)
    assert global_allocation(spec, kv, ch, int(0.02 * spec.total_params)) is None
    with pytest.raises(ValueError, match="scores must be"):
        global_allocation(spec, kv[:, :1], ch, spec.total_params)


def test_strong_starts_are_distinct_and_named():
    target = int(0.6 * DEEP24.total_params)
    rules = strong_starts(DEEP24, target)
    assert [n for n, _ in rules] == list(RULES)
    kv, ch = _scores(DEEP24)
    both = strong_starts(DEEP24, target, kv, ch)
    names = [n for n, _ in both]
    assert names == [*RULES, "flap", "global_raw"]
    assert len({a.canonical_json() for _, a in both}) == len(both)
    assert all(a.params <= target for _, a in both)


# -- starts in the verify loop --------------------------------------------------------------------
def test_loop_measures_starts_first_and_never_ends_below_them(archive):
    fill(archive, 30)
    target = int(0.75 * SPEC.total_params)
    truth = SyntheticTruth(noise=TRUTH.noise, seed=11)
    kv, ch = _scores(SPEC, 2)
    starts = strong_starts(SPEC, target, kv, ch)
    calls: list[list[dict]] = []
    values: dict[str, float] = {}

    def measure(archs, picks, doc):
        calls.append(picks)
        ppl = truth.ppl(encode(archs, SPEC), noisy=True)
        record_ppl(archive, archs, ppl)
        values.update({a.arch_id("synth"): float(v) for a, v in zip(archs, ppl)})

    report = verify_loop(archive, QueryRequest(model="synth", params=target, candidates=2000), verify=2, rounds=2,
                         measure=measure, starts=starts)
    start_ids = [a.arch_id("synth") for _, a in starts]
    assert [p["arch_id"] for p in calls[0]] == start_ids
    assert [p["start"] for p in calls[0]] == [n for n, _ in starts] and all(p["origin"] == "start" for p in calls[0])
    assert all("ppl_wikitext2" in p["predicted"] for p in calls[0])
    assert report.rounds[0].starts == start_ids and report.rounds[0].verified[:len(starts)] == start_ids
    assert len(report.verified) == len(starts) + 4 and len(calls) == 3
    assert min(values.values()) <= min(values[i] for i in start_ids)
    # measured already: a new loop does not measure them again; a budget counts them
    calls.clear()
    verify_loop(archive, QueryRequest(model="synth", params=target, candidates=2000, seed=5), verify=1, rounds=1,
                measure=measure, starts=lambda doc: strong_starts(SPEC, doc["target_params"], kv, ch))
    assert len(calls) == 1 and not any(p.get("origin") == "start" for p in calls[0])
    fresh = [("uniform", full(SPEC))] + [(f"r{r}", a) for r, a in
                                         ((r, strong_starts(SPEC, int(r * SPEC.total_params))[0][1]) for r in (0.7, 0.65))]
    calls.clear()
    report = verify_loop(archive, QueryRequest(model="synth", params=target, candidates=2000, seed=9), verify=2,
                         rounds=3, measure=measure, starts=fresh, budget=2)
    assert report.stopped == "budget" and len(calls) == 1 and len(report.verified) == 2


# -- the random sampler's MLP-only share -------------------------------------------------------------
def test_random_samples_keep_attention_whole_in_a_share():
    assert mlp_only_rows(8, 0.25).tolist() == [False, False, False, True, False, False, False, True]
    assert not mlp_only_rows(5, 0.0).any() and mlp_only_rows(3, 1.0).all()
    target = int(0.6 * DEEP24.total_params)
    archs = sample_architectures(DEEP24, 40, seed=0, target_params=target)
    whole = [all(l.kv_heads == DEEP24.num_kv_heads for l in a.layers) for a in archs]
    assert 0.2 <= np.mean(whole) <= 0.4
    assert all(int(np.ceil(target * 0.98)) <= a.params <= target for a in archs)
    none = sample_architectures(DEEP24, 40, seed=0, target_params=target, mlp_only_share=0.0)
    assert np.mean([all(l.kv_heads == 2 for l in a.layers) for a in none]) < 0.1
    with pytest.raises(ValueError):
        mlp_only_rows(4, 1.5)


# -- archopt evaluate --starts ---------------------------------------------------------------------
@pytest.mark.slow
def test_evaluate_starts_stores_rule_architectures(run_cli, sqlite_url, model_dir, data_dir, env):
    from helpers.cli_runs import evaluate
    r = evaluate(run_cli, sqlite_url, model_dir, data_dir, "--starts")
    assert r.code != 0 and "--starts needs --params" in r.err
    r = evaluate(run_cli, sqlite_url, model_dir, data_dir, "--params", "85%", "--starts", "--no-base",
                 "--importance", "l2")
    assert r.code == 0, r.err
    shown = [line.split(":")[0].split()[1] for line in r.err.splitlines() if line.startswith("start ")]
    assert shown and shown[0] == "uniform", r.err[-3000:]
    spec = BaseSpec.from_hf_config(json.loads((model_dir / "config.json").read_text()))
    target = int(0.85 * spec.total_params)   # embeddings are two thirds of this tiny model
    doc = json.loads(run_cli("--db", sqlite_url, "archs", "--model", "tiny-gqa", "--json").out)
    # the sensitivity profile: every single-layer variant (and the base) on a cheap fidelity
    variants = [a for a in doc["archs"] if a["origin"] == "profile"]
    assert len(variants) == len(profile_variants(spec)) + 1
    assert "profile-1" in shown and "sensitivity profile:" in r.err
    stored = {a["arch_id"]: a for a in doc["archs"] if a["origin"] != "profile"}
    assert 0 < len(stored) <= len(shown)   # a profile start may coincide with a rule
    # rules and allocations are stored as rules, the profile's solutions as searched (unless one is a rule)
    assert {"uniform", "rule"} <= {a["origin"] for a in stored.values()} <= {"uniform", "rule", "search"}
    assert all(a["params"] <= target and "ppl_wikitext2" in a["metrics"] for a in stored.values())
    for name, arch in rules_of_thumb(spec, target).items():
        row = next(a for i, a in stored.items() if i.startswith(arch.arch_id("tiny-gqa")[:16]))
        assert row["origin"] == ("uniform" if name == "uniform" else "rule")


def test_loop_ranks_offered_proposals_with_its_neighbourhood(archive):
    """Proposals (the profile's next-best solutions in the product) join each round's trust-region
    candidates: with nothing measured in the window, they are all the neighbourhood there is."""
    fill(archive, 30)
    target = int(0.97 * SPEC.total_params)
    kv, ch = _scores(SPEC, 3)
    offered = [a for _, a in strong_starts(SPEC, target, kv, ch)][:3]
    with archive.read() as session:
        from archopt.archdb import reads
        base = reads.get_base_model(session, "synth")
        assert not [a for a, _, _ in reads.training_pairs(session, base, "ppl_wikitext2",
                                                          reads.default_protocol(session, base, "ppl_wikitext2"))
                    if int(target * 0.95) <= a.params <= target]
    calls: list[list[dict]] = []
    seen_docs: list[dict] = []

    def measure(archs, picks, doc):
        calls.append(picks)
        record_ppl(archive, archs, TRUTH.ppl(encode(archs, SPEC), noisy=True))

    def proposals(doc):
        seen_docs.append(doc)
        return offered

    verify_loop(archive, QueryRequest(model="synth", params=target, candidates=500), verify=2, rounds=2,
                measure=measure, local=1.0, proposals=proposals)
    assert len(seen_docs) == 2 and seen_docs[0]["target_params"] == target
    first = [p for p in calls[0]]
    assert [p["origin"] for p in first] == ["proposal", "proposal"]
    assert {p["arch_id"] for p in first} <= {a.arch_id("synth") for a in offered}
    # measured proposals are not offered again: the second round has one left at most
    second_ids = {p["arch_id"] for p in calls[1] if p["origin"] == "proposal"}
    assert not second_ids & {p["arch_id"] for p in first}
