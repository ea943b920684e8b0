"""The queue's tables: procrastinate's (its own schema SQL) and archopt's job log, in schema ``procrastinate``."""

from __future__ import annotations

from .connection import NEEDS_POSTGRES, SCHEMA, QueueError, conninfo, connect, connector_kwargs
from .joblog import LOG_DDL

_LOCK = 712008  # advisory lock: two `archopt db upgrade` at once create the schema once


def upgrade_queue_schema(archive_url: str) -> bool:
    """Create procrastinate's tables in the ``procrastinate`` schema if they are missing (its own
    schema SQL through its ``SchemaManager``), and archopt's; returns whether procrastinate's were created."""
    from procrastinate import SyncPsycopgConnector
    from procrastinate.schema import SchemaManager
    with connect(archive_url) as conn:
        conn.execute("SELECT pg_advisory_lock(%s)", (_LOCK,))
        try:
            conn.execute(f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}")
            exists = conn.execute("SELECT to_regclass(%s)", (f"{SCHEMA}.procrastinate_jobs",)).fetchone()[0]
            if exists is None:
                connector = SyncPsycopgConnector(conninfo=conninfo(archive_url), kwargs=connector_kwargs())
                connector.open()
                try:
                    SchemaManager(connector).apply_schema()
                finally:
                    connector.close()
            conn.execute(LOG_DDL)
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (_LOCK,))
    return exists is None


def require_queue(archive_url: str) -> None:
    """Raise :class:`QueueError` unless the archive is PostgreSQL with the queue's tables."""
    if not archive_url.startswith("postgresql"):
        raise QueueError(NEEDS_POSTGRES)
    with connect(archive_url) as conn:
        if conn.execute("SELECT to_regclass(%s)", (f"{SCHEMA}.procrastinate_jobs",)).fetchone()[0] is None:
            raise QueueError("the job queue is not set up in this database: run `archopt db upgrade`")
