"""Reading and writing the node's records; domain objects in, domain objects out.

Every function takes the ``sessionmaker`` from :func:`triage_node.store.db.make_session_factory`
and runs one transaction. ORM objects never leave this module; SQLAlchemy errors leave it as
:class:`triage_node.errors.DatabaseError`.

Concurrency: several SCP processes record instances of the same series at the same time.
:func:`record_batch` therefore never relies on "SELECT, then INSERT if missing": every insert
is ``INSERT ... ON CONFLICT DO NOTHING`` followed by a re-read. On SQLite the engine's
``BEGIN IMMEDIATE`` serialises writers as a whole. On PostgreSQL a batch first takes a
transaction-scoped advisory lock per series, in a fixed order, so the bookkeeping of one
series is serialised; patients and studies, the only rows two batches of different series
may both insert, are inserted in sorted key order, so writers cannot deadlock. Read-only
functions open SQLite transactions as ``BEGIN DEFERRED``: they never wait for, or block,
a writer.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import hashlib
import os
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any, cast

import sqlalchemy as sa
from sqlalchemy import exc
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.sql.compiler import SQLCompiler

from triage_node.domain import (
    EventKind,
    EventRecord,
    InstanceRecord,
    InstanceState,
    SeriesResult,
    SeriesState,
    SeriesSummary,
    utcnow,
)
from triage_node.errors import DatabaseError
from triage_node.store.db import SQLITE_BEGIN_OPTION, database_errors, sqlite_file
from triage_node.store.models import (
    UID_LENGTH,
    Event,
    Instance,
    Patient,
    Series,
    Study,
    UTCDateTime,
)
from triage_node.store.models import SeriesResult as SeriesResult_

__all__ = [
    "claim_series",
    "complete_series",
    "count_instances",
    "due_series",
    "fail_series",
    "get_instance",
    "get_result",
    "list_events",
    "list_series",
    "mark_release_hint",
    "record_batch",
    "record_events",
    "series_in_states",
    "series_instances",
    "store_result",
]

_PATIENT = cast(sa.Table, Patient.__table__)
_STUDY = cast(sa.Table, Study.__table__)
_SERIES = cast(sa.Table, Series.__table__)
_INSTANCE = cast(sa.Table, Instance.__table__)
_EVENT = cast(sa.Table, Event.__table__)
_RESULT = cast(sa.Table, SeriesResult_.__table__)

# Multi-row INSERTs below are executemany() calls: SQLAlchemy's "insertmanyvalues" turns
# them into multi-VALUES statements (RETURNING included) that are compiled once and cached,
# paged under the drivers' parameter limits; .values([...]) would be recompiled every time.

#: First key of the PostgreSQL advisory locks serialising writers of one series (b"tnsr").
#: Two-key advisory locks never collide with the one-key lock of the migrations.
_SERIES_LOCK_NAMESPACE = int.from_bytes(b"tnsr", "big")

#: DICOM multi-value separator, used for the stored position and orientation vectors.
_BACKSLASH = "\\"

_InsertFactory = Callable[[sa.Table], sqlite.Insert | postgresql.Insert]


# --------------------------------------------------------------------------- plumbing


def _engine_of(session_factory: sessionmaker[Session]) -> Engine:
    """The engine a session factory is bound to (validated)."""
    if not isinstance(session_factory, sessionmaker):
        raise TypeError(
            "session_factory must be a sqlalchemy sessionmaker, "
            f"not {type(session_factory).__name__}"
        )
    bind = session_factory.kw.get("bind")
    if not isinstance(bind, Engine):
        raise TypeError("session_factory must be bound to an Engine (see make_session_factory)")
    return bind


@contextmanager
def _transaction(
    session_factory: sessionmaker[Session], action: str, *, read_only: bool = False
) -> Iterator[Session]:
    """One session and transaction, committed on success; errors become DatabaseError."""
    engine = _engine_of(session_factory)
    with database_errors(engine.url, action), session_factory() as session, session.begin():
        if read_only:
            # Procure the connection now, so the SQLite "begin" hook sees the option.
            session.connection(execution_options={SQLITE_BEGIN_OPTION: "DEFERRED"})
        yield session


def _insert_factory(session: Session) -> _InsertFactory:
    """The dialect's INSERT construct that supports ON CONFLICT."""
    name = session.get_bind().dialect.name
    if name == "postgresql":
        return postgresql.insert
    if name == "sqlite":
        return sqlite.insert
    raise NotImplementedError(f"unsupported database dialect {name!r}")


# --------------------------------------------------------------------------- validation


def _check_aware(value: object, name: str) -> dt.datetime:
    """Return ``value`` if it is a timezone-aware datetime, else raise naming ``name``."""
    if not isinstance(value, dt.datetime):
        raise TypeError(f"{name} must be a datetime, not {type(value).__name__}")
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{name} must be timezone-aware, got naive {value.isoformat()}")
    return value


def _check_uid(value: object, name: str, *, optional: bool = False) -> None:
    """Raise unless ``value`` is a non-empty UID string that fits the column."""
    if value is None and optional:
        return
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, not {type(value).__name__}")
    if not value and not optional:
        raise ValueError(f"{name} must not be empty")
    if len(value) > UID_LENGTH:
        raise ValueError(
            f"{name} is {len(value)} characters long (at most {UID_LENGTH}): {value!r}"
        )


def _check_limit(limit: object) -> None:
    """Raise unless ``limit`` is ``None`` or a non-negative int."""
    if limit is None:
        return
    if isinstance(limit, bool) or not isinstance(limit, int):
        raise TypeError(f"limit must be an int or None, not {type(limit).__name__}")
    if limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")


def _check_instance(record: object, index: int) -> InstanceRecord:
    """Validate one element of ``instances``."""
    where = f"instances[{index}]"
    if not isinstance(record, InstanceRecord):
        raise TypeError(f"{where} must be an InstanceRecord, not {type(record).__name__}")
    for field in ("sop_instance_uid", "study_instance_uid", "series_instance_uid"):
        _check_uid(getattr(record, field), f"{where}.{field}")
    _check_aware(record.received_at, f"{where}.received_at")
    InstanceState(record.state)  # ValueError names the bad value
    if record.image_position is not None and len(record.image_position) != 3:
        raise ValueError(f"{where}.image_position must have 3 values")
    if record.image_orientation is not None and len(record.image_orientation) != 6:
        raise ValueError(f"{where}.image_orientation must have 6 values")
    return record


def _check_event(record: object, index: int) -> EventRecord:
    """Validate one element of ``events``."""
    where = f"events[{index}]"
    if not isinstance(record, EventRecord):
        raise TypeError(f"{where} must be an EventRecord, not {type(record).__name__}")
    _check_aware(record.at, f"{where}.at")
    EventKind(record.kind)
    for field in ("study_instance_uid", "series_instance_uid", "sop_instance_uid"):
        _check_uid(getattr(record, field), f"{where}.{field}", optional=True)
    return record


# --------------------------------------------------------------------------- conversions


def _join_vector(values: Sequence[float] | None) -> str | None:
    """``(1.0, 2.5, -3.0)`` -> ``"1.0\\2.5\\-3.0"`` (repr keeps every float exact)."""
    if values is None:
        return None
    return _BACKSLASH.join(repr(float(v)) for v in values)


def _split_vector(text: str | None) -> list[float] | None:
    """Inverse of :func:`_join_vector`."""
    if text is None:
        return None
    return [float(v) for v in text.split(_BACKSLASH)]


def _position(text: str | None) -> tuple[float, float, float] | None:
    """Stored Image Position (Patient) as a 3-tuple."""
    values = _split_vector(text)
    if values is None:
        return None
    x, y, z = values
    return (x, y, z)


def _orientation(
    text: str | None,
) -> tuple[float, float, float, float, float, float] | None:
    """Stored Image Orientation (Patient) as a 6-tuple."""
    values = _split_vector(text)
    if values is None:
        return None
    a, b, c, d, e, f = values
    return (a, b, c, d, e, f)


def _event_row(record: EventRecord) -> dict[str, Any]:
    """Column values of one event."""
    return {
        "at": record.at,
        "kind": EventKind(record.kind).value,
        "actor": record.actor,
        "peer": record.peer,
        "outcome": record.outcome,
        "detail": record.detail,
        "study_instance_uid": record.study_instance_uid,
        "series_instance_uid": record.series_instance_uid,
        "sop_instance_uid": record.sop_instance_uid,
    }


_EVENT_ROW_KEYS = ("at", "kind", "actor", "peer", "outcome", "detail", "study_instance_uid",
                   "series_instance_uid", "sop_instance_uid")
_INSTANCE_ROW_KEYS = ("sop_instance_uid", "series_fk", "sop_class_uid", "transfer_syntax_uid",
                      "instance_number", "image_type", "image_position", "image_orientation",
                      "rows", "columns", "file_path", "file_size", "received_at", "calling_ae",
                      "state", "reason")


def _instance_row(record: InstanceRecord, series_fk: int) -> dict[str, Any]:
    """Column values of one instance."""
    return {
        "sop_instance_uid": record.sop_instance_uid,
        "series_fk": series_fk,
        "sop_class_uid": record.sop_class_uid,
        "transfer_syntax_uid": record.transfer_syntax_uid,
        "instance_number": record.instance_number,
        "image_type": record.image_type,
        "image_position": _join_vector(record.image_position),
        "image_orientation": _join_vector(record.image_orientation),
        "rows": record.rows,
        "columns": record.columns,
        "file_path": record.file_path,
        "file_size": record.file_size,
        "received_at": record.received_at,
        "calling_ae": record.calling_ae,
        "state": InstanceState(record.state).value,
        "reason": record.reason,
    }


# --------------------------------------------------------------------------- series bookkeeping


def _initial_series_state(records: Sequence[InstanceRecord]) -> tuple[SeriesState, str | None]:
    """State of a series created by ``records`` (in arrival order)."""
    if any(r.state == InstanceState.STORED for r in records):
        return SeriesState.RECEIVING, None
    return SeriesState.NOT_TRIAGED, records[0].reason


def _next_series_state(
    state: str, reason: str | None, new_records: Sequence[InstanceRecord]
) -> tuple[str, str | None]:
    """State of an existing series after ``new_records`` arrived.

    A triageable slice arriving after the series was decided (not triaged, queued, done...)
    reopens it: assembly decides again and the result is recomputed.
    """
    if state != SeriesState.RECEIVING and any(
        r.state == InstanceState.STORED for r in new_records
    ):
        return SeriesState.RECEIVING.value, None
    return state, reason


def _get_or_create(
    session: Session,
    insert: _InsertFactory,
    table: sa.Table,
    key: str,
    rows: dict[str, dict[str, Any]],
) -> dict[str, int]:
    """Ids of the rows keyed by ``rows``' keys, inserting the missing ones race-free."""
    column = table.c[key]
    keys = sorted(rows)
    lookup = sa.select(column, table.c.id)
    found: dict[str, int] = dict(session.execute(lookup.where(column.in_(keys))).all())
    missing = [k for k in keys if k not in found]
    if missing:
        stmt = (
            insert(table).on_conflict_do_nothing(index_elements=[key]).returning(column, table.c.id)
        )
        found.update(session.execute(stmt, [rows[k] for k in missing]).all())
        # Inserted meanwhile by another transaction (now committed: ours waited for it).
        raced = [k for k in missing if k not in found]
        if raced:
            found.update(session.execute(lookup.where(column.in_(raced))).all())
    return found


@dataclass(slots=True)
class _SeriesRow:
    """The bookkeeping of one series during a batch, as stored in the database."""

    id: int
    state: str
    reason: str | None
    first: dt.datetime | None
    last: dt.datetime | None

    def as_tuple(self) -> tuple[str, str | None, dt.datetime | None, dt.datetime | None]:
        """The values :func:`_update_series` may change."""
        return (self.state, self.reason, self.first, self.last)


#: Takes the advisory locks of :func:`_series_lock_key` keys, in the order given.
_SERIES_LOCKS = sa.text(
    "SELECT pg_advisory_xact_lock(:namespace, t.key)"
    " FROM unnest(CAST(:keys AS integer[])) WITH ORDINALITY AS t(key, n) ORDER BY t.n"
)


def _series_lock_key(series_instance_uid: str) -> int:
    """32-bit signed advisory lock key of a series (collisions only over-serialise)."""
    digest = hashlib.blake2b(series_instance_uid.encode(), digest_size=4).digest()
    return int.from_bytes(digest, "big", signed=True)


def _serialise_series(session: Session, uids: Collection[str]) -> None:
    """On PostgreSQL, lock the series ``uids`` until commit, always in the same order."""
    if session.get_bind().dialect.name != "postgresql":
        return  # SQLite: BEGIN IMMEDIATE already excludes every other writer
    keys = sorted({_series_lock_key(uid) for uid in uids})
    session.execute(_SERIES_LOCKS, {"namespace": _SERIES_LOCK_NAMESPACE, "keys": keys})


def _read_series(session: Session, uids: Collection[str]) -> dict[str, _SeriesRow]:
    """Bookkeeping of the existing series among ``uids``."""
    s = _SERIES.c
    stmt = sa.select(
        s.series_instance_uid,
        s.id,
        s.state,
        s.reason,
        s.first_received_at,
        s.last_received_at,
    ).where(s.series_instance_uid.in_(sorted(uids)))
    return {
        row[0]: _SeriesRow(row[1], row[2], row[3], row[4], row[5]) for row in session.execute(stmt)
    }


def _create_series(
    session: Session,
    insert: _InsertFactory,
    by_series: dict[str, list[InstanceRecord]],
    missing: list[str],
    now: dt.datetime,
) -> dict[str, _SeriesRow]:
    """Create the ``missing`` series (and their studies and patients); return them."""
    firsts = {uid: by_series[uid][0] for uid in missing}
    patients = {
        r.patient_id: {
            "patient_id": r.patient_id,
            "patient_name": r.patient_name,
            "created_at": now,
        }
        for r in reversed(firsts.values())
    }
    patient_ids = _get_or_create(session, insert, _PATIENT, "patient_id", patients)
    studies = {
        r.study_instance_uid: {
            "study_instance_uid": r.study_instance_uid,
            "patient_fk": patient_ids[r.patient_id],
            "accession_number": r.accession_number,
            "study_date": r.study_date,
            "study_description": r.study_description,
            "created_at": now,
        }
        for r in reversed(firsts.values())
    }
    study_ids = _get_or_create(session, insert, _STUDY, "study_instance_uid", studies)

    created: dict[str, _SeriesRow] = {}
    values = []
    for uid in sorted(missing):
        records = by_series[uid]
        state, reason = _initial_series_state(records)
        first = min(r.received_at for r in records)
        last = max(r.received_at for r in records)
        head = records[0]
        values.append(
            {
                "series_instance_uid": uid,
                "study_fk": study_ids[head.study_instance_uid],
                "modality": head.modality,
                "body_part_examined": head.body_part_examined,
                "series_description": head.series_description,
                "series_number": head.series_number,
                "state": state.value,
                "reason": reason,
                "first_received_at": first,
                "last_received_at": last,
            }
        )
        created[uid] = _SeriesRow(0, state.value, reason, first, last)
    stmt = (
        insert(_SERIES)
        .on_conflict_do_nothing(index_elements=["series_instance_uid"])
        .returning(_SERIES.c.series_instance_uid, _SERIES.c.id)
    )
    inserted: dict[str, int] = dict(session.execute(stmt, values).all())
    result = {uid: created[uid] for uid in inserted}
    for uid, id_ in inserted.items():
        # Times as the database will return them (UTC), for the later comparison.
        row = result[uid]
        row.id = id_
        row.first = row.first.astimezone(dt.UTC) if row.first else None
        row.last = row.last.astimezone(dt.UTC) if row.last else None
    raced = [uid for uid in missing if uid not in inserted]
    if raced:
        result.update(_read_series(session, raced))
    return result


# --------------------------------------------------------------------------- public API


def record_batch(
    session_factory: sessionmaker[Session],
    instances: Sequence[InstanceRecord],
    events: Sequence[EventRecord] = (),
    *,
    _series_ids: dict[str, int] | None = None,
) -> list[bool]:
    """Record received instances (and audit events) in one transaction.

    Patients, studies and series are created on first sight (the first instance's header
    values win); an instance whose SOP Instance UID is already recorded, in the database or
    earlier in the same batch, is left as it is. Safe to call from several processes and
    threads at once, also for the same series or the same instances.

    Series bookkeeping, from the instances actually inserted: ``first_received_at`` and
    ``last_received_at`` widen to their ``received_at``; a new series is ``RECEIVING`` if any
    of its instances is ``STORED``, otherwise ``NOT_TRIAGED`` with the first one's reason; a
    ``NOT_TRIAGED`` series that receives a ``STORED`` instance becomes ``RECEIVING`` with no
    reason. Other states are left to the pipeline.

    Parameters
    ----------
    session_factory : sqlalchemy.orm.sessionmaker
        From :func:`triage_node.store.db.make_session_factory`.
    instances : sequence of InstanceRecord
        The instances to record, timezone-aware ``received_at``.
    events : sequence of EventRecord, optional
        Audit events committed in the same transaction.

    Returns
    -------
    list of bool
        One per element of ``instances``: ``True`` if it was recorded now, ``False`` if its
        SOP Instance UID was already recorded (a re-send).

    Raises
    ------
    TypeError, ValueError
        For a malformed record (naive datetime, empty or over-long UID, bad state), before
        anything is written.
    DatabaseError
        If the database is unreachable or refuses the write; nothing is recorded then.
    """
    checked = [_check_instance(r, i) for i, r in enumerate(instances)]
    checked_events = [_check_event(e, i) for i, e in enumerate(events)]
    if not checked and not checked_events:
        return []

    first_index: dict[str, int] = {}
    for i, r in enumerate(checked):
        first_index.setdefault(r.sop_instance_uid, i)
    unique = [checked[i] for i in sorted(first_index.values())]
    by_series: dict[str, list[InstanceRecord]] = {}
    for r in unique:
        by_series.setdefault(r.series_instance_uid, []).append(r)

    new_uids: set[str] = set()
    action = f"record {len(checked)} instance(s) and {len(checked_events)} event(s)"
    with _transaction(session_factory, action) as session:
        if by_series:
            insert = _insert_factory(session)
            _serialise_series(session, by_series)
            series = _read_series(session, by_series)
            missing = [uid for uid in by_series if uid not in series]
            if missing:
                series.update(_create_series(session, insert, by_series, missing, utcnow()))
            if _series_ids is not None:
                _series_ids.update((uid, row.id) for uid, row in series.items())

            rows = [
                _instance_row(r, series[r.series_instance_uid].id)
                for r in sorted(unique, key=lambda r: r.sop_instance_uid)
            ]
            stmt = (
                insert(_INSTANCE)
                .on_conflict_do_nothing(index_elements=["sop_instance_uid"])
                .returning(_INSTANCE.c.sop_instance_uid)
            )
            new_uids.update(session.execute(stmt, rows).scalars())
            _refresh_file_facts(session, checked, first_index, new_uids)

            for uid in sorted(by_series):
                _update_series(
                    session,
                    series[uid],
                    [r for r in by_series[uid] if r.sop_instance_uid in new_uids],
                )
        if checked_events:
            session.execute(sa.insert(_EVENT), [_event_row(e) for e in checked_events])

    return [
        r.sop_instance_uid in new_uids and first_index[r.sop_instance_uid] == i
        for i, r in enumerate(checked)
    ]


class InstanceWriter:
    """:func:`record_batch` for the ingest hot path: the same rows and the same series
    bookkeeping, in fewer statements.

    One writer per process (the SCP's group-commit thread). It remembers the database id of
    every series it has written to; a batch whose series are all known skips reading them:
    an ``INSERT ... ON CONFLICT DO NOTHING RETURNING`` of the instances, one ``UPDATE`` per
    series that widens its time range and reopens it in the database itself (so no lost
    update is possible against a concurrent writer), the audit events, and the commit, on a
    Core connection. Anything else (a new series, a UID twice in one batch, a series row
    gone) takes :func:`record_batch`. On PostgreSQL both paths take the same per-series
    advisory locks.

    Called as ``writer(instances, events)``: the
    :data:`triage_node.ingest.BatchWriter` contract; returns and raises like
    :func:`record_batch`. :meth:`stage` writes a batch that commits later. Not thread-safe:
    one thread at a time uses a writer (:class:`triage_node.ingest.Recorder` sees to
    that). It keeps one connection checked out between batches (no pool round trip per
    slice), and drops it after any error, so an outage ends with a fresh connection.

    On a SQLite file, writers (the node's receiving processes) take turns through an
    exclusive ``flock`` of ``<database>-writers.lock`` around each transaction
    (:meth:`turn`): a writer waiting there wakes the moment the other commits, where
    SQLite's busy handler would sleep 1 to 100 ms between tries.
    """

    #: Series ids remembered at most (a scanner sends a few series at a time).
    MAX_SERIES = 4096

    def __init__(self, session_factory: sessionmaker[Session]) -> None:
        self._factory = session_factory
        self._engine = _engine_of(session_factory)
        self._pg = self._engine.dialect.name == "postgresql"
        self._series_ids: dict[str, int] = {}
        self._conn: sa.Connection | None = None
        self._raw: _RawStatements | None = None
        database = sqlite_file(self._engine.url) if not self._pg else None
        self._lock_path = database.with_name(database.name + "-writers.lock") if database else None
        self._lock_fd: int | None = None
        self._turns = 0

    def __call__(
        self,
        instances: Sequence[InstanceRecord],
        events: Sequence[EventRecord] = (),
    ) -> list[bool]:
        with self.turn():
            return self._write(instances, events)

    @contextmanager
    def turn(self) -> Iterator[None]:
        """This process's turn to write (SQLite files only; see the class docstring).

        Re-entrant: a caller that holds it (:class:`triage_node.ingest.Recorder`, while it
        picks a batch) writes with it. Raises :class:`DatabaseError` if the lock file
        cannot be opened.
        """
        self._take_turn()
        try:
            yield
        finally:
            self._give_turn()

    def _take_turn(self, *, blocking: bool = True) -> bool:
        """Take the turn (re-entrant); False only when not ``blocking`` and another
        process has it."""
        if self._lock_path is not None and not self._turns:  # not held yet: take it
            lock = self._lock_fd_for_turn()
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            except BlockingIOError:
                return False
        self._turns += 1
        return True

    def _give_turn(self) -> None:
        self._turns -= 1
        if self._lock_fd is not None and not self._turns:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def _lock_fd_for_turn(self) -> int:
        """The open lock file (opened once)."""
        if self._lock_fd is None:
            assert self._lock_path is not None
            try:
                self._lock_fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o600)
            except OSError as error:
                raise DatabaseError(f"cannot open {self._lock_path}: {error}") from error
        return self._lock_fd

    def stage(
        self,
        instances: Sequence[InstanceRecord],
        events: Sequence[EventRecord] = (),
    ) -> StagedBatch | None:
        """Write a batch now without committing it, if that can start at once.

        For a caller with other work to wait for before the batch may commit (a file's
        ``fsync`` and rename): the statements run now, in the caller's thread, and the
        caller commits with :meth:`StagedBatch.commit` once its work is done, or drops the
        batch with :meth:`StagedBatch.rollback`; this writer's turn (and on SQLite the
        database's write lock) is held until then. None, with nothing written, when the
        batch needs the slow path (a series this writer has not written to yet) or when
        another process has the turn: then write it with ``writer(instances, events)``.
        Not for use while the writer is in use by another thread.

        Raises
        ------
        ValueError, TypeError
            If a record is invalid (nothing is written).
        DatabaseError
            If the database is unreachable or refuses the write (nothing is written).
        """
        if not self._fast_applies(instances) or not self._take_turn(blocking=False):
            return None
        try:
            results, action = self._write_uncommitted(instances, events)
        except _SeriesGone:
            self._series_ids.clear()
            self._give_turn()
            return None
        except BaseException:
            self._give_turn()
            raise
        return StagedBatch(self, action, results)

    def _fast_applies(self, instances: Sequence[InstanceRecord]) -> bool:
        """Every series known and no UID twice: what the fast path can write."""
        return all(r.series_instance_uid in self._series_ids for r in instances) and len(
            {r.sop_instance_uid for r in instances}) == len(instances)

    def _write(
        self,
        instances: Sequence[InstanceRecord],
        events: Sequence[EventRecord],
    ) -> list[bool]:
        if self._fast_applies(instances):
            try:
                return self._fast(instances, events)
            except _SeriesGone:
                self._series_ids.clear()
        if len(self._series_ids) > self.MAX_SERIES:
            self._series_ids.clear()
        return record_batch(self._factory, instances, events, _series_ids=self._series_ids)

    def _fast(
        self,
        instances: Sequence[InstanceRecord],
        events: Sequence[EventRecord],
    ) -> list[bool]:
        results, action = self._write_uncommitted(instances, events)
        self._commit_written(action)
        return results

    def _write_uncommitted(
        self,
        instances: Sequence[InstanceRecord],
        events: Sequence[EventRecord],
    ) -> tuple[list[bool], str]:
        """The fast path's batch up to its commit: (True per new instance, what it does)."""
        checked = [_check_instance(r, i) for i, r in enumerate(instances)]
        checked_events = [_check_event(e, i) for i, e in enumerate(events)]
        action = f"record {len(checked)} instance(s) and {len(checked_events)} event(s)"
        try:
            with database_errors(self._engine.url, action):
                if self._conn is None:
                    self._conn = self._engine.connect()
                new = self._begin_and_write(self._conn, checked, checked_events)
        except _SeriesGone:
            raise  # rolled back; the connection stays usable
        except BaseException:
            self._drop_connection()
            raise
        return [r.sop_instance_uid in new for r in checked], action

    def _commit_written(self, action: str) -> None:
        """COMMIT what :meth:`_write_uncommitted` wrote (DatabaseError if that fails)."""
        try:
            with database_errors(self._engine.url, action):
                assert self._conn is not None
                self._commit(self._conn)
        except BaseException:
            self._drop_connection()
            raise

    def _rollback_written(self) -> None:
        """ROLLBACK what :meth:`_write_uncommitted` wrote; a connection that cannot is
        dropped."""
        driver = self._conn.connection.dbapi_connection if self._conn is not None else None
        try:
            if driver is not None:
                driver.rollback()
        except Exception:
            self._drop_connection()

    def _drop_connection(self) -> None:
        """After an error: roll back what is open and close the connection (the next
        batch connects afresh)."""
        if self._conn is not None:
            with suppress(Exception):
                self._conn.close()
            self._conn = None

    def close(self) -> None:
        """Give the connection back to the pool; close the lock file."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _begin_and_write(
        self,
        conn: sa.Connection,
        checked: Sequence[InstanceRecord],
        checked_events: Sequence[EventRecord],
    ) -> set[str]:
        """The fast path's transaction up to its commit, on the driver's connection itself:
        BEGIN (IMMEDIATE on SQLite, as every transaction of ours there), the statements
        compiled once (:class:`_Precompiled`) on its cursor; ROLLBACK on any error.
        Returns the UIDs that were new. Going past SQLAlchemy's statement and transaction
        layers saves most of the CPU a slice costs here (0.10 -> 0.07 ms a single-slice
        batch; the handler threads need the GIL too)."""
        if self._raw is None:
            self._raw = _RawStatements(conn.dialect)
        raw = self._raw
        ids = self._series_ids
        dbapi = conn.dialect.loaded_dbapi
        driver = conn.connection.dbapi_connection
        assert driver is not None
        cursor = driver.cursor()
        written = False
        try:
            if not self._pg:
                cursor.execute("BEGIN IMMEDIATE")  # psycopg begins by itself
            if self._pg and checked:
                keys = sorted({_series_lock_key(r.series_instance_uid) for r in checked})
                raw.locks.run(cursor, {"namespace": _SERIES_LOCK_NAMESPACE, "keys": keys})
            new: set[str] = set()
            for r in sorted(checked, key=lambda r: r.sop_instance_uid):
                try:
                    raw.insert.run(cursor, _instance_row(r, ids[r.series_instance_uid]))
                except dbapi.IntegrityError as error:  # the series row is gone
                    raise _SeriesGone() from error
                new.update(row[0] for row in cursor.fetchall())
            for r in checked:
                if r.sop_instance_uid not in new:  # a re-send: the row follows the file
                    raw.refresh.run(cursor, {"uid": r.sop_instance_uid, "fp": r.file_path,
                                             "ts": r.transfer_syntax_uid,
                                             "size": r.file_size})
            by_series: dict[str, list[InstanceRecord]] = {}
            for r in checked:
                if r.sop_instance_uid in new:
                    by_series.setdefault(r.series_instance_uid, []).append(r)
            for uid in sorted(by_series, key=ids.__getitem__):
                recs = by_series[uid]
                raw.update.run(cursor, {
                    "sid": ids[uid],
                    "first": min(r.received_at for r in recs),
                    "last": max(r.received_at for r in recs),
                    "reopen": any(r.state == InstanceState.STORED for r in recs),
                })
                if cursor.rowcount != 1:
                    raise _SeriesGone()
            for e in checked_events:
                raw.event.run(cursor, _event_row(e))
            written = True
        except dbapi.Error as error:
            raise exc.DBAPIError.instance(None, None, error, dbapi.Error) from error
        finally:
            if not written:
                with suppress(Exception):
                    driver.rollback()
            cursor.close()
        return new

    @staticmethod
    def _commit(conn: sa.Connection) -> None:
        """COMMIT what :meth:`_begin_and_write` wrote; ROLLBACK if that fails."""
        dbapi = conn.dialect.loaded_dbapi
        driver = conn.connection.dbapi_connection
        assert driver is not None
        try:
            driver.commit()
        except dbapi.Error as error:
            with suppress(Exception):
                driver.rollback()
            raise exc.DBAPIError.instance(None, None, error, dbapi.Error) from error


class StagedBatch:
    """A batch written by :meth:`InstanceWriter.stage` and not yet committed.

    One of :meth:`commit` and :meth:`rollback` ends it and gives the writer's turn back
    (after that, commit raises and rollback does nothing).
    """

    def __init__(self, writer: InstanceWriter, action: str, results: list[bool]) -> None:
        self._writer = writer
        self._action = action
        self._results = results
        self._open = True

    def commit(self) -> list[bool]:
        """Commit; True per instance that was new.

        Raises
        ------
        DatabaseError
            If the commit failed (nothing of the batch is recorded).
        """
        if not self._open:
            raise DatabaseError("this batch was already ended")
        self._open = False
        try:
            self._writer._commit_written(self._action)
        finally:
            self._writer._give_turn()
        return self._results

    def rollback(self) -> None:
        """Drop the batch: nothing of it is recorded."""
        if not self._open:
            return
        self._open = False
        try:
            self._writer._rollback_written()
        finally:
            self._writer._give_turn()


class _Precompiled:
    """A statement compiled once for a dialect and run on a DBAPI cursor, with the
    dialect's own parameter processing (time zones, booleans)."""

    def __init__(self, stmt: sa.ClauseElement, dialect: sa.Dialect,
                 keys: Sequence[str] | None = None) -> None:
        compiled = cast(SQLCompiler, stmt.compile(dialect=dialect,
                                                  column_keys=list(keys) if keys else None))
        self.compiled = compiled
        self.sql = compiled.string
        self.order = list(compiled.positiontup or ()) if dialect.positional else None
        processors = {name: bind.type.bind_processor(dialect)
                      for name, bind in compiled.binds.items()}
        self.processors = {name: p for name, p in processors.items() if p is not None}

    def run(self, cursor: Any, values: dict[str, Any]) -> None:
        params = dict(self.compiled.construct_params(values) or {})
        for name, process in self.processors.items():
            if name in params:
                params[name] = process(params[name])
        if self.order is not None:
            cursor.execute(self.sql, tuple(params[name] for name in self.order))
        else:
            cursor.execute(self.sql, params)


class _RawStatements:
    """The fast path's statements, compiled for one dialect."""

    def __init__(self, dialect: sa.Dialect) -> None:
        insert = postgresql.insert if dialect.name == "postgresql" else sqlite.insert
        c = _SERIES.c
        first, last = sa.bindparam("first", type_=UTCDateTime()), sa.bindparam(
            "last", type_=UTCDateTime())
        reopen = sa.bindparam("reopen", type_=sa.Boolean())
        self.insert = _Precompiled(
            insert(_INSTANCE)
            .on_conflict_do_nothing(index_elements=["sop_instance_uid"])
            .returning(_INSTANCE.c.sop_instance_uid),
            dialect, _INSTANCE_ROW_KEYS)
        self.update = _Precompiled(
            sa.update(_SERIES)
            .where(c.id == sa.bindparam("sid"))
            .values(
                first_received_at=sa.case(
                    (sa.or_(c.first_received_at.is_(None), c.first_received_at > first), first),
                    else_=c.first_received_at),
                last_received_at=sa.case(
                    (sa.or_(c.last_received_at.is_(None), c.last_received_at < last), last),
                    else_=c.last_received_at),
                # _next_series_state, in SQL: a new triageable slice reopens a decided series
                reason=sa.case((sa.and_(reopen, c.state != SeriesState.RECEIVING.value),
                                sa.null()), else_=c.reason),
                state=sa.case((reopen, SeriesState.RECEIVING.value), else_=c.state),
            ),
            dialect)
        self.refresh = _Precompiled(_REFRESH_FILE_FACTS, dialect)
        self.event = _Precompiled(sa.insert(_EVENT), dialect, _EVENT_ROW_KEYS)
        self.locks = _Precompiled(_SERIES_LOCKS, dialect)


class _SeriesGone(Exception):
    """A remembered series row no longer exists (rolled back; the slow path recreates it)."""


_REFRESH_FILE_FACTS = (
    sa.update(_INSTANCE)
    .where(_INSTANCE.c.sop_instance_uid == sa.bindparam("uid"))
    .values(
        file_path=sa.bindparam("fp"),
        transfer_syntax_uid=sa.bindparam("ts"),
        file_size=sa.bindparam("size"),
    )
)


def _refresh_file_facts(
    session: Session,
    checked: Sequence[InstanceRecord],
    first_index: dict[str, int],
    new_uids: set[str],
) -> None:
    """A re-sent instance replaced its file in the spool: the row must describe that file.

    Only where the file facts (path, transfer syntax, size) differ; the rest of the row,
    and the series bookkeeping, stay as first recorded.
    """
    latest: dict[str, InstanceRecord] = {}
    for i, r in enumerate(checked):
        if r.sop_instance_uid not in new_uids or i != first_index[r.sop_instance_uid]:
            latest[r.sop_instance_uid] = r
    if not latest:
        return
    session.execute(
        _REFRESH_FILE_FACTS,
        [
            {"uid": r.sop_instance_uid, "fp": r.file_path, "ts": r.transfer_syntax_uid,
             "size": r.file_size}
            for r in latest.values()
        ],
        execution_options={"synchronize_session": False},
    )


def _update_series(session: Session, row: _SeriesRow, new_records: list[InstanceRecord]) -> None:
    """Fold newly inserted instances into a series' state and time range."""
    if not new_records:
        return
    before = row.as_tuple()
    row.state, row.reason = _next_series_state(row.state, row.reason, new_records)
    first = min(r.received_at for r in new_records).astimezone(dt.UTC)
    last = max(r.received_at for r in new_records).astimezone(dt.UTC)
    row.first = first if row.first is None else min(row.first, first)
    row.last = last if row.last is None else max(row.last, last)
    if row.as_tuple() == before:
        return
    session.execute(
        sa.update(_SERIES)
        .where(_SERIES.c.id == row.id)
        .values(
            state=row.state,
            reason=row.reason,
            first_received_at=row.first,
            last_received_at=row.last,
        )
    )


def record_events(session_factory: sessionmaker[Session], events: Sequence[EventRecord]) -> None:
    """Record audit events in one transaction.

    Parameters
    ----------
    session_factory : sqlalchemy.orm.sessionmaker
        From :func:`triage_node.store.db.make_session_factory`.
    events : sequence of EventRecord
        Events with timezone-aware ``at``.

    Raises
    ------
    TypeError, ValueError
        For a malformed event, before anything is written.
    DatabaseError
        If the database is unreachable or refuses the write.
    """
    checked = [_check_event(e, i) for i, e in enumerate(events)]
    if not checked:
        return
    with _transaction(session_factory, f"record {len(checked)} event(s)") as session:
        session.execute(sa.insert(_EVENT), [_event_row(e) for e in checked])


def list_series(
    session_factory: sessionmaker[Session], *, limit: int | None = None
) -> list[SeriesSummary]:
    """Series, most recently received first, with their instance counts.

    Parameters
    ----------
    session_factory : sqlalchemy.orm.sessionmaker
        From :func:`triage_node.store.db.make_session_factory`.
    limit : int, optional
        At most this many series; all when ``None``.

    Returns
    -------
    list of SeriesSummary
        Ordered by ``last_received_at`` descending (series never received last), with
        timezone-aware UTC datetimes.

    Raises
    ------
    DatabaseError
        If the database is unreachable.
    """
    _check_limit(limit)
    s, st, p, i = _SERIES.c, _STUDY.c, _PATIENT.c, _INSTANCE.c
    instance_count = (
        sa.select(sa.func.count())
        .where(i.series_fk == s.id)
        .scalar_subquery()
        .label("instance_count")
    )
    stmt = (
        sa.select(
            s.series_instance_uid,
            st.study_instance_uid,
            p.patient_id,
            st.accession_number,
            s.modality,
            s.series_description,
            instance_count,
            s.state,
            s.reason,
            s.first_received_at,
            s.last_received_at,
        )
        .select_from(
            _SERIES.join(_STUDY, st.id == s.study_fk).join(_PATIENT, p.id == st.patient_fk)
        )
        .order_by(s.last_received_at.desc().nulls_last(), s.id.desc())
        .limit(limit)
    )
    with _transaction(session_factory, "list series", read_only=True) as session:
        rows = session.execute(stmt).all()
    return [
        SeriesSummary(
            series_instance_uid=row.series_instance_uid,
            study_instance_uid=row.study_instance_uid,
            patient_id=row.patient_id,
            accession_number=row.accession_number,
            modality=row.modality,
            series_description=row.series_description,
            instance_count=int(row.instance_count),
            state=SeriesState(row.state),
            reason=row.reason,
            first_received_at=row.first_received_at,
            last_received_at=row.last_received_at,
        )
        for row in rows
    ]


def get_instance(
    session_factory: sessionmaker[Session], sop_instance_uid: str
) -> InstanceRecord | None:
    """The recorded instance with this SOP Instance UID.

    Parameters
    ----------
    session_factory : sqlalchemy.orm.sessionmaker
        From :func:`triage_node.store.db.make_session_factory`.
    sop_instance_uid : str
        The UID to look up.

    Returns
    -------
    InstanceRecord or None
        The record, with its patient, study and series attributes as stored (the first
        instance's values) and ``received_at`` in UTC; ``None`` if not recorded.

    Raises
    ------
    DatabaseError
        If the database is unreachable.
    """
    _check_uid(sop_instance_uid, "sop_instance_uid")
    stmt = _instance_select().where(_INSTANCE.c.sop_instance_uid == sop_instance_uid)
    with _transaction(session_factory, "read an instance", read_only=True) as session:
        row = session.execute(stmt).one_or_none()
    return None if row is None else _record_of(row)


def _instance_select() -> sa.Select[Any]:
    """Instances joined with their series, study and patient (the InstanceRecord fields)."""
    s, st, p, i = _SERIES.c, _STUDY.c, _PATIENT.c, _INSTANCE.c
    return sa.select(
        _INSTANCE,
        s.series_instance_uid,
        s.modality,
        s.body_part_examined,
        s.series_description,
        s.series_number,
        st.study_instance_uid,
        st.accession_number,
        st.study_date,
        st.study_description,
        p.patient_id,
        p.patient_name,
    ).select_from(
        _INSTANCE.join(_SERIES, s.id == i.series_fk)
        .join(_STUDY, st.id == s.study_fk)
        .join(_PATIENT, p.id == st.patient_fk)
    )


def _record_of(row: Any) -> InstanceRecord:
    return InstanceRecord(
        sop_instance_uid=row.sop_instance_uid,
        sop_class_uid=row.sop_class_uid,
        study_instance_uid=row.study_instance_uid,
        series_instance_uid=row.series_instance_uid,
        patient_id=row.patient_id,
        transfer_syntax_uid=row.transfer_syntax_uid,
        file_path=row.file_path,
        file_size=row.file_size,
        received_at=row.received_at,
        calling_ae=row.calling_ae,
        state=InstanceState(row.state),
        reason=row.reason,
        patient_name=row.patient_name,
        accession_number=row.accession_number,
        study_date=row.study_date,
        study_description=row.study_description,
        modality=row.modality,
        body_part_examined=row.body_part_examined,
        series_description=row.series_description,
        series_number=row.series_number,
        image_type=row.image_type,
        instance_number=row.instance_number,
        image_position=_position(row.image_position),
        image_orientation=_orientation(row.image_orientation),
        rows=row.rows,
        columns=row.columns,
    )


def series_instances(
    session_factory: sessionmaker[Session], series_instance_uid: str
) -> list[InstanceRecord]:
    """Every recorded instance of one series (unordered; see :mod:`triage_node.series`)."""
    _check_uid(series_instance_uid, "series_instance_uid")
    stmt = _instance_select().where(_SERIES.c.series_instance_uid == series_instance_uid)
    with _transaction(session_factory, "read a series", read_only=True) as session:
        return [_record_of(row) for row in session.execute(stmt)]


def mark_release_hint(
    session_factory: sessionmaker[Session], series_instance_uids: Collection[str],
    at: dt.datetime,
) -> None:
    """An association that delivered these series was released at ``at``.

    Series assembly treats a released series as complete after a short settle time instead
    of the full ``stable_seconds``.
    """
    at = _check_aware(at, "at")
    if not series_instance_uids:
        return
    stmt = (
        sa.update(_SERIES)
        .where(_SERIES.c.series_instance_uid.in_(sorted(series_instance_uids)))
        .values(release_hint_at=at)
    )
    with _transaction(session_factory, "record a release hint") as session:
        session.execute(stmt)


def due_series(
    session_factory: sessionmaker[Session], *, now: dt.datetime, stable_seconds: float,
    settle_seconds: float,
) -> list[tuple[str, dt.datetime]]:
    """Receiving series that are complete by now: quiet for ``stable_seconds``, or released
    (after their last instance) at least ``settle_seconds`` ago. Oldest first, each with
    its ``last_received_at`` (pass it to :func:`complete_series`)."""
    now = _check_aware(now, "now")
    s = _SERIES.c
    quiet = s.last_received_at <= now - dt.timedelta(seconds=stable_seconds)
    released = sa.and_(
        s.release_hint_at.is_not(None),
        s.release_hint_at >= s.last_received_at,
        s.release_hint_at <= now - dt.timedelta(seconds=settle_seconds),
    )
    stmt = (
        sa.select(s.series_instance_uid, s.last_received_at)
        .where(s.state == SeriesState.RECEIVING.value, sa.or_(quiet, released))
        .order_by(s.last_received_at)
    )
    with _transaction(session_factory, "find complete series", read_only=True) as session:
        return [(row[0], row[1]) for row in session.execute(stmt)]


def complete_series(
    session_factory: sessionmaker[Session], series_instance_uid: str, *,
    state: SeriesState, reason: str | None, at: dt.datetime, last_received_at: dt.datetime,
) -> bool:
    """Move a receiving series to ``state`` - only if nothing arrived since the decision.

    ``last_received_at`` is the value the decision was based on: a late slice changes it
    (and reopens the series), so the update is skipped and False returned.
    """
    at = _check_aware(at, "at")
    s = _SERIES.c
    stmt = (
        sa.update(_SERIES)
        .where(
            s.series_instance_uid == series_instance_uid,
            s.state == SeriesState.RECEIVING.value,
            s.last_received_at == last_received_at,
        )
        .values(state=state.value, reason=reason, completed_at=at)
    )
    with _transaction(session_factory, "complete a series") as session:
        result = cast(sa.CursorResult[Any], session.execute(stmt))
        return bool(result.rowcount)


def list_events(
    session_factory: sessionmaker[Session],
    *,
    since: dt.datetime | None = None,
    kinds: Iterable[EventKind] | None = None,
    limit: int | None = None,
    series_instance_uid: str | None = None,
) -> list[EventRecord]:
    """Audit events in time order.

    Parameters
    ----------
    session_factory : sqlalchemy.orm.sessionmaker
        From :func:`triage_node.store.db.make_session_factory`.
    since : datetime, optional
        Only events at or after this timezone-aware time.
    kinds : iterable of EventKind, optional
        Only events of these kinds (none at all for an empty iterable); all when ``None``.
    limit : int, optional
        At most this many (the oldest matching ones); all when ``None``.
    series_instance_uid : str, optional
        Only events about this series.

    Returns
    -------
    list of EventRecord
        Oldest first (ties in recording order), ``at`` in UTC.

    Raises
    ------
    DatabaseError
        If the database is unreachable.
    """
    _check_limit(limit)
    e = _EVENT.c
    stmt = sa.select(_EVENT).order_by(e.at, e.id).limit(limit)
    if since is not None:
        stmt = stmt.where(e.at >= _check_aware(since, "since"))
    if kinds is not None:
        if isinstance(kinds, str):
            raise TypeError("kinds must be an iterable of EventKind, not a single str")
        stmt = stmt.where(e.kind.in_(sorted({EventKind(k).value for k in kinds})))
    if series_instance_uid is not None:
        _check_uid(series_instance_uid, "series_instance_uid")
        stmt = stmt.where(e.series_instance_uid == series_instance_uid)
    with _transaction(session_factory, "list events", read_only=True) as session:
        rows = session.execute(stmt).all()
    return [
        EventRecord(
            kind=EventKind(row.kind),
            at=row.at,
            actor=row.actor,
            peer=row.peer,
            outcome=row.outcome,
            detail=row.detail,
            study_instance_uid=row.study_instance_uid,
            series_instance_uid=row.series_instance_uid,
            sop_instance_uid=row.sop_instance_uid,
        )
        for row in rows
    ]


def count_instances(
    session_factory: sessionmaker[Session], series_instance_uid: str | None = None
) -> int:
    """Number of recorded instances, in all series or in one.

    Parameters
    ----------
    session_factory : sqlalchemy.orm.sessionmaker
        From :func:`triage_node.store.db.make_session_factory`.
    series_instance_uid : str, optional
        Count only this series' instances (0 for an unknown series).

    Returns
    -------
    int

    Raises
    ------
    DatabaseError
        If the database is unreachable.
    """
    _check_uid(series_instance_uid, "series_instance_uid", optional=True)
    stmt = sa.select(sa.func.count()).select_from(_INSTANCE)
    if series_instance_uid is not None:
        stmt = stmt.join(_SERIES, _SERIES.c.id == _INSTANCE.c.series_fk).where(
            _SERIES.c.series_instance_uid == series_instance_uid
        )
    with _transaction(session_factory, "count instances", read_only=True) as session:
        return int(session.execute(stmt).scalar_one())


def store_result(session_factory: sessionmaker[Session], result: SeriesResult) -> SeriesState:
    """Store (or replace) a series' result; a queued/processing series becomes done.

    Idempotent: storing the same series again replaces the row. A series reopened by a late
    slice meanwhile keeps its state (receiving): its result will be recomputed.

    Returns
    -------
    SeriesState
        The series' state afterwards.
    """
    _check_uid(result.series_instance_uid, "series_instance_uid")
    s, r = _SERIES.c, _RESULT.c
    now = utcnow()
    with _transaction(session_factory, "store a series result") as session:
        row = session.execute(
            sa.select(s.id, s.state).where(s.series_instance_uid == result.series_instance_uid)
        ).one_or_none()
        if row is None:
            raise ValueError(f"unknown series {result.series_instance_uid!r}")
        series_id, state = row
        session.execute(sa.delete(_RESULT).where(r.series_fk == series_id))
        session.execute(
            sa.insert(_RESULT).values(
                series_fk=series_id,
                probabilities=dict(result.probabilities),
                slices=[[uid, pos, list(p)] for uid, pos, p in result.slices],
                key_sop_instance_uid=result.key_sop_instance_uid,
                flagged=result.flagged,
                threshold=result.threshold,
                model_name=result.model_name,
                model_version=result.model_version,
                model_sha256=result.model_sha256,
                inference_started_at=result.inference_started_at,
                inference_done_at=result.inference_done_at,
                stored_at=now,
            )
        )
        if state in (SeriesState.QUEUED, SeriesState.PROCESSING):
            session.execute(
                sa.update(_SERIES).where(s.id == series_id).values(state=SeriesState.DONE.value)
            )
            return SeriesState.DONE
        return SeriesState(state)


def get_result(
    session_factory: sessionmaker[Session], series_instance_uid: str
) -> SeriesResult | None:
    """The stored result of a series, or None."""
    _check_uid(series_instance_uid, "series_instance_uid")
    s, r = _SERIES.c, _RESULT.c
    stmt = (
        sa.select(_RESULT)
        .select_from(_RESULT.join(_SERIES, s.id == r.series_fk))
        .where(s.series_instance_uid == series_instance_uid)
    )
    with _transaction(session_factory, "read a series result", read_only=True) as session:
        row = session.execute(stmt).one_or_none()
    if row is None:
        return None
    return SeriesResult(
        series_instance_uid=series_instance_uid,
        probabilities={k: float(v) for k, v in row.probabilities.items()},
        slices=tuple((str(u), float(p), tuple(float(x) for x in probs))
                     for u, p, probs in row.slices),
        key_sop_instance_uid=row.key_sop_instance_uid,
        flagged=bool(row.flagged),
        threshold=float(row.threshold),
        model_name=row.model_name,
        model_version=row.model_version,
        model_sha256=row.model_sha256,
        inference_started_at=row.inference_started_at,
        inference_done_at=row.inference_done_at,
        stored_at=row.stored_at,
    )


def claim_series(session_factory: sessionmaker[Session], series_instance_uid: str) -> bool:
    """Mark a queued series as processing; False if it is not queued (any more)."""
    s = _SERIES.c
    stmt = (
        sa.update(_SERIES)
        .where(s.series_instance_uid == series_instance_uid,
               s.state.in_([SeriesState.QUEUED.value, SeriesState.PROCESSING.value]))
        .values(state=SeriesState.PROCESSING.value)
    )
    with _transaction(session_factory, "claim a series") as session:
        result = cast(sa.CursorResult[Any], session.execute(stmt))
        return bool(result.rowcount)


def series_in_states(session_factory: sessionmaker[Session], states: Collection[str], *,
                     decided_before: dt.datetime | None = None) -> list[str]:
    """Series Instance UIDs of the series in any of ``states``, oldest activity first;
    with ``decided_before``, only those whose completion was decided before that time."""
    s = _SERIES.c
    stmt = (sa.select(s.series_instance_uid).where(s.state.in_(sorted(states)))
            .order_by(s.last_received_at))
    if decided_before is not None:
        stmt = stmt.where(s.completed_at < _check_aware(decided_before, "decided_before"))
    with _transaction(session_factory, "list series by state", read_only=True) as session:
        return list(session.execute(stmt).scalars())


def fail_series(session_factory: sessionmaker[Session], series_instance_uid: str,
                reason: str) -> bool:
    """Mark a queued or processing series ``failed`` with ``reason``; False if it is in
    another state (reopened by a late slice, or already done)."""
    _check_uid(series_instance_uid, "series_instance_uid")
    if not isinstance(reason, str) or not reason:
        raise ValueError(f"reason must be a non-empty string, got {reason!r}")
    s = _SERIES.c
    stmt = (
        sa.update(_SERIES)
        .where(s.series_instance_uid == series_instance_uid,
               s.state.in_([SeriesState.QUEUED.value, SeriesState.PROCESSING.value]))
        .values(state=SeriesState.FAILED.value, reason=reason)
    )
    with _transaction(session_factory, "fail a series") as session:
        result = cast(sa.CursorResult[Any], session.execute(stmt))
        return bool(result.rowcount)
