"""KLTask: mean KL(base || pruned) per token, its on-disk reference cache, top-k and window subsets."""

from __future__ import annotations

import pytest
import torch

import tiny_models as tm
from archopt.archdb.arch import uniform
from archopt.evaluators import load_base_model, prune_model
from archopt.evaluators.kl import KLTask

TEXT = tm.CORPUS * 3


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    path = tm.save_tiny("llama_gqa_odd", tmp_path_factory.mktemp("tiny") / "tiny-gqa")
    return load_base_model(str(path), attn_implementation="eager")


@pytest.fixture(scope="module")
def pruned(base):
    return prune_model(base, uniform(base.spec, 0.4), tm.random_importance(base.spec))


def make_task(base, **kw) -> KLTask:
    return KLTask.from_text(base.tokenizer, TEXT, dataset="corpus", seq_len=16, batch_size=3, **kw)


def plain_kl(base_model, model, task: KLTask) -> float:
    """Independent reference: float64, one window at a time, sum_v p (log p - log q)."""
    total = 0.0
    with torch.no_grad():
        for w in task.windows:
            lp = torch.log_softmax(base_model(input_ids=w[None]).logits[0].double(), -1)
            lq = torch.log_softmax(model(input_ids=w[None]).logits[0].double(), -1)
            total += float((lp.exp() * (lp - lq)).sum())
    return total / task.tokens


def test_kl_of_base_against_itself_is_zero(base, tmp_path):
    task = make_task(base)
    assert task.prepare_reference(base, tmp_path) is True
    assert task.mean_kl(base.model) == pytest.approx(0.0, abs=1e-6)


def test_pruned_kl_is_positive_and_matches_plain_loop(base, pruned, tmp_path):
    task = make_task(base)
    task.prepare_reference(base, tmp_path)
    got = task.mean_kl(pruned)
    assert got > 1e-3
    assert got == pytest.approx(plain_kl(base.model, pruned, task), rel=1e-4)
    m = task.evaluate(pruned)
    assert m.metric == "kl_base" and m.value == pytest.approx(got)
    assert m.protocol.tokens == task.tokens and m.protocol.seq_len == 16


def test_cache_hit_gives_the_same_value(base, pruned, tmp_path):
    first = make_task(base)
    assert first.prepare_reference(base, tmp_path) is True
    files = list(tmp_path.glob("kl-*.npz"))
    assert len(files) == 1
    again = make_task(base)
    assert again.prepare_reference(base, tmp_path) is False   # read from disk
    assert again.reference_key == first.reference_key
    assert again.mean_kl(pruned) == pytest.approx(first.mean_kl(pruned), rel=1e-6)
    # another token count or top-k is another reference
    other = make_task(base, max_tokens=first.tokens - 16)
    assert other.prepare_reference(base, tmp_path) is True
    assert len(list(tmp_path.glob("kl-*.npz"))) == 2


def test_windows_subset_and_top_k(base, pruned, tmp_path):
    task = make_task(base)
    task.prepare_reference(base, tmp_path)
    n = task.n_windows
    assert n >= 4
    parts = [task.mean_kl(pruned, [w]) for w in range(n)]
    assert task.mean_kl(pruned) == pytest.approx(sum(parts) / n, rel=1e-5)
    assert task.tokens_of([0, 2]) == 32
    assert task.protocol([0, 2]).key() != task.protocol().key()
    full = task.mean_kl(pruned)
    sparse = make_task(base, top_k=8)
    sparse.prepare_reference(base, tmp_path)
    approx = sparse.mean_kl(pruned)
    assert 0 < approx <= full + 1e-6            # the tail bucket makes it a lower bound
    everything = make_task(base, top_k=base.spec.vocab_size)
    everything.prepare_reference(base, tmp_path)
    assert everything.mean_kl(pruned) == pytest.approx(full, rel=1e-4)
    assert sparse.mean_kl(base.model) == pytest.approx(0.0, abs=1e-6)


def test_needs_a_reference(base, pruned):
    with pytest.raises(RuntimeError):
        make_task(base).mean_kl(pruned)


def test_diverged_model_is_infinitely_far(base, tmp_path):
    import math

    from archopt.archdb.arch import full
    task = make_task(base)
    task.prepare_reference(base, tmp_path)
    model = prune_model(base, full(base.spec), None)   # shares the base's tensors: replace, never fill
    model.model.norm.weight = torch.nn.Parameter(torch.full_like(model.model.norm.weight, float("nan")))
    assert task.mean_kl(model) == math.inf
    assert task.mean_kl(base.model) == pytest.approx(0.0, abs=1e-6)
