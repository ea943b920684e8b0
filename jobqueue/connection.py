"""Where the queue lives: a libpq URL from an archive URL, a connection in the queue's schema, its error."""

from __future__ import annotations

from typing import Any

from archopt.archdb.errors import ArchoptError

SCHEMA = "procrastinate"
NEEDS_POSTGRES = ("the job queue needs a PostgreSQL archive (--db postgresql://...); "
                  "`archopt evaluate` does the same work on one machine")


class QueueError(ArchoptError, RuntimeError):
    """The queue cannot be used (one line)."""


def conninfo(archive_url: str) -> str:
    """A libpq URL for psycopg from an archive URL (``postgresql+psycopg://`` -> ``postgresql://``)."""
    from sqlalchemy.engine import make_url
    from archopt.archdb.archive import resolve_url
    url = make_url(resolve_url(archive_url))
    if url.get_backend_name() != "postgresql":
        raise QueueError(NEEDS_POSTGRES)
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


def connect(archive_url: str) -> Any:
    """An autocommit psycopg connection whose search path is the queue's schema."""
    import psycopg
    return psycopg.connect(conninfo(archive_url), autocommit=True, options=f"-c search_path={SCHEMA}")


def connector_kwargs() -> dict[str, Any]:
    """What procrastinate's connectors pass to psycopg: the queue's schema as search path."""
    return {"options": f"-c search_path={SCHEMA}"}
