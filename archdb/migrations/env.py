"""Alembic environment for archopt's archive (its own version table, batch mode for SQLite)."""

from __future__ import annotations

import os

from alembic import context
from sqlalchemy import create_engine

from archopt.archdb.models import Base

VERSION_TABLE = "archopt_alembic_version"
config = context.config


def _include(obj, name, type_, reflected, compare_to) -> bool:  # noqa: ANN001
    """Only archopt's own tables (Optuna and procrastinate keep theirs in other schemas)."""
    return not (type_ == "table" and reflected and compare_to is None)


def run() -> None:
    connection = config.attributes.get("connection")
    if connection is None:
        url = os.environ.get("ARCHOPT_DB") or config.get_main_option("sqlalchemy.url")
        engine = create_engine(url)
        with engine.begin() as conn:
            _configure_and_run(conn)
        engine.dispose()
    else:
        _configure_and_run(connection)


def _configure_and_run(connection) -> None:  # noqa: ANN001
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        version_table=VERSION_TABLE,
        render_as_batch=True,
        include_object=_include,
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


run()
