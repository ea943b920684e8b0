"""save_pruned -> load_pruned gives the same model; the files record shapes and provenance."""

from __future__ import annotations

import json

import pytest
import torch

import tiny_models as tm
from archopt.archdb.arch import DROPPED, Architecture, from_ratios
from archopt.evaluators import compute_importance, load_base_model, load_pruned, prune_model, read_pruned_info, save_pruned


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    paths = tm.save_all(tmp_path_factory.mktemp("tiny"), ["llama_tied_bias", "qwen2_bias", "mistral_gqa"])
    return {name: load_base_model(str(p), attn_implementation="eager") for name, p in paths.items()}


def arch_with_drop(spec) -> Architecture:
    layers = list(from_ratios(spec, [0.5, 0.0, 0.4], [0.3, 0.5, 0.0]).layers)
    layers[1] = DROPPED
    return Architecture(spec, tuple(layers))


@pytest.mark.parametrize("name", ["llama_tied_bias", "qwen2_bias", "mistral_gqa"])
def test_save_load_identical_logits(bases, name, tmp_path):
    base = bases[name]
    imp = compute_importance(base, "taylor", calibration_text=tm.CORPUS, samples=2, seq_len=16)
    arch = arch_with_drop(base.spec)
    model = prune_model(base, arch, imp)
    out = save_pruned(model, base, arch, imp, tmp_path / "pruned")
    loaded = load_pruned(out, attn_implementation="eager")
    ids, mask = tm.padded_batch()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids, attention_mask=mask).logits,
                           model(input_ids=ids, attention_mask=mask).logits)
    assert sum(p.numel() for p in loaded.parameters()) == arch.params
    if base.spec.tie_embeddings:
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    gen = loaded.generate(ids[:1], max_new_tokens=3, do_sample=False, pad_token_id=2)
    assert gen.shape[1] > ids.shape[1]


def test_files_record_shapes_and_provenance(bases, tmp_path):
    base = bases["qwen2_bias"]
    imp = compute_importance(base, "l2")
    arch = arch_with_drop(base.spec)
    out = save_pruned(prune_model(base, arch, imp), base, arch, imp, tmp_path / "p", dtype="bfloat16",
                      base_name="my-qwen")
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 2 and config["layer_types"] == ["full_attention"] * 2
    kept = [l for l in arch.layers if not l.dropped]
    assert [(d["base_layer"], d["q_heads"], d["kv_heads"], d["intermediate"]) for d in config["archopt_layers"]] == \
        [(0, kept[0].q_heads, kept[0].kv_heads, kept[0].intermediate), (2, kept[1].q_heads, kept[1].kv_heads,
                                                                        kept[1].intermediate)]
    info = read_pruned_info(out)
    assert info["architecture"] == arch.layer_dicts() and info["canonical"] == arch.canonical_json()
    assert info["params"] == arch.params and info["base"]["config_hash"] == base.config_hash
    assert info["base"]["name"] == "my-qwen" and info["base"]["location"] == base.location
    assert info["importance"]["criterion"] == "l2" and info["dtype"] == "bfloat16"
    assert (out / "tokenizer.json").is_file() and (out / "generation_config.json").is_file()
    loaded = load_pruned(out)
    assert next(loaded.parameters()).dtype == torch.bfloat16
    assert next(base.model.parameters()).dtype == torch.float32  # saving converted copies only
    float_loaded = load_pruned(out, dtype="float32")
    assert next(float_loaded.parameters()).dtype == torch.float32


def test_load_refuses_a_plain_checkpoint(tmp_path):
    path = tm.save_tiny("llama_mha", tmp_path / "plain")
    (path / "archopt.json").write_text("{}")
    with pytest.raises(ValueError, match="archopt_layers"):
        load_pruned(path)
