"""MMLU: prompt format, answer scoring with a known outcome, question selection, truncation."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import tiny_models as tm
from archopt.evaluators import MmluTask, load_base_model
from archopt.evaluators.data import MmluQuestion, MmluSubject
from archopt.evaluators.mmlu import build_prompt, continuation_tokens, select_questions


def q(text: str, answer: str) -> MmluQuestion:
    return MmluQuestion(text, (f"{text} one", f"{text} two", f"{text} three", f"{text} four"), "ABCD".index(answer))


SHOTS = tuple(q(f"Shot {i}?", "ABCDA"[i]) for i in range(5))
SUBJECTS = {
    "alpha_beta": MmluSubject("alpha_beta", SHOTS, tuple(q(f"Alpha {i}?", a) for i, a in enumerate("CACB"))),
    "gamma": MmluSubject("gamma", SHOTS, tuple(q(f"Gamma {i}?", a) for i, a in enumerate("CCD"))),
}


class Favouring(torch.nn.Module):
    """A fake LM whose logits favour the tokens of one answer letter's continuation, everywhere."""

    def __init__(self, tokens: list[int], vocab: int = 1000, max_positions: int = 4096) -> None:
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.config = SimpleNamespace(max_position_embeddings=max_positions, vocab_size=vocab)
        self.bias = torch.zeros(vocab)
        self.bias[tokens] = 5.0
        self.seen_lengths: list[int] = []

    def forward(self, input_ids, attention_mask=None, **kwargs):
        self.seen_lengths.append(input_ids.shape[1])
        logits = self.bias.expand(*input_ids.shape, -1).clone()
        return SimpleNamespace(logits=logits)


@pytest.fixture(scope="module")
def tokenizer():
    return tm.make_tokenizer()


def test_prompt_format():
    prompt = build_prompt("alpha_beta", SHOTS[:1], SUBJECTS["alpha_beta"].test[0])
    assert prompt == (
        "The following are multiple choice questions (with answers) about alpha beta.\n\n"
        "Shot 0?\nA. Shot 0? one\nB. Shot 0? two\nC. Shot 0? three\nD. Shot 0? four\nAnswer: A\n\n"
        "Alpha 0?\nA. Alpha 0? one\nB. Alpha 0? two\nC. Alpha 0? three\nD. Alpha 0? four\nAnswer:")


def test_known_answer_pattern(tokenizer):
    conts = continuation_tokens(tokenizer)
    task = MmluTask(tokenizer, SUBJECTS, shots=5)
    results = {m.metric: m for m in task.evaluate(Favouring(conts[2]))}  # always answers C
    assert results["mmlu"].value == pytest.approx(4 / 7)
    assert results["mmlu:alpha_beta"].value == pytest.approx(2 / 4)
    assert results["mmlu:gamma"].value == pytest.approx(2 / 3)
    assert results["mmlu"].protocol.questions == 7 and results["mmlu:gamma"].protocol.questions == 3
    assert (results["mmlu"].protocol.dataset, results["mmlu"].protocol.split, results["mmlu"].protocol.shots) == \
        ("mmlu", "test", 5)
    d_results = {m.metric: m.value for m in task.evaluate(Favouring(conts[3]))}  # always D
    assert d_results["mmlu"] == pytest.approx(1 / 7) and d_results["mmlu:alpha_beta"] == 0.0


def test_ties_go_to_a_and_multi_token_continuations(tokenizer):
    task = MmluTask(tokenizer, SUBJECTS, shots=0)
    flat = {m.metric: m.value for m in task.evaluate(Favouring([]))}  # all four equally likely
    assert flat["mmlu:alpha_beta"] == pytest.approx(1 / 4)  # answers C,A,C,B: only the A one is right
    # two-token continuations (forced): scored as a sum over both tokens
    task.continuations = [[500, 600], [501, 601], [502, 602], [503, 603]]
    results = {m.metric: m.value for m in task.evaluate(Favouring([503, 603]))}
    assert results["mmlu"] == pytest.approx(1 / 7)
    results = {m.metric: m.value for m in task.evaluate(Favouring([603]))}  # second token decides
    assert results["mmlu"] == pytest.approx(1 / 7)


def test_max_questions_round_robin(tokenizer):
    assert select_questions(SUBJECTS, 3) == {"alpha_beta": 2, "gamma": 1}
    assert select_questions(SUBJECTS, 100) == {"alpha_beta": 4, "gamma": 3}
    assert select_questions(SUBJECTS, 1) == {"alpha_beta": 1}
    task = MmluTask(tokenizer, SUBJECTS, shots=2, max_questions=3)
    results = {m.metric: m.value for m in task.evaluate(Favouring(continuation_tokens(tokenizer)[2]))}
    assert results == pytest.approx({"mmlu": 2 / 3, "mmlu:alpha_beta": 0.5, "mmlu:gamma": 1.0})


def test_prompts_are_truncated_from_the_left(tokenizer):
    task = MmluTask(tokenizer, SUBJECTS, shots=5)
    assert max(len(i.prompt_ids) for i in task.items) > 60
    model = Favouring(continuation_tokens(tokenizer)[2], max_positions=40)
    results = {m.metric: m.value for m in task.evaluate(model)}
    assert max(model.seen_lengths) == 40 and results["mmlu"] == pytest.approx(4 / 7)


def test_batched_scores_equal_one_by_one_on_a_real_model(tmp_path, tokenizer):
    path = tm.save_tiny("qwen2_bias", tmp_path / "m", tokenizer=tokenizer)
    base = load_base_model(str(path), attn_implementation="eager")
    task = MmluTask(base.tokenizer, SUBJECTS, shots=1, max_batch_tokens=400)
    for conts in (task.continuations, [[300, 301], [302, 303], [304], [305, 306, 307]]):
        task.continuations = conts
        scores = task.choice_scores(base.model)
        with torch.no_grad():
            for item, row in zip(task.items, scores):
                for k, cont in enumerate(conts):
                    ids = torch.tensor([list(item.prompt_ids) + cont])
                    logp = torch.log_softmax(base.model(input_ids=ids).logits[0].double(), -1)
                    n = len(item.prompt_ids)
                    want = sum(float(logp[n - 1 + j, t]) for j, t in enumerate(cont))
                    assert row[k] == pytest.approx(want, abs=1e-4)
