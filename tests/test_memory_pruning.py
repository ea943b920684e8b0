"""Pruning, saving and evaluation within the base model's memory: lazily pruned models equal eagerly
pruned ones, hold no tensor of their own, save one tensor at a time; several architectures in a
row never keep a copy of the base; perplexity batches follow the memory budget."""

from __future__ import annotations

import gc
import json
import weakref

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import tiny_models as tm
from archopt.archdb.arch import DROPPED, Architecture, from_ratios, full, uniform
from archopt.evaluators import Evaluator, PerplexityTask, load_base_model, load_pruned, prune_model, save_pruned
from archopt.evaluators import evaluator as evaluator_mod
from archopt.evaluators import loading as loading_mod
from archopt.evaluators import perplexity as perplexity_mod
from archopt.evaluators.loading import activation_budget, param_bytes, parse_memory
from archopt.evaluators.pruning import SlicedLinear, is_lazy, param_count, sliced_bytes
from archopt.evaluators.saving import write_safetensors

NAMES = ["llama_gqa_odd", "llama_tied_bias", "qwen2_bias", "mistral_gqa"]


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    paths = tm.save_all(tmp_path_factory.mktemp("tiny"), NAMES)
    return {name: load_base_model(str(p), attn_implementation="eager") for name, p in paths.items()}


def mixed_arch(spec) -> Architecture:
    n = spec.num_layers
    layers = list(from_ratios(spec, [(0.3 * i + 0.2) % 0.7 for i in range(n)],
                              [(0.23 * i + 0.1) % 0.8 for i in range(n)]).layers)
    layers[1] = DROPPED
    return Architecture(spec, tuple(layers))


def base_pointers(base) -> set[int]:
    return {t.data_ptr() for t in list(base.model.parameters()) + list(base.model.buffers())}


@pytest.mark.parametrize("name", NAMES)
def test_lazy_pruned_model_equals_the_eager_one_and_owns_no_tensor(bases, name):
    base = bases[name]
    imp = tm.random_importance(base.spec, seed=5)
    arch = mixed_arch(base.spec)
    eager = prune_model(base, arch, imp)
    lazy = prune_model(base, arch, imp, lazy=True)
    assert is_lazy(lazy) and not is_lazy(eager)
    assert param_count(lazy) == param_count(eager) == arch.params
    # every tensor the lazy model holds is the base's own: it allocated nothing that lasts
    assert {p.data_ptr() for p in lazy.parameters()} <= base_pointers(base)
    for module in lazy.modules():
        if isinstance(module, SlicedLinear):
            assert module._source[0].data_ptr() in base_pointers(base)
    ids, mask = tm.padded_batch()
    with torch.no_grad():
        want = eager(input_ids=ids, attention_mask=mask).logits
        got = lazy(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(got, want)
    # the eager model shares every untouched tensor with the base; its new tensors are the slices
    new = [p for p in eager.parameters() if p.data_ptr() not in base_pointers(base)]
    assert sum(p.numel() * p.element_size() for p in new) == sliced_bytes(base, arch)


@pytest.mark.parametrize("name", ["llama_tied_bias", "qwen2_bias"])
def test_lazy_model_saves_the_same_files(bases, name, tmp_path):
    base = bases[name]
    imp = tm.random_importance(base.spec, seed=2)
    arch = mixed_arch(base.spec)
    save_pruned(prune_model(base, arch, imp), base, arch, imp, tmp_path / "eager")
    save_pruned(prune_model(base, arch, imp, lazy=True), base, arch, imp, tmp_path / "lazy")
    a = load_file(str(tmp_path / "eager" / "model.safetensors"))
    b = load_file(str(tmp_path / "lazy" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    info = json.loads((tmp_path / "lazy" / "archopt.json").read_text())
    assert info["params"] == arch.params
    ids, mask = tm.padded_batch()
    with torch.no_grad():
        want = prune_model(base, arch, imp)(input_ids=ids, attention_mask=mask).logits
        got = load_pruned(tmp_path / "lazy", attn_implementation="eager")(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(got, want, atol=1e-6)


def test_lazy_bfloat16_save(bases, tmp_path):
    base = bases["qwen2_bias"]
    imp = tm.random_importance(base.spec, seed=4)
    arch = uniform(base.spec, 0.5)
    save_pruned(prune_model(base, arch, imp, lazy=True), base, arch, imp, tmp_path / "bf16", dtype="bfloat16")
    state = load_file(str(tmp_path / "bf16" / "model.safetensors"))
    assert all(t.dtype == torch.bfloat16 for t in state.values())
    eager = prune_model(base, arch, imp).state_dict()
    for key, value in state.items():
        assert torch.equal(value, eager[key].to(torch.bfloat16))
    assert json.loads((tmp_path / "bf16" / "archopt.json").read_text())["dtype"] == "bfloat16"


def test_streaming_writer_is_read_as_safetensors_writes(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(3, 5, generator=g), "b.bias": torch.randn(7, generator=g).to(torch.bfloat16),
               "c": torch.arange(6, dtype=torch.int64).reshape(2, 3), "empty": torch.zeros(0, 4),
               "scalar": torch.tensor(2.5)}
    write_safetensors(tmp_path / "ours.safetensors", tensors, metadata={"format": "pt"})
    save_file(tensors, str(tmp_path / "theirs.safetensors"), metadata={"format": "pt"})
    ours, theirs = load_file(str(tmp_path / "ours.safetensors")), load_file(str(tmp_path / "theirs.safetensors"))
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert ours[key].dtype == theirs[key].dtype and torch.equal(ours[key], theirs[key])
    write_safetensors(tmp_path / "half.safetensors", tensors, torch.float16)
    half = load_file(str(tmp_path / "half.safetensors"))
    assert half["a"].dtype == torch.float16 and half["c"].dtype == torch.int64


def test_measuring_several_architectures_keeps_no_copy(bases, monkeypatch):
    """Architecture after architecture: each pruned model is gone when the next is built, and a
    tight --max-memory builds them lazily (nothing but the base's tensors)."""
    base = bases["llama_gqa_odd"]
    imp = tm.random_importance(base.spec)
    task = PerplexityTask.from_text(base.tokenizer, tm.CORPUS, metric="ppl_wikitext2", dataset="wikitext",
                                    split="test", seq_len=16)
    alive: list[weakref.ref] = []
    lazies: list[bool] = []
    real = evaluator_mod.prune_model

    def tracking(b, a, i, lazy=False):
        model = real(b, a, i, lazy=lazy)
        alive.append(weakref.ref(model))
        lazies.append(lazy)
        return model

    monkeypatch.setattr(evaluator_mod, "prune_model", tracking)
    weights = param_bytes(base.model)
    cases = ((None, 64 * 2 ** 20, False),   # tiny slices fit the default budget: copied once
             (None, 1, True),               # a budget of weights / 16: slices of 30% do not fit
             (weights + 10 ** 9, None, False), (weights + 1, None, True))
    for max_memory, least, want_lazy in cases:
        if least is not None:
            monkeypatch.setattr(loading_mod, "MIN_ACTIVATION_BUDGET", least)
        ev = Evaluator.__new__(Evaluator)
        ev.metrics, ev.max_memory, ev.tasks = ["ppl_wikitext2"], max_memory, {"ppl_wikitext2": task}
        ev.reference_tokens = 0
        values = []
        for arch in (full(base.spec), uniform(base.spec, 0.3), mixed_arch(base.spec)):
            before = len(alive)
            values.append(ev.evaluate_architecture(base, arch, imp)[0].value)
            gc.collect()
            assert all(ref() is None for ref in alive[:before + 1])  # freed before returning
        assert lazies[-1] is want_lazy and lazies[-3] is False  # a full architecture is never sliced
        direct = [task.evaluate(prune_model(base, a, imp)).value
                  for a in (full(base.spec), uniform(base.spec, 0.3), mixed_arch(base.spec))]
        np.testing.assert_allclose(values, direct, rtol=1e-5)


def test_batches_follow_the_memory_budget(bases):
    base = bases["llama_gqa_odd"]
    task = PerplexityTask.from_text(base.tokenizer, tm.CORPUS * 4, metric="ppl_wikitext2", dataset="wikitext",
                                    split="test", seq_len=16)
    per_token = perplexity_mod.inference_bytes_per_token(base.model, 16)
    assert task._batch_size(base.model, 1) == 1                       # at least one window
    assert task._batch_size(base.model, per_token * 16 * 5) == 5      # five windows' worth
    assert task._batch_size(base.model, 10 ** 12) == perplexity_mod.MAX_BATCH_TOKENS // 16
    values = {budget: task.evaluate(base.model, memory_budget=budget).value
              for budget in (1, per_token * 16 * 3, 10 ** 12)}
    assert max(values.values()) == pytest.approx(min(values.values()), rel=1e-5)
    fixed = PerplexityTask.from_text(base.tokenizer, tm.CORPUS * 4, metric="ppl_wikitext2", dataset="wikitext",
                                     split="test", seq_len=16, batch_size=2)
    assert fixed._batch_size(base.model, 1) == 2                       # an explicit batch size wins


def test_logits_are_formed_a_few_rows_at_a_time(bases, monkeypatch):
    """A Llama-layout model never forms a whole batch's logits: lm_head sees CE_CHUNK_ROWS rows."""
    base = bases["llama_gqa_odd"]
    monkeypatch.setattr(perplexity_mod, "CE_CHUNK_ROWS", 20)
    task = PerplexityTask.from_text(base.tokenizer, tm.CORPUS * 2, metric="ppl_wikitext2", dataset="wikitext",
                                    split="test", seq_len=16)
    rows = []
    handle = base.model.lm_head.register_forward_hook(lambda m, a, out: rows.append(a[0].shape[0]))
    try:
        chunked = task.total_nll(base.model, memory_budget=10 ** 9)
    finally:
        handle.remove()
    assert rows and max(rows) <= 20
    with torch.no_grad():
        logits = base.model(input_ids=task.windows).logits
    want = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), task.targets.reshape(-1),
                                             reduction="sum", ignore_index=-100)
    assert chunked[0] == pytest.approx(float(want), rel=1e-5)


def test_activation_budget_and_memory_sizes(bases):
    model = bases["llama_gqa_odd"].model
    weights = param_bytes(model)
    assert activation_budget(model) == max(64 * 2 ** 20, weights // 16)
    assert activation_budget(model, max_memory=weights + 2 * 2 ** 30) == 2 ** 30
    assert activation_budget(model, max_memory=1) == 64 * 2 ** 20
    assert parse_memory("6GB") == 6 * 10 ** 9 and parse_memory("6GiB") == 6 * 2 ** 30
    assert parse_memory("512M") == 512 * 10 ** 6 and parse_memory("1.5e9") == 1_500_000_000
    assert parse_memory(None) is None and parse_memory(123) == 123
    for bad in ("six", "6XB", "-1GB", "0"):
        with pytest.raises(ValueError):
            parse_memory(bad)


def test_max_memory_option_is_checked_in_one_line():
    from click.testing import CliRunner

    from archopt.cli import cli
    result = CliRunner().invoke(cli, ["--db", "sqlite:///:memory:", "evaluate", "--model", ".", "--max-memory",
                                      "lots"])
    assert result.exit_code != 0
