"""Opening an archive: engine, sessions, schema version check and migrations.

Contract:
- ``Archive`` is safe to share between threads; each ``read()``/``write()`` block gets its own
  session, closed at the end of the block.
- ``write()`` commits on success and rolls back on any error: a block is all or nothing. On SQLite
  a write block starts with ``BEGIN IMMEDIATE`` (writers queue on the busy timeout instead of
  failing on a lock upgrade); readers are never blocked (WAL). On PostgreSQL a write block starts
  by taking the writers' advisory transaction lock, so write blocks are serialised the same way.
- Database errors leave as ``ArchiveError`` with a one-line message, never a raw SQL string.
- A new, empty database is migrated to head on first use. An archive behind head asks for
  ``archopt db upgrade``; one ahead of this archopt asks for a newer archopt.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import re
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from sqlalchemy import Engine, create_engine, event, inspect, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from .errors import ArchoptError

if TYPE_CHECKING:
    from alembic.config import Config

VERSION_TABLE = "archopt_alembic_version"
DEFAULT_URL = "sqlite:///archopt.db"
SQLITE_SUFFIXES = (".db", ".sqlite", ".sqlite3")
SQLITE_BUSY_TIMEOUT_S = 120


class ArchiveError(ArchoptError, RuntimeError):
    """Something is wrong with the archive database (one readable line)."""


def resolve_url(url: str | None = None) -> str:
    """``--db URL`` wins, then ``ARCHOPT_DB``, then ``sqlite:///archopt.db``. A bare path means
    SQLite when it ends in ``.db``, ``.sqlite`` or ``.sqlite3``; any other bare word is refused
    (``--db foo`` would silently create a SQLite file named ``foo``)."""
    url = url or os.environ.get("ARCHOPT_DB") or DEFAULT_URL
    if "://" not in url:
        if not url.lower().endswith(SQLITE_SUFFIXES):
            shown = url if len(url) <= 80 else url[:77] + "..."
            raise ArchiveError(f"database {shown!r} is neither a URL nor a SQLite file name: write "
                               f"sqlite:///PATH, a path ending in {', '.join(SQLITE_SUFFIXES)} (e.g. "
                               "archopt.db), or postgresql://user@host/db")
        url = f"sqlite:///{url}"
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        url = "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


def alembic_config(url: str) -> Config:
    """An Alembic config that finds the migrations inside the installed package."""
    from alembic.config import Config
    cfg = Config()
    cfg.set_main_option("script_location", str(resources.files("archopt.archdb") / "migrations"))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    cfg.set_main_option("version_table", VERSION_TABLE)
    return cfg


def head_revision(url: str = DEFAULT_URL) -> str:
    """The newest schema revision, as Alembic reads the migrations."""
    from alembic.script import ScriptDirectory
    head = ScriptDirectory.from_config(alembic_config(url)).get_current_head()
    assert head is not None
    return head


_REVISION = re.compile(r"""^revision\s*=\s*['"]([^'"]+)['"]""", re.M)
_DOWN = re.compile(r"""^down_revision\s*=\s*(None|['"]([^'"]+)['"])""", re.M)


@functools.cache
def declared_head() -> str | None:
    """The newest revision read from the migration files' ``revision`` / ``down_revision`` lines
    without importing Alembic (opening an archive at head needs no more); None when the files do not
    form one plain chain (a merge, several heads), and Alembic has to say."""
    folder = resources.files("archopt.archdb") / "migrations" / "versions"
    revisions, parents = set(), set()
    for entry in folder.iterdir():
        if not entry.name.endswith(".py") or entry.name.startswith("__"):
            continue
        source = entry.read_text(encoding="utf-8")
        rev, down = _REVISION.search(source), _DOWN.search(source)
        if rev is None or down is None:
            return None
        revisions.add(rev.group(1))
        if down.group(2):
            parents.add(down.group(2))
    heads = revisions - parents
    return heads.pop() if len(heads) == 1 else None


def _sqlite_pragmas(dbapi_connection, _record) -> None:  # noqa: ANN001
    dbapi_connection.isolation_level = None  # we issue BEGIN ourselves
    cur = dbapi_connection.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_S * 1000}")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA cache_size=-65536")  # up to 64 MiB of pages: bulk ingests touch large indexes
    cur.close()


def _make_engine(url: str, immediate: bool) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S, "check_same_thread": False})
        event.listen(engine, "connect", _sqlite_pragmas)
        begin = "BEGIN IMMEDIATE" if immediate else "BEGIN"
        event.listen(engine, "begin", lambda conn: conn.exec_driver_sql(begin))
        return engine
    return create_engine(url, pool_pre_ping=True)


class Archive:
    """One archive database: ``read()`` and ``write()`` sessions and its schema state."""

    def __init__(self, url: str | None = None, *, check_schema: bool = True) -> None:
        self.url = resolve_url(url)
        try:
            parsed = make_url(self.url)
        except (ArgumentError, ValueError):  # ValueError: a port that is not a number
            raise ArchiveError(f"cannot read database URL {self.url[:80]!r}") from None
        self.dialect = parsed.get_backend_name()
        if self.dialect not in ("sqlite", "postgresql"):
            raise ArchiveError(f"unsupported database {self.dialect!r}: use sqlite:/// or postgresql://")
        if self.dialect == "sqlite" and parsed.database and parsed.database != ":memory:":
            folder = Path(parsed.database).expanduser().resolve().parent
            if not folder.is_dir():
                raise ArchiveError(f"folder {folder} of the SQLite archive does not exist")
        self.engine = _make_engine(self.url, immediate=False)
        self.write_engine = _make_engine(self.url, immediate=True) if self.dialect == "sqlite" else self.engine
        self._read = sessionmaker(self.engine, expire_on_commit=False)
        self._write = sessionmaker(self.write_engine, expire_on_commit=False)
        if check_schema:
            self.ensure_schema()

    # --- sessions -------------------------------------------------------------------------------
    @contextlib.contextmanager
    def read(self) -> Iterator[Session]:
        session = self._read()
        try:
            yield session
        except SQLAlchemyError as exc:
            raise ArchiveError(_describe(exc)) from exc
        except OverflowError as exc:  # e.g. an id of 2**63 given to SQLite's driver
            raise ArchiveError(_OVERFLOW) from exc
        finally:
            session.rollback()
            session.close()

    @contextlib.contextmanager
    def write(self) -> Iterator[Session]:
        session = self._write()
        try:
            if self.dialect == "postgresql":
                # Queue behind other writers for the whole block, as BEGIN IMMEDIATE does on SQLite:
                # blocks that read then insert (the next predictor version) would otherwise race.
                from .store import serialize_writers
                serialize_writers(session)
            yield session
            session.commit()
        except SQLAlchemyError as exc:
            session.rollback()
            raise ArchiveError(_describe(exc)) from exc
        except OverflowError as exc:
            session.rollback()
            raise ArchiveError(_OVERFLOW) from exc
        except BaseException:
            session.rollback()
            raise
        finally:
            session.close()

    def close(self) -> None:
        self.engine.dispose()
        if self.write_engine is not self.engine:
            self.write_engine.dispose()

    # --- schema ---------------------------------------------------------------------------------
    def current_revision(self) -> str | None:
        """The archive's schema revision (None: no archopt schema yet), read with plain SQL."""
        try:
            with self.engine.connect() as conn:
                if not inspect(conn).has_table(VERSION_TABLE):
                    return None
                found = list(conn.execute(text(f"SELECT version_num FROM {VERSION_TABLE}")).scalars())
        except SQLAlchemyError as exc:
            raise ArchiveError(_describe(exc)) from exc
        if len(found) > 1:
            raise ArchiveError(f"the archive records several schema versions ({', '.join(sorted(found))}): "
                               "run `archopt db upgrade`")
        return found[0] if found else None

    def ensure_schema(self) -> None:
        """Migrate a new archive to head; refuse one that is behind or ahead. An archive at head is
        recognised without importing Alembic."""
        current = self.current_revision()
        if current is not None and current == declared_head():
            return
        from alembic import command
        from alembic.script import ScriptDirectory
        head = head_revision(self.url)
        if current == head:
            return
        if current is None:
            with self._upgrade_lock():
                if self.current_revision() is None:
                    if self._has_foreign_tables():
                        raise ArchiveError("the database holds tables but no archopt schema version: "
                                           "is this an archopt archive? (run `archopt db upgrade` to adopt it)")
                    self._migrate(command.upgrade, "head")
            return
        script = ScriptDirectory.from_config(alembic_config(self.url))
        try:
            script.get_revision(current)
        except Exception:
            raise ArchiveError(f"archive schema {current} is newer than this archopt knows (head {head}): "
                               "upgrade archopt") from None
        raise ArchiveError(f"archive schema {current} is behind {head}: run `archopt db upgrade`")

    def _has_foreign_tables(self) -> bool:
        names = set(inspect(self.engine).get_table_names())
        return bool(names - {VERSION_TABLE})

    def upgrade(self, revision: str = "head") -> None:
        from alembic import command
        with self._upgrade_lock():
            self._migrate(command.upgrade, revision)

    def downgrade(self, revision: str) -> None:
        from alembic import command
        with self._upgrade_lock():
            self._migrate(command.downgrade, revision)

    def _migrate(self, step, revision: str) -> None:  # noqa: ANN001
        with self.write_engine.begin() as conn:
            cfg = alembic_config(self.url)
            cfg.attributes["connection"] = conn
            step(cfg, revision)

    @contextlib.contextmanager
    def _upgrade_lock(self) -> Iterator[None]:
        """Serialise concurrent first-use migrations (a lock file / a PostgreSQL advisory lock)."""
        if self.dialect == "sqlite":
            database = make_url(self.url).database
            if not database or database == ":memory:":
                yield
                return
            with open(f"{database}.lock", "a+") as handle:
                fcntl.flock(handle, fcntl.LOCK_EX)
                try:
                    yield
                finally:
                    fcntl.flock(handle, fcntl.LOCK_UN)
            return
        with self.engine.connect() as conn:
            conn.execute(text("SELECT pg_advisory_lock(712006)"))
            conn.commit()
            try:
                yield
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(712006)"))
                conn.commit()


_OVERFLOW = "a number is out of the archive's range (integers are at most 64-bit)"


def _describe(exc: SQLAlchemyError) -> str:
    """A one-line message without SQL text."""
    orig = getattr(exc, "orig", None)
    msg = str(orig if orig is not None else exc).strip().splitlines()[0] if str(orig or exc).strip() else type(exc).__name__
    return f"archive database error: {msg[:300]}"
