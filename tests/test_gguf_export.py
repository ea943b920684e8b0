"""`archopt prune --format gguf`: llama.cpp (llama-cpp-python) runs the file with per-layer shapes and
its logits equal transformers' on the same pruned directory.

Tiny random bases are pruned to architectures that cover GQA 9/3, tied embeddings with q/k/v/o and
MLP biases, Qwen2 (q/k/v biases), Mistral, a dropped layer, uneven MLP widths and uneven KV groups
(one KV group in one layer, all of them in another). Each pruned directory is exported to GGUF (f32)
and llama.cpp's logits on a fixed token sequence are compared with ``load_pruned`` (transformers'
stock classes with the directory's shapes): max absolute difference <= 1e-3. f16 and q8_0 files
load and stay close; llama.cpp's tokenizer reproduces the base tokenizer; the provenance keys hold
archopt.json; bad outputs are one-line errors that leave nothing behind; ``evaluate --runtime
llama.cpp`` stores a value under a protocol that says llama.cpp and the out type.

llama-cpp-python is a test dependency (``make test`` builds it from source): under ``make test``
(``ARCHOPT_REQUIRE_LLAMACPP=1``) or CI its absence fails these tests, elsewhere it skips them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import tiny_models as tm
from archopt.archdb.arch import DROPPED, Architecture, LayerSpec
from archopt.archdb.protocol import Protocol
from archopt.evaluators import load_base_model, load_pruned, prune_model, save_pruned
from archopt.evaluators.gguf_export import GgufExportError, export_gguf, read_gguf_provenance

try:
    import llama_cpp  # noqa: F401
    HAVE_LLAMA_CPP = True
except ImportError:
    HAVE_LLAMA_CPP = False

needs_llama_cpp = pytest.mark.skipif(
    not HAVE_LLAMA_CPP and not (os.environ.get("CI") or os.environ.get("ARCHOPT_REQUIRE_LLAMACPP")),
    reason="llama-cpp-python is not installed (make test builds it)")

# base -> per layer (q_heads, kv_heads, intermediate) or None (dropped): uneven KV groups and widths
ARCHS = {
    "llama_gqa_odd": [(3, 1, 24), None, (9, 3, 40)],    # GQA 9/3 (3 query heads per KV head), head_dim 8
    "llama_tied_bias": [(6, 2, 16), (3, 1, 40), None],  # tied embeddings, attention and MLP biases
    "qwen2_bias": [None, (3, 1, 8), (6, 2, 32)],        # q/k/v biases
    "mistral_gqa": [(4, 2, 48), None, (2, 1, 16)],
}
TOKENS = [0, 17, 301, 5, 99, 250, 42, 7, 3, 388, 120, 64, 11, 200, 150, 33, 9, 270, 81, 4]


def _arch(spec, rows) -> Architecture:  # noqa: ANN001
    return Architecture(spec, tuple(DROPPED if r is None else LayerSpec(*r) for r in rows))


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    """Every base pruned (random importance) and saved; name -> (directory, architecture, base name)."""
    root = tmp_path_factory.mktemp("gguf")
    paths = tm.save_all(root / "bases", list(ARCHS))
    out = {}
    for name, path in paths.items():
        base = load_base_model(str(path), attn_implementation="eager")
        arch = _arch(base.spec, ARCHS[name])
        model = prune_model(base, arch, tm.random_importance(base.spec, seed=5))
        out[name] = (save_pruned(model, base, arch, {"criterion": "l2", "calibration": None}, root / f"pruned-{name}"),
                     arch, base.name)
    return root, out


def _hf_logits(directory: Path) -> np.ndarray:
    model = load_pruned(directory, attn_implementation="eager")
    with torch.no_grad():
        return model(input_ids=torch.tensor([TOKENS])).logits[0].double().numpy()


@needs_llama_cpp
@pytest.mark.parametrize("name", list(ARCHS))
def test_f32_logits_match_transformers(pruned, name):
    from archopt.evaluators.llamacpp import gguf_logits
    root, out = pruned
    directory, arch, _ = out[name]
    report = export_gguf(directory, root / f"{name}.gguf", "f32")
    kept = [r for r in ARCHS[name] if r is not None]
    assert [(s["q_heads"], s["kv_heads"], s["intermediate"]) for s in report.layers] == kept
    ours = gguf_logits(report.path, TOKENS, n_threads=2)
    ref = _hf_logits(directory)
    assert ours.shape == ref.shape
    diff = float(np.abs(ours - ref).max())
    assert diff <= 1e-3, f"{name}: max |llama.cpp - transformers| = {diff:.2e}"
    assert float(np.abs(ref).max()) > 0.1  # the comparison is not between two near-zero arrays


@needs_llama_cpp
@pytest.mark.parametrize("outtype,tol", [("f16", 5e-2), ("bf16", 2e-1), ("q8_0", 2e-1)])
def test_smaller_outtypes_load_and_stay_close(pruned, outtype, tol):
    from archopt.evaluators.llamacpp import gguf_logits
    root, out = pruned
    directory = out["mistral_gqa"][0]
    path = export_gguf(directory, root / f"mistral-{outtype}.gguf", outtype).path
    ours = gguf_logits(path, TOKENS, n_threads=2)
    ref = _hf_logits(directory)
    assert np.isfinite(ours).all()
    assert float(np.abs(ours - ref).max()) <= tol * max(1.0, float(np.abs(ref).max()))
    assert read_gguf_provenance(path)["outtype"] == outtype


@needs_llama_cpp
def test_llama_cpp_tokenizes_like_the_base_tokenizer(pruned):
    from transformers import AutoTokenizer

    from archopt.evaluators.llamacpp import load_gguf
    root, out = pruned
    directory = out["llama_gqa_odd"][0]
    path = root / "llama_gqa_odd.tok.gguf"
    export_gguf(directory, path, "f32")
    hf = AutoTokenizer.from_pretrained(directory)
    llm = load_gguf(path, n_ctx=64, n_threads=1, logits_all=False)
    try:
        for text in ["The quick brown fox jumps over the lazy dog.", "Answer: B\nNumbers 0 1 2 3 and words",
                     "  pruning removes  heads;\n\nperplexity?"]:
            assert llm.tokenize(text.encode(), add_bos=True, special=False) == hf(text)["input_ids"], text
    finally:
        llm.close()


def test_gguf_layout_and_provenance(pruned):
    import gguf
    root, out = pruned
    directory, arch, base_name = out["llama_tied_bias"]
    path = export_gguf(directory, root / "tied.gguf", "f32").path
    reader = gguf.GGUFReader(str(path))
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.ggml.token")}
    assert fields["general.architecture"] == "deci"
    assert fields["deci.block_count"] == 2
    assert fields["deci.attention.head_count"] == [6, 3]
    assert fields["deci.attention.head_count_kv"] == [2, 1]
    assert fields["deci.feed_forward_length"] == [16, 40]
    assert fields["deci.attention.key_length"] == 6 and fields["deci.rope.dimension_count"] == 6
    names = {t.name for t in reader.tensors}
    assert "output.weight" not in names  # tied: llama.cpp reuses token_embd
    assert {"blk.0.attn_q.bias", "blk.0.attn_output.bias", "blk.1.ffn_down.bias"} <= names
    assert not any(n.startswith("blk.2.") for n in names)
    prov = read_gguf_provenance(path)
    info = json.loads((directory / "archopt.json").read_text())
    assert prov["arch_id"] == arch.arch_id(base_name) == info["arch_id"]
    assert prov["base_model"] == base_name and prov["params"] == arch.params
    assert json.loads(prov["architecture"]) == info["architecture"]
    assert prov["info"]["importance"] == {"criterion": "l2", "calibration": None}


def test_untied_model_writes_output_and_padding_tokens(pruned):
    import gguf
    root, out = pruned
    path = export_gguf(out["llama_gqa_odd"][0], root / "odd.gguf", "f16").path
    reader = gguf.GGUFReader(str(path))
    assert "output.weight" in {t.name for t in reader.tensors}
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    assert len(tokens) == 1000 and tokens[-1] == "[PAD999]"  # config vocab 1000, tokenizer 400
    assert reader.fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert reader.fields["tokenizer.ggml.bos_token_id"].contents() == 0


def test_refuses_what_the_layout_cannot_hold(pruned, tmp_path):
    root, out = pruned
    directory = out["llama_gqa_odd"][0]
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in directory.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    config = json.loads((bad / "config.json").read_text())
    target = tmp_path / "x.gguf"

    config["rope_parameters"] = {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(GgufExportError, match="RoPE scaling 'dynamic'"):
        export_gguf(bad, target)
    config["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0}
    config["archopt_layers"][0]["q_heads"] = 4  # 4 query heads over 1 KV head... made uneven below
    config["archopt_layers"][0]["kv_heads"] = 3
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(GgufExportError, match="do not split"):
        export_gguf(bad, target)
    with pytest.raises(GgufExportError, match="--outtype 'q4'"):
        export_gguf(directory, target, "q4")
    with pytest.raises(GgufExportError, match="is a directory"):
        export_gguf(directory, tmp_path)
    assert not target.exists() and not list(tmp_path.glob(".x.gguf*"))


def test_failed_write_leaves_nothing(pruned, tmp_path, monkeypatch):
    import gguf
    root, out = pruned

    def boom(self, *a, **k):  # noqa: ANN001
        raise OSError("disk full")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", boom)
    with pytest.raises(OSError, match="disk full"):
        export_gguf(out["qwen2_bias"][0], tmp_path / "q.gguf")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args,needle", [
    (["--format", "gguf", "--out", "{tmp}"], "is a directory"),
    (["--format", "gguf", "--out", "{tmp}/m.bin"], "ends in .gguf"),
    (["--format", "gguf", "--out", "{tmp}/m.gguf", "--dtype", "float16"], "--dtype is for --format dir"),
    (["--outtype", "q8_0", "--out", "{tmp}/d"], "--outtype is for --format gguf"),
    (["--format", "gguf", "--outtype", "q4_0", "--out", "{tmp}/m.gguf"], "q4_0"),
])
def test_prune_refuses_bad_gguf_output(run_cli, tmp_path, args, needle):
    res = run_cli("--db", tmp_path / "a.db", "prune", "--model", tmp_path / "nowhere", "--arch", "full",
                  *[a.format(tmp=tmp_path) for a in args])
    assert res.code != 0
    assert needle in res.err and len(res.err_lines) == 1, res.err
    assert not list(tmp_path.glob("*.gguf")) and not (tmp_path / "d").exists()


def test_runtime_keeps_old_protocol_keys():
    base = Protocol(dataset="wikitext-2-raw-v1", split="test", seq_len=128, tokens=8192)
    assert "runtime" not in base.to_dict()
    lcpp = Protocol(dataset="wikitext-2-raw-v1", split="test", seq_len=128, tokens=8192, runtime="llama.cpp",
                    precision="q8_0")
    assert lcpp.key() != base.key() and lcpp.to_dict()["runtime"] == "llama.cpp"
    assert Protocol.from_dict(lcpp.to_dict()) == lcpp and Protocol.from_dict(lcpp.to_dict()).key() == lcpp.key()
    assert lcpp.describe().endswith("llama.cpp/q8_0")
    assert not lcpp.is_cheaper_fidelity_of(Protocol(dataset="wikitext-2-raw-v1", split="test", seq_len=128,
                                                    tokens=16384))


@needs_llama_cpp
def test_evaluate_runtime_llama_cpp_stores_its_protocol(run_cli, tmp_path, monkeypatch):
    monkeypatch.setenv("ARCHOPT_CACHE", str(tmp_path / "cache"))
    base_dir = tm.save_tiny("llama_gqa_odd", tmp_path / "tiny")
    data = tm.write_local_data(tmp_path / "data")
    db = tmp_path / "a.db"
    gguf_file = tmp_path / "p.gguf"
    res = run_cli("--db", db, "prune", "--model", base_dir, "--arch", "6/2/40,-,9/3/24", "--importance", "l2",
                  "--format", "gguf", "--out", gguf_file, "--outtype", "f32")
    assert res.code == 0, res.err
    res = run_cli("--db", db, "evaluate", "--model", base_dir, "--runtime", "llama.cpp", "--gguf", gguf_file,
                  "--metrics", "ppl_wikitext2", "--data-dir", data, "--seq-len", "32", "--threads", "2")
    assert res.code == 0, res.err
    # the same architecture measured by archopt in transformers: the values agree, protocols differ
    res2 = run_cli("--db", db, "evaluate", "--model", base_dir, "--no-base", "--arch", "6/2/40,-,9/3/24",
                   "--importance", "l2", "--metrics", "ppl_wikitext2", "--data-dir", data, "--seq-len", "32",
                   "--device", "cpu")
    assert res2.code == 0, res2.err
    res = run_cli("--db", db, "export", "--format", "jsonl")
    lines = [json.loads(line) for line in res.out.splitlines() if line.strip()]
    evs = [ev for rec in lines for ev in rec.get("evaluations", [])]
    by_runtime = {ev["protocol"].get("runtime", "transformers"): ev for ev in evs}
    assert set(by_runtime) == {"transformers", "llama.cpp"}
    lcpp = by_runtime["llama.cpp"]
    assert "precision" not in lcpp["protocol"]  # float32, the default, is left out of the key
    assert "llama-cpp-python" in lcpp["protocol"]["extra"]["runtime_version"]
    assert lcpp["value"] == pytest.approx(by_runtime["transformers"]["value"], rel=1e-4)
    # the export round-trips (JSONL and CSV) into a fresh archive with the runtime kept
    for fmt in ("jsonl", "csv"):
        dump = tmp_path / f"dump.{fmt}"
        assert run_cli("--db", db, "export", "--format", fmt, "-o", dump).code == 0
        fresh = tmp_path / f"fresh-{fmt}.db"
        assert run_cli("--db", fresh, "ingest", dump).code == 0
        again = run_cli("--db", fresh, "export", "--format", "jsonl").out
        assert again == run_cli("--db", db, "export", "--format", "jsonl").out
