"""``archopt evaluate`` on a saved tiny model with local data, and what the archive then holds."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import func, select

from archopt.archdb import Archive
from archopt.archdb import models as m


def evaluate(run_cli, db: str, model_dir: Path, data_dir: Path, *extra: str):
    """``archopt evaluate`` of two perplexities on 16-token windows, on CPU (conftest's ``run_cli``)."""
    return run_cli("--db", db, "evaluate", "--model", str(model_dir), "--data-dir", str(data_dir),
                   "--metrics", "ppl_wikitext2,ppl_ptb", "--seq-len", "16", "--device", "cpu", *extra)


def counts(db: str) -> tuple[int, int]:
    """(architectures, evaluations) in the archive."""
    archive = Archive(db)
    try:
        with archive.read() as session:
            return (session.scalar(select(func.count()).select_from(m.Architecture)),
                    session.scalar(select(func.count()).select_from(m.Evaluation)))
    finally:
        archive.close()
