"""MMLU, k-shot, scored like Hendrycks et al. and lm-evaluation-harness.

Prompt per subject: ``"The following are multiple choice questions (with answers) about {subject}.\\n\\n"``
(underscores as spaces), then the first ``shots`` dev rows, each ``"Q\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer: X\\n\\n"``,
then the test question ending in ``"Answer:"``. The prediction is the letter whose continuation
(``" A"`` .. ``" D"``, tokenized in context) has the highest log-likelihood; ties go to the earlier
letter. Prompts are tokenized with the tokenizer's special tokens (a leading BOS where it adds one)
and cut from the left to the model's ``max_position_embeddings``.

``max_questions`` caps the total number of test questions: subjects (alphabetical) take turns
(round robin), each giving its next test row from the top, until the cap is reached. Each
subject's questions are thus always its first rows, and the choice depends only on the cap.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

import archopt
from archopt.archdb.protocol import DEFAULT_PRECISION, Measurement, Protocol

from .data import LETTERS, MMLU, MmluQuestion, MmluSubject, load_mmlu
from .loading import model_device
from .perplexity import autocast_for, batch_tokens, device_label, protocol_for
from .tokenization import tokenizer_hash, tokenizer_name

HEADER = "The following are multiple choice questions (with answers) about {}.\n\n"
MAX_BATCH_TOKENS = 8192
MAX_BATCH = 32


def format_subject(subject: str) -> str:
    return subject.replace("_", " ")


def format_example(question: MmluQuestion, with_answer: bool) -> str:
    text = question.question + "".join(f"\n{letter}. {choice}" for letter, choice in zip(LETTERS, question.choices))
    text += "\nAnswer:"
    return text + f" {question.answer_letter}\n\n" if with_answer else text


def build_prompt(subject: str, shots: Sequence[MmluQuestion], question: MmluQuestion) -> str:
    return (HEADER.format(format_subject(subject)) + "".join(format_example(s, True) for s in shots)
            + format_example(question, False))


def select_questions(subjects: dict[str, MmluSubject], max_questions: int | None) -> dict[str, int]:
    """How many test rows (from the top) each subject contributes under ``max_questions`` (round robin)."""
    sizes = {name: len(s.test) for name, s in sorted(subjects.items())}
    if max_questions is None:
        return sizes
    counts = {name: 0 for name in sizes}
    left = int(max_questions)
    while left > 0 and any(counts[n] < sizes[n] for n in sizes):
        for name in sizes:
            if left > 0 and counts[name] < sizes[name]:
                counts[name] += 1
                left -= 1
    return {n: c for n, c in counts.items() if c > 0}


def continuation_tokens(tokenizer: Any) -> list[list[int]]:
    """Tokens of ``" A"``..``" D"`` as they follow ``"Answer:"`` (encoded in context, lm-eval style)."""
    context = tokenizer("Answer:", add_special_tokens=False)["input_ids"]
    out = []
    for letter in LETTERS:
        whole = tokenizer(f"Answer: {letter}", add_special_tokens=False)["input_ids"]
        cont = whole[len(context):] if whole[: len(context)] == context else \
            tokenizer(f" {letter}", add_special_tokens=False)["input_ids"]
        if not cont:
            raise ValueError(f"tokenizer gives no tokens for the answer {letter!r}")
        out.append(list(cont))
    return out


@dataclass(frozen=True)
class _Item:
    subject: str
    answer: int
    prompt_ids: tuple[int, ...]


class MmluTask:
    """MMLU prompts tokenized once; ``evaluate(model)`` gives ``mmlu`` and one ``mmlu:<subject>`` per subject."""

    def __init__(self, tokenizer: Any, subjects: dict[str, MmluSubject], *, shots: int = 5,
                 max_questions: int | None = None, max_batch_tokens: int = MAX_BATCH_TOKENS,
                 precision: str = DEFAULT_PRECISION) -> None:
        if shots < 0:
            raise ValueError("shots must be 0 or more")
        self.shots = shots
        self.precision = precision
        self.max_batch_tokens = max_batch_tokens
        self.continuations = continuation_tokens(tokenizer)
        self.pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
        counts = select_questions(subjects, max_questions)
        prompts, meta = [], []
        for name, count in counts.items():
            subject = subjects[name]
            if len(subject.dev) < shots:
                raise ValueError(f"MMLU subject {name!r} has {len(subject.dev)} dev rows, fewer than {shots} shots")
            for question in subject.test[:count]:
                prompts.append(build_prompt(name, subject.dev[:shots], question))
                meta.append((name, question.answer))
        if not prompts:
            raise ValueError("no MMLU questions selected")
        encoded = tokenizer(prompts)["input_ids"]
        self.items = [_Item(name, answer, tuple(ids)) for (name, answer), ids in zip(meta, encoded)]
        self.subject_counts = {n: c for n, c in counts.items()}
        name, thash = tokenizer_name(tokenizer), tokenizer_hash(tokenizer)
        self.protocol = self._protocol(name, thash, len(self.items))
        self.subject_protocols = {n: self._protocol(name, thash, c) for n, c in counts.items()}

    def _protocol(self, tok_name: str, tok_hash: str, questions: int) -> Protocol:
        return Protocol(dataset=MMLU, split="test", tokenizer=tok_name, tokenizer_hash=tok_hash,
                        questions=questions, shots=self.shots, tool="archopt", tool_version=archopt.__version__,
                        precision=self.precision)

    @classmethod
    def prepare(cls, tokenizer: Any, *, data_dir: str | Path | None = None, shots: int = 5,
                max_questions: int | None = None, subjects: Sequence[str] | None = None,
                precision: str = DEFAULT_PRECISION) -> "MmluTask":
        """Read MMLU (``DIR/mmlu`` CSVs or ``datasets`` ``cais/mmlu``) and tokenize the prompts."""
        return cls(tokenizer, load_mmlu(data_dir, subjects), shots=shots, max_questions=max_questions,
                   precision=precision)

    # ----- scoring ------------------------------------------------------------------------------
    def choice_scores(self, model: torch.nn.Module, memory_budget: int | None = None) -> list[list[float]]:
        """Per question, the log-likelihood of each of the four answer continuations."""
        max_pos = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        single = all(len(c) == 1 for c in self.continuations)
        requests: list[tuple[list[int], list[int]]] = []  # (ids, positions to read)
        for item in self.items:
            if single:
                ids = _left_truncate(list(item.prompt_ids), max_pos)
                requests.append((ids, [len(ids) - 1]))
            else:
                for cont in self.continuations:
                    ids = _left_truncate(list(item.prompt_ids) + cont, max_pos)
                    requests.append((ids, list(range(len(ids) - len(cont) - 1, len(ids) - 1))))
        logprobs = self._position_logprobs(model, requests, memory_budget)
        scores: list[list[float]] = []
        if single:
            cand = torch.tensor([c[0] for c in self.continuations])
            for lp in logprobs:
                scores.append(lp[0, cand].tolist())
        else:
            for q in range(len(self.items)):
                row = []
                for k, cont in enumerate(self.continuations):
                    lp = logprobs[q * 4 + k]
                    row.append(float(lp[torch.arange(len(cont)), torch.tensor(cont)].sum()))
                scores.append(row)
        return scores

    def _position_logprobs(self, model: torch.nn.Module, requests: list[tuple[list[int], list[int]]],
                           memory_budget: int | None = None) -> list[torch.Tensor]:
        """Log-softmax rows (float32, CPU) at the requested positions, batched by length with right
        padding; a batch holds at most ``max_batch_tokens`` tokens and ``memory_budget`` bytes of
        activations (``perplexity.batch_tokens``)."""
        device = model_device(model)
        longest_prompt = max((len(r[0]) for r in requests), default=1)
        max_tokens = min(self.max_batch_tokens, batch_tokens(model, longest_prompt, memory_budget)
                         if memory_budget else self.max_batch_tokens)
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][0]))
        out: list[torch.Tensor | None] = [None] * len(requests)
        start = 0
        with torch.inference_mode(), autocast_for(device):
            while start < len(order):
                longest = len(requests[order[start]][0])
                size = max(1, min(MAX_BATCH, max_tokens // max(1, longest)))
                chunk = order[start: start + size]
                start += size
                ids = torch.full((len(chunk), longest), self.pad_id, dtype=torch.long)
                mask = torch.zeros((len(chunk), longest), dtype=torch.long)
                rows, cols = [], []
                for b, i in enumerate(chunk):
                    seq, positions = requests[i]
                    ids[b, : len(seq)] = torch.tensor(seq)
                    mask[b, : len(seq)] = 1
                    rows += [b] * len(positions)
                    cols += positions
                logits = _logits_at(model, ids.to(device), mask.to(device), torch.tensor(rows), torch.tensor(cols))
                logprobs = torch.log_softmax(logits.float(), dim=-1).cpu()
                offset = 0
                for i in chunk:
                    n = len(requests[i][1])
                    out[i] = logprobs[offset: offset + n]
                    offset += n
        return out  # type: ignore[return-value]

    @property
    def forwarded_tokens(self) -> int:
        """Tokens one evaluation puts through the model (every prompt)."""
        return sum(len(item.prompt_ids) for item in self.items)

    def evaluate(self, model: torch.nn.Module, memory_budget: int | None = None) -> list[Measurement]:
        """``mmlu`` (micro average over all questions) and ``mmlu:<subject>`` accuracies; a model
        whose answer log-likelihoods are not finite (diverged) gives failed measurements.
        ``memory_budget``: bytes of activations a batch may hold."""
        started = time.perf_counter()
        scores = self.choice_scores(model, memory_budget)
        correct: dict[str, int] = {n: 0 for n in self.subject_counts}
        for item, row in zip(self.items, scores):
            predicted = max(range(4), key=lambda k: (row[k], -k))
            correct[item.subject] += int(predicted == item.answer)
        bad = sum(not all(math.isfinite(v) for v in row) for row in scores)
        failed = f"diverged: non-finite answer log-likelihoods in {bad} of {len(scores)} questions" if bad else None
        elapsed = time.perf_counter() - started
        device = device_label(model_device(model))
        out = [Measurement("mmlu", sum(correct.values()) / len(self.items), protocol_for(self.protocol, model),
                           device, elapsed, failed)]
        for name, count in self.subject_counts.items():
            out.append(Measurement(f"mmlu:{name}", correct[name] / count,
                                   protocol_for(self.subject_protocols[name], model), device, None, failed))
        return out


def _left_truncate(ids: list[int], max_pos: int | None) -> list[int]:
    return ids[-max_pos:] if max_pos and len(ids) > max_pos else ids


def _logits_at(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor,
               cols: torch.Tensor) -> torch.Tensor:
    """Logits at (row, col) pairs; for Llama-layout LMs only those rows go through ``lm_head``."""
    rows, cols = rows.to(ids.device), cols.to(ids.device)
    inner, head = getattr(model, "model", None), getattr(model, "lm_head", None)
    if isinstance(inner, torch.nn.Module) and isinstance(head, torch.nn.Module):
        hidden = inner(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        return head(hidden[rows, cols])
    return model(input_ids=ids, attention_mask=mask, use_cache=False).logits[rows, cols]
