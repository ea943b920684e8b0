"""Sizes (``parse_size``), base-model shapes, parameter counts and the canonical architecture encoding."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from archopt.archdb.arch import (SUPPORTED_FAMILIES, Architecture, ArchitectureError, BaseSpec, LayerSpec,
                                 config_hash, from_layer_dicts, from_ratios, full, parse_architecture,
                                 parse_layer_range, round_channels, uniform, uniform_at_size)
from archopt.archdb.sizes import SizeError, format_size, parse_size, parse_tolerance

HYPOTHESIS = settings(max_examples=150, deadline=None, database=None,
                      suppress_health_check=[HealthCheck.too_slow])


# --- parse_size -----------------------------------------------------------------------------------
@pytest.mark.parametrize("text, expected", [
    ("5B", 5_000_000_000), ("5b", 5_000_000_000), ("550M", 550_000_000), ("5.2e9", 5_200_000_000),
    ("1.5K", 1500), ("7G", 7_000_000_000), ("2T", 2 * 10**12), (" 42 ", 42), ("1234", 1234), (1234, 1234),
    ("0.5B", 500_000_000), ("6.74B", 6_740_000_000),
])
def test_parse_size_absolute(text, expected):
    assert parse_size(text) == expected


def test_parse_size_relative_to_base():
    base = 6_738_415_616
    assert parse_size("80%", base) == math.floor(base * 0.8)
    assert parse_size("100%", base) == base
    assert parse_size("12.5%", 800) == 100
    with pytest.raises(SizeError, match="needs a base model"):
        parse_size("80%")


@pytest.mark.parametrize("text", ["-1", -1, "0", 0, "0%", "1e400", "abc", "120%", "", "5 B B", "5X", "nan", "inf",
                                  "1e16", True, "0.1"])
def test_parse_size_refuses(text):
    with pytest.raises(SizeError):
        parse_size(text, 1000)


def test_parse_size_messages_are_one_line():
    for bad in ("abc", "-1", "120%", "1e400"):
        with pytest.raises(SizeError) as info:
            parse_size(bad, 10**9)
        assert "\n" not in str(info.value) and str(info.value)


@pytest.mark.parametrize("text, expected", [("2%", 0.02), ("0.02", 0.02), (0.05, 0.05), ("0%", 0.0), ("0", 0.0)])
def test_parse_tolerance(text, expected):
    assert parse_tolerance(text) == pytest.approx(expected)


@pytest.mark.parametrize("text", ["100%", "-2%", "abc", "1.5", "nan"])
def test_parse_tolerance_refuses(text):
    with pytest.raises(SizeError):
        parse_tolerance(text)


def test_format_size():
    assert format_size(6_738_415_616) == "6.74B"
    assert format_size(7_900_000) == "7.9M"
    assert format_size(260_100) == "260.1K"
    assert format_size(999) == "999"


# --- base shapes and exact parameter counts -------------------------------------------------------
def _hf(**kw):
    return {"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 16, "num_attention_heads": 4,
            "intermediate_size": 32, "vocab_size": 50, **kw}


@pytest.mark.parametrize("spec, expected", [
    # Llama-2-7B, Llama-3-8B (GQA 32/8), SmolLM2-135M (9 q / 3 kv, tied), Qwen2-0.5B (qkv biases, tied):
    # the published parameter counts.
    (BaseSpec("llama", 32, 4096, 32, 32, 128, 11008, 32000), 6_738_415_616),
    (BaseSpec("llama", 32, 4096, 32, 8, 128, 14336, 128256), 8_030_261_248),
    (BaseSpec("llama", 30, 576, 9, 3, 64, 1536, 49152, tie_embeddings=True), 134_515_008),
    (BaseSpec.from_hf_config(dict(model_type="qwen2", num_hidden_layers=24, hidden_size=896, num_attention_heads=14,
                                  num_key_value_heads=2, intermediate_size=4864, vocab_size=151936,
                                  tie_word_embeddings=True)), 494_032_768),
])
def test_total_params_of_known_models(spec, expected):
    assert spec.total_params == expected
    assert full(spec).params == expected and full(spec).fraction() == 1.0


def test_llm_pruner_20_percent_setting():
    """LLM-Pruner's "20%": 25% of attention and MLP on layers 4-29 of Llama-7B gives 5.42B (80.5%)."""
    spec = BaseSpec("llama", 32, 4096, 32, 32, 128, 11008, 32000)
    arch = parse_architecture(spec, {"uniform": 0.25, "layers": "4-29"})
    assert round(arch.params / 1e9, 2) == 5.42
    assert arch.fraction() == pytest.approx(0.805, abs=0.001)
    assert [l == spec.full_layer() for l in arch.layers] == [i < 4 or i > 29 for i in range(32)]
    assert arch.layers[4] == LayerSpec(24, 24, 8256, False)


def _count(spec: BaseSpec, layers) -> int:
    """An independent count, written out module by module (Linear weights, biases, RMSNorms)."""
    h, d = spec.hidden_size, spec.head_dim
    total = spec.vocab_size * h + h + (0 if spec.tie_embeddings else spec.vocab_size * h)
    for q, kv, inter, dropped in layers:
        if dropped:
            continue
        q_proj = h * q * d + (q * d if spec.qkv_bias else 0)
        k_proj = h * kv * d + (kv * d if spec.qkv_bias else 0)
        v_proj = k_proj
        o_proj = q * d * h + (h if spec.o_bias else 0)
        gate = up = h * inter + (inter if spec.mlp_bias else 0)
        down = inter * h + (h if spec.mlp_bias else 0)
        total += q_proj + k_proj + v_proj + o_proj + gate + up + down + 2 * h
    return total


TINY_CONFIGS = {
    # 9 query heads / 3 KV heads with an explicit head_dim that is not hidden // heads
    "llama_gqa_odd": _hf(hidden_size=36, num_attention_heads=9, num_key_value_heads=3, head_dim=8,
                         intermediate_size=48, num_hidden_layers=3),
    "llama_tied_bias": _hf(hidden_size=24, num_attention_heads=6, num_key_value_heads=2, head_dim=6,
                           intermediate_size=40, num_hidden_layers=3, tie_word_embeddings=True,
                           attention_bias=True, mlp_bias=True),
    "qwen2_bias": _hf(model_type="qwen2", hidden_size=24, num_attention_heads=6, num_key_value_heads=2,
                      head_dim=8, intermediate_size=40, num_hidden_layers=3),
    "mistral_gqa": _hf(model_type="mistral", hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                       head_dim=8, intermediate_size=48, num_hidden_layers=3),
    "llama_deep": _hf(hidden_size=16, num_attention_heads=4, num_key_value_heads=2, head_dim=4,
                      intermediate_size=32, num_hidden_layers=32),
    "llama_mha_default_head_dim": _hf(hidden_size=32, num_attention_heads=4, intermediate_size=64),
}


def test_from_hf_config_reads_shapes():
    odd = BaseSpec.from_hf_config(TINY_CONFIGS["llama_gqa_odd"])
    assert (odd.num_heads, odd.num_kv_heads, odd.group_size, odd.head_dim) == (9, 3, 3, 8)
    mha = BaseSpec.from_hf_config(TINY_CONFIGS["llama_mha_default_head_dim"])
    assert (mha.num_kv_heads, mha.head_dim) == (4, 8)  # no num_key_value_heads: MHA; head_dim = hidden // heads
    tied = BaseSpec.from_hf_config(TINY_CONFIGS["llama_tied_bias"])
    assert tied.tie_embeddings and tied.qkv_bias and tied.o_bias and tied.mlp_bias
    qwen = BaseSpec.from_hf_config(TINY_CONFIGS["qwen2_bias"])
    assert qwen.family == "qwen2" and qwen.qkv_bias and not qwen.o_bias and not qwen.mlp_bias
    deep = BaseSpec.from_hf_config(TINY_CONFIGS["llama_deep"])
    assert deep.num_layers == 32
    with pytest.raises(ArchitectureError, match="not a Llama-layout"):
        BaseSpec.from_hf_config(_hf(model_type="gpt2"))


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_param_counts_match_module_by_module_count(name):
    spec = BaseSpec.from_hf_config(TINY_CONFIGS[name])
    rows = [(spec.num_heads, spec.num_kv_heads, spec.intermediate_size, False)] * spec.num_layers
    assert spec.total_params == _count(spec, rows)
    # a pruned architecture: one KV group less where possible, narrower MLPs, one dropped layer
    layers, rows = [], []
    for i in range(spec.num_layers):
        if i == 1:
            layers.append(LayerSpec(0, 0, 0, True))
            rows.append((0, 0, 0, True))
            continue
        kv = max(1, spec.num_kv_heads - (i % 2))
        inter = max(8, spec.intermediate_size - 8 * (i % 3))
        layers.append(LayerSpec(kv * spec.group_size, kv, inter, False))
        rows.append((kv * spec.group_size, kv, inter, False))
    arch = Architecture(spec, tuple(layers))
    assert arch.params == _count(spec, rows)
    assert arch.params < spec.total_params


@pytest.mark.parametrize("name", ["llama_gqa_odd", "llama_tied_bias", "qwen2_bias", "mistral_gqa"])
def test_param_counts_match_transformers(name):
    """``total_params`` equals ``sum(p.numel())`` of the real transformers model (tied weights once)."""
    transformers = pytest.importorskip("transformers")
    cfg = dict(TINY_CONFIGS[name])
    kind = {"llama": "LlamaConfig", "qwen2": "Qwen2Config", "mistral": "MistralConfig"}[cfg.pop("model_type")]
    config = getattr(transformers, kind)(**{k: v for k, v in cfg.items()})
    model = transformers.AutoModelForCausalLM.from_config(config)
    spec = BaseSpec.from_hf_config(config)
    assert spec.total_params == sum(p.numel() for p in model.parameters())


def test_validation_messages():
    spec = BaseSpec.from_hf_config(TINY_CONFIGS["llama_gqa_odd"])  # 3 layers, 9 q / 3 kv, inter 48
    ok = [9, 3, 48]
    with pytest.raises(ArchitectureError, match="whole KV groups"):
        from_layer_dicts(spec, [[4, 2, 48], ok, ok])  # 4 query heads are not 2 whole groups of 3
    with pytest.raises(ArchitectureError, match="kv_heads=4 outside 1..3"):
        from_layer_dicts(spec, [[12, 4, 48], ok, ok])
    with pytest.raises(ArchitectureError, match="intermediate=56 outside"):
        from_layer_dicts(spec, [[9, 3, 56], ok, ok])
    with pytest.raises(ArchitectureError, match="2 layers but the base model has 3"):
        from_layer_dicts(spec, [ok, ok])
    with pytest.raises(ArchitectureError, match="drops every layer"):
        from_layer_dicts(spec, [None, None, None])
    with pytest.raises(ArchitectureError, match="must be an integer"):
        from_layer_dicts(spec, [[9, 3, 47.5], ok, ok])
    with pytest.raises(ArchitectureError, match="unknown field 'heads'"):
        from_layer_dicts(spec, [{"kv_heads": 3, "intermediate": 48, "heads": 9}, ok, ok])
    with pytest.raises(ArchitectureError, match="layer order"):
        from_layer_dicts(spec, [{"layer": 1, "kv_heads": 3, "intermediate": 48}, ok, ok])
    with pytest.raises(ArchitectureError, match="multiple of num_kv_heads"):
        BaseSpec("llama", 2, 16, 9, 4, 4, 32, 50)
    with pytest.raises(ArchitectureError, match="positive integer"):
        BaseSpec("llama", 0, 16, 4, 4, 4, 32, 50)
    with pytest.raises(ArchitectureError):
        from_ratios(spec, 1.0, 0.0)  # a ratio of 1 keeps nothing
    with pytest.raises(ArchitectureError):
        parse_architecture(spec, "9/3/48,9/3/48,abc")


def test_odd_heads_ratios_keep_whole_groups():
    spec = BaseSpec.from_hf_config(TINY_CONFIGS["llama_gqa_odd"])
    arch = from_ratios(spec, 0.4, 0.5)
    for layer in arch.layers:
        assert layer.q_heads == 3 * layer.kv_heads
        assert layer.kv_heads == 2  # round(0.6 * 3) = 2
        assert layer.intermediate == 24
    assert from_ratios(spec, 0.99, 0.0).layers[0].kv_heads == 1  # at least one KV group


def test_layer_ranges_are_inclusive_on_32_layers():
    assert parse_layer_range("3-29", 32) == list(range(3, 30))
    assert parse_layer_range("0-3,28-31", 32) == [0, 1, 2, 3, 28, 29, 30, 31]
    assert parse_layer_range(None, 32) == list(range(32))
    assert parse_layer_range("5", 32) == [5]
    for bad in ("3-32", "29-3", "a-b", "-1"):
        with pytest.raises(ArchitectureError):
            parse_layer_range(bad, 32)
    spec = BaseSpec.from_hf_config(TINY_CONFIGS["llama_deep"])
    arch = parse_architecture(spec, {"attn": 0.5, "mlp": 0.25, "layers": "3-29"})
    pruned = [i for i, l in enumerate(arch.layers) if l != spec.full_layer()]
    assert pruned == list(range(3, 30))


def test_round_channels_multiple():
    spec = BaseSpec("llama", 1, 16, 4, 4, 4, 100, 50)
    assert round_channels(spec, 100) == 100
    assert round_channels(spec, 51) == 48 and round_channels(spec, 53) == 56
    assert round_channels(spec, 1) == 8  # at least one multiple
    assert round_channels(spec, 99) == 96


def test_config_hash_ignores_volatile_keys():
    config = TINY_CONFIGS["qwen2_bias"]
    assert config_hash(config) == config_hash({**config, "transformers_version": "9.9", "_name_or_path": "x",
                                               "torch_dtype": "bfloat16", "use_cache": False})
    assert config_hash(config) != config_hash({**config, "intermediate_size": 48})


# --- written forms round-trip to one canonical encoding -------------------------------------------
@st.composite
def specs(draw, max_layers: int = 8) -> BaseSpec:
    kv = draw(st.integers(1, 4))
    group = draw(st.integers(1, 3))
    return BaseSpec(
        family=draw(st.sampled_from(SUPPORTED_FAMILIES)), num_layers=draw(st.integers(1, max_layers)),
        hidden_size=draw(st.integers(4, 64)), num_heads=kv * group, num_kv_heads=kv,
        head_dim=draw(st.sampled_from([2, 4, 6, 8])), intermediate_size=draw(st.integers(1, 96)),
        vocab_size=draw(st.integers(1, 500)), tie_embeddings=draw(st.booleans()), qkv_bias=draw(st.booleans()),
        o_bias=draw(st.booleans()), mlp_bias=draw(st.booleans()))


@st.composite
def architectures(draw) -> Architecture:
    spec = draw(specs())
    layers = []
    for _ in range(spec.num_layers):
        if draw(st.integers(0, 4)) == 0:
            layers.append(LayerSpec(0, 0, 0, True))
        else:
            kv = draw(st.integers(1, spec.num_kv_heads))
            layers.append(LayerSpec(kv * spec.group_size, kv, draw(st.integers(1, spec.intermediate_size)), False))
    if all(l.dropped for l in layers):
        layers[0] = spec.full_layer()
    return Architecture(spec, tuple(layers))


def written_forms(arch: Architecture) -> list:
    dicts = arch.layer_dicts()
    rows = [None if l.dropped else [l.q_heads, l.kv_heads, l.intermediate] for l in arch.layers]
    short = [{"dropped": True} if l.dropped else {"kv_heads": l.kv_heads, "intermediate": l.intermediate}
             for l in arch.layers]
    dashed = ["-" if r is None else r for r in rows]
    spaced = " , ".join("x" if l.dropped else f"{l.q_heads}/{l.kv_heads}/{l.intermediate}" for l in arch.layers)
    return [dicts, rows, short, dashed, tuple(rows), {"layers": dicts}, arch.compact(), spaced,
            json.dumps(dicts), json.dumps(rows), json.dumps({"layers": short}), "  " + json.dumps(rows) + "\n"]


@HYPOTHESIS
@given(architectures())
def test_every_written_form_gives_one_encoding_and_hash(arch):
    want = (arch.canonical_json(), arch.arch_id("base-x"), arch.params)
    for form in written_forms(arch):
        parsed = parse_architecture(arch.spec, form)
        assert (parsed.canonical_json(), parsed.arch_id("base-x"), parsed.params) == want, form
    # the identity depends on the base model's key too
    assert arch.arch_id("base-y") != arch.arch_id("base-x")


@st.composite
def ratio_forms(draw):
    spec = draw(specs(max_layers=10))
    lo = draw(st.integers(0, spec.num_layers - 1))
    hi = draw(st.integers(lo, spec.num_layers - 1))
    ratio = st.sampled_from([0.0, 0.1, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.75, 0.9])
    n = hi - lo + 1
    same = draw(st.booleans())
    attn = [draw(ratio)] * n if same else [draw(ratio) for _ in range(n)]
    mlp = [draw(ratio)] * n if same else [draw(ratio) for _ in range(n)]
    return spec, lo, hi, attn, mlp


@HYPOTHESIS
@given(ratio_forms())
def test_ratios_and_explicit_sizes_are_one_architecture(case):
    spec, lo, hi, attn, mlp = case
    rng = f"{lo}-{hi}"
    arch = parse_architecture(spec, {"attn": attn, "mlp": mlp, "layers": rng})
    want = arch.canonical_json()
    forms = [arch.layer_dicts(), arch.compact(), json.dumps({"attn": attn, "mlp": mlp, "layers": rng})]
    if len(set(attn)) == 1 and len(set(mlp)) == 1:
        forms.append({"attn": attn[0], "mlp": mlp[0], "layers": rng})
        if attn[0] == mlp[0]:
            forms.append({"uniform": attn[0], "layers": rng})
            if (lo, hi) == (0, spec.num_layers - 1):
                forms += [f"uniform:{attn[0]}", {"uniform": attn[0]}]
                if attn[0] == 0.0:
                    forms.append("full")
    for form in forms:
        parsed = parse_architecture(spec, form)
        assert parsed.canonical_json() == want and parsed.arch_id("m") == arch.arch_id("m"), form
    outside = [i for i in range(spec.num_layers) if not lo <= i <= hi]
    assert all(arch.layers[i] == spec.full_layer() for i in outside)
    for layer in arch.layers:
        assert layer.q_heads == layer.kv_heads * spec.group_size and layer.kv_heads >= 1


@HYPOTHESIS
@given(specs(max_layers=12), st.floats(0.02, 1.0), st.booleans(), st.booleans())
def test_uniform_at_size_never_exceeds_the_target(spec, fraction, attention, some_layers):
    target = max(1, int(spec.total_params * fraction))
    layers = list(range(spec.num_layers // 2, spec.num_layers)) if some_layers else None
    try:
        ratio, arch = uniform_at_size(spec, target, layers=layers, attention=attention)
    except ArchitectureError as exc:
        assert "no uniform ratio reaches that size" in str(exc)
        assert uniform(spec, 0.999, layers, attention=attention).params > target
        return
    assert arch.params <= target
    assert 0.0 <= ratio < 1.0
    assert arch.canonical_json() == uniform(spec, ratio, layers, attention=attention).canonical_json()
    if ratio > 1e-9:  # the smallest such ratio: a little less is over the target
        assert uniform(spec, ratio - 1e-9, layers, attention=attention).params > target


def test_uniform_at_size_at_full_size_is_the_base():
    spec = BaseSpec("llama", 32, 4096, 32, 8, 128, 14336, 128256)
    ratio, arch = uniform_at_size(spec, spec.total_params)
    assert ratio == 0.0 and arch.is_full()
    ratio, arch = uniform_at_size(spec, parse_size("80%", spec.total_params), layers=range(3, 30))
    assert arch.params <= parse_size("80%", spec.total_params)
    assert arch.params > 0.78 * spec.total_params


def test_sketch_and_compact():
    spec = BaseSpec("llama", 3, 16, 4, 2, 4, 40, 50)
    arch = from_layer_dicts(spec, [[4, 2, 40], None, [2, 1, 16]])
    assert arch.compact() == "4/2/40,-,2/1/16"
    assert arch.sketch() == "A:Fx5 M:Fx4"
    assert not arch.is_full() and full(spec).is_full()
