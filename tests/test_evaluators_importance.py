"""Importance scores: the group sums are right, Taylor uses the LM-loss gradient, the disk cache is reused."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import tiny_models as tm
from archopt.archdb.arch import DROPPED, Architecture, full, uniform
from archopt.evaluators import Importance, compute_importance, load_base_model
from archopt.evaluators import importance as importance_mod


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    paths = tm.save_all(tmp_path_factory.mktemp("tiny"), ["llama_gqa_odd", "qwen2_bias", "llama_tied_bias"])
    return {name: load_base_model(str(p), attn_implementation="eager") for name, p in paths.items()}


def group_params(layer, spec, group):
    """(tensor, mask) pairs selecting one KV group's parameters, written out independently."""
    d, g = spec.head_dim, spec.group_size
    q_rows = slice(group * g * d, (group + 1) * g * d)
    kv_rows = slice(group * d, (group + 1) * d)
    attn = layer.self_attn
    out = [(attn.q_proj.weight, (q_rows, slice(None))), (attn.k_proj.weight, (kv_rows, slice(None))),
           (attn.v_proj.weight, (kv_rows, slice(None))), (attn.o_proj.weight, (slice(None), q_rows))]
    for lin, rows in ((attn.q_proj, q_rows), (attn.k_proj, kv_rows), (attn.v_proj, kv_rows)):
        if lin.bias is not None:
            out.append((lin.bias, (rows,)))
    return out


def channel_params(layer, channel):
    mlp = layer.mlp
    out = [(mlp.gate_proj.weight, (channel, slice(None))), (mlp.up_proj.weight, (channel, slice(None))),
           (mlp.down_proj.weight, (slice(None), channel))]
    for lin in (mlp.gate_proj, mlp.up_proj):
        if lin.bias is not None:
            out.append((lin.bias, (channel,)))
    return out


@pytest.mark.parametrize("name", ["llama_gqa_odd", "qwen2_bias", "llama_tied_bias"])
def test_l2_sums_the_group_parameters(bases, name):
    base = bases[name]
    imp = compute_importance(base, "l2")
    assert imp.kv_group.shape == (3, base.spec.num_kv_heads)
    assert imp.channel.shape == (3, base.spec.intermediate_size)
    layer = base.model.model.layers[2]
    for group in range(base.spec.num_kv_heads):
        want = sum(float(t.detach()[idx].pow(2).sum()) for t, idx in group_params(layer, base.spec, group))
        assert imp.kv_group[2, group] == pytest.approx(want, rel=1e-5)
    for channel in (0, 7, base.spec.intermediate_size - 1):
        want = sum(float(t.detach()[idx].pow(2).sum()) for t, idx in channel_params(layer, channel))
        assert imp.channel[2, channel] == pytest.approx(want, rel=1e-5)


def test_taylor_is_weight_times_gradient(bases):
    base = bases["qwen2_bias"]
    imp = compute_importance(base, "taylor", calibration_text=tm.CORPUS, samples=4, seq_len=16, seed=1)
    batch = importance_mod.calibration_batch(base.tokenizer, tm.CORPUS, 4, 16, 1)
    model = base.model
    loss = model(input_ids=batch, labels=batch, use_cache=False).loss
    layer = model.model.layers[1]
    tensors = [p for p in layer.parameters()]
    grads = dict(zip(map(id, tensors), torch.autograd.grad(loss, tensors, allow_unused=True)))
    for group in range(base.spec.num_kv_heads):
        want = sum(float((t.detach()[idx] * grads[id(t)][idx]).abs().sum())
                   for t, idx in group_params(layer, base.spec, group))
        assert imp.kv_group[1, group] == pytest.approx(want, rel=1e-3)
    for channel in (3, 11):
        want = sum(float((t.detach()[idx] * grads[id(t)][idx]).abs().sum()) for t, idx in channel_params(layer, channel))
        assert imp.channel[1, channel] == pytest.approx(want, rel=1e-3)
    # the model is left as it was: no gradients, original requires_grad flags, eval mode
    assert all(p.grad is None for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters()) and not model.training


def test_cache_is_reused_without_a_gradient_pass(bases, tmp_path, monkeypatch):
    base = bases["llama_gqa_odd"]
    calls = []
    real = importance_mod.taylor_scores

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(importance_mod, "taylor_scores", counting)
    kwargs = dict(calibration_text=tm.CORPUS, samples=3, seq_len=16, seed=0, cache_dir=tmp_path)
    first = compute_importance(base, "taylor", **kwargs)
    files = list(tmp_path.glob("*.npz"))
    assert len(calls) == 1 and [f.name for f in files] == [f"{first.key}.npz"]
    mtime = files[0].stat().st_mtime_ns
    second = compute_importance(base, "taylor", **kwargs)
    assert len(calls) == 1 and files[0].stat().st_mtime_ns == mtime
    np.testing.assert_array_equal(first.kv_group, second.kv_group)
    np.testing.assert_array_equal(first.channel, second.channel)
    assert second.calibration == first.calibration and second.criterion == "taylor"
    # another seed, text or criterion is another key
    assert compute_importance(base, "taylor", **{**kwargs, "seed": 1}).key != first.key
    assert compute_importance(base, "taylor", **{**kwargs, "calibration_text": tm.CORPUS[:-9]}).key != first.key
    assert len(calls) == 3
    assert compute_importance(base, "l2", cache_dir=tmp_path).key != first.key


def test_key_describes_model_and_calibration(bases):
    base = bases["llama_gqa_odd"]
    imp = compute_importance(base, "taylor", calibration_text=tm.CORPUS, samples=2, seq_len=8,
                             calibration_name="corpus")
    assert imp.config_hash == base.config_hash
    assert imp.calibration["samples"] == 2 and imp.calibration["seq_len"] == 8 and imp.calibration["name"] == "corpus"
    assert len(imp.calibration["text_sha256"]) == 64
    assert imp.calibration_label().startswith("corpus/2x8/seed0/sha256:")
    assert compute_importance(base, "l2").calibration is None
    with pytest.raises(ValueError, match="criterion"):
        compute_importance(base, "random")


def test_removed_share_and_totals(bases):
    spec = bases["llama_gqa_odd"].spec  # 3 KV groups, 48 channels, 3 layers
    imp = Importance(key="k", criterion="l2", kv_group=np.array([[1.0, 2.0, 7.0]] * 3),
                     channel=np.ones((3, 48)))
    np.testing.assert_allclose(imp.layer_totals(), [58.0] * 3)
    layers = list(full(spec).layers)
    layers[0] = type(layers[0])(3, 1, 24, False)  # keeps group 2 (7 of 10) and 24 of 48 channels
    layers[1] = DROPPED
    arch = Architecture(spec, tuple(layers))
    np.testing.assert_allclose(imp.removed_share(arch, "attention"), [0.3, 1.0, 0.0])
    np.testing.assert_allclose(imp.removed_share(arch, "mlp"), [0.5, 1.0, 0.0])
    np.testing.assert_allclose(imp.removed_share(arch), [(3 + 24) / 58, 1.0, 0.0])
    assert imp.kept_kv_groups(0, 2).tolist() == [1, 2]
    batch = imp.removed_share_batch(np.array([[1, 0, 3], [3, 2, 1]]), np.array([[24, 0, 48], [48, 8, 48]]),
                                    np.array([[False, True, False], [False, False, False]]))
    np.testing.assert_allclose(batch[0], imp.removed_share(arch))
    np.testing.assert_allclose(batch[1], [0.0, (1 + 40) / 58, 3 / 58])
    with pytest.raises(ValueError):
        imp.removed_share(uniform(bases["qwen2_bias"].spec, 0.5))
