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


def sampled_tiny_archive(run_cli, db: str, tmp_path: Path, monkeypatch) -> Path:
    """A tiny GQA model (9 query / 3 KV heads) with 8 random architectures at 80% evaluated on
    512 tokens into ``db`` (the CLI tests of ``query --rounds/--screen/--refine``); returns the
    local data folder."""
    import tiny_models as tm
    monkeypatch.setenv("ARCHOPT_CACHE", str(tmp_path / "cache"))
    model_dir = tm.save_tiny("llama_gqa_odd", tmp_path / "tiny-gqa")
    data_dir = tm.write_local_data(tmp_path / "data")
    r = evaluate(run_cli, db, model_dir, data_dir, "--samples", "8", "--params", "80%", "--seed", "1",
                 "--max-tokens", "512")
    assert r.code == 0, r.err
    return data_dir


def fidelity_pairs(db: str, model: str = "tiny-gqa", metric: str = "ppl_wikitext2") -> tuple[int, int, list]:
    """(tokens of ``metric``'s default protocol, its measured architectures, [(tokens, measured)]
    of each cheaper fidelity of it) in the archive."""
    from archopt.archdb import reads
    archive = Archive(db)
    try:
        with archive.read() as session:
            base = reads.get_base_model(session, model)
            pid = reads.default_protocol(session, base, metric)
            cheap = reads.cheaper_fidelities(session, base, metric, pid)
            return (reads.protocol_dict(session, pid)["tokens"], len(reads.training_pairs(session, base, metric, pid)),
                    [(reads.protocol_dict(session, c)["tokens"], len(reads.training_pairs(session, base, metric, c)))
                     for c in cheap])
    finally:
        archive.close()


def counts(db: str) -> tuple[int, int]:
    """(architectures, evaluations) in the archive."""
    archive = Archive(db)
    try:
        with archive.read() as session:
            return (session.scalar(select(func.count()).select_from(m.Architecture)),
                    session.scalar(select(func.count()).select_from(m.Evaluation)))
    finally:
        archive.close()
