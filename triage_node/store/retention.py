"""What retention may remove: settled series, their files, and eventually their rows.

A series is *settled* when nothing more will happen to it: it is ``done`` and none of its
SR deliveries is still ``pending`` or ``failed`` (an SR no PACS got keeps its images), or it
is ``not_triaged``. Series still receiving, queued, processing or ``failed`` are never
settled: someone has to look at them first.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any, cast

import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from triage_node.domain import DeliveryState, SeriesState
from triage_node.store.models import (
    Base,
    Event,
    Feedback,
    Instance,
    OutboxItem,
    Patient,
    ResultDocument,
    Series,
    Study,
)
from triage_node.store.repository import _check_aware, _transaction

__all__ = ["SettledSeries", "prune_events", "prune_series", "settled_series"]

_SERIES = cast(sa.Table, Series.__table__)
_INSTANCE = cast(sa.Table, Instance.__table__)
_STUDY = cast(sa.Table, Study.__table__)
_PATIENT = cast(sa.Table, Patient.__table__)
_EVENT = cast(sa.Table, Event.__table__)
_DOCUMENT = cast(sa.Table, ResultDocument.__table__)
_OUTBOX = cast(sa.Table, OutboxItem.__table__)
_FEEDBACK = cast(sa.Table, Feedback.__table__)

#: Series states retention may act on (with the delivery condition for ``done``).
SETTLED_STATES = (SeriesState.DONE.value, SeriesState.NOT_TRIAGED.value)


@dataclass(frozen=True, slots=True)
class SettledSeries:
    """A settled series and the spool files of its instances."""

    series_instance_uid: str
    state: SeriesState
    last_received_at: dt.datetime
    files: tuple[tuple[str, int], ...]  # (path relative to the spool root, size)


def settled_series(session_factory: sessionmaker[Session], *, older_than: dt.datetime,
                   keep_labelled: bool = False) -> list[SettledSeries]:
    """Settled series whose last instance arrived before ``older_than``, oldest first.

    ``keep_labelled`` leaves out series a radiologist gave feedback on: that feedback is
    training data (``triage-node train --from-store``), kept until it is exported.
    """
    older_than = _check_aware(older_than, "older_than")
    s, i, d, o = _SERIES.c, _INSTANCE.c, _DOCUMENT.c, _OUTBOX.c
    undelivered = (
        sa.select(sa.literal(1))
        .select_from(_OUTBOX.join(_DOCUMENT, d.id == o.document_fk))
        .where(d.series_fk == s.id,
               o.state.in_([DeliveryState.PENDING.value, DeliveryState.FAILED.value]))
        .exists()
    )
    series_stmt = (
        sa.select(s.id, s.series_instance_uid, s.state, s.last_received_at)
        .where(s.state.in_(SETTLED_STATES), s.last_received_at < older_than, ~undelivered)
        .order_by(s.last_received_at, s.id)
    )
    if keep_labelled:
        f = _FEEDBACK.c
        series_stmt = series_stmt.where(
            ~sa.select(sa.literal(1)).where(f.series_fk == s.id).exists())
    with _transaction(session_factory, "find settled series", read_only=True) as session:
        rows = session.execute(series_stmt).all()
        files: dict[int, list[tuple[str, int]]] = {row.id: [] for row in rows}
        if files:
            for series_fk, path, size in session.execute(
                sa.select(i.series_fk, i.file_path, i.file_size)
                .where(i.series_fk.in_(sorted(files))).order_by(i.id)
            ):
                files[series_fk].append((path, int(size)))
    return [SettledSeries(row.series_instance_uid, SeriesState(row.state), row.last_received_at,
                          tuple(files[row.id])) for row in rows]


def _referencing(table: sa.Table) -> list[tuple[sa.Table, sa.Column[Any]]]:
    """Every (table, column) with a foreign key to ``table``'s id."""
    return [(t, fk.parent) for t in Base.metadata.sorted_tables for fk in t.foreign_keys
            if fk.column.table is table]


def _delete_under(session: Session, table: sa.Table, ids: Collection[int]) -> None:
    """Delete rows of ``table`` with these ids, after everything that references them."""
    if not ids:
        return
    for child, column in _referencing(table):
        child_ids = list(session.execute(
            sa.select(child.c.id).where(column.in_(sorted(ids)))).scalars())
        _delete_under(session, child, child_ids)
    session.execute(sa.delete(table).where(table.c.id.in_(sorted(ids))))


def prune_series(session_factory: sessionmaker[Session],
                 series_instance_uids: Collection[str]) -> int:
    """Delete these series with everything recorded about them (instances, predictions,
    results, SRs and their deliveries, feedback, key images), then patients and studies
    left without series. Audit events are kept (see :func:`prune_events`). Returns how
    many series were deleted."""
    if not series_instance_uids:
        return 0
    s, st = _SERIES.c, _STUDY.c
    with _transaction(session_factory, "prune series") as session:
        ids = list(session.execute(sa.select(s.id).where(
            s.series_instance_uid.in_(sorted(series_instance_uids)))).scalars())
        _delete_under(session, _SERIES, ids)
        session.execute(sa.delete(_STUDY).where(
            ~sa.select(s.id).where(s.study_fk == st.id).exists()))
        session.execute(sa.delete(_PATIENT).where(
            ~sa.select(st.id).where(st.patient_fk == _PATIENT.c.id).exists()))
        return len(ids)


def prune_events(session_factory: sessionmaker[Session], *, older_than: dt.datetime) -> int:
    """Delete audit events recorded before ``older_than``; returns how many."""
    older_than = _check_aware(older_than, "older_than")
    with _transaction(session_factory, "prune audit events") as session:
        result = cast(sa.CursorResult[Any], session.execute(
            sa.delete(_EVENT).where(_EVENT.c.at < older_than)))
        return int(result.rowcount)
