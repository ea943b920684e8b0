"""``archopt db``: create, migrate, check and back up the archive schema."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from archopt.cli import State, pass_state

from .output import print_json


@click.group()
def db() -> None:
    """Archive schema: upgrade, current version.

    \b
    Example:
      archopt db upgrade
    """


@db.command("upgrade")
@click.option("--revision", default="head", show_default=True, help="Target revision.")
@pass_state
def db_upgrade(state: State, revision: str) -> None:
    """Create or migrate the archive schema.

    \b
    Example:
      archopt --db postgresql://user@host/archopt db upgrade
    """
    from archopt.archdb.archive import Archive
    archive = Archive(state.db, check_schema=False)
    try:
        before = archive.current_revision()
        archive.upgrade(revision)
        after = archive.current_revision()
    finally:
        archive.close()
    click.echo(f"archive {archive.url.split('@')[-1]}: {before or 'empty'} -> {after}")
    if archive.dialect == "postgresql":
        from archopt.jobqueue import upgrade_queue_schema
        created = upgrade_queue_schema(archive.url)
        click.echo(f"job queue (schema procrastinate): {'created' if created else 'up to date'}")


@db.command("current")
@pass_state
def db_current(state: State) -> None:
    """Print the archive's schema version and the newest this archopt knows.

    \b
    Example:
      archopt db current
    """
    from archopt.archdb.archive import head_revision
    from archopt.archdb.archive import Archive
    archive = Archive(state.db, check_schema=False)
    try:
        current = archive.current_revision()
    finally:
        archive.close()
    head = head_revision(archive.url)
    status = "up to date" if current == head else ("empty" if current is None else "behind: run archopt db upgrade")
    click.echo(f"{current or '-'} (head {head}, {status})")


@db.command("downgrade")
@click.argument("revision")
@pass_state
def db_downgrade(state: State, revision: str) -> None:
    """Migrate the schema down to REVISION (``base`` removes every archopt table).

    \b
    Example:
      archopt db downgrade 0001_initial
    """
    from archopt.archdb.archive import Archive
    archive = Archive(state.db, check_schema=False)
    try:
        archive.downgrade(revision)
        click.echo(f"archive now at {archive.current_revision() or 'base'}")
    finally:
        archive.close()


@db.command("check")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_state
def db_check(state: State, as_json: bool) -> None:
    """Check the archive: database integrity, foreign keys, hashes, parameter counts, artifacts.

    Exits non-zero when a problem is found.

    \b
    Example:
      archopt db check
    """
    from archopt.archdb.maintenance import check
    report = check(state.archive)
    if as_json:
        print_json({"ok": report.ok, "checked": report.checked, "problems": report.problems})
    else:
        counts = ", ".join(f"{v} {k}" for k, v in report.checked.items())
        for problem in report.problems:
            state.out.print(f"problem: {problem}", markup=False)
        state.out.print(f"{'ok' if report.ok else f'{len(report.problems)} problem(s)'}: checked {counts}")
    if not report.ok:
        sys.exit(1)


@db.command("backup")
@click.argument("destination", type=click.Path(dir_okay=False, path_type=Path))
@pass_state
def db_backup(state: State, destination: Path) -> None:
    """Copy a SQLite archive to DESTINATION with the online backup API (safe while others write).

    For PostgreSQL it prints the pg_dump command to use instead.

    \b
    Example:
      archopt db backup backups/archopt-2026-11-24.db
    """
    from archopt.archdb.maintenance import backup
    path = backup(state.archive, destination)
    click.echo(f"backed up to {path}")

