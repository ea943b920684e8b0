"""Local data loaders yield the rows the ``datasets`` builders yield; MMLU CSVs and question selection."""

from __future__ import annotations

import pytest

import tiny_models  # noqa: F401  (sets the offline environment)
from archopt.evaluators import data


def test_wikitext_rows_follow_the_builder(tmp_path):
    # The builder: `for row in open(f, encoding="utf-8"): yield row if row.strip() else ""`.
    raw = " = Title = \n \n Some text , with spaces . \n\n\t\n Last line without end"
    (tmp_path / "wikitext-2").mkdir()
    (tmp_path / "wikitext-2" / "wiki.test.raw").write_bytes(raw.encode("utf-8"))
    rows = data.wikitext2_rows("test", tmp_path)
    assert rows == [" = Title = \n", "", " Some text , with spaces . \n", "", "", " Last line without end"]
    assert data.dataset_text(data.WIKITEXT2, "test", tmp_path) == "\n\n".join(rows)


def test_wikitext_reads_universal_newlines(tmp_path):
    (tmp_path / "wikitext-2").mkdir()
    (tmp_path / "wikitext-2" / "wiki.valid.raw").write_bytes(b" a b\r\n \r\n c\r\n")
    assert data.wikitext2_rows("validation", tmp_path) == [" a b\n", "", " c\n"]


def test_ptb_rows_are_stripped(tmp_path):
    (tmp_path / "ptb").mkdir()
    (tmp_path / "ptb" / "ptb.valid.txt").write_text(" consumers may want to move <unk> \n\n the N stock \n")
    (tmp_path / "ptb" / "ptb.test.txt").write_text(" no it was n't black monday \n")
    assert data.ptb_rows("validation", tmp_path) == ["consumers may want to move <unk>", "", "the N stock"]
    assert data.dataset_text(data.PTB, "test", tmp_path) == "no it was n't black monday"
    assert data.dataset_text(data.PTB, "valid", tmp_path) == "consumers may want to move <unk>\n\n\n\nthe N stock"
    assert data.canonical_split("valid") == "validation"


def test_missing_files_and_bad_names(tmp_path):
    with pytest.raises(FileNotFoundError, match="wiki.test.raw"):
        data.wikitext2_rows("test", tmp_path)
    with pytest.raises(ValueError, match="split"):
        data.ptb_rows("dev", tmp_path)
    with pytest.raises(ValueError, match="dataset"):
        data.dataset_text("lambada", "test", tmp_path)


def write_mmlu(root, subjects):
    for split in ("dev", "test"):
        (root / "mmlu" / split).mkdir(parents=True, exist_ok=True)
    for name, (dev, test) in subjects.items():
        for split, rows in (("dev", dev), ("test", test)):
            lines = [",".join(f'"{c}"' for c in row) for row in rows]
            (root / "mmlu" / split / f"{name}_{split}.csv").write_text("\n".join(lines) + "\n")


def test_mmlu_csv_loader(tmp_path):
    write_mmlu(tmp_path, {
        "high_school_math": ([("1+1?", "1", "2", "3", "4", "B")], [("Is 2, 3 prime?", "yes, both", "no", "x", "y", "A")]),
        "anatomy": ([("q", "a", "b", "c", "d", "D")], [("q2", "a", "b", "c", "d", "C"), ("q3", "a", "b", "c", "d", "A")]),
    })
    subjects = data.load_mmlu(tmp_path)
    assert list(subjects) == ["anatomy", "high_school_math"]
    q = subjects["high_school_math"].test[0]
    assert q.question == "Is 2, 3 prime?" and q.choices[0] == "yes, both" and q.answer == 0 and q.answer_letter == "A"
    assert subjects["anatomy"].dev[0].answer == 3 and len(subjects["anatomy"].test) == 2
    assert list(data.load_mmlu(tmp_path, ["anatomy"])) == ["anatomy"]
    with pytest.raises(ValueError, match="subject"):
        data.load_mmlu(tmp_path, ["law"])


def test_real_shared_data_layout_when_present():
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "shared" / "data"
    if not (root / "wikitext-2" / "wiki.test.raw").is_file():
        pytest.skip("shared data not present")
    rows = data.wikitext2_rows("test", root)
    assert len(rows) == 4358 and rows[0] == "" and rows[1] == " = Robert Boulter = \n"
