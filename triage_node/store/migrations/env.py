"""Alembic environment of triage-node, loaded by Alembic (see ``triage_node.store.db``).

:func:`triage_node.store.db.upgrade` hands over an open connection in
``config.attributes["connection"]``; without one (the ``alembic`` command line with an ini
file naming this folder) an engine is built from ``sqlalchemy.url`` by ``make_engine``, so
migrations always run with the node's SQLite pragmas and ``BEGIN IMMEDIATE``.

All pending migrations run in ONE transaction, also on SQLite (whose DDL is transactional
once pysqlite stops managing transactions, as ``make_engine`` arranges). Concurrent
upgraders are serialised: on SQLite by ``BEGIN IMMEDIATE``, on PostgreSQL by a
transaction-scoped advisory lock taken before the version table is read.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context

from triage_node.store.db import make_engine
from triage_node.store.models import Base

#: PostgreSQL advisory lock key serialising concurrent upgrades (b"triage" as an integer).
MIGRATION_LOCK_KEY = int.from_bytes(b"triage", "big")

config = context.config
target_metadata = Base.metadata


def _run_online(connection: sa.Connection) -> None:
    """Run the pending migrations on ``connection`` in one transaction."""
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        transactional_ddl=True,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        if connection.dialect.name == "postgresql":
            connection.execute(
                sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY}
            )
        context.run_migrations()


def _run_offline() -> None:
    """Write the migrations' SQL instead of running it (``alembic upgrade --sql``)."""
    url = config.get_main_option("sqlalchemy.url")
    context.configure(
        url=url,
        target_metadata=target_metadata,
        literal_binds=True,
        transactional_ddl=True,
        render_as_batch=url is not None and url.startswith("sqlite"),
    )
    with context.begin_transaction():
        context.run_migrations()


def _main() -> None:
    """Entry point: offline, with a handed-over connection, or with a fresh engine."""
    if context.is_offline_mode():
        _run_offline()
        return
    connection = config.attributes.get("connection")
    if isinstance(connection, sa.Connection):
        _run_online(connection)
        return
    url = config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError("sqlalchemy.url is not set in the Alembic configuration")
    engine = make_engine(url)
    try:
        with engine.connect() as fresh:
            _run_online(fresh)
    finally:
        engine.dispose()


_main()
