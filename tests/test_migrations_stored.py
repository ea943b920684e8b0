"""Archives made by earlier schema versions, stored under tests/data/, upgrade to head with their data intact.

``tests/data/archive_0001_initial.db`` is a SQLite archive at revision ``0001_initial``: 14 architectures
of the tiny base model with 24 evaluations (one retracted, one on another protocol), made by ingesting a
file at head and running ``archopt db downgrade 0001_initial``. ``archive_0001_initial.export.jsonl`` is
``archopt export`` of that archive before the downgrade. On PostgreSQL the same rows are loaded, table
by table, into a database migrated to ``0001_initial`` only.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import sqlalchemy as sa

from archopt.archdb import Archive, ArchiveError
from archopt.archdb.archive import head_revision

DATA = Path(__file__).resolve().parent / "data"
STORED = DATA / "archive_0001_initial.db"
EXPORT = (DATA / "archive_0001_initial.export.jsonl").read_text()
OLD_TABLES = ("base_models", "protocols", "architectures", "evaluations")  # foreign keys in this order


def stored_copy(tmp_path: Path) -> str:
    """The committed file is never opened in place (opening it writes a WAL)."""
    path = tmp_path / "old.db"
    shutil.copy(STORED, path)
    return f"sqlite:///{path}"


def load_into_postgresql(url: str) -> None:
    """Migrate an empty PostgreSQL database to 0001_initial and copy the stored archive's rows into it."""
    Archive(url, check_schema=False).upgrade("0001_initial")
    source = sa.create_engine(f"sqlite:///{STORED}")
    target = Archive(url, check_schema=False)
    try:
        src_meta = sa.MetaData()
        src_meta.reflect(source, only=OLD_TABLES)
        dst_meta = sa.MetaData()
        dst_meta.reflect(target.engine, only=OLD_TABLES)
        with source.connect() as src, target.engine.begin() as dst:
            for name in OLD_TABLES:
                rows = [dict(r._mapping) for r in src.execute(sa.select(src_meta.tables[name]))]
                if rows:
                    dst.execute(sa.insert(dst_meta.tables[name]), rows)
                # the ids were copied: move each sequence past them
                dst.execute(sa.text(f"SELECT setval(pg_get_serial_sequence('{name}', 'id'), "
                                    f"(SELECT COALESCE(MAX(id), 1) FROM {name}))"))
    finally:
        source.dispose()
        target.close()


@pytest.fixture
def old_archive(archive_url: str, tmp_path: Path) -> str:
    """The stored 0001_initial archive on each backend."""
    if archive_url.startswith("sqlite"):
        return stored_copy(tmp_path)
    load_into_postgresql(archive_url)
    return archive_url


def test_stored_archive_is_at_0001() -> None:
    engine = sa.create_engine(f"sqlite:///{STORED}")
    try:
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT version_num FROM archopt_alembic_version")).scalar() == "0001_initial"
            assert conn.execute(sa.text("SELECT count(*) FROM evaluations")).scalar() == 24
    finally:
        engine.dispose()


def test_old_archive_upgrades_with_data_intact(old_archive: str, run_cli) -> None:
    # behind head: commands refuse with one line that names the way out, and change nothing
    res = run_cli("--db", old_archive, "models")
    assert res.code == 1 and len(res.err_lines) == 1 and "archopt db upgrade" in res.err
    with pytest.raises(ArchiveError, match="behind"):
        Archive(old_archive)
    res = run_cli("--db", old_archive, "db", "upgrade")
    assert res.code == 0, res.err
    assert Archive(old_archive, check_schema=False).current_revision() == head_revision()
    res = run_cli("--db", old_archive, "db", "check")
    assert res.code == 0, res.out + res.err
    res = run_cli("--db", old_archive, "export")
    assert res.code == 0, res.err
    assert res.out == EXPORT
    # the upgraded archive works for new writes and the new tables (predictors)
    res = run_cli("--db", old_archive, "predictors", "train", "--model", "tiny", "--metric", "ppl_wikitext2")
    assert res.code == 0, res.err


def test_downgrade_then_upgrade_round_trips(old_archive: str, run_cli) -> None:
    assert run_cli("--db", old_archive, "db", "upgrade").code == 0
    for _ in range(2):
        res = run_cli("--db", old_archive, "db", "downgrade", "0001_initial")
        assert res.code == 0, res.err
        res = run_cli("--db", old_archive, "db", "upgrade")
        assert res.code == 0, res.err
        res = run_cli("--db", old_archive, "export")
        assert res.code == 0 and res.out == EXPORT, res.err
    assert run_cli("--db", old_archive, "db", "check").code == 0
