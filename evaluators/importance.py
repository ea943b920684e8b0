"""Per-layer importance of every KV group and every MLP channel, cached on disk by a descriptive key.

Units scored (per decoder layer):

- a KV group: its K and V heads with all its query heads, i.e. the group's rows of q/k/v_proj (and
  their biases) and the matching columns of o_proj;
- an MLP channel: its rows of gate_proj and up_proj (and biases) and its column of down_proj.

Criteria (summed over those parameters):

- ``taylor``: LLM-Pruner's ``param_first``, ``|w * dL/dw|`` with the gradient of the LM loss (mean over
  the calibration tokens) accumulated over ``samples`` windows of ``seq_len`` tokens drawn with
  ``seed`` from a calibration text. Computed in float32, one decoder layer at a time, each
  gradient folded into the scores as soon as it is complete (``taylor_scores``): the pass needs
  the weights plus about one projection's gradient.
- ``l2``: the squared magnitude ``w ** 2`` (torch-pruning's ``MagnitudeImportance(p=2)``), data free.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from archopt.archdb.arch import Architecture, BaseSpec

from .cache import cached_entries, calibration_label
from .loading import BaseModel, activation_budget, model_device, release_memory
from .tokenization import encode_text, text_sha256, tokenizer_hash

CRITERIA = ("taylor", "l2")
KEY_VERSION = 1
MAX_CALIBRATION_CHARS = 2_000_000


@dataclass
class Importance:
    """Scores of one base model: ``kv_group`` [layers, kv heads] and ``channel`` [layers, intermediate]."""

    key: str
    criterion: str
    kv_group: np.ndarray
    channel: np.ndarray
    config_hash: str = ""
    calibration: dict[str, Any] | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    # ----- what pruning keeps -------------------------------------------------------------------
    def kept_kv_groups(self, layer: int, count: int) -> np.ndarray:
        """Indices (sorted) of the ``count`` highest-scoring KV groups of ``layer``; ties keep lower indices."""
        return _top_sorted(self.kv_group[layer], count)

    def kept_channels(self, layer: int, count: int) -> np.ndarray:
        """Indices (sorted) of the ``count`` highest-scoring MLP channels of ``layer``."""
        return _top_sorted(self.channel[layer], count)

    # ----- totals and removed shares, for predictor features ------------------------------------
    def attention_totals(self) -> np.ndarray:
        return self.kv_group.sum(axis=1)

    def mlp_totals(self) -> np.ndarray:
        return self.channel.sum(axis=1)

    def layer_totals(self) -> np.ndarray:
        """Total importance of each layer (attention plus MLP)."""
        return self.attention_totals() + self.mlp_totals()

    def kept_curves(self) -> tuple[np.ndarray, np.ndarray]:
        """Importance kept when keeping the top ``k`` units, for every ``k``: attention [L, kv + 1], MLP [L, I + 1].

        ``curve[l, k]`` is the sum of the ``k`` highest scores of layer ``l`` (what pruning keeps), so
        removed shares of many architectures are array look-ups.
        """
        def curve(scores: np.ndarray) -> np.ndarray:
            top = np.cumsum(-np.sort(-scores, axis=1), axis=1)
            return np.concatenate([np.zeros((scores.shape[0], 1)), top], axis=1)

        return curve(self.kv_group), curve(self.channel)

    def removed_share_batch(self, kv_heads: np.ndarray, intermediate: np.ndarray, dropped: np.ndarray,
                            part: str = "layer") -> np.ndarray:
        """Vectorised ``removed_share`` for N architectures given as [N, L] arrays of kept KV heads,
        kept channels and dropped flags; returns [N, L]."""
        if part not in ("attention", "mlp", "layer"):
            raise ValueError(f"part must be attention, mlp or layer, got {part!r}")
        attn_curve, mlp_curve = self.kept_curves()
        rows = np.arange(attn_curve.shape[0])[None, :]
        kv = np.asarray(kv_heads, dtype=np.int64)
        inter = np.asarray(intermediate, dtype=np.int64)
        attn_kept, mlp_kept = attn_curve[rows, kv], mlp_curve[rows, inter]
        attn_total, mlp_total = attn_curve[:, -1][None, :], mlp_curve[:, -1][None, :]
        if part == "attention":
            kept, total = attn_kept, attn_total
        elif part == "mlp":
            kept, total = mlp_kept, mlp_total
        else:
            kept, total = attn_kept + mlp_kept, attn_total + mlp_total
        with np.errstate(divide="ignore", invalid="ignore"):
            share = np.where(total > 0, 1.0 - kept / total, 0.0)
        return np.where(np.asarray(dropped, dtype=bool), 1.0, np.clip(share, 0.0, 1.0))

    def removed_share(self, arch: Architecture, part: str = "layer") -> np.ndarray:
        """Per layer, the share of its importance that ``arch`` removes (1.0 for a dropped layer).

        ``part``: ``attention``, ``mlp`` or ``layer`` (both together).
        """
        self.check_spec(arch.spec)
        kv = np.array([[0 if l.dropped else l.kv_heads for l in arch.layers]])
        inter = np.array([[0 if l.dropped else l.intermediate for l in arch.layers]])
        dropped = np.array([[l.dropped for l in arch.layers]])
        return self.removed_share_batch(kv, inter, dropped, part)[0]

    def check_spec(self, spec: BaseSpec) -> None:
        want = ((spec.num_layers, spec.num_kv_heads), (spec.num_layers, spec.intermediate_size))
        if (self.kv_group.shape, self.channel.shape) != want:
            raise ValueError(f"importance shapes {self.kv_group.shape}/{self.channel.shape} do not fit the "
                             f"base model ({want[0]}/{want[1]})")

    def calibration_label(self) -> str | None:
        """One-line calibration description (``None`` for data-free criteria), as the archive stores it."""
        return calibration_label(self.calibration)

    def info(self) -> dict[str, Any]:
        """JSON-ready summary for saved models and the archive."""
        return {"key": self.key, "criterion": self.criterion, "config_hash": self.config_hash,
                "calibration": self.calibration, "calibration_label": self.calibration_label()}

    # ----- disk ---------------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """Write an ``.npz`` atomically (arrays plus the metadata as JSON text)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"key": self.key, "criterion": self.criterion, "config_hash": self.config_hash,
                "calibration": self.calibration, "meta": self.meta}
        tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npz")
        np.savez(tmp, kv_group=self.kv_group, channel=self.channel, meta=np.array(json.dumps(meta)))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | Path) -> "Importance":
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(str(data["meta"]))
            return cls(key=meta["key"], criterion=meta["criterion"], kv_group=data["kv_group"].copy(),
                       channel=data["channel"].copy(), config_hash=meta.get("config_hash", ""),
                       calibration=meta.get("calibration"), meta=meta.get("meta", {}))


def _top_sorted(scores: np.ndarray, count: int) -> np.ndarray:
    if not 0 < count <= len(scores):
        raise ValueError(f"cannot keep {count} of {len(scores)} units")
    order = np.argsort(-scores, kind="stable")
    return np.sort(order[:count])


def importance_key(base: BaseModel, criterion: str, calibration: dict[str, Any] | None,
                   fingerprint: str | None = None) -> str:
    """sha256 of (config hash, weights fingerprint, criterion, calibration spec); ``fingerprint``:
    ``base.weights_fingerprint()`` when already computed."""
    payload = {"v": KEY_VERSION, "config_hash": base.config_hash,
               "weights": fingerprint or base.weights_fingerprint(), "criterion": criterion, "calibration": calibration}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def find_cached(base: BaseModel, criterion: str, cache_dir: str | Path, *, samples: int = 10, seq_len: int = 64,
                seed: int = 0, name: str | None = None, label: str | None = None) -> Importance | None:
    """The cached importance of ``base`` by ``criterion``, found without its calibration text.

    A cached file is ``base``'s when its key, recomputed from ``base`` (config, weights) and the
    calibration recorded in the file, is the file's own key. ``label`` (the calibration label the
    archive recorded for an architecture) picks the calibration; without it the calibration must
    have ``samples`` windows of ``seq_len`` tokens drawn with ``seed`` from text ``name`` (default:
    the default calibration text). None when no file, or more than one calibration text, fits.
    """
    from .data import CALIBRATION_NAME
    fingerprint: str | None = None
    found: list[Path] = []
    for file, meta in cached_entries(cache_dir, criterion, base.config_hash):
        calibration = meta.get("calibration")
        if not isinstance(calibration, dict):
            continue
        if label is not None and calibration_label(calibration) != label:
            continue
        if label is None and ((calibration.get("samples"), calibration.get("seq_len"), calibration.get("seed"),
                               calibration.get("name")) != (samples, seq_len, seed, name or CALIBRATION_NAME)):
            continue
        fingerprint = fingerprint or base.weights_fingerprint()
        if importance_key(base, criterion, calibration, fingerprint) == meta["key"]:
            found.append(file)
    return Importance.load(found[0]) if len(found) == 1 else None


def compute_importance(base: BaseModel, criterion: str = "taylor", calibration_text: str | None = None,
                       samples: int = 10, seq_len: int = 64, seed: int = 0,
                       cache_dir: str | Path | None = None, *, calibration_name: str | None = None,
                       data_dir: str | Path | None = None, batch_size: int | None = None,
                       calibration_label: str | None = None, memory_budget: int | None = None) -> Importance:
    """Importance of ``base`` by ``criterion`` (``taylor`` or ``l2``), read from ``cache_dir/<key>.npz`` if there.

    ``taylor`` without ``calibration_text`` uses PTB train (``data.calibration_text``, from ``data_dir``
    or ``datasets``). Without ``data_dir`` either, a cached importance of this model with this
    calibration (``find_cached``; ``calibration_label`` names the calibration) is used without
    reading any text: the text is needed only when the cache lacks it. Only the first 2,000,000
    characters of a calibration text are tokenized. Without ``cache_dir`` nothing is cached.
    ``batch_size`` and ``memory_budget`` (bytes of activations) size the Taylor pass's chunks
    (``taylor_scores``); they do not change the scores beyond float rounding.
    """
    if criterion not in CRITERIA:
        raise ValueError(f"unknown importance criterion {criterion!r}: use {' or '.join(CRITERIA)}")
    calibration: dict[str, Any] | None = None
    if criterion == "taylor":
        if calibration_text is None and data_dir is None and cache_dir is not None:
            cached = find_cached(base, criterion, cache_dir, samples=samples, seq_len=seq_len, seed=seed,
                                 name=calibration_name, label=calibration_label)
            if cached is not None:
                return cached
        if calibration_text is None:
            from .data import calibration_text as default_calibration
            from .hub import SourceError

            try:
                calibration_text, default_name = default_calibration(data_dir)
            except SourceError as exc:
                raise SourceError(f"taylor importance of {base.name} is not cached here ({cache_dir or 'no cache'}) "
                                  f"and needs its calibration text: {exc}") from None
            calibration_name = calibration_name or default_name
        calibration = {"name": calibration_name or "text", "text_sha256": text_sha256(calibration_text),
                       "samples": int(samples), "seq_len": int(seq_len), "seed": int(seed),
                       "tokenizer_hash": tokenizer_hash(base.tokenizer)}
    key = importance_key(base, criterion, calibration)
    cache_file = Path(cache_dir) / f"{key}.npz" if cache_dir is not None else None
    if cache_file is not None and cache_file.is_file():
        return Importance.load(cache_file)

    if criterion == "taylor":
        assert calibration_text is not None
        batch = calibration_batch(base.tokenizer, calibration_text, samples, seq_len, seed)
        kv, ch = taylor_scores(base.model, base.spec, batch, batch_size=batch_size, memory_budget=memory_budget)
    else:
        kv, ch = l2_scores(base.model, base.spec)
    result = Importance(key=key, criterion=criterion, kv_group=kv, channel=ch,
                        config_hash=base.config_hash, calibration=calibration)
    if cache_file is not None:
        result.save(cache_file)
    return result


def calibration_batch(tokenizer: Any, text: str, samples: int, seq_len: int, seed: int) -> torch.Tensor:
    """``samples`` windows of ``seq_len`` tokens at start offsets drawn with ``numpy`` ``default_rng(seed)``."""
    if samples < 1 or seq_len < 2:
        raise ValueError("calibration needs at least 1 sample of at least 2 tokens")
    ids = encode_text(tokenizer, text[:MAX_CALIBRATION_CHARS], add_special_tokens=False)
    if ids.numel() < seq_len:
        raise ValueError(f"calibration text has {ids.numel()} tokens, fewer than seq_len={seq_len}")
    starts = np.random.default_rng(seed).integers(0, ids.numel() - seq_len + 1, size=samples)
    return torch.stack([ids[s: s + seq_len] for s in starts.tolist()])


# ----- scoring ------------------------------------------------------------------------------------

def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The ModuleList of decoder layers of a Llama-layout causal LM."""
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise TypeError(f"{type(model).__name__} has no decoder layers at .model.layers")
    return layers


def _prunable_params(layer: torch.nn.Module) -> Iterator[torch.nn.Parameter]:
    attn, mlp = layer.self_attn, layer.mlp
    for lin in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj):
        yield lin.weight
        if lin.bias is not None:
            yield lin.bias


def _layer_group_scores(layer: torch.nn.Module, spec: BaseSpec,
                        score: Callable[[torch.Tensor], torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
    """Reduce element scores of one layer's prunable tensors to [kv groups] and [channels]."""
    attn, mlp = layer.self_attn, layer.mlp
    kv, d = spec.num_kv_heads, spec.head_dim

    def rows(lin: torch.nn.Linear) -> torch.Tensor:
        s = score(lin.weight).sum(dim=1)
        return s + score(lin.bias) if lin.bias is not None else s

    groups = rows(attn.q_proj).reshape(kv, -1).sum(1)
    groups = groups + rows(attn.k_proj).reshape(kv, d).sum(1) + rows(attn.v_proj).reshape(kv, d).sum(1)
    groups = groups + score(attn.o_proj.weight).sum(dim=0).reshape(kv, -1).sum(1)
    channels = rows(mlp.gate_proj) + rows(mlp.up_proj) + score(mlp.down_proj.weight).sum(dim=0)
    return (groups.double().cpu().numpy(), channels.double().cpu().numpy())


def _stack_scores(model: torch.nn.Module, spec: BaseSpec,
                  score: Callable[[torch.Tensor], torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
    kv_rows, ch_rows = [], []
    for layer in decoder_layers(model):
        g, c = _layer_group_scores(layer, spec, score)
        kv_rows.append(g)
        ch_rows.append(c)
    return np.stack(kv_rows), np.stack(ch_rows)


@torch.no_grad()
def l2_scores(model: torch.nn.Module, spec: BaseSpec) -> tuple[np.ndarray, np.ndarray]:
    """Squared-magnitude scores (data free)."""
    return _stack_scores(model, spec, lambda t: t.detach().float().pow(2))


def taylor_scores(model: torch.nn.Module, spec: BaseSpec, batch: torch.Tensor,
                  batch_size: int | None = None, *, memory_budget: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """First-order Taylor scores ``|w * dL/dw|``, ``dL/dw`` the gradient of the mean LM loss over ``batch``.

    Memory is the weights plus about one projection's gradient, whatever the model's depth:

    - a no-grad forward records each decoder layer's input (``batch`` tokens x hidden per layer) and
      call arguments (rotary embeddings, mask);
    - the gradient then flows back one decoder layer at a time: the layer is run again on its
      recorded input and back-propagated with the gradient of its output, giving the gradient of
      its input for the layer below (activation checkpointing at layer granularity);
    - a post-accumulate-grad hook on every scored projection folds ``|w * dL/dw|`` into the KV-group
      and channel scores (float32 products, float64 sums) once the parameter's gradient is complete,
      then frees that gradient.

    The pass computes in float32 whatever the weights' dtype: a bfloat16 model has one decoder layer
    (and the lm_head) upcast at a time, so the scores are those of the float32 model. ``batch_size``:
    windows per chunk (default: all at once when their activations fit ``memory_budget`` bytes,
    default ``loading.activation_budget(model)``; more chunks accumulate one layer's gradients). The model's
    weights, ``requires_grad`` flags and eval mode are as before afterwards, with no gradient left.
    """
    layers = decoder_layers(model)
    inner = getattr(model, "model", model)
    head = model.get_output_embeddings()
    norm = getattr(inner, "norm", None)
    if head is None or norm is None:
        raise TypeError(f"{type(model).__name__} has no lm_head or final norm: not a Llama-layout causal LM")
    params = list(model.parameters())
    saved_flags = [p.requires_grad for p in params]
    device = model_device(model)
    n_windows, window = int(batch.shape[0]), int(batch.shape[1])
    budget = memory_budget or activation_budget(model)
    chunk = batch_size or _taylor_chunk(model, spec, n_windows, window, budget)
    chunks = [batch[s: s + chunk] for s in range(0, n_windows, chunk)]
    predicted = n_windows * (window - 1)
    fold = _TaylorFold(spec, len(layers), device)
    handles = []
    try:
        for p in params:
            p.requires_grad_(False)
        for index, layer in enumerate(layers):
            for p, role in _scored_params(layer):
                p.grad = None
                p.requires_grad_(True)
                handles.append(p.register_post_accumulate_grad_hook(fold.hook(index, role)))
        model.eval()
        inputs, final = _record_layer_inputs(model, layers, norm, chunks, device)
        grads = _head_gradients(head, norm, final, chunks, device, predicted, budget)
        del final
        for index in range(len(layers) - 1, -1, -1):
            layer = layers[index]
            with _float32(layer):
                for c, (hidden, args, kwargs) in enumerate(inputs[index]):
                    fold.final = c == len(chunks) - 1
                    hidden = hidden.requires_grad_(True)
                    with torch.enable_grad():
                        out = layer(hidden, *args, **kwargs)
                        out = out[0] if isinstance(out, tuple) else out
                        torch.autograd.backward(out, grads[c])
                    grads[c] = hidden.grad
                    inputs[index][c] = None  # type: ignore[call-overload]
                    del hidden, out
            inputs[index] = []
        return fold.result()
    finally:
        for handle in handles:
            handle.remove()
        for p, flag in zip(params, saved_flags):
            p.grad = None
            p.requires_grad_(flag)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        release_memory()


# Bytes per token of one decoder layer's activations kept for its backward pass (float32), per
# unit of width: hidden-wide tensors (norms, q/k/v/o, residuals) and intermediate-wide ones (gate,
# up, activation, product), plus attention weights per head and key.
_HIDDEN_ACTS, _INTER_ACTS = 10, 5
FOLD_CHUNK_ELEMENTS = 2 ** 22  # |w * g| is formed this many elements at a time (16 MiB in float32)


def _taylor_chunk(model: torch.nn.Module, spec: BaseSpec, n_windows: int, window: int, budget: int) -> int:
    """Windows per chunk: all of them when their activations fit the budget or cost less than the
    gradients that chunking would keep (one layer's), else as many as fit the budget."""
    per_token = 4 * (_HIDDEN_ACTS * spec.hidden_size + _INTER_ACTS * spec.intermediate_size
                     + 2 * spec.num_heads * window)
    layer = decoder_layers(model)[0]
    layer_grads = 4 * sum(p.numel() for p, _ in _scored_params(layer))
    if per_token * window * n_windows <= max(budget, layer_grads):
        return n_windows
    return max(1, min(n_windows, budget // (per_token * window)))


def _scored_params(layer: torch.nn.Module) -> Iterator[tuple[torch.nn.Parameter, str]]:
    """The parameters Taylor scores, each with how it folds: ``q``/``kv``/``o`` into KV groups (rows
    of q, rows of k and v, columns of o), ``rows``/``cols`` into MLP channels."""
    attn, mlp = layer.self_attn, layer.mlp
    for lin, role in ((attn.q_proj, "q"), (attn.k_proj, "kv"), (attn.v_proj, "kv"),
                      (mlp.gate_proj, "rows"), (mlp.up_proj, "rows")):
        yield lin.weight, role
        if lin.bias is not None:
            yield lin.bias, role
    yield attn.o_proj.weight, "o"
    yield mlp.down_proj.weight, "cols"


def _abs_product_sums(w: torch.Tensor, g: torch.Tensor, dim: int) -> torch.Tensor:
    """``|w * g|`` summed over ``dim`` (1: per row, 0: per column) in float32, formed a few rows at a time."""
    if w.dim() == 1:
        return (w.detach().float() * g.float()).abs()
    w = w.detach()
    step = max(1, FOLD_CHUNK_ELEMENTS // max(1, w.shape[1]))
    if dim == 1:
        return torch.cat([(w[s: s + step].float() * g[s: s + step].float()).abs_().sum(dim=1)
                          for s in range(0, w.shape[0], step)])
    out = torch.zeros(w.shape[1], dtype=torch.float32, device=w.device)
    for s in range(0, w.shape[0], step):
        out += (w[s: s + step].float() * g[s: s + step].float()).abs_().sum(dim=0)
    return out


class _TaylorFold:
    """KV-group and channel scores (float64) fed by post-accumulate-grad hooks."""

    def __init__(self, spec: BaseSpec, layers: int, device: torch.device) -> None:
        self.spec = spec
        self.kv = torch.zeros(layers, spec.num_kv_heads, dtype=torch.float64, device=device)
        self.channel = torch.zeros(layers, spec.intermediate_size, dtype=torch.float64, device=device)
        self.final = False   # True during the backward pass of a layer's last chunk

    def hook(self, layer: int, role: str) -> Callable[[torch.Tensor], None]:
        kv, d = self.spec.num_kv_heads, self.spec.head_dim

        def fold(param: torch.Tensor) -> None:
            if not self.final or param.grad is None:
                return  # an earlier chunk: the gradient keeps accumulating
            grad = param.grad
            param.grad = None
            if role == "q":
                self.kv[layer] += _abs_product_sums(param, grad, 1).reshape(kv, -1).sum(1).double()
            elif role == "kv":
                self.kv[layer] += _abs_product_sums(param, grad, 1).reshape(kv, d).sum(1).double()
            elif role == "o":
                self.kv[layer] += _abs_product_sums(param, grad, 0).reshape(kv, -1).sum(1).double()
            else:
                self.channel[layer] += _abs_product_sums(param, grad, 1 if role == "rows" else 0).double()

        return fold

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        return self.kv.cpu().numpy(), self.channel.cpu().numpy()


class _float32:
    """Within the block ``module`` computes in float32 (its parameters upcast in place, then back)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module
        self.dtype = next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)

    def __enter__(self) -> torch.nn.Module:
        if self.dtype != torch.float32:
            self.module.float()
        return self.module

    def __exit__(self, *exc: Any) -> None:
        if self.dtype != torch.float32:
            self.module.to(self.dtype)


def _to_float32(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != torch.float32:
        return value.float()
    if isinstance(value, tuple):
        return tuple(_to_float32(v) for v in value)
    return value


def _record_layer_inputs(model: torch.nn.Module, layers: torch.nn.ModuleList, norm: torch.nn.Module,
                         chunks: list[torch.Tensor], device: torch.device
                         ) -> tuple[list[list[Any]], list[torch.Tensor]]:
    """No-grad forward of each chunk (each layer in float32): per layer and chunk its input hidden
    state and other call arguments, and per chunk the final norm's input."""
    inputs: list[list[Any]] = [[] for _ in layers]
    final: list[torch.Tensor] = []
    handles = []

    def before(index: int) -> Callable[..., Any]:
        def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            if args:
                hidden, rest = args[0], tuple(_to_float32(a) for a in args[1:])
            else:
                hidden, rest = kwargs.pop("hidden_states"), ()
            kwargs = {k: _to_float32(v) for k, v in kwargs.items()}
            hidden = hidden.detach().float()
            inputs[index].append((hidden, rest, kwargs))
            if next(module.parameters()).dtype != torch.float32:
                module.float()
            return (hidden, *rest), kwargs
        return hook

    def after(module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        dtype = model_dtype(model)
        if dtype != torch.float32:
            module.to(dtype)

    def at_norm(module: torch.nn.Module, args: tuple) -> None:
        final.append(args[0].detach().float())

    inner = getattr(model, "model", model)
    try:
        for index, layer in enumerate(layers):
            handles.append(layer.register_forward_pre_hook(before(index), with_kwargs=True))
            handles.append(layer.register_forward_hook(after, with_kwargs=True))
        handles.append(norm.register_forward_pre_hook(at_norm))
        with torch.no_grad():
            for ids in chunks:
                inner(input_ids=ids.to(device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return inputs, final


def model_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype of a model's embeddings (its loaded dtype; layers may be upcast for a while)."""
    return model.get_input_embeddings().weight.dtype


def _head_gradients(head: torch.nn.Module, norm: torch.nn.Module, final: list[torch.Tensor],
                    chunks: list[torch.Tensor], device: torch.device, predicted: int, budget: int
                    ) -> list[torch.Tensor]:
    """Per chunk, the gradient of the mean next-token loss (over all ``predicted`` tokens) with
    respect to the final norm's input; logits are formed a few windows at a time."""
    weight = head.weight.detach()
    weight = weight if weight.dtype == torch.float32 else weight.float()
    bias = getattr(head, "bias", None)
    vocab = weight.shape[0]
    grads = []
    with _float32(norm), torch.enable_grad():
        for hidden, ids in zip(final, chunks):
            hidden = hidden.requires_grad_(True)
            ids = ids.to(device)
            rows = max(1, budget // (12 * vocab * ids.shape[1]))  # logits, log-softmax and their gradient
            for s in range(0, ids.shape[0], rows):
                part = hidden[s: s + rows]
                logits = torch.nn.functional.linear(norm(part), weight, None if bias is None else bias.float())
                loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, vocab),
                                                         ids[s: s + rows, 1:].reshape(-1), reduction="sum")
                (loss / predicted).backward()
                del logits, loss
            grads.append(hidden.grad)
            hidden.grad = None
    return grads
