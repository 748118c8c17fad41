"""Engines, sessions and schema migrations for the node's database (SQLite or PostgreSQL).

The node writes from several processes at once (one per DICOM SCP worker), so the engine
is tuned for that:

* SQLite: WAL journal, ``synchronous=FULL`` (a C-STORE is answered "success" only after the
  record is committed, so a commit must survive a power cut), a 30 s busy timeout, foreign
  keys on, and every write transaction opened with ``BEGIN IMMEDIATE`` so that two writers
  never both hold a read lock and deadlock while upgrading it to a write lock.
* PostgreSQL (``postgresql+psycopg://``): ``pool_pre_ping`` so a restarted server is noticed.

Every SQLAlchemy or Alembic failure leaves this package as
:class:`triage_node.errors.DatabaseError`, with the URL in the message but never its password.
"""

from __future__ import annotations

import logging
import random
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import event, exc
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.orm import Session, sessionmaker

from triage_node.errors import DatabaseError
from triage_node.logs import REDACTED as _REDACTED
from triage_node.logs import SECRET_QUERY_KEYS as _SECRET_QUERY_KEYS
from triage_node.logs import redact_url

__all__ = [
    "MIGRATIONS_DIR",
    "SQLITE_BUSY_TIMEOUT_MS",
    "alembic_config",
    "current_revision",
    "database_errors",
    "default_sqlite_url",
    "head_revision",
    "make_engine",
    "make_session_factory",
    "redact_url",
    "upgrade",
]

logger = logging.getLogger(__name__)

#: The Alembic environment shipped inside the package.
MIGRATIONS_DIR: Path = Path(__file__).resolve().parent / "migrations"

#: How long a SQLite writer waits for another process's write lock before failing.
SQLITE_BUSY_TIMEOUT_MS = 30_000

#: Default PostgreSQL connect timeout (seconds): an unreachable host must not hang a receiver.
POSTGRES_CONNECT_TIMEOUT_S = 10

#: Execution option read by the SQLite "begin" hook: ``"DEFERRED"`` for read-only work.
SQLITE_BEGIN_OPTION = "triage_node_sqlite_begin"

#: Alembic keeps its running environment in module globals: one upgrade per process at a time.
_ALEMBIC_LOCK = threading.Lock()

#: Backends and the drivers the store is written (and tested) for.
_SUPPORTED_DRIVERS: dict[str, frozenset[str]] = {
    "sqlite": frozenset({"pysqlite"}),
    "postgresql": frozenset({"psycopg"}),
}
_URL_HINT = "use sqlite:///PATH or postgresql+psycopg://USER@HOST/DB"


def _secrets_of(url: URL) -> list[str]:
    """Passwords that must not appear in a message about ``url``."""
    secrets = [url.password] if url.password else []
    for key, value in url.query.items():
        if key.lower() in _SECRET_QUERY_KEYS:
            secrets.extend([value] if isinstance(value, str) else list(value))
    return [str(s) for s in secrets if s]


def _describe(error: BaseException, url: URL) -> str:
    """One line saying what went wrong, without SQL parameters or secrets."""
    if isinstance(error, exc.DBAPIError) and error.orig is not None:
        detail = str(error.orig).strip() or type(error.orig).__name__
    else:
        detail = str(error).strip() or type(error).__name__
    # Keep the first line: drivers append hints and SQLAlchemy appends the statement.
    detail = detail.splitlines()[0] if detail else detail
    for secret in _secrets_of(url):
        detail = detail.replace(secret, _REDACTED)
    return detail


@contextmanager
def database_errors(url: str | URL, action: str) -> Iterator[None]:
    """Translate SQLAlchemy and Alembic errors raised inside the block to ``DatabaseError``.

    Parameters
    ----------
    url : str or sqlalchemy.engine.URL
        The database the block talks to; named in the message with its password hidden.
    action : str
        What the block does, phrased to follow "cannot", e.g. ``"record the batch"``.

    Yields
    ------
    None

    Raises
    ------
    DatabaseError
        For any :class:`sqlalchemy.exc.SQLAlchemyError` or :class:`alembic.util.CommandError`
        raised in the block (chained with ``from``).
    """
    try:
        yield
    except (exc.SQLAlchemyError, CommandError) as error:
        try:
            parsed = make_url(url)
        except exc.ArgumentError:
            parsed = URL.create("unknown")
        message = f"cannot {action}: database {redact_url(url)}: {_describe(error, parsed)}"
        raise DatabaseError(message) from error


def default_sqlite_url(data_dir: Path) -> str:
    """URL of the node's default SQLite database inside ``data_dir``.

    Parameters
    ----------
    data_dir : pathlib.Path
        The node's data directory (need not exist yet; :func:`make_engine` creates it).

    Returns
    -------
    str
        ``sqlite:///<data_dir>/triage-node.db`` with ``data_dir`` made absolute.
    """
    if not isinstance(data_dir, Path):
        raise TypeError(f"data_dir must be a pathlib.Path, not {type(data_dir).__name__}")
    return f"sqlite:///{(data_dir.absolute() / 'triage-node.db').as_posix()}"


def _parse(url: str | URL) -> URL:
    """Parse and check a URL, or raise ``DatabaseError`` naming it (redacted)."""
    try:
        parsed = make_url(url)
    except (exc.ArgumentError, ValueError) as error:
        raise DatabaseError(f"invalid database URL {redact_url(url)}: {error}") from error
    if parsed.get_backend_name() not in _SUPPORTED_DRIVERS:
        raise DatabaseError(f"unsupported database URL {redact_url(parsed)}: {_URL_HINT}")
    return parsed


def _create_engine(url: URL, **kwargs: Any) -> Engine:
    """``sqlalchemy.create_engine`` refusing drivers other than pysqlite and psycopg."""
    try:
        engine = sa.create_engine(url, **kwargs)
    except ImportError as error:
        raise DatabaseError(
            f"unsupported database URL {redact_url(url)}: {error}; {_URL_HINT}"
        ) from error
    if engine.dialect.driver not in _SUPPORTED_DRIVERS[engine.dialect.name]:
        engine.dispose()
        raise DatabaseError(
            f"unsupported database driver {engine.dialect.driver!r} in {redact_url(url)}: "
            f"{_URL_HINT}"
        )
    return engine


def sqlite_file(url: URL) -> Path | None:
    """The file a SQLite URL points at, or ``None`` for in-memory databases."""
    database = url.database or ""
    if database in ("", ":memory:") or url.query.get("mode") == "memory":
        return None
    if database.startswith("file:"):
        database = database[len("file:") :].split("?", 1)[0]
    return Path(database)


def _enable_wal(cursor: Any) -> str:
    """Switch the database file to WAL (persistent) unless it already is; return the mode."""
    mode = str(cursor.execute("PRAGMA journal_mode").fetchone()[0]).lower()
    deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_MS / 1000
    while mode != "wal":
        try:
            return str(cursor.execute("PRAGMA journal_mode = WAL").fetchone()[0]).lower()
        except sqlite3.OperationalError as error:
            # Two connections switching a new file at once: SQLite answers "locked" at once
            # (its busy handler is skipped to avoid a deadlock), so wait here instead.
            if "locked" not in str(error) or time.monotonic() > deadline:
                raise
            time.sleep(random.uniform(0.005, 0.05))
    return mode


def _on_sqlite_connect(dbapi_connection: Any, _record: Any) -> None:
    """Set the per-connection pragmas and hand transaction control to SQLAlchemy."""
    # Stop pysqlite from issuing its own (deferred) BEGIN; _on_sqlite_begin issues ours.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
        mode = _enable_wal(cursor)
        if mode not in ("wal", "memory"):
            logger.warning("SQLite refused WAL journal mode (got %r); concurrency suffers", mode)
        cursor.execute("PRAGMA synchronous = FULL")
        cursor.execute("PRAGMA foreign_keys = ON")
    finally:
        cursor.close()


def _on_sqlite_begin(connection: sa.Connection) -> None:
    """Open every transaction as IMMEDIATE (write lock up front) unless told otherwise."""
    mode = connection.get_execution_options().get(SQLITE_BEGIN_OPTION, "IMMEDIATE")
    connection.exec_driver_sql("BEGIN" if mode == "DEFERRED" else "BEGIN IMMEDIATE")


def make_engine(url: str) -> Engine:
    """Create the engine for ``url``, configured for concurrent, durable writes.

    Parameters
    ----------
    url : str
        ``sqlite:///PATH`` (the parent directory is created) or
        ``postgresql+psycopg://USER[:PASSWORD]@HOST[:PORT]/DB``.

    Returns
    -------
    sqlalchemy.Engine
        A lazily connecting engine; nothing is opened until first use.

    Raises
    ------
    DatabaseError
        If the URL is invalid or of an unsupported backend, or the SQLite file's directory
        cannot be created. The message names the URL without its password.
    """
    if not isinstance(url, str):
        raise TypeError(f"url must be a str, not {type(url).__name__}")
    parsed = _parse(url)
    with database_errors(parsed, "create the engine"):
        if parsed.get_backend_name() == "sqlite":
            engine = _create_engine(parsed)
            path = sqlite_file(parsed)
            if path is not None:
                try:
                    path.parent.mkdir(parents=True, exist_ok=True)
                except OSError as error:
                    raise DatabaseError(
                        f"cannot create the directory of database {redact_url(parsed)}: "
                        f"{error.strerror or error}"
                    ) from error
            event.listen(engine, "connect", _on_sqlite_connect)
            event.listen(engine, "begin", _on_sqlite_begin)
            return engine
        connect_args: dict[str, Any] = {}
        if "connect_timeout" not in parsed.query:
            connect_args["connect_timeout"] = POSTGRES_CONNECT_TIMEOUT_S
        return _create_engine(parsed, pool_pre_ping=True, connect_args=connect_args)


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    """Session factory bound to ``engine``; objects stay readable after commit.

    Parameters
    ----------
    engine : sqlalchemy.Engine
        An engine from :func:`make_engine`.

    Returns
    -------
    sqlalchemy.orm.sessionmaker
        Factory of :class:`sqlalchemy.orm.Session` with ``expire_on_commit=False``.
    """
    if not isinstance(engine, Engine):
        raise TypeError(f"engine must be a sqlalchemy Engine, not {type(engine).__name__}")
    return sessionmaker(bind=engine, expire_on_commit=False)


def alembic_config(url: str) -> Config:
    """Alembic configuration for the migrations shipped in this package.

    Parameters
    ----------
    url : str
        Database URL; migrations run on an engine from :func:`make_engine`.

    Returns
    -------
    alembic.config.Config
        Usable with :mod:`alembic.command` (no ``alembic.ini`` involved).
    """
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    # ConfigParser interpolates "%": URL-escaped passwords would break without doubling.
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def head_revision() -> str:
    """The newest migration revision shipped with this package.

    Returns
    -------
    str
        The revision id of the single head.
    """
    head = ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()
    if head is None:  # pragma: no cover - the package always ships a migration
        raise DatabaseError(f"no migrations found in {MIGRATIONS_DIR}")
    return head


def upgrade(url: str, revision: str = "head") -> None:
    """Migrate the database at ``url`` to ``revision``; a no-op when already there.

    Safe to call at every start-up, also from several processes (or threads) at once: on
    SQLite the migration runs inside one ``BEGIN IMMEDIATE`` transaction, on PostgreSQL under
    a transaction-scoped advisory lock, so concurrent callers wait and then find nothing to
    do. Within one process, calls are serialised (Alembic's context is process-global).

    Parameters
    ----------
    url : str
        Database URL (see :func:`make_engine`).
    revision : str, optional
        Target revision, ``"head"`` by default.

    Raises
    ------
    DatabaseError
        If the database is unreachable, the revision is unknown or a migration fails.
    """
    parsed = _parse(url)
    engine = make_engine(url)
    try:
        with (
            _ALEMBIC_LOCK,
            database_errors(parsed, f"upgrade the schema to {revision!r}"),
            engine.connect() as connection,
        ):
            config = alembic_config(url)
            config.attributes["connection"] = connection
            command.upgrade(config, revision)
    finally:
        engine.dispose()


def current_revision(url: str) -> str | None:
    """Revision the database at ``url`` is at.

    Parameters
    ----------
    url : str
        Database URL (see :func:`make_engine`).

    Returns
    -------
    str or None
        The revision id, or ``None`` for a database never migrated.

    Raises
    ------
    DatabaseError
        If the database is unreachable or has several heads recorded.
    """
    parsed = _parse(url)
    engine = make_engine(url)
    try:
        with (
            database_errors(parsed, "read the schema revision"),
            engine.connect() as connection,
        ):
            connection.execution_options(**{SQLITE_BEGIN_OPTION: "DEFERRED"})
            return MigrationContext.configure(connection).get_current_revision()
    finally:
        engine.dispose()
