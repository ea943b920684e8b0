"""PerplexityTask: exp(mean NLL) over non-overlapping windows, its protocol, token caching, Evaluator."""

from __future__ import annotations

import math

import pytest
import torch

import tiny_models as tm
from archopt.archdb.arch import uniform
from archopt.evaluators import Evaluator, PerplexityTask, compute_importance, load_base_model, prune_model
from archopt.evaluators.tokenization import tokenizer_hash

TEXT_ROWS = [" = Heading = \n", "", " " + tm.CORPUS.replace("\n", " ") + "\n"] * 3


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    paths = tm.save_all(tmp_path_factory.mktemp("tiny"), ["llama_gqa_odd"])
    return load_base_model(str(paths["llama_gqa_odd"]), attn_implementation="eager")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    (root / "wikitext-2").mkdir()
    (root / "wikitext-2" / "wiki.test.raw").write_text("".join(r if r else " \n" for r in TEXT_ROWS))
    (root / "ptb").mkdir()
    ptb = "".join(f" {line.strip()} \n" for line in tm.CORPUS.splitlines())
    (root / "ptb" / "ptb.valid.txt").write_text(ptb * 2)
    (root / "ptb" / "ptb.test.txt").write_text(ptb)
    for split in ("dev", "test"):
        (root / "mmlu" / split).mkdir(parents=True)
        rows = [f'"What is {i}?","{i}","{i + 1}","{i + 2}","{i + 3}","{"ABCD"[i % 4]}"' for i in range(5)]
        (root / "mmlu" / split / f"toy_subject_{split}.csv").write_text("\n".join(rows) + "\n")
    return root


def plain_loop_ppl(model, tokenizer, text: str, seq_len: int, max_tokens: int | None = None) -> float:
    """Independent reference: one window at a time, one predicted token at a time."""
    ids = tokenizer(text)["input_ids"]
    if max_tokens is not None:
        ids = ids[:max_tokens]
    nll, count = 0.0, 0
    with torch.no_grad():
        for w in range(len(ids) // seq_len):
            window = ids[w * seq_len:(w + 1) * seq_len]
            logp = torch.log_softmax(model(input_ids=torch.tensor([window])).logits[0].double(), dim=-1)
            for j in range(seq_len - 1):
                nll -= float(logp[j, window[j + 1]])
                count += 1
    return math.exp(nll / count)


def test_ppl_equals_plain_loop(base):
    text = "\n\n".join(TEXT_ROWS)
    task = PerplexityTask.from_text(base.tokenizer, text, metric="ppl_wikitext2", dataset="wikitext-2-raw-v1",
                                    split="test", seq_len=32, batch_size=3)
    got = task.evaluate(base.model)
    assert got.metric == "ppl_wikitext2"
    assert got.value == pytest.approx(plain_loop_ppl(base.model, base.tokenizer, text, 32), rel=1e-5)
    n_tokens = len(base.tokenizer(text)["input_ids"])
    assert got.protocol.tokens == (n_tokens // 32) * 32 and task.predicted_tokens == (n_tokens // 32) * 31
    # the batch size does not change the value
    other = PerplexityTask.from_text(base.tokenizer, text, metric="ppl_wikitext2", dataset="wikitext-2-raw-v1",
                                     split="test", seq_len=32, batch_size=1)
    assert other.evaluate(base.model).value == pytest.approx(got.value, rel=1e-6)


def test_max_tokens_keeps_whole_windows_from_the_start(base):
    text = "\n\n".join(TEXT_ROWS)
    task = PerplexityTask.from_text(base.tokenizer, text, metric="ppl_ptb", dataset="ptb_text_only",
                                    split="validation", seq_len=16, max_tokens=70)
    assert task.windows.shape == (4, 16) and task.protocol.tokens == 64
    assert task.evaluate(base.model).value == pytest.approx(
        plain_loop_ppl(base.model, base.tokenizer, text, 16, max_tokens=70), rel=1e-5)
    with pytest.raises(ValueError, match="window"):
        PerplexityTask.from_text(base.tokenizer, "tiny", metric="ppl_ptb", dataset="ptb_text_only",
                                 split="validation", seq_len=128)


def test_protocol_and_token_cache(base, data_dir, tmp_path):
    import archopt

    task = PerplexityTask.prepare(base.tokenizer, "ppl_wikitext2", data_dir=data_dir, seq_len=16, cache_dir=tmp_path)
    p = task.protocol
    assert (p.dataset, p.split, p.joining, p.seq_len) == ("wikitext-2-raw-v1", "test", "\n\n", 16)
    assert p.tokenizer == "llama_gqa_odd" and p.tokenizer_hash == tokenizer_hash(base.tokenizer)
    assert p.tool == "archopt" and p.tool_version == archopt.__version__
    cached = list(tmp_path.glob("tokens-*.npy"))
    assert len(cached) == 1
    again = PerplexityTask.prepare(base.tokenizer, "ppl_wikitext2", data_dir=data_dir, seq_len=16, cache_dir=tmp_path)
    assert torch.equal(again.windows, task.windows) and again.protocol == p
    ptb = PerplexityTask.prepare(base.tokenizer, "ppl_ptb", data_dir=data_dir, seq_len=16)
    assert (ptb.protocol.dataset, ptb.protocol.split) == ("ptb_text_only", "validation")
    ptb_test = PerplexityTask.prepare(base.tokenizer, "ppl_ptb", data_dir=data_dir, seq_len=16, split="test")
    assert ptb_test.protocol.split == "test" and ptb_test.protocol.key() != ptb.protocol.key()


def test_evaluator_runs_every_metric_on_pruned_models(base, data_dir):
    ev = Evaluator(base.tokenizer, ["ppl_wikitext2", "ppl_ptb", "mmlu"], data_dir=data_dir, seq_len=16,
                   max_tokens=64, max_questions=3, shots=1)
    imp = compute_importance(base, "l2")
    first = ev.evaluate_architecture(base, uniform(base.spec, 0.0), imp)
    pruned = ev.evaluate_architecture(base, uniform(base.spec, 0.5), imp)
    names = [m.metric for m in first]
    assert names == ["ppl_wikitext2", "ppl_ptb", "mmlu", "mmlu:toy_subject"]
    assert first[0].value == pytest.approx(ev.tasks["ppl_wikitext2"].evaluate(base.model).value, rel=1e-6)
    assert pruned[0].value != first[0].value and all(math.isfinite(m.value) for m in pruned)
    assert first[2].protocol.questions == 3 and first[2].protocol.shots == 1
    direct = ev.evaluate(prune_model(base, uniform(base.spec, 0.5), imp))
    assert [m.value for m in direct] == pytest.approx([m.value for m in pruned], rel=1e-6)
    with pytest.raises(ValueError, match="metric"):
        Evaluator(base.tokenizer, ["bleu"], data_dir=data_dir)


def test_evaluator_counts_a_computed_kl_reference_once(base, data_dir, tmp_path):
    """The base's forward pass for a ``kl_base`` reference counts in ``reference_tokens`` when it is
    computed, not when it is read back (kept, or from the cache directory)."""
    ev = Evaluator(base.tokenizer, ["kl_base", "ppl_wikitext2"], data_dir=data_dir, seq_len=16, max_tokens=64,
                   kl_text="wikitext2-test", reference_dir=tmp_path)
    assert ev.prepare(base) == 1 and ev.reference_tokens == ev.tasks["kl_base"].forwarded_tokens == 64
    assert ev.prepare(base) == 0 and ev.reference_tokens == 64
    again = Evaluator(base.tokenizer, ["kl_base"], data_dir=data_dir, seq_len=16, max_tokens=64,
                      kl_text="wikitext2-test", reference_dir=tmp_path)
    assert again.prepare(base) == 0 and again.reference_tokens == 0


def test_evaluate_architecture_collects_garbage_only_for_a_model_left_alive(base, data_dir, monkeypatch):
    """A pruned model that reference counting frees costs no full garbage collection (about 0.2 s
    on the CPU, more than a profile variant's measurement); one kept alive by a reference cycle is
    collected, and its memory with it."""
    import gc
    import weakref
    from archopt.evaluators import evaluator as evaluator_module
    calls: list[int] = []
    real_collect = gc.collect
    monkeypatch.setattr(evaluator_module.gc, "collect", lambda *a: calls.append(1) or real_collect(*a))
    ev = Evaluator(base.tokenizer, ["ppl_wikitext2"], data_dir=data_dir, seq_len=16, max_tokens=64)
    arch = uniform(base.spec, 0.25)
    importance = compute_importance(base, "l2")
    first = ev.evaluate_architecture(base, arch, importance)
    assert calls == []
    made: list[weakref.ref] = []

    def cyclic(*args, **kwargs):
        model = prune_model(*args, **kwargs)
        model.keep_me = [model]   # a reference cycle: only the collector frees it
        made.append(weakref.ref(model))
        return model

    monkeypatch.setattr(evaluator_module, "prune_model", cyclic)
    again = ev.evaluate_architecture(base, arch, importance)
    assert calls == [1] and made[0]() is None
    assert again[0].value == pytest.approx(first[0].value)
