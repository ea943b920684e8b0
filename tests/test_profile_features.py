"""The sensitivity profile as predictor input: summed damages, the ``profile_trees`` candidate, and
predictors that pick the archived profile up."""

from __future__ import annotations

import dataclasses
import io

import joblib
import numpy as np
import pytest

from archopt.archdb.arch import DROPPED, Architecture, BaseSpec, LayerSpec, full
from archopt.optimizer.encoding import encode
from archopt.optimizer.features import DAMAGE_FEATURES, Featurizer
from archopt.optimizer.predictors import kendall_tau, train_predictor
from archopt.optimizer.profile import Profile, profile_variants
from archopt.optimizer.training import ensure_predictors
from tests.helpers.archives import PPL, SPEC, TRUTH, fill, record_ppl

GQA93 = BaseSpec(family="llama", num_layers=30, hidden_size=576, num_heads=9, num_kv_heads=3, head_dim=64,
                 intermediate_size=1536, vocab_size=49152, tie_embeddings=True)


def measured_profile(spec: BaseSpec, seed: int = 0) -> Profile:
    """Damages that differ per layer and level (no two alike)."""
    rng = np.random.default_rng(seed)
    variants = profile_variants(spec)
    base = 50.0
    values = []
    for v in variants:
        removed = (1 - v.level / spec.intermediate_size) if v.kind == "mlp" else \
            (1 - v.level / spec.num_kv_heads) if v.kind == "attn" else 1.0
        values.append(base * np.exp(removed * rng.uniform(0.01, 0.3) * (3 if v.kind == "drop" else 1)))
    return Profile.from_values(spec, variants, values, base)


def random_archs(spec: BaseSpec, n: int, seed: int) -> list[Architecture]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        layers = []
        for _ in range(spec.num_layers):
            if rng.random() < 0.1:
                layers.append(DROPPED)
                continue
            kv = int(rng.integers(1, spec.num_kv_heads + 1))
            inter = int(rng.integers(8, spec.intermediate_size + 1))
            layers.append(LayerSpec(kv * spec.group_size, kv, inter, False))
        out.append(Architecture(spec, tuple(layers)))
    return out


def looped_damage(profile: Profile, arch: Architecture) -> tuple[float, float, float]:
    """The additive model written out layer by layer (measured widths and up only)."""
    a = m = d = 0.0
    for layer, spec_layer in enumerate(arch.layers):
        if spec_layer.dropped:
            d += profile.drop[layer]
            continue
        a += profile.attn_damage(layer, spec_layer.kv_heads)
        m += profile.mlp_damage(layer, spec_layer.intermediate)
    return a, m, d


@pytest.mark.parametrize("spec", [SPEC, GQA93], ids=["12l-6q3kv", "30l-9q3kv"])
def test_damage_parts_are_the_additive_sum_per_layer(spec):
    profile = measured_profile(spec)
    narrowest = min(w for _, w in profile.mlp)
    archs = [a for a in random_archs(spec, 40, seed=1)
             if all(l.dropped or l.intermediate >= narrowest for l in a.layers)][:10]
    assert archs
    batch = encode(archs, spec)
    parts = profile.damage_parts(batch.kv, batch.inter)
    assert parts.shape == (len(archs), 3)
    np.testing.assert_allclose(parts, [looped_damage(profile, a) for a in archs], rtol=1e-9, atol=1e-12)
    assert profile.damage_parts(*[np.atleast_2d(x) for x in (batch.kv[0], batch.inter[0])]).shape == (1, 3)
    full_batch = encode([full(spec)], spec)
    np.testing.assert_allclose(profile.damage_parts(full_batch.kv, full_batch.inter), [[0.0, 0.0, 0.0]])


def test_mlp_damage_below_the_narrowest_width_grows_past_it():
    profile = measured_profile(SPEC)
    narrowest = min(w for _, w in profile.mlp)
    kv = np.full((3, SPEC.num_layers), SPEC.num_kv_heads)
    inter = np.full((3, SPEC.num_layers), SPEC.intermediate_size)
    inter[0, 4], inter[1, 4], inter[2, 4] = narrowest, narrowest // 2, 1
    mlp = profile.damage_parts(kv, inter)[:, 1]
    assert mlp[0] == pytest.approx(profile.mlp_damage(4, narrowest))
    assert mlp[0] < mlp[1] < mlp[2]


def test_unmeasured_levels_are_filled_and_a_missing_drop_costs_the_narrowest_layer():
    profile = measured_profile(GQA93)
    attn = {k: v for k, v in profile.attn.items() if k != (3, 1)}
    drop = {k: v for k, v in profile.drop.items() if k != 5}
    thin = dataclasses.replace(profile, attn=attn, drop=drop)
    tables_attn, tables_mlp, tables_drop = thin.tables()
    assert np.isfinite(tables_attn).all() and np.isfinite(tables_mlp).all()
    assert tables_attn[3, 1] > tables_attn[3, 2] > 0    # extrapolated below the measured level
    assert tables_drop[5] == pytest.approx(tables_attn[5, 1] + tables_mlp[5, 0])


def test_featurizer_adds_damage_features_and_survives_pickling():
    profile = measured_profile(SPEC)
    archs = random_archs(SPEC, 12, seed=2)
    fz = Featurizer.for_spec(SPEC, profile=profile)
    X = fz.transform(archs)
    names = fz.names
    assert len(names) == X.shape[1] == Featurizer.for_spec(SPEC).transform(archs).shape[1] + len(DAMAGE_FEATURES)
    batch = encode(archs, SPEC)
    parts = profile.damage_parts(batch.kv, batch.inter)
    cols = [names.index(n) for n in DAMAGE_FEATURES]
    np.testing.assert_allclose(X[:, cols], np.column_stack([parts, parts.sum(1)]))
    buffer = io.BytesIO()
    joblib.dump(fz, buffer)
    buffer.seek(0)
    np.testing.assert_array_equal(joblib.load(buffer).transform(archs), X)
    other = dataclasses.replace(SPEC, intermediate_size=128)
    with pytest.raises(ValueError, match="another base model"):
        fz.transform(encode([full(other)], other))


def test_profile_trees_needs_a_profile_and_ranks_better_with_it():
    """Truth: the additive damage plus a small interaction; 25 training rows. The predictor with
    the profile ranks held-out architectures far better, and ``profile_trees`` is only a
    candidate when the damage features exist."""
    profile = measured_profile(GQA93, seed=3)
    archs = random_archs(GQA93, 125, seed=4)
    batch = encode(archs, GQA93)
    parts = profile.damage_parts(batch.kv, batch.inter)
    rng = np.random.default_rng(5)
    log_y = np.log(50.0) + parts.sum(1) * (1 + 0.1 * batch.dropped.mean(1)) + rng.normal(0, 0.02, len(archs))
    y = np.exp(log_y)
    plain, with_profile = Featurizer.for_spec(GQA93), Featurizer.for_spec(GQA93, profile=profile)
    train, test = slice(0, 25), slice(25, None)
    taus = {}
    for name, fz in (("plain", plain), ("profile", with_profile)):
        X = fz.transform(archs)
        p = train_predictor(X[train], y[train], "ppl_wikitext2", seed=0, featurizer=fz)
        assert ("profile_trees" in p.cv["candidates"]) == (name == "profile")
        taus[name] = kendall_tau(p.predict_mean(X[test]), y[test])
        if name == "profile":
            mean, std = p.predict(X[test])
            assert np.all(std > 0) and np.isfinite(mean).all()
            assert abs(sum(p.feature_importances().values()) - 1) < 1e-9
    assert taus["profile"] > 0.8 > taus["plain"] + 0.1, taus


def test_a_stored_profile_reaches_the_next_predictor_version(archive):
    fill(archive, 30)
    first = ensure_predictors(archive, "synth", ["ppl_wikitext2"])["ppl_wikitext2"]
    assert "damage_sum" not in first.predictor.feature_names
    cheap = dataclasses.replace(PPL, tokens=1024)
    variants = profile_variants(SPEC)
    archs = [full(SPEC)] + [v.architecture for v in variants]
    record_ppl(archive, archs, TRUTH.ppl(encode(archs, SPEC)), protocol=cheap, origin="profile")
    second = ensure_predictors(archive, "synth", ["ppl_wikitext2"])["ppl_wikitext2"]
    assert second.retrained and second.version == first.version + 1
    assert "damage_sum" in second.predictor.feature_names
    from archopt.archdb import models as m
    with archive.read() as session:
        row = session.get(m.PredictorVersion, second.row_id)
        assert row.trained_on["profile"]["variants"] == len(variants)
        assert session.get(m.Protocol, row.trained_on["profile"]["protocol_id"]).tokens == 1024
    mean, _ = second.predictor.predict_architectures(fill.__globals__["random_archive"](SPEC, 5, 9))
    assert np.isfinite(mean).all()


def test_a_layer_without_measured_variants_costs_the_most_any_layer_costs():
    """Failed runs leave no value: such a layer must not look free to prune."""
    profile = measured_profile(SPEC, seed=6)
    attn = {k: v for k, v in profile.attn.items() if k[0] != 2}
    mlp = {k: v for k, v in profile.mlp.items() if k[0] != 2}
    attn_t, mlp_t, _ = dataclasses.replace(profile, attn=attn, mlp=mlp).tables()
    full_attn, full_mlp, _ = profile.tables()
    others = [l for l in range(SPEC.num_layers) if l != 2]
    np.testing.assert_allclose(attn_t[2], full_attn[others].max(axis=0))
    np.testing.assert_allclose(mlp_t[2], full_mlp[others].max(axis=0))
    assert attn_t[2, 1] > 0 and mlp_t[2, SPEC.intermediate_size // 2] > 0


def test_noisy_negative_damages_do_not_extrapolate_below_the_least_measured():
    from archopt.optimizer.profile import _curve
    out = _curve([(1, -0.01), (2, 0.02)], 4)
    assert out.min() >= -0.01 and out[4] == 0.0


def test_llama_cpp_measurements_never_become_the_default_protocol(archive):
    """Predictors and verification work in transformers: a runtime's values (however many) do not
    displace the transformers protocol as a metric's default."""
    from archopt.archdb import reads
    archs = fill(archive, 6)
    record_ppl(archive, random_archs(SPEC, 12, seed=7), [100.0] * 12,
               protocol=dataclasses.replace(PPL, runtime="llama.cpp", precision="q8_0"))
    with archive.read() as session:
        base = reads.get_base_model(session, "synth")
        chosen = reads.protocol_dict(session, reads.default_protocol(session, base, "ppl_wikitext2"))
    assert chosen.get("runtime", "transformers") == "transformers" and len(archs) == 6


def test_a_kl_base_profile_gives_raw_damages_and_features(archive):
    """kl_base (the base's own KL is 0): a stored profile on a cheap KL fidelity gives damages equal
    to the measured KL of each single-layer variant, and the next kl_base predictor uses them."""
    from archopt.archdb import models as m
    from archopt.archdb import reads
    from archopt.archdb.protocol import Protocol
    from archopt.archdb.records import ArchRecord, BaseModelInfo, ValueRecord
    from archopt.archdb.store import ingest_records
    from archopt.optimizer.training import stored_profile

    kl = Protocol(dataset="wikitext-2-v1", split="validation", joining="\n\n", tokenizer="synthetic", seq_len=128,
                  tokens=8192, extra={"reference": "base", "top_k": None})
    info = BaseModelInfo("synth", SPEC, "hash-synth")

    def store(archs, protocol, origin):
        values = np.log(TRUTH.ppl(encode(archs, SPEC)) / TRUTH.ppl(encode([full(SPEC)], SPEC))[0])
        records = [ArchRecord(model="synth", base=info, architecture=a.layer_dicts(), origin=origin,
                              values=(ValueRecord("kl_base", float(max(0.0, v)), protocol),))
                   for a, v in zip(archs, values)]
        with archive.write() as session:
            ingest_records(session, records)
        return values

    store(fill.__globals__["random_archive"](SPEC, 30, 3).architectures(), kl, "random")
    variants = profile_variants(SPEC)
    measured = store([full(SPEC)] + [v.architecture for v in variants], dataclasses.replace(kl, tokens=1024),
                     "profile")
    with archive.read() as session:
        base = reads.get_base_model(session, "synth")
        pid = reads.default_protocol(session, base, "kl_base")
        profile, profile_pid, count = stored_profile(session, base, "kl_base", pid)
        assert session.get(m.Protocol, profile_pid).tokens == 1024
    assert count == len(variants)
    got = {(v.kind, v.layer, v.level): d for v, d in zip(variants, measured[1:])}
    for (layer, level), damage in profile.mlp.items():
        assert damage == pytest.approx(max(0.0, got[("mlp", layer, level)]), abs=1e-9)   # raw KL, not its log
    trained = ensure_predictors(archive, "synth", ["kl_base"])["kl_base"]
    assert "damage_sum" in trained.predictor.feature_names
