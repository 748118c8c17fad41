"""Persistent state of the node: the database (SQLite or PostgreSQL) and its migrations.

Typical start-up::

    url = default_sqlite_url(data_dir)          # or the configured PostgreSQL URL
    upgrade(url)                                # idempotent; safe at every start
    sessions = make_session_factory(make_engine(url))
    record_batch(sessions, instances, events)

Everything returned is a :mod:`triage_node.domain` value object; every database failure is
raised as :class:`triage_node.errors.DatabaseError`.
"""

from triage_node.store.db import (
    alembic_config,
    current_revision,
    default_sqlite_url,
    head_revision,
    make_engine,
    make_session_factory,
    redact_url,
    upgrade,
)
from triage_node.store.repository import (
    count_instances,
    get_instance,
    list_events,
    list_series,
    record_batch,
    record_events,
)

__all__ = [
    "alembic_config",
    "count_instances",
    "current_revision",
    "default_sqlite_url",
    "get_instance",
    "head_revision",
    "list_events",
    "list_series",
    "make_engine",
    "make_session_factory",
    "record_batch",
    "record_events",
    "redact_url",
    "upgrade",
]
