"""Search space: exact vectorised parameter counts, repair into the size window, sampling bias,
projection and refinement."""

import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from archopt.archdb.arch import BaseSpec, from_ratios
from archopt.optimizer import (LayerBatch, batch_params, build_space, encode, refine_space, size_window)
from archopt.optimizer.space import trust_bounds

CONFIGS = [
    BaseSpec("llama", 4, 72, 9, 3, 8, 100, 50),                                   # odd heads 9 q / 3 kv
    BaseSpec("llama", 3, 64, 4, 2, 24, 96, 40),                                   # explicit head_dim != hidden/heads
    BaseSpec("llama", 5, 48, 6, 6, 8, 130, 77, tie_embeddings=True),              # tied, width not a multiple of 8
    BaseSpec("qwen2", 4, 64, 8, 2, 8, 176, 60, qkv_bias=True),                    # q/k/v biases
    BaseSpec("llama", 3, 32, 4, 4, 8, 64, 30, o_bias=True, mlp_bias=True),        # o and MLP biases
    BaseSpec("llama", 32, 128, 8, 4, 16, 344, 500),                               # 32 layers
]


def _random_batch(spec, n, rng, drop=True):
    kv = rng.integers(1, spec.num_kv_heads + 1, (n, spec.num_layers))
    inter = rng.integers(1, spec.intermediate_size + 1, (n, spec.num_layers))
    if drop:
        d = rng.random((n, spec.num_layers)) < 0.15
        d[:, 0] = False
        kv, inter = np.where(d, 0, kv), np.where(d, 0, inter)
    return LayerBatch(spec, kv, inter)


@pytest.mark.parametrize("spec", CONFIGS, ids=lambda s: f"{s.family}-{s.num_layers}L-{s.num_heads}h{s.num_kv_heads}kv")
def test_batch_params_equal_architecture_params(spec):
    rng = np.random.default_rng(0)
    b = _random_batch(spec, 60, rng)
    counts = batch_params(spec, b.kv, b.inter)
    for i in range(len(b)):
        assert counts[i] == b.architecture(i).params
    full = encode([from_ratios(spec, 0.0, 0.0)])
    assert full.params[0] == spec.total_params


def test_llama2_7b_total():
    spec = BaseSpec("llama", 32, 4096, 32, 32, 128, 11008, 32000)
    assert batch_params(spec, np.full(32, 32), np.full(32, 11008)) == spec.total_params == 6_738_415_616


@pytest.mark.parametrize("spec", CONFIGS[:3] + CONFIGS[-1:], ids=str)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(frac=st.floats(0.45, 0.98), tol=st.floats(0.02, 0.2), seed=st.integers(0, 10**6))
def test_repair_lands_in_window(spec, frac, tol, seed):
    space = build_space(spec, mlp_min_frac=0.1)
    target = int(frac * spec.total_params)
    lo, hi = size_window(target, tol)
    p_min, p_max = space.bounds_params()
    rng = np.random.default_rng(seed)
    raw = space.sample(200, rng)
    rep, ok = space.repair(raw, lo, hi)
    p = rep.params
    assert np.all(ok == ((p >= lo) & (p <= hi)))
    assert np.all(p[ok] <= target)
    # every repaired candidate is a valid architecture of the space
    for i in range(0, 200, 37):
        assert rep.architecture(i).params == p[i]
    assert np.all(rep.inter[:, space.idx] % space.multiple == 0) or spec.intermediate_size % space.multiple
    # reachable windows are (almost) always hit; the step is one KV group / one channel multiple
    if p_min <= lo and hi <= p_max and (hi - lo) > 4 * 3 * spec.hidden_size * space.multiple:
        assert ok.mean() > 0.95


def test_repair_leaves_feasible_candidates_alone():
    spec = CONFIGS[-1]
    space = build_space(spec)
    rng = np.random.default_rng(1)
    raw = space.sample(300, rng)
    p = raw.params
    lo, hi = int(np.quantile(p, 0.3)), int(np.quantile(p, 0.7))
    rep, ok = space.repair(raw, lo, hi)
    inside = (p >= lo) & (p <= hi)
    np.testing.assert_array_equal(rep.kv[inside], raw.kv[inside])
    np.testing.assert_array_equal(rep.inter[inside], raw.inter[inside])
    assert ok.all()


def test_attention_sampling_is_biased_toward_keeping():
    spec = BaseSpec("llama", 8, 256, 8, 8, 32, 688, 100)
    space = build_space(spec)
    choices, probs = space.attn_probs(0)
    assert choices[-1] == 8 and probs[-1] == pytest.approx(0.5) and probs.sum() == pytest.approx(1.0)
    assert np.all(np.diff(probs[:-1]) > 0)           # fewer groups removed: more likely
    b = space.sample(4000, np.random.default_rng(0))
    assert (b.kv == 8).mean() == pytest.approx(0.5, abs=0.03)
    # MLP is sampled evenly over its grid
    assert b.mlp_frac.mean() == pytest.approx(0.55, abs=0.05)


def test_project_and_layer_range():
    spec = CONFIGS[-1]
    space = build_space(spec, "3-29")
    assert space.layers == tuple(range(3, 30))
    rng = np.random.default_rng(2)
    b = _random_batch(spec, 50, rng, drop=False)
    pr = space.project(b)
    assert np.all(pr.kv[:, [0, 1, 2, 30, 31]] == spec.num_kv_heads)
    assert np.all(pr.inter[:, space.idx] % 8 == 0)
    pr2 = space.project(pr)
    np.testing.assert_array_equal(pr.inter, pr2.inter)   # idempotent


def test_layer_drop_option():
    spec = CONFIGS[-1]
    space = build_space(spec, allow_drop=True, drop_prob=0.2)
    b = space.sample(500, np.random.default_rng(3))
    assert (b.kv == 0).any() and np.all(b.inter[b.kv == 0] == 0)
    target = int(0.6 * spec.total_params)
    rep, ok = space.repair(b, *size_window(target, 0.05))
    assert ok.mean() > 0.9
    assert rep.architecture(int(np.flatnonzero(ok)[0])).params <= target


class _FakePredictor:
    def __init__(self, importances, ranges=None):
        self._imp = importances
        self._ranges = ranges or {}
        self.metric = "ppl_fake"

    def feature_importances(self):
        return self._imp

    def training_range(self):
        return self._ranges


def test_refinement_keeps_important_dims_free_and_is_json():
    spec = BaseSpec("llama", 8, 64, 4, 4, 16, 256, 100)
    space = build_space(spec)
    imp = {f"attn_l{i}": 0.001 for i in range(8)}
    imp.update({f"mlp_l{i}": 0.001 for i in range(8)})
    imp.update({"attn_l0": 0.5, "mlp_l7": 0.3, "attn_p3": 0.1, "param_frac": 0.05})
    elite = space.sample(64, np.random.default_rng(0))
    ref = refine_space(space, {"ppl_fake": _FakePredictor(imp)}, elite=elite)
    rec = ref.refinement
    json.dumps(rec)
    json.dumps(ref.to_dict())
    status = {(d["layer"], d["kind"]): d["status"] for d in rec["dims"]}
    assert status[(0, "attn")] == "free" and status[(7, "mlp")] == "free"
    assert rec["free"] >= 4 and rec["fixed"] + rec["narrowed"] > 0
    assert rec["dims"][0]["layer"] == 0 and rec["dims"][0]["kind"] == "attn"
    # ranges only shrink
    assert np.all(ref.kv_lo >= space.kv_lo) and np.all(ref.kv_hi <= space.kv_hi)
    assert np.all(ref.mlp_lo >= space.mlp_lo) and np.all(ref.mlp_hi <= space.mlp_hi)
    # no importances: unchanged, and said so
    same = refine_space(space, {"x": object()})
    assert "skipped" in same.refinement["method"]
    np.testing.assert_array_equal(same.mlp_lo, space.mlp_lo)


def test_trust_bounds_from_training_ranges():
    p1 = _FakePredictor({}, {"attn_l0": (0.5, 1.0), "mlp_l0": (0.4, 1.0), "mlp_l1": (0.6, 1.0)})
    p2 = _FakePredictor({}, {"attn_p0": (0.75, 1.0), "mlp_p0": (0.3, 1.0)})
    assert trust_bounds([p1, p2]) == {"attn": 0.75, "mlp": 0.4}
    assert trust_bounds([object()]) is None
