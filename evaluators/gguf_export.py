"""Write a pruned model directory (``archopt prune``'s format) as one GGUF file that llama.cpp runs.

Layout: llama.cpp's ``deci`` architecture (the one NVIDIA's Puzzletron / Nemotron-51B models use),
because it is the llama.cpp graph whose layers may each have their own shape: it reads per-layer
arrays ``deci.attention.head_count``, ``deci.attention.head_count_kv`` and ``deci.feed_forward_length``
(``llama_hparams::n_head(il)``, ``n_head_kv(il)``, ``n_ff(il)``), creates each layer's tensors with
those sizes and builds each layer's attention with its own head counts. The stock ``llama``
architecture reads the same arrays but builds every layer with layer 0's head count, so it cannot
hold archopt's per-layer query heads. Otherwise ``deci`` is the Llama graph: RMSNorm, RoPE
(llama.cpp's "normal" rope: q/k rows are permuted per head as convert_hf_to_gguf.py does), SwiGLU,
optional q/k/v/o and MLP biases, optional ``output.weight`` (absent: tied to ``token_embd``).

Mapping (checked against the llama.cpp bundled with llama-cpp-python 0.3.36):

- dropped layers are left out (``block_count`` counts kept layers); every kept layer has at least
  one KV group and ``q_heads / kv_heads`` query heads per KV head;
- ``key_length`` / ``value_length`` / ``rope.dimension_count`` = the base ``head_dim`` (written
  explicitly: llama.cpp's default ``n_embd / n_head(0)`` is wrong once layer 0 is pruned);
- RoPE: ``rope_theta``, and ``linear``, ``yarn`` (factor and original context) and ``llama3``
  (a ``rope_freqs`` tensor, as convert_hf_to_gguf.py writes it) scaling; other scaling types and
  partial rotary are refused;
- not carried: Mistral's ``sliding_window`` (llama.cpp's own Llama/Mistral conversion drops it too);
- the tokenizer: byte-level BPE (``tokenizer.ggml.model = gpt2`` with merges; pre-tokenizer
  ``gpt-2``, ``llama-bpe``, ``qwen2`` or ``smollm`` recognised from ``tokenizer.json``) or
  SentencePiece-style BPE with byte fallback (``llama``; scores from the merge ranks); the vocabulary
  is padded with unused ``[PAD{i}]`` tokens up to the embedding rows;
- ``archopt.*`` keys carry ``archopt.json``'s provenance (base model, architecture id, the exact
  per-layer encoding, parameter count, importance and calibration) and the out type.

The file is written to a temporary name beside ``out`` and renamed when complete.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

ARCH = "deci"
OUTTYPES = ("f32", "f16", "bf16", "q8_0")
DEFAULT_OUTTYPE = "f16"
WEIGHTS_FILE = "model.safetensors"
INFO_FILE = "archopt.json"
SCHEMA = "archopt.gguf/1"

# regexes of tokenizer.json Split pre-tokenizers -> llama.cpp's pre-tokenizer names (src/llama-vocab.cpp)
_LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_SPLIT_PRE = {_LLAMA3_REGEX: "llama-bpe", _QWEN2_REGEX: "qwen2"}


class GgufExportError(ValueError):
    """The directory cannot be written as a GGUF llama.cpp runs (one line: what and why)."""


@dataclass
class GgufReport:
    """What was written: path, out type, layer shapes, tensor count and notes (what did not map)."""

    path: Path
    outtype: str
    layers: list[dict[str, int]]
    tensors: int
    bytes: int
    tokenizer: str
    notes: list[str] = field(default_factory=list)


def _gguf() -> Any:
    try:
        import gguf
    except ImportError:  # pragma: no cover - a dependency of archopt
        raise GgufExportError("--format gguf needs the gguf package: pip install gguf") from None
    return gguf


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise GgufExportError(f"{path.parent}: no {path.name}; not a pruned directory written by archopt prune") from None


# --- configuration --------------------------------------------------------------------------------
def layer_shapes(config: Mapping[str, Any]) -> list[dict[str, int]]:
    """Per kept layer ``{"q_heads", "kv_heads", "intermediate"}`` (archopt_layers, else the uniform config)."""
    recorded = config.get("archopt_layers")
    if recorded:
        shapes = [{"q_heads": int(s["q_heads"]), "kv_heads": int(s["kv_heads"]),
                   "intermediate": int(s["intermediate"])} for s in recorded]
    else:
        heads = int(config["num_attention_heads"])
        shapes = [{"q_heads": heads, "kv_heads": int(config.get("num_key_value_heads") or heads),
                   "intermediate": int(config["intermediate_size"])}
                  for _ in range(int(config["num_hidden_layers"]))]
    for i, s in enumerate(shapes):
        if s["kv_heads"] < 1 or s["q_heads"] < 1 or s["intermediate"] < 1:
            raise GgufExportError(f"layer {i} keeps no attention or no MLP ({s}): llama.cpp's deci layout "
                                  "needs at least one KV group and one channel per kept layer")
        if s["q_heads"] % s["kv_heads"]:
            raise GgufExportError(f"layer {i}: {s['q_heads']} query heads do not split into {s['kv_heads']} KV "
                                  "groups (llama.cpp needs a whole number of query heads per KV head)")
    return shapes


def _head_dim(config: Mapping[str, Any]) -> int:
    return int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])


def _rope(config: Mapping[str, Any]) -> dict[str, Any]:
    """RoPE parameters (transformers 5 ``rope_parameters``, else ``rope_theta`` + ``rope_scaling``)."""
    params = dict(config.get("rope_parameters") or {})
    if "full_attention" in params and isinstance(params["full_attention"], Mapping):
        params = dict(params["full_attention"])
    if not params:
        params = dict(config.get("rope_scaling") or {})
        params.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    params.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    kind = str(params.get("rope_type") or params.get("type") or "default").lower()
    params["rope_type"] = kind
    if kind not in ("default", "linear", "yarn", "llama3"):
        raise GgufExportError(f"RoPE scaling {kind!r} has no GGUF export here (supported: none, linear, yarn, "
                              "llama3)")
    partial = config.get("partial_rotary_factor")
    if partial not in (None, 1, 1.0):
        raise GgufExportError(f"partial_rotary_factor {partial}: llama.cpp's deci layout rotates whole heads")
    return params


def _llama3_rope_factors(params: Mapping[str, Any], dim: int) -> np.ndarray:
    """The ``rope_freqs`` tensor of Llama 3 scaling (as convert_hf_to_gguf.py's DeciModel writes it)."""
    base = float(params.get("rope_theta", 10000.0))
    freqs = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    factor = float(params.get("factor", 8.0))
    low, high = float(params.get("low_freq_factor", 1.0)), float(params.get("high_freq_factor", 4.0))
    old_ctx = float(params.get("original_max_position_embeddings", 8192))
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


# --- tokenizer ------------------------------------------------------------------------------------
def _pre_tokenizer(tok: Mapping[str, Any]) -> str:
    """llama.cpp's name for a byte-level BPE pre-tokenizer, read from its structure in tokenizer.json."""
    pre = tok.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in parts]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits") and parts[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not parts[1].get("use_regex", True):
        regex = (parts[0].get("pattern") or {}).get("Regex")
        if regex in _SPLIT_PRE:
            return _SPLIT_PRE[regex]
    raise GgufExportError(f"byte-level BPE pre-tokenizer {json.dumps(pre)[:120]} is not one archopt maps to "
                          "llama.cpp (gpt-2, llama-bpe, qwen2, smollm)")


def _merge_strings(merges: list[Any]) -> list[str]:
    out = []
    for m in merges:
        if isinstance(m, str):
            out.append(m)
        else:  # [a, b] (tokenizers >= 0.20); spaces inside parts are encoded as gguf's SpecialVocab does
            out.append(" ".join("".join(chr(ord(c) + 256) if c == " " else c for c in part) for part in m))
    return out


def write_tokenizer(writer: Any, directory: Path, n_vocab: int) -> str:
    """Add the directory's tokenizer to ``writer``; returns the tokenizer model name written."""
    gguf = _gguf()
    path = directory / "tokenizer.json"
    if not path.is_file():
        raise GgufExportError(f"{directory}: no tokenizer.json (a fast tokenizer is needed for the GGUF vocabulary)")
    tok = json.loads(path.read_text(encoding="utf-8"))
    model = tok.get("model") or {}
    if model.get("type") != "BPE":
        raise GgufExportError(f"tokenizer model {model.get('type')!r}: archopt writes BPE tokenizers to GGUF only")
    vocab: dict[str, int] = dict(model.get("vocab") or {})
    added = {int(a["id"]): a for a in tok.get("added_tokens", [])}
    size = max([*vocab.values(), *added.keys(), -1]) + 1
    if size > n_vocab:
        raise GgufExportError(f"the tokenizer has {size} tokens, the embedding only {n_vocab} rows")
    reverse = {i: t for t, i in vocab.items()}
    tokens: list[str] = []
    types: list[int] = []
    T = gguf.TokenType
    for i in range(n_vocab):
        if i in added:
            tokens.append(added[i]["content"])
            types.append(T.CONTROL if added[i].get("special") else T.USER_DEFINED)
        elif i in reverse:
            tokens.append(reverse[i])
            types.append(T.BYTE if re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", reverse[i]) and model.get("byte_fallback")
                         else T.NORMAL)
        else:
            tokens.append(f"[PAD{i}]")
            types.append(T.UNUSED)
    merges = _merge_strings(list(model.get("merges") or []))
    if model.get("byte_fallback"):
        # SentencePiece-style BPE: llama.cpp's SPM tokenizer merges the bigram whose result scores
        # highest; score = -(rank of the merge that makes the token) reproduces the BPE merge order.
        scores = [0.0] * n_vocab
        for rank, merge in enumerate(merges):
            a, _, b = merge.partition(" ")
            tid = vocab.get(a + b)
            if tid is not None and scores[tid] == 0.0:
                scores[tid] = -float(rank + 1)
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        special = gguf.SpecialVocab(directory, load_merges=False, n_vocab=n_vocab)
        name = "llama"
    else:
        decoder = (tok.get("decoder") or {}).get("type")
        if decoder != "ByteLevel":
            raise GgufExportError(f"BPE tokenizer with decoder {decoder!r}: neither byte-level (gpt2) nor "
                                  "SentencePiece-style (byte fallback)")
        pre = _pre_tokenizer(tok)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        special = gguf.SpecialVocab(directory, load_merges=True, n_vocab=n_vocab)
        name = f"gpt2/{pre}"
    special.add_to_gguf(writer, quiet=True)
    return name


# --- tensors --------------------------------------------------------------------------------------
def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF's rotate-half q/k rows -> llama.cpp's interleaved ("normal") RoPE layout, head by head."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def _encode(gguf: Any, data: np.ndarray, outtype: str) -> tuple[np.ndarray, Any]:
    """Tensor data and its GGML type: 1-D tensors stay f32; q8_0 rows not divisible by 32 fall back to f16."""
    Q = gguf.GGMLQuantizationType
    data = np.ascontiguousarray(data, dtype=np.float32)
    if data.ndim < 2 or outtype == "f32":
        return data, Q.F32
    if outtype == "f16":
        return data.astype(np.float16), Q.F16
    qtype = Q.BF16 if outtype == "bf16" else Q.Q8_0
    try:
        return gguf.quants.quantize(data, qtype), qtype
    except gguf.quants.QuantError:
        return data.astype(np.float16), Q.F16


def _file_type(gguf: Any, outtype: str) -> int:
    F = gguf.LlamaFileType
    return int({"f32": F.ALL_F32, "f16": F.MOSTLY_F16, "bf16": F.MOSTLY_BF16, "q8_0": F.MOSTLY_Q8_0}[outtype])


@contextmanager
def _quiet_gguf() -> Iterator[None]:
    logger = logging.getLogger("gguf")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _provenance(writer: Any, info: Mapping[str, Any], outtype: str) -> None:
    """``archopt.*`` keys: what the file was pruned from and how (archopt.json, whole, in ``archopt.info``)."""
    base = info.get("base") or {}
    importance = info.get("importance") or {}
    writer.add_string("archopt.schema", SCHEMA)
    writer.add_string("archopt.base_model", str(base.get("name", "")))
    writer.add_string("archopt.base_config_hash", str(base.get("config_hash", "")))
    writer.add_string("archopt.arch_id", str(info.get("arch_id", "")))
    writer.add_string("archopt.architecture", json.dumps(info.get("architecture", []), separators=(",", ":")))
    writer.add_uint64("archopt.params", int(info.get("params") or 0))
    writer.add_string("archopt.importance", str(importance.get("criterion") or ""))
    writer.add_string("archopt.calibration", str(importance.get("calibration") or ""))
    writer.add_string("archopt.outtype", outtype)
    writer.add_string("archopt.tool_version", str(info.get("tool_version", "")))
    writer.add_string("archopt.info", json.dumps(info, sort_keys=True, separators=(",", ":")))


def export_gguf(directory: str | Path, out: str | Path, outtype: str = DEFAULT_OUTTYPE) -> GgufReport:
    """Write the pruned model in ``directory`` (``archopt prune``'s format) to the GGUF file ``out``."""
    from safetensors import safe_open

    gguf = _gguf()
    directory, out = Path(directory), Path(out)
    if outtype not in OUTTYPES:
        raise GgufExportError(f"--outtype {outtype!r}: choose one of {', '.join(OUTTYPES)}")
    if out.is_dir():
        raise GgufExportError(f"--out {out} is a directory; --format gguf writes one file (e.g. {out}/model.gguf)")
    config = _read_json(directory / "config.json")
    info = _read_json(directory / INFO_FILE) if (directory / INFO_FILE).is_file() else {}
    family = str(config.get("archopt_base_model_type") or config.get("model_type", "")).removeprefix("archopt_")
    if family not in ("llama", "mistral", "qwen2"):
        raise GgufExportError(f"model type {config.get('model_type')!r}: GGUF export covers Llama, Mistral and Qwen2")
    if str(config.get("hidden_act", "silu")) != "silu":
        raise GgufExportError(f"hidden_act {config.get('hidden_act')!r}: llama.cpp's deci layout uses SiLU")
    shapes = layer_shapes(config)
    head_dim, hidden = _head_dim(config), int(config["hidden_size"])
    rope = _rope(config)
    notes: list[str] = []
    window = config.get("sliding_window")
    if window and (family == "mistral" or config.get("use_sliding_window")):
        notes.append(f"sliding_window {window} is not carried: llama.cpp attends over the whole context")
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise GgufExportError(f"{directory}: no {WEIGHTS_FILE}")

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    writer = gguf.GGUFWriter(str(tmp), ARCH, use_temp_file=True)  # tensors spill to disk as they are added
    n_tensors = 0
    try:
        with _quiet_gguf(), safe_open(str(weights), framework="pt") as f:
            names = set(f.keys())

            def get(name: str) -> np.ndarray:
                return f.get_tensor(name).float().numpy()

            def put(name: str, data: np.ndarray) -> None:
                nonlocal n_tensors
                encoded, qtype = _encode(gguf, data, outtype)
                writer.add_tensor(name, encoded, raw_dtype=qtype)
                n_tensors += 1

            embed = get("model.embed_tokens.weight")
            n_vocab = embed.shape[0]
            name = info.get("base", {}).get("name") or directory.name
            writer.add_name(f"{name} pruned by archopt ({info.get('compact') or 'full'})"[:200])
            writer.add_type(gguf.GGUFType.MODEL)
            writer.add_block_count(len(shapes))
            writer.add_context_length(int(config.get("max_position_embeddings", 2048)))
            writer.add_embedding_length(hidden)
            writer.add_feed_forward_length([s["intermediate"] for s in shapes])
            writer.add_head_count([s["q_heads"] for s in shapes])
            writer.add_head_count_kv([s["kv_heads"] for s in shapes])
            writer.add_key_length(head_dim)
            writer.add_value_length(head_dim)
            writer.add_rope_dimension_count(head_dim)
            writer.add_rope_freq_base(float(rope["rope_theta"]))
            if rope["rope_type"] == "linear":
                writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
                writer.add_rope_scaling_factor(float(rope["factor"]))
            elif rope["rope_type"] == "yarn":
                writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
                writer.add_rope_scaling_factor(float(rope["factor"]))
                writer.add_rope_scaling_orig_ctx_len(int(rope.get("original_max_position_embeddings")
                                                         or config.get("max_position_embeddings", 2048)))
            writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
            writer.add_vocab_size(n_vocab)
            writer.add_file_type(_file_type(gguf, outtype))
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
            _provenance(writer, info, outtype)
            tokenizer = write_tokenizer(writer, directory, n_vocab)

            put("token_embd.weight", embed)
            put("output_norm.weight", get("model.norm.weight"))
            if "lm_head.weight" in names:
                put("output.weight", get("lm_head.weight"))
            if rope["rope_type"] == "llama3":
                put("rope_freqs.weight", _llama3_rope_factors(rope, head_dim))
            for i, s in enumerate(shapes):
                p = f"model.layers.{i}."
                blk = f"blk.{i}."
                put(blk + "attn_norm.weight", get(p + "input_layernorm.weight"))
                put(blk + "ffn_norm.weight", get(p + "post_attention_layernorm.weight"))
                for hf, gg, heads in (("q_proj", "attn_q", s["q_heads"]), ("k_proj", "attn_k", s["kv_heads"]),
                                      ("v_proj", "attn_v", None), ("o_proj", "attn_output", None)):
                    for kind in ("weight", "bias"):
                        key = f"{p}self_attn.{hf}.{kind}"
                        if key not in names:
                            if kind == "weight":
                                raise GgufExportError(f"{weights} lacks {key}")
                            continue
                        data = get(key)
                        if heads is not None:
                            data = _permute(data, heads)
                        put(f"{blk}{gg}.{kind}", data)
                for hf, gg in (("gate_proj", "ffn_gate"), ("up_proj", "ffn_up"), ("down_proj", "ffn_down")):
                    for kind in ("weight", "bias"):
                        key = f"{p}mlp.{hf}.{kind}"
                        if key in names:
                            put(f"{blk}{gg}.{kind}", get(key))
                q_rows = f.get_slice(p + "self_attn.q_proj.weight").get_shape()[0]
                inter = f.get_slice(p + "mlp.gate_proj.weight").get_shape()[0]
                if q_rows != s["q_heads"] * head_dim or inter != s["intermediate"]:
                    raise GgufExportError(f"layer {i}: weights ({q_rows // head_dim} query heads, {inter} channels) "
                                          f"do not match config.json ({s})")
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return GgufReport(path=out, outtype=outtype, layers=shapes, tensors=n_tensors, bytes=out.stat().st_size,
                      tokenizer=tokenizer, notes=notes)


def read_gguf_provenance(path: str | Path) -> dict[str, Any]:
    """The ``archopt.*`` keys of a GGUF written by :func:`export_gguf` (``archopt.info`` parsed)."""
    gguf = _gguf()
    reader = gguf.GGUFReader(str(path))
    out: dict[str, Any] = {}
    for key, fld in reader.fields.items():
        if not key.startswith("archopt."):
            continue
        value = fld.contents()
        out[key.removeprefix("archopt.")] = value
    if isinstance(out.get("info"), str):
        out["info"] = json.loads(out["info"])
    if not out:
        raise GgufExportError(f"{path}: no archopt provenance keys (not written by archopt prune --format gguf)")
    return out
