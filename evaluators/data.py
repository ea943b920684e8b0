"""Evaluation texts (WikiText-2 raw, PTB) and MMLU questions, from Hugging Face ``datasets`` or a local folder.

A local ``--data-dir`` is laid out like ``shared/data``::

    wikitext-2/wiki.{test,valid,train}.raw
    ptb/ptb.{train,valid,test}.txt
    mmlu/{dev,test}/<subject>_{dev,test}.csv     (no header: question,A,B,C,D,answer-letter)

The local readers yield the same rows as the ``datasets`` builders (checked in their code):
``wikitext`` yields every line of the file with its line end kept and a whitespace-only line as
``""``; ``ptb_text_only`` yields every line stripped. Both open the file with universal newlines.
Texts are the rows joined with ``"\\n\\n"`` (LLM-Pruner's evaluation).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

JOINING = "\n\n"
WIKITEXT2 = "wikitext-2-raw-v1"
PTB = "ptb_text_only"
MMLU = "mmlu"
LETTERS = ("A", "B", "C", "D")
CALIBRATION_NAME = f"{PTB}:train"   # the default calibration text of Taylor importance

_LOCAL_SPLIT = {"test": "test", "validation": "valid", "valid": "valid", "train": "train"}
_HF_SPLIT = {"test": "test", "validation": "validation", "valid": "validation", "train": "train"}


def read_wikitext_rows(path: str | Path) -> list[str]:
    """Rows of a WikiText ``.raw``/``.tokens`` file exactly as the ``wikitext`` builder yields them."""
    with open(path, encoding="utf-8") as fh:
        return [line if line.strip() else "" for line in fh]


def read_ptb_rows(path: str | Path) -> list[str]:
    """Rows of a PTB ``.txt`` file exactly as the ``ptb_text_only`` builder yields them."""
    with open(path, encoding="utf-8") as fh:
        return [line.strip() for line in fh]


def _split_names(split: str) -> tuple[str, str]:
    if split not in _LOCAL_SPLIT:
        raise ValueError(f"unknown split {split!r}: use test, validation or train")
    return _LOCAL_SPLIT[split], _HF_SPLIT[split]


def wikitext2_rows(split: str = "test", data_dir: str | Path | None = None) -> list[str]:
    """WikiText-2 raw rows: ``DIR/wikitext-2/wiki.<split>.raw`` or ``datasets`` ``wikitext``/``wikitext-2-raw-v1``."""
    return _rows(split, data_dir, "wikitext-2/wiki.{}.raw", "the WikiText-2 raw {} file", read_wikitext_rows,
                 ("wikitext", WIKITEXT2), "text")


def ptb_rows(split: str = "validation", data_dir: str | Path | None = None) -> list[str]:
    """PTB rows: ``DIR/ptb/ptb.<split>.txt`` or ``datasets`` ``ptb_text_only`` (column ``sentence``)."""
    return _rows(split, data_dir, "ptb/ptb.{}.txt", "the Mikolov PTB {} file", read_ptb_rows, (PTB,), "sentence")


def _rows(split: str, data_dir: str | Path | None, local_name: str, what: str, read: Any,
          hub_args: tuple[str, ...], column: str) -> list[str]:
    """The rows of a split from ``data_dir`` (``local_name`` formatted with the split's file name)
    or, without a folder, from the ``datasets`` hub builder ``hub_args``."""
    local, hf = _split_names(split)
    if data_dir is not None:
        path = Path(data_dir) / local_name.format(local)
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found (expected {what.format(local)})")
        return read(path)
    return list(_load_dataset(*hub_args, split=hf)[column])


def _load_dataset(*args: str, split: str) -> Any:
    """``datasets.load_dataset`` of a hub dataset, or one line (``hub.SourceError``) naming
    ``--data-dir`` within seconds when the hub cannot be used (offline and not cached, unreachable)."""
    from . import hub
    hub.check_dataset(args[0])
    from datasets import load_dataset

    try:
        return load_dataset(*args, split=split)
    except ConnectionError as exc:
        raise hub.SourceError(f"dataset {args[0]}: {str(exc).splitlines()[0][:200]}: {hub.DATA_DIR_HINT}") from None


def dataset_text(dataset: str, split: str, data_dir: str | Path | None = None) -> str:
    """The rows of ``dataset`` (``wikitext-2-raw-v1`` or ``ptb_text_only``) joined with ``"\\n\\n"``."""
    if dataset == WIKITEXT2:
        rows = wikitext2_rows(split, data_dir)
    elif dataset == PTB:
        rows = ptb_rows(split, data_dir)
    else:
        raise ValueError(f"unknown text dataset {dataset!r}: use {WIKITEXT2} or {PTB}")
    return JOINING.join(rows)


def canonical_split(split: str) -> str:
    """The ``datasets`` split name recorded in protocols (``valid`` -> ``validation``)."""
    return _split_names(split)[1]


@dataclass(frozen=True)
class MmluQuestion:
    question: str
    choices: tuple[str, str, str, str]
    answer: int  # 0..3

    @property
    def answer_letter(self) -> str:
        return LETTERS[self.answer]


@dataclass(frozen=True)
class MmluSubject:
    name: str
    dev: tuple[MmluQuestion, ...]
    test: tuple[MmluQuestion, ...]


def _read_mmlu_csv(path: Path) -> tuple[MmluQuestion, ...]:
    rows: list[MmluQuestion] = []
    with open(path, encoding="utf-8", newline="") as fh:
        for n, row in enumerate(csv.reader(fh)):
            if len(row) != 6 or row[5].strip() not in LETTERS:
                raise ValueError(f"{path}: row {n + 1} is not question,A,B,C,D,answer-letter")
            rows.append(MmluQuestion(row[0], (row[1], row[2], row[3], row[4]), LETTERS.index(row[5].strip())))
    return tuple(rows)


def load_mmlu(data_dir: str | Path | None = None, subjects: Sequence[str] | None = None) -> dict[str, MmluSubject]:
    """MMLU subjects (alphabetical) with their dev (shots) and test rows.

    From ``DIR/mmlu/{dev,test}/<subject>_{dev,test}.csv`` or ``datasets`` ``cais/mmlu`` (config ``all``).
    """
    wanted = set(subjects) if subjects else None
    out: dict[str, MmluSubject] = {}
    if data_dir is not None:
        root = Path(data_dir) / "mmlu"
        test_files = sorted((root / "test").glob("*_test.csv"))
        if not test_files:
            raise FileNotFoundError(f"no MMLU test CSVs under {root / 'test'}")
        for file in test_files:
            name = file.name[: -len("_test.csv")]
            if wanted is not None and name not in wanted:
                continue
            dev_file = root / "dev" / f"{name}_dev.csv"
            dev = _read_mmlu_csv(dev_file) if dev_file.is_file() else ()
            out[name] = MmluSubject(name, dev, _read_mmlu_csv(file))
    else:
        grouped: dict[str, dict[str, list[MmluQuestion]]] = {}
        for split in ("dev", "test"):
            for row in _load_dataset("cais/mmlu", "all", split=split):
                if wanted is not None and row["subject"] not in wanted:
                    continue
                q = MmluQuestion(row["question"], tuple(row["choices"]), int(row["answer"]))  # type: ignore[arg-type]
                grouped.setdefault(row["subject"], {"dev": [], "test": []})[split].append(q)
        for name in sorted(grouped):
            out[name] = MmluSubject(name, tuple(grouped[name]["dev"]), tuple(grouped[name]["test"]))
    if wanted is not None:
        missing = sorted(wanted - set(out))
        if missing:
            raise ValueError(f"unknown MMLU subject {missing[0]!r}")
    return out


def calibration_text(data_dir: str | Path | None = None) -> tuple[str, str]:
    """Default calibration text for Taylor importance, with its name: PTB train rows joined with ``"\\n\\n"``.

    (LLM-Pruner samples BookCorpus, which is not available offline; PTB train is never an evaluation split.)
    """
    return JOINING.join(ptb_rows("train", data_dir)), CALIBRATION_NAME
