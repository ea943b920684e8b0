"""The layer-by-layer, hook-folded Taylor pass gives the scores of the plain full-gradient pass,
in any chunking, for every layout, and leaves no gradient or dtype change behind."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import tiny_models as tm
from archopt.evaluators import compute_importance, load_base_model
from archopt.evaluators import importance as importance_mod
from archopt.evaluators.importance import decoder_layers

NAMES = ["llama_gqa_odd", "qwen2_bias", "llama_tied_bias", "mistral_gqa", "llama_deep"]


def reference_taylor(model, spec, batch, batch_size=2):
    """The pass archopt had before issue 20: every prunable projection's gradient held at once,
    accumulated over batches of ``batch_size`` windows, then |w * g| summed per unit (float32)."""
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    prunable = []
    for layer in decoder_layers(model):
        attn, mlp = layer.self_attn, layer.mlp
        for lin in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj):
            prunable += [lin.weight] + ([lin.bias] if lin.bias is not None else [])
    for p in prunable:
        p.requires_grad_(True)
    total = batch.shape[0]
    with torch.enable_grad():
        for start in range(0, total, batch_size):
            ids = batch[start: start + batch_size]
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            (loss * (ids.shape[0] / total)).backward()

    def score(t):
        return torch.zeros_like(t) if t.grad is None else (t.detach() * t.grad).abs()

    kv, d = spec.num_kv_heads, spec.head_dim
    kv_rows, ch_rows = [], []
    with torch.no_grad():
        for layer in decoder_layers(model):
            attn, mlp = layer.self_attn, layer.mlp

            def rows(lin):
                s = score(lin.weight).sum(dim=1)
                return s + score(lin.bias) if lin.bias is not None else s

            groups = rows(attn.q_proj).reshape(kv, -1).sum(1)
            groups = groups + rows(attn.k_proj).reshape(kv, d).sum(1) + rows(attn.v_proj).reshape(kv, d).sum(1)
            groups = groups + score(attn.o_proj.weight).sum(dim=0).reshape(kv, -1).sum(1)
            channels = rows(mlp.gate_proj) + rows(mlp.up_proj) + score(mlp.down_proj.weight).sum(dim=0)
            kv_rows.append(groups.double().numpy())
            ch_rows.append(channels.double().numpy())
    for p, flag in zip(params, flags):
        p.grad = None
        p.requires_grad_(flag)
    return np.stack(kv_rows), np.stack(ch_rows)


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    paths = tm.save_all(tmp_path_factory.mktemp("tiny"), NAMES + ["llama_mha"])
    return {name: load_base_model(str(p), attn_implementation=("sdpa" if name == "mistral_gqa" else "eager"))
            for name, p in paths.items()}


def batch_of(base, samples=6, seq_len=16, seed=3):
    return importance_mod.calibration_batch(base.tokenizer, tm.CORPUS, samples, seq_len, seed)


@pytest.mark.parametrize("name", NAMES)
def test_hook_pass_equals_the_full_gradient_pass(bases, name):
    base = bases[name]
    batch = batch_of(base)
    want_kv, want_ch = reference_taylor(base.model, base.spec, batch)
    kv, ch = importance_mod.taylor_scores(base.model, base.spec, batch)
    np.testing.assert_allclose(kv, want_kv, rtol=2e-5, atol=1e-12)
    np.testing.assert_allclose(ch, want_ch, rtol=2e-5, atol=1e-12)
    assert kv.dtype == np.float64 and kv.shape == (base.spec.num_layers, base.spec.num_kv_heads)


@pytest.mark.parametrize("batch_size", [1, 2, 4])
def test_chunked_pass_equals_one_chunk(bases, batch_size):
    """More chunks (when the activations would not fit) accumulate a layer's gradient first: same scores."""
    base = bases["qwen2_bias"]
    batch = batch_of(base, samples=5)
    one_kv, one_ch = importance_mod.taylor_scores(base.model, base.spec, batch, batch_size=5)
    kv, ch = importance_mod.taylor_scores(base.model, base.spec, batch, batch_size=batch_size)
    np.testing.assert_allclose(kv, one_kv, rtol=2e-5)
    np.testing.assert_allclose(ch, one_ch, rtol=2e-5)


def test_small_budget_chunks_the_pass_and_the_head(bases, monkeypatch):
    base = bases["llama_gqa_odd"]
    batch = batch_of(base, samples=6)
    want_kv, want_ch = reference_taylor(base.model, base.spec, batch)
    assert importance_mod._taylor_chunk(base.model, base.spec, 6, 16, 1) == 1
    monkeypatch.setattr(importance_mod, "FOLD_CHUNK_ELEMENTS", 7)  # |w * g| a row at a time
    kv, ch = importance_mod.taylor_scores(base.model, base.spec, batch, memory_budget=1)
    np.testing.assert_allclose(kv, want_kv, rtol=2e-5)
    np.testing.assert_allclose(ch, want_ch, rtol=2e-5)


def test_no_full_set_of_gradients_is_ever_held(bases, monkeypatch):
    """At any gradient fold at most one parameter of the model holds a gradient (one chunk)."""
    base = bases["llama_deep"]
    batch = batch_of(base)
    most = []
    real = importance_mod._abs_product_sums

    def watching(w, g, dim):
        most.append(sum(p.grad is not None for p in base.model.parameters()))
        return real(w, g, dim)

    monkeypatch.setattr(importance_mod, "_abs_product_sums", watching)
    importance_mod.taylor_scores(base.model, base.spec, batch)
    assert most and max(most) <= 1
    assert len(most) == 7 * base.spec.num_layers


def test_bfloat16_weights_are_scored_in_float32_and_left_bfloat16(bases):
    """A bf16 model: each layer upcast in turn, so the scores are the float32 model's."""
    base = bases["llama_mha"]
    assert base.dtype == torch.float32  # CPU loads in float32: make a bf16 copy by hand
    model = tm.make_model("llama_mha")
    model.to(torch.bfloat16)
    batch = batch_of(base)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    kv, ch = importance_mod.taylor_scores(model, base.spec, batch)
    assert all(p.dtype == torch.bfloat16 and p.grad is None for p in model.parameters())
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    ref = tm.make_model("llama_mha")
    ref.to(torch.bfloat16).float()
    want_kv, want_ch = reference_taylor(ref, base.spec, batch)
    np.testing.assert_allclose(kv, want_kv, rtol=2e-2)   # rotary tables are rounded to bf16 in the forward
    np.testing.assert_allclose(ch, want_ch, rtol=2e-2)
    assert np.corrcoef(ch.ravel(), want_ch.ravel())[0, 1] > 0.999


def test_compute_importance_matches_the_reference_and_restores_the_model(bases):
    base = bases["llama_tied_bias"]
    flags = [p.requires_grad for p in base.model.parameters()]
    imp = compute_importance(base, "taylor", calibration_text=tm.CORPUS, samples=4, seq_len=16, seed=1)
    batch = importance_mod.calibration_batch(base.tokenizer, tm.CORPUS, 4, 16, 1)
    want_kv, want_ch = reference_taylor(base.model, base.spec, batch)
    np.testing.assert_allclose(imp.kv_group, want_kv, rtol=2e-5)
    np.testing.assert_allclose(imp.channel, want_ch, rtol=2e-5)
    assert [p.requires_grad for p in base.model.parameters()] == flags
    assert all(p.grad is None for p in base.model.parameters()) and not base.model.training
