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
from triage_node.store.outbox import (
    add_document,
    claim_due,
    delivery_counts,
    latest_document,
    list_deliveries,
    mark_failed,
    mark_retry,
    mark_sent,
    results_without_document,
)
from triage_node.store.predictions import (
    receiving_series_counts,
    save_slice_predictions,
    slice_predictions,
)
from triage_node.store.repository import (
    InstanceWriter,
    StagedBatch,
    claim_series,
    complete_series,
    count_instances,
    due_series,
    fail_series,
    get_instance,
    get_result,
    list_events,
    list_series,
    mark_release_hint,
    record_batch,
    record_events,
    series_in_states,
    series_instances,
    store_result,
)
from triage_node.store.worklist import (
    beat,
    feedback_labels,
    forget_workers,
    get_key_images,
    heartbeats,
    list_feedback,
    list_worklist,
    node_metrics,
    ping,
    record_feedback,
    save_key_images,
    series_events,
    worklist_row,
)

__all__ = [
    "InstanceWriter",
    "StagedBatch",
    "add_document",
    "alembic_config",
    "beat",
    "claim_due",
    "claim_series",
    "complete_series",
    "count_instances",
    "current_revision",
    "default_sqlite_url",
    "delivery_counts",
    "due_series",
    "fail_series",
    "feedback_labels",
    "forget_workers",
    "get_instance",
    "get_key_images",
    "get_result",
    "head_revision",
    "heartbeats",
    "latest_document",
    "list_deliveries",
    "list_events",
    "list_feedback",
    "list_series",
    "list_worklist",
    "make_engine",
    "make_session_factory",
    "mark_failed",
    "mark_release_hint",
    "mark_retry",
    "mark_sent",
    "node_metrics",
    "ping",
    "receiving_series_counts",
    "record_batch",
    "record_events",
    "record_feedback",
    "redact_url",
    "results_without_document",
    "save_key_images",
    "save_slice_predictions",
    "series_events",
    "series_in_states",
    "series_instances",
    "slice_predictions",
    "store_result",
    "upgrade",
    "worklist_row",
]
