"""The archive schema: ORM models and Alembic migrations agree, migrations go down and up, versions are checked."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from archopt.archdb import Archive, ArchiveError, ingest_file
from archopt.archdb.archive import VERSION_TABLE, alembic_config, head_revision
from archopt.archdb.models import Base

REPO = Path(__file__).resolve().parents[1]
ARCHOPT_TABLES = set(Base.metadata.tables)


def _tables(archive: Archive) -> set[str]:
    return set(sa.inspect(archive.engine).get_table_names())


def _diff(archive: Archive) -> list:
    def include(obj, name, type_, reflected, compare_to):  # noqa: ANN001
        return not (type_ == "table" and name == VERSION_TABLE)

    with archive.engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True, "include_object": include,
                                                     "version_table": VERSION_TABLE})
        return compare_metadata(ctx, Base.metadata)


def _revisions() -> list[str]:
    script = ScriptDirectory.from_config(alembic_config("sqlite://"))
    return [r.revision for r in reversed(list(script.walk_revisions()))]  # oldest first


def test_orm_and_migrations_agree(archive_url):
    archive = Archive(archive_url)  # a new archive is migrated to head on first use
    try:
        assert archive.current_revision() == head_revision()
        assert ARCHOPT_TABLES <= _tables(archive)
        assert _diff(archive) == []
    finally:
        archive.close()


def test_downgrade_to_base_and_upgrade_again(archive_url, examples):
    archive = Archive(archive_url)
    try:
        ingest_file(archive, examples.jsonl("a.jsonl", examples.standard(3)))
        archive.downgrade("base")
        assert archive.current_revision() is None
        assert not (_tables(archive) & ARCHOPT_TABLES)
        archive.upgrade("head")
        assert archive.current_revision() == head_revision()
        assert ARCHOPT_TABLES <= _tables(archive)
        assert _diff(archive) == []
        with archive.read() as session:  # the tables came back empty
            assert session.execute(sa.text("SELECT count(*) FROM evaluations")).scalar() == 0
        ingest_file(archive, examples.jsonl("b.jsonl", examples.standard(3)))
    finally:
        archive.close()


def test_every_revision_goes_down_and_up(sqlite_url):
    revisions = _revisions()
    archive = Archive(sqlite_url)
    try:
        for rev in reversed(revisions[:-1]):
            archive.downgrade(rev)
            assert archive.current_revision() == rev
        archive.downgrade("base")
        for rev in revisions:
            archive.upgrade(rev)
            assert archive.current_revision() == rev
        assert _diff(archive) == []
    finally:
        archive.close()


def test_new_archive_is_upgraded_on_first_use(tmp_path):
    path = tmp_path / "new.db"
    assert not path.exists()
    archive = Archive(str(path))  # a bare path means SQLite
    try:
        assert path.exists()
        assert archive.current_revision() == head_revision()
        with archive.read() as session:
            assert session.execute(sa.text("SELECT count(*) FROM base_models")).scalar() == 0
    finally:
        archive.close()
    again = Archive(f"sqlite:///{path}")  # opening it again checks and passes
    again.close()


def test_db_current_and_upgrade_commands(archive_url, run_cli):
    head = head_revision()
    res = run_cli("--db", archive_url, "db", "current")
    assert res.code == 0 and res.out.strip() == f"- (head {head}, empty)"
    res = run_cli("--db", archive_url, "db", "upgrade")
    assert res.code == 0, res.err
    assert f"empty -> {head}" in res.out
    assert "postgres:@" not in res.out  # no credentials printed
    res = run_cli("--db", archive_url, "db", "current")
    assert res.code == 0 and res.out.strip() == f"{head} (head {head}, up to date)"
    res = run_cli("--db", archive_url, "db", "upgrade")  # idempotent
    assert res.code == 0 and f"{head} -> {head}" in res.out
    res = run_cli("--db", archive_url, "db", "downgrade", "base")
    assert res.code == 0 and "base" in res.out
    res = run_cli("--db", archive_url, "db", "current")
    assert "empty" in res.out


def test_archive_behind_head_asks_for_upgrade(sqlite_url, run_cli):
    revisions = _revisions()
    if len(revisions) < 2:
        pytest.skip("only one revision")
    Archive(sqlite_url).close()
    archive = Archive(sqlite_url, check_schema=False)
    archive.downgrade(revisions[-2])
    archive.close()
    with pytest.raises(ArchiveError, match="behind .* run `archopt db upgrade`"):
        Archive(sqlite_url)
    res = run_cli("--db", sqlite_url, "models")
    assert res.code == 1 and len(res.err_lines) == 1 and "archopt db upgrade" in res.err
    res = run_cli("--db", sqlite_url, "db", "current")
    assert "behind" in res.out
    assert run_cli("--db", sqlite_url, "db", "upgrade").code == 0
    assert run_cli("--db", sqlite_url, "models").code == 0


def test_unknown_revision_is_refused(archive_url, run_cli):
    Archive(archive_url).close()
    archive = Archive(archive_url, check_schema=False)
    with archive.write_engine.begin() as conn:
        conn.execute(sa.text(f"UPDATE {VERSION_TABLE} SET version_num = '9999_from_the_future'"))
    archive.close()
    with pytest.raises(ArchiveError) as info:
        Archive(archive_url)
    message = str(info.value)
    assert "9999_from_the_future" in message and "newer than this archopt" in message and "upgrade archopt" in message
    res = run_cli("--db", archive_url, "archs", "--model", "x")
    assert res.code == 1
    assert res.err_lines == [f"error: {message}"]
    assert "Traceback" not in res.err


def test_foreign_database_is_not_adopted_silently(sqlite_url, run_cli):
    engine = sa.create_engine(sqlite_url)
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE somebody_elses (id INTEGER PRIMARY KEY)"))
    engine.dispose()
    with pytest.raises(ArchiveError, match="holds tables but no archopt schema version"):
        Archive(sqlite_url)
    res = run_cli("--db", sqlite_url, "models")
    assert res.code == 1 and len(res.err_lines) == 1
    assert run_cli("--db", sqlite_url, "db", "upgrade").code == 0  # adopting it is explicit
    archive = Archive(sqlite_url)
    assert "somebody_elses" in _tables(archive) and ARCHOPT_TABLES <= _tables(archive)
    archive.close()


@pytest.mark.parametrize("url, message", [
    ("mysql://u@h/db", "unsupported database 'mysql'"),
    ("sqlite:////no/such/folder/a.db", "does not exist"),
    ("postgresql://u@h:notaport/db", "cannot read database URL"),
])
def test_bad_urls(url, message, run_cli):
    with pytest.raises(ArchiveError, match=message):
        Archive(url)
    res = run_cli("--db", url, "models")
    assert res.code == 1 and len(res.err_lines) == 1 and message in res.err


def test_plain_alembic_uses_the_same_migrations(tmp_path):
    """``ARCHOPT_DB=... alembic upgrade head`` (alembic.ini at the repository root) builds the same schema."""
    url = f"sqlite:///{tmp_path / 'plain.db'}"
    env = {**os.environ, "ARCHOPT_DB": url}
    alembic = [sys.executable, "-m", "alembic", "-c", str(REPO / "alembic.ini")]
    done = subprocess.run([*alembic, "upgrade", "head"], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    archive = Archive(url)  # recognised as an archive at head
    try:
        assert archive.current_revision() == head_revision()
        assert _diff(archive) == []
    finally:
        archive.close()
