"""``archopt db check`` finds broken invariants; ``archopt db backup`` copies a live archive."""

from __future__ import annotations

from sqlalchemy import update

from archopt.archdb import Archive
from archopt.archdb import models as m
from helpers.archives import fill
from archopt.optimizer.training import ensure_predictors


def test_check_passes_then_finds_tampering(sqlite_url, run_cli):
    archive = Archive(sqlite_url)
    fill(archive, 12)
    ensure_predictors(archive, "synth", ["ppl_wikitext2"])
    archive.close()
    r = run_cli("--db", sqlite_url, "db", "check")
    assert r.code == 0 and r.out.startswith("ok: checked 1 base_models, 12 architectures, 24 evaluations")
    archive = Archive(sqlite_url)
    with archive.write() as session:
        session.execute(update(m.PredictorVersion).values(artifact=b"not the artifact"))
        session.execute(update(m.Architecture).where(m.Architecture.id == 1).values(params=1))
    archive.close()
    r = run_cli("--db", sqlite_url, "db", "check")
    assert r.code == 1
    assert "artifact hash mismatch" in r.out and "params 1 !=" in r.out and "2 problem(s)" in r.out


def test_backup_copies_everything_and_refuses_to_overwrite(sqlite_url, run_cli, tmp_path):
    archive = Archive(sqlite_url)
    fill(archive, 10)
    archive.close()
    target = tmp_path / "copy.db"
    assert run_cli("--db", sqlite_url, "db", "backup", str(target)).code == 0
    original = run_cli("--db", sqlite_url, "export").out
    assert run_cli("--db", f"sqlite:///{target}", "export").out == original and original
    again = run_cli("--db", sqlite_url, "db", "backup", str(target))
    assert again.code == 1 and "exists" in again.err


def test_backup_of_postgresql_gives_pg_dump_guidance(archive_url, run_cli, tmp_path):
    r = run_cli("--db", archive_url, "db", "backup", str(tmp_path / "x.db"))
    if archive_url.startswith("postgresql"):
        assert r.code == 1 and "pg_dump" in r.err
    else:
        assert r.code == 0
